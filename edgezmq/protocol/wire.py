"""Data-plane message format: encode and decode activation messages (pure, no I/O).

One ZeroMQ multipart message per microbatch::

    frame 0      msgpack map (the header)
                 {v: 1, kind: "act"|"result"|"error", run: str, seq: int, stage: int,
                  tensors: [{dtype: "float32", shape: [8, 197, 384], enc: "raw"}, ...],
                  t: [[stage, t_recv, t_start, t_end, t_send], ...],
                  error: {code: str, message: str},       # kind == "error" only
                  session: str,                           # optional: the submitting client's
                  gen: {op, ids, pos, lens, max_len}}     # optional: a decoder's stateful step

    frame 1..n   the buffers of each tensor, in header order: one raw C-contiguous buffer
                 (enc raw, f16, bf16), or payload then scales (enc int8, int4; codecs.py)

Buffers at or above ``COPY_THRESHOLD`` bytes are sent zero-copy; on receive the
arrays are ``np.frombuffer`` views on the frames' memory (no copy).  No pickle:
the header is msgpack of plain scalars, the tensors are raw bytes of a whitelisted
dtype.  Everything that arrives is validated; anything wrong raises ``WireError``
(a ``ValueError``), and nothing else.  See docs/wire.md.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TypeGuard

import msgpack
import numpy as np

from edgezmq.errors import EdgezmqError
from edgezmq.protocol import codecs
from edgezmq.protocol.sampling import MAX_TEMPERATURE, MAX_TOP_K
from edgezmq.terms import MAX_TENSORS

VERSION = 1
KINDS = ("act", "result", "error")
# dtypes that may cross the wire; anything else (object, void, strings) is refused
DTYPES = frozenset(
    {"float32", "float16", "float64", "int64", "int32", "int16", "int8", "uint8", "bool"}
)
ENCODINGS = tuple(codecs.WIRE_ENCODINGS)  # the header's `enc` (docs/wire.md, Encodings)

COPY_THRESHOLD = 512 * 1024  # measured: below this, copying beats zero-copy tracking (bench/transport.py)
MAX_HEADER_BYTES = 64 * 1024
MAX_NDIM = 8
MAX_TIMESTAMPS = 256  # one entry per stage hop; bounds header growth along a long pipeline
MAX_TENSOR_BYTES = 512 * 1024 * 1024  # per tensor; sockets also cap whole messages (MAXMSGSIZE)
MAX_TEXT = 4096  # run ids, error messages
MAX_SESSION = 64  # a client session id: what tells one client's results from another's
# generation (docs/generate.md): sequence ids and token positions in a `gen` header
GEN_OPS = ("step", "release")
# what a decoder's last stage returns for a step's rows: each row's next-token logits (absent:
# the default, (rows, vocab) float32), or the token it picks from them, (rows,) int64:
# `argmax` (greedy) or `sample` (at the client's draws; edgezmq.protocol.sampling): 8 bytes a
# row, not 4 x vocab
GEN_PICKS = ("argmax", "sample")
GEN_TOKEN_DTYPE = np.dtype(np.int64)  # a picked token as it travels (torch.argmax's dtype)
GEN_FIELDS_ORDER = ("op", "ids", "pos", "lens", "max_len", "pick", "u", "temperature", "top_k")
GEN_FIELDS = frozenset(GEN_FIELDS_ORDER)
MAX_SEQUENCE_ID = 2**31 - 1
MAX_POSITION = 2**31 - 1
MAX_GEN_ROWS = 1024  # rows of one gen message (msgpack's array limit below; at its largest ids the header stays under MAX_HEADER_BYTES, tested)


def gen_out_bytes(rows: int, logits_bytes: int, pick: str | None) -> int:
    """Bytes of what a decoder's last stage sends for a step of `rows` rows: their logits
    (`logits_bytes`: rows x vocab x 4), or with a `pick` one token each."""
    return rows * GEN_TOKEN_DTYPE.itemsize if pick is not None else logits_bytes


class WireError(EdgezmqError, ValueError):
    """A message that does not follow the wire format; ``code`` names the failed check."""

    def __init__(self, code: str, message: str, seq: int | None = None, session: str | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.seq = seq  # the message's seq when the header was readable, for error replies
        self.session = session  # ... and its client session, so that the error reaches that client


@dataclass(frozen=True)
class HeaderField:
    """One field of frame 0 (docs/wire.md's table is generated from ``HEADER``)."""

    name: str
    type: str
    required: bool
    doc: str


HEADER: tuple[HeaderField, ...] = (
    HeaderField("v", "int", True, f"protocol version, {VERSION}"),
    HeaderField("kind", "str", True, "`act` (activations, between stages), `result` (the last stage's "
                "output), `error` (in place of either)"),
    HeaderField("run", "str", True, f"deployment id, at most {MAX_TEXT} bytes; stages refuse other runs "
                "(`wrong_run`)"),
    HeaderField("seq", "int", True, "microbatch number, -1 .. 2^63-1 (-1: unknown, in errors about "
                "unreadable messages); results are reordered and deduplicated by it"),
    HeaderField("stage", "int", True, "stage that produced it, -1 .. 2^63-1 (-1: the client); a stage "
                "accepts messages of the stage before it only"),
    HeaderField("tensors", "[{dtype, shape, enc, scale}]", True, f"one entry per tensor, in order, at most "
                f"{MAX_TENSORS}; `dtype` (required) one of the dtypes below (a non-raw `enc`: `float32`, the "
                f"decoded tensor's), `shape` (required) a list of at most {MAX_NDIM} ints >= 0 (the decoded "
                f"tensor's), `enc` (optional, default `raw`) one of the encodings below, `scale` (`int8`/`int4` "
                f"only, required there) `token` or `channel`; each tensor takes 1 buffer frame (`raw`, `f16`, "
                f"`bf16`) or 2 (`int8`, `int4`: payload, then scales)"),
    HeaderField("t", "[[stage, t_recv, t_start, t_end, t_send], ...]", False, f"wall-clock seconds per stage "
                f"hop, at most {MAX_TIMESTAMPS} entries (default []); the client adds [-1, t_submit] first"),
    HeaderField("error", "{code: str, message: str}", False, "required when `kind` is `error`, absent "
                "otherwise"),
    HeaderField("session", "str", False, f"the submitting client's session id, 1..{MAX_SESSION} characters, "
                "random per client; every stage copies it onto what it sends for that message (`error` "
                "messages included), so a client takes only its own results and drops (and counts) the "
                "rest: run and seq alone do not tell a client from the one before it on the same address"),
    HeaderField("gen", "{op, ids, pos, lens, max_len, pick, u, temperature, top_k}", False, f"a decoder's generation step (docs/generate.md); "
                f"requires `session` (each stage keys its KV caches by session and sequence id, so no client "
                f"reaches another's). `op`: `step` (row i adds `lens[i]` tokens to sequence `ids[i]` after its "
                f"first `pos[i]`: a resent step re-runs from `pos[i]`) or `release` (drop "
                f"the sequences' caches; no tensors). `ids`: 1..{MAX_GEN_ROWS} distinct ints in "
                f"0..{MAX_SEQUENCE_ID}, one per batch row; `pos` (step): ints in 0..{MAX_POSITION}; `lens` "
                f"(step): ints >= 1, at most the tensors' token dimension (rows are right-padded); `max_len` "
                f"(step, required where `pos` is 0): the sequence's most tokens ever, 1..{MAX_POSITION}, "
                f"what the stage reserves cache for; `pick` (step, optional): what the last stage returns, "
                f"each row's next-token logits (rows, vocab) float32 when absent, else each row's token id "
                f"(rows,) int64: `argmax` the most likely, the first of equal maxima; `sample` drawn at `u` "
                f"(one float in [0, 1) per id) from softmax(logits / `temperature`, in (0, "
                f"{MAX_TEMPERATURE:g}]) over the `top_k` most likely (0..{MAX_TOP_K}, 0: all; "
                f"edgezmq.protocol.sampling); `u`, `temperature`, `top_k` go with `sample` only"),
)

# code -> when: what a stage refuses a data message with (it sends an `error` message downstream
# with this code in the message's place); docs/wire.md's table is generated from it
ERRORS: dict[str, str] = {
    "missing_frames": "fewer buffer frames than `tensors` entries (or an empty message)",
    "extra_frames": "more buffer frames than `tensors` entries",
    "bad_header": "frame 0 is not a msgpack map (or holds binary fields, or too long a structure)",
    "bad_version": f"`v` is not {VERSION}",
    "bad_kind": "`kind` unknown; a stage given a `result`; an `error` sent by a client (stage -1): "
                "errors come from stages only",
    "bad_field": "`run`/`seq`/`stage`/`tensors`/`t`/`error` of the wrong type or range, or an error "
                 "message without `error`",
    "bad_encoding": "a tensor's `enc` is not one of the encodings (docs/wire.md, Encodings); a non-raw `enc` on a tensor whose "
                    "`dtype` is not `float32`; `int8`/`int4` without a known `scale` or with a negative or "
                    "non-finite scale",
    "bad_dtype": "a tensor's dtype not allowed on the wire, or not the dtype the stage's first unit takes",
    "bad_shape": "a shape that is not a list of ints, or not what the stage's first unit takes (every "
                 "dimension but the batch), a batch outside 1..microbatch, tensors disagreeing on the batch",
    "bad_arity": "not as many tensors as the stage's first unit takes",
    "bad_length": "a buffer's length is not what its `enc`, `dtype` and `shape` make (raw: prod(shape) x "
                  "itemsize; the Encodings table)",
    "oversize": f"header over {MAX_HEADER_BYTES // 1024} KiB or a tensor declared over "
                f"{MAX_TENSOR_BYTES >> 20} MiB (the product of its non-zero dimensions x itemsize, decoded)",
    "wrong_run": "a message of another `run`; the error message carries the SENDER's run id, so that the "
                 "client of that run (not ours) can attribute it",
    "bad_stage": "an `act` message from a stage other than the previous one; an `error` from a stage not upstream",
    "compute_failed": "the shard's forward raised on this microbatch",
    "gen_state": "a `gen` step that does not continue a sequence this stage holds (its `pos` beyond the "
                 "tokens cached: a step was lost, or the cache was released or expired), that goes past the "
                 "sequence's `max_len` or the model's positions, a `gen` message to a stage that is not a "
                 "decoder's, or a whole-sequence message to a stage loaded `generation_only`",
    "cache_full": "a `gen` step starting sequences whose `max_len` does not fit the stage's KV-cache budget "
                  "beside the sequences it holds: nothing was changed; send it again once sequences are released",
    "bad_message": "a message the decoder failed on in a way it does not name (a decoder bug: the stage "
                   "refuses the message and keeps serving; its log holds the traceback)",
}


@dataclass
class Message:
    """One microbatch (or its error) travelling the pipeline."""

    kind: str
    run: str
    seq: int
    stage: int
    tensors: list[np.ndarray] = field(default_factory=list)
    t: list[list[Any]] = field(default_factory=list)
    error: dict[str, str] | None = None
    session: str | None = None
    gen: dict[str, Any] | None = None  # a decoder's step or release (the `gen` header field)

    def header(self, encoded: Sequence[codecs.Encoded | None] = ()) -> dict[str, Any]:
        """Frame 0; ``encoded[i]``, when given, is how tensor i travels (else raw)."""
        h: dict[str, Any] = {
            "v": VERSION,
            "kind": self.kind,
            "run": self.run,
            "seq": self.seq,
            "stage": self.stage,
            "tensors": [
                e.spec() if e is not None else {"dtype": a.dtype.name, "shape": list(a.shape), "enc": "raw"}
                for a, e in zip(self.tensors, _padded(encoded, len(self.tensors)))
            ],
            "t": self.t,
        }
        if self.error is not None:
            h["error"] = self.error
        if self.session is not None:
            h["session"] = self.session
        if self.gen is not None:
            h["gen"] = self.gen
        return h


def error_message(
    run: str, seq: int, stage: int, code: str, message: str, t: list | None = None,
    session: str | None = None,
) -> Message:
    """An ``error`` message: travels downstream to the client (of `session`) in place of a result."""
    return Message(
        kind="error",
        run=run,
        seq=seq,
        stage=stage,
        t=list(t or []),
        error={"code": str(code)[:MAX_TEXT], "message": str(message)[:MAX_TEXT]},
        session=session,
    )


def _padded(encoded: Sequence[codecs.Encoded | None], n: int) -> list[codecs.Encoded | None]:
    if len(encoded) > n:
        raise ValueError(f"{len(encoded)} encoded tensors for a message of {n} tensors")
    return [*encoded, *[None] * (n - len(encoded))]


def encode(msg: Message, encoded: Sequence[codecs.Encoded | None] = ()) -> list[Any]:
    """Message -> frames: [header bytes, buffer, ...].  Refuses what it cannot send as-is.

    ``encoded[i]`` (codecs.encode of ``msg.tensors[i]``), when given, is sent in the tensor's
    place; the others go raw.
    """
    if msg.kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {msg.kind!r}")
    if len(msg.tensors) > MAX_TENSORS:
        raise ValueError(f"at most {MAX_TENSORS} tensors per message, got {len(msg.tensors)}")
    frames: list[Any] = [b""]
    encs = _padded(encoded, len(msg.tensors))
    for i, (a, e) in enumerate(zip(msg.tensors, encs)):
        if e is not None:
            if e.enc not in ENCODINGS or not all(b.flags.c_contiguous for b in e.buffers):
                raise ValueError(f"tensor {i}: an encoded tensor needs a known enc and contiguous buffers")
            frames.extend(e.buffers)
            continue
        if not isinstance(a, np.ndarray):
            raise TypeError(f"tensor {i}: expected numpy.ndarray, got {type(a).__name__}")
        if a.dtype.name not in DTYPES:
            raise TypeError(f"tensor {i}: dtype {a.dtype.name} not allowed on the wire")
        if not a.flags.c_contiguous:
            raise ValueError(f"tensor {i}: buffer must be C-contiguous (shape {a.shape})")
        frames.append(a)  # small ones are copied once, by zmq, when sent (copy_flags)
    frames[0] = msgpack.packb(msg.header(encs), use_bin_type=True)
    return frames


def copy_flags(frames: Sequence[Any]) -> list[bool]:
    """Per frame: send by copy (small) or zero-copy (large)."""
    return [_nbytes(f) < COPY_THRESHOLD for f in frames]


def _nbytes(buf: Any) -> int:
    if isinstance(buf, np.ndarray):
        return int(buf.nbytes)
    return memoryview(buf).nbytes


def _buffer(frame: Any) -> memoryview:
    """The bytes of a received frame without copying (zmq.Frame, bytes or memoryview)."""
    buf = getattr(frame, "buffer", None)  # zmq.Frame
    return memoryview(buf if buf is not None else frame)


def decode_header(raw: Any) -> dict[str, Any]:
    """Parse and validate frame 0; raises WireError."""
    mv = _buffer(raw)
    if mv.nbytes > MAX_HEADER_BYTES:
        raise WireError("oversize", f"header is {mv.nbytes} bytes, limit {MAX_HEADER_BYTES}")
    try:
        h = msgpack.unpackb(
            mv,
            raw=False,
            strict_map_key=False,
            max_str_len=MAX_TEXT,
            max_bin_len=0,
            max_array_len=max(MAX_TIMESTAMPS, MAX_TENSORS, MAX_NDIM, MAX_GEN_ROWS, 16),
            max_map_len=32,
        )
    except Exception as e:  # msgpack raises several unrelated types on garbage
        raise WireError("bad_header", f"frame 0 is not a msgpack header ({type(e).__name__}: {e})") from None
    if not isinstance(h, dict):
        raise WireError("bad_header", f"header must be a map, got {type(h).__name__}")
    seq = h.get("seq") if isinstance(h.get("seq"), int) else None
    session = h.get("session")
    if session is not None and not (isinstance(session, str) and 1 <= len(session) <= MAX_SESSION):
        raise WireError("bad_field", f"session must be a string of 1..{MAX_SESSION} characters", seq)
    try:
        return _check_header(h, seq)
    except WireError as e:  # its error message must reach the client that sent it
        e.session = session
        raise


def _check_header(h: dict[str, Any], seq: int | None) -> dict[str, Any]:
    if h.get("v") != VERSION:
        raise WireError("bad_version", f"expected version {VERSION}, got {h.get('v')!r}", seq)
    if h.get("kind") not in KINDS:
        raise WireError("bad_kind", f"kind must be one of {KINDS}, got {h.get('kind')!r}", seq)
    if not isinstance(h.get("run"), str):
        raise WireError("bad_field", f"run must be a string, got {type(h.get('run')).__name__}", seq)
    for key in ("seq", "stage"):
        v = h.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or not -1 <= v < 2**63:
            raise WireError("bad_field", f"{key} must be an integer >= -1, got {v!r}", seq)
    tensors = h.get("tensors")
    if not isinstance(tensors, list) or len(tensors) > MAX_TENSORS:
        raise WireError("bad_field", f"tensors must be a list of at most {MAX_TENSORS} entries", seq)
    for i, spec in enumerate(tensors):
        _check_spec(i, spec, seq)
    t = h.get("t", [])
    if not isinstance(t, list) or not all(isinstance(e, list) and len(e) <= 16 for e in t):
        raise WireError("bad_field", "t must be a list of timestamp lists", seq)
    if "gen" in h:
        _check_gen(h["gen"], seq, has_session="session" in h)
    if h["kind"] == "error":
        err = h.get("error")
        if not (isinstance(err, dict) and isinstance(err.get("code"), str)
                and isinstance(err.get("message"), str)):
            raise WireError("bad_field", "an error message needs error: {code: str, message: str}", seq)
    return h


def _ints(v: Any, lo: int, hi: int) -> bool:
    return isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool) and lo <= x <= hi for x in v)


def _check_gen(g: Any, seq: int | None, has_session: bool) -> None:
    """The `gen` field's own consistency; whether it fits the tensors and the stage's caches is the
    stage's check (gen_state, cache_full)."""
    if not isinstance(g, dict) or not set(g) <= GEN_FIELDS:
        raise WireError("bad_field", f"gen must be a map of {', '.join(GEN_FIELDS_ORDER)}", seq)
    if not has_session:
        raise WireError("bad_field", "a gen message needs a session (caches are keyed by it)", seq)
    op, ids = g.get("op"), g.get("ids")
    if not isinstance(op, str) or op not in GEN_OPS:
        raise WireError("bad_field", f"gen.op must be one of {GEN_OPS}, got {op!r}", seq)
    if not (isinstance(ids, list) and _ints(ids, 0, MAX_SEQUENCE_ID) and 1 <= len(ids) <= MAX_GEN_ROWS
            and len(set(ids)) == len(ids)):
        raise WireError("bad_field", f"gen.ids must be 1..{MAX_GEN_ROWS} distinct ints in 0..{MAX_SEQUENCE_ID}", seq)
    if op == "release":
        if set(g) - {"op", "ids"}:
            raise WireError("bad_field", "a gen release carries op and ids only", seq)
        return
    n = len(ids)
    for key, lo in (("pos", 0), ("lens", 1)):
        if not (_ints(g.get(key), lo, MAX_POSITION) and len(g[key]) == n):
            raise WireError("bad_field", f"gen.{key} must be {n} ints in {lo}..{MAX_POSITION}, one per id", seq)
    max_len = g.get("max_len")
    if max_len is not None and not (_ints(max_len, 1, MAX_POSITION) and len(max_len) == n):
        raise WireError("bad_field", f"gen.max_len must be {n} ints in 1..{MAX_POSITION}, one per id", seq)
    if max_len is None and 0 in g["pos"]:
        raise WireError("bad_field", "gen.max_len is required when a sequence starts (pos 0)", seq)
    pick = g.get("pick")
    if pick is not None and not (isinstance(pick, str) and pick in GEN_PICKS):
        raise WireError("bad_field", f"gen.pick must be one of {GEN_PICKS} (absent: logits), got {pick!r}", seq)
    if pick != "sample":
        if set(g) & {"u", "temperature", "top_k"}:
            raise WireError("bad_field", "gen.u, gen.temperature and gen.top_k go with pick sample only", seq)
        return
    u, temp, k = g.get("u"), g.get("temperature"), g.get("top_k")
    if not (isinstance(u, list) and len(u) == n and all(_number(x) and 0 <= x < 1 for x in u)):
        raise WireError("bad_field", f"gen.u must be {n} numbers in [0, 1), one per id", seq)
    if not (_number(temp) and 0 < temp <= MAX_TEMPERATURE):  # NaN fails every comparison
        raise WireError("bad_field", f"gen.temperature must be a number in (0, {MAX_TEMPERATURE:g}]", seq)
    if not _ints([k], 0, MAX_TOP_K):
        raise WireError("bad_field", f"gen.top_k must be an int in 0..{MAX_TOP_K}", seq)


def _number(x: Any) -> TypeGuard[int | float]:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check_spec(i: int, spec: Any, seq: int | None) -> None:
    if not isinstance(spec, dict):
        raise WireError("bad_field", f"tensors[{i}] must be a map", seq)
    enc, dtype = spec.get("enc", "raw"), spec.get("dtype")
    # isinstance first: `x in a_set` hashes x, and a list or a map is unhashable (TypeError)
    if not isinstance(enc, str) or enc not in ENCODINGS:
        raise WireError("bad_encoding", f"tensors[{i}].enc: expected one of {ENCODINGS}, got {spec.get('enc')!r}", seq)
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise WireError("bad_dtype", f"tensors[{i}].dtype: {spec.get('dtype')!r} is not one of {sorted(DTYPES)}", seq)
    shape = spec.get("shape")
    if (not isinstance(shape, list) or len(shape) > MAX_NDIM
            or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**31 for d in shape)):
        raise WireError("bad_shape", f"tensors[{i}].shape: expected a list of at most {MAX_NDIM} non-negative ints, got {shape!r}", seq)
    bad = codecs.check_spec(spec)
    if bad is not None:
        raise WireError(bad[0], f"tensors[{i}]: {bad[1]}", seq)
    # checked before anything is allocated: the product of the non-zero dimensions, so that
    # a tensor of 0 elements cannot declare 2^217 scales, nor a shape numpy cannot even make
    nbytes = math.prod(d for d in shape if d) * np.dtype(spec["dtype"]).itemsize
    if nbytes > MAX_TENSOR_BYTES:
        raise WireError("oversize", f"tensors[{i}] declares {nbytes} bytes, limit {MAX_TENSOR_BYTES}", seq)


def decode(frames: Sequence[Any]) -> Message:
    """Frames -> Message.  Raw tensors are zero-copy read-only views on the frames; encoded
    ones are decoded into new float32 arrays (codecs.decode).

    Raises WireError on anything malformed (frame count, header, buffer length, scales).
    """
    if len(frames) < 1:
        raise WireError("missing_frames", "empty message")
    h = decode_header(frames[0])
    seq, session = h["seq"], h.get("session")
    specs = h["tensors"]
    want_frames = sum(codecs.WIRE_ENCODINGS[s.get("enc", "raw")] for s in specs)
    if len(frames) != 1 + want_frames:
        raise WireError(
            "missing_frames" if len(frames) < 1 + want_frames else "extra_frames",
            f"header declares {len(specs)} tensors in {want_frames} buffer frames, message has "
            f"{len(frames) - 1} buffer frames",
            seq, session,
        )
    tensors = []
    k = 1
    for i, spec in enumerate(specs):
        lengths = codecs.frame_lengths(spec)
        bufs = [_buffer(f) for f in frames[k:k + len(lengths)]]
        k += len(lengths)
        for j, (mv, want) in enumerate(zip(bufs, lengths)):
            if mv.nbytes != want:
                what = "" if len(lengths) == 1 else (" payload" if j == 0 else " scales")
                raise WireError(
                    "bad_length",
                    f"tensors[{i}]{what}: shape {spec['shape']} {spec['dtype']} enc {spec.get('enc', 'raw')} "
                    f"needs {want} bytes, frame has {mv.nbytes}",
                    seq, session,
                )
        try:
            tensors.append(codecs.decode(spec, bufs))
        except codecs.CodecError as e:
            raise WireError(e.code, f"tensors[{i}]: {e.message}", seq, session) from None
    return Message(
        kind=h["kind"], run=h["run"], seq=seq, stage=h["stage"], tensors=tensors,
        t=h.get("t", []), error=h.get("error"), session=session, gen=h.get("gen"),
    )


def check_tensors(
    tensors: Sequence[np.ndarray],
    expected: Sequence[tuple[Sequence[int], str]],
    *,
    max_batch: int | None = None,
    seq: int | None = None,
) -> None:
    """Check received tensors against what a stage expects: count, dtype, and shape.

    The leading (batch) dimension may be smaller than the microbatch (a short last
    batch) but not zero or larger; every other dimension must match exactly.
    """
    if len(tensors) != len(expected):
        raise WireError("bad_arity", f"expected {len(expected)} tensors, got {len(tensors)}", seq)
    for i, (a, (shape, dtype)) in enumerate(zip(tensors, expected)):
        if a.dtype.name != dtype:
            raise WireError("bad_dtype", f"tensors[{i}]: expected {dtype}, got {a.dtype.name}", seq)
        shape = tuple(shape)
        if a.ndim != len(shape) or tuple(a.shape[1:]) != shape[1:]:
            raise WireError("bad_shape", f"tensors[{i}]: expected shape (B, {', '.join(map(str, shape[1:]))}), got {tuple(a.shape)}", seq)
        limit = max_batch if max_batch is not None else shape[0]
        if not 1 <= a.shape[0] <= limit:
            raise WireError("bad_shape", f"tensors[{i}]: batch {a.shape[0]} outside 1..{limit}", seq)
