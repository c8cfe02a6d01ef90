"""Activation encodings on the wire: float32 tensors as raw, f16, bf16, int8 or int4 (pure numpy).

A *codec* is what a sender is configured with (``int8-ch-aciq``); it writes one wire
encoding (the header's ``enc``: ``raw`` ``f16`` ``bf16`` ``int8`` ``int4``) plus, for the
integer ones, the ``scale`` layout (``token``: one scale per row of the last dimension,
``channel``: one per index of the last dimension).  Clipping (ACIQ) is the sender's
choice and invisible to the receiver.  Byte layouts: docs/wire.md; the policy that
picks a codec at run time: docs/compression.md.

    >>> enc = encode("int8", a)                 # Encoded: header fields + buffers to send
    >>> b = decode(enc.spec(), enc.buffers)     # what the receiver gets (a new float32 array)
    >>> b = roundtrip("int8", a)                # the same, in one call
    >>> c = measure_cost("int8")                # CPU seconds per MB of float32, both ways

NaN/Inf: ``f16``/``bf16`` convert as IEEE does (round to nearest even; f16 overflow
becomes +-inf, NaN stays NaN); ``int8``/``int4`` refuse a tensor holding NaN or +-inf
(``CodecError``): a stage then sends that tensor ``raw``, so a non-finite activation
reaches the next stage exactly as in an uncompressed pipeline, never clamped.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgezmq import terms
from edgezmq.errors import EdgezmqError

RAW = "raw"
# wire encodings (the header's `enc`) -> buffer frames per tensor
WIRE_ENCODINGS: dict[str, int] = {"raw": 1, "f16": 1, "bf16": 1, "int8": 2, "int4": 2}
QUANTIZED = ("int8", "int4")
SCALES = ("token", "channel")  # int8/int4: what one scale covers
ENCODED_DTYPE = "float32"  # the only dtype a non-raw encoding carries (the compute dtype)
QMAX = {"int8": 127, "int4": 7}  # symmetric: -QMAX..QMAX (-128 / -8 never written)
# ACIQ (Banner et al., NeurIPS 2019, "Post training 4-bit quantization ..."): the MSE-optimal
# clipping value of a Laplace(b) tensor at M bits is ALPHA[M] * b (the factors QuantPipe uses,
# PipeEdge src/pipeedge/quantization/clamp_op.py).  QuantPipe estimates b = sqrt(var / 2) about
# the mean; our quantizer is symmetric about 0, so b = mean(|x|) (the Laplace(0, b) estimate):
# a row of constant value is then never clipped to 0, as the variance estimate would do.
ACIQ_ALPHA = {8: 9.89, 4: 5.03}
BITS = {"raw": 32, "f16": 16, "bf16": 16, "int8": 8, "int4": 4}
MB = 1e6  # measure_cost's unit: a million bytes of float32 input


class CodecError(EdgezmqError, ValueError):
    """A tensor a codec cannot encode, or frames it cannot decode; ``code`` is a docs/wire.md error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Codec:
    """One configurable encoding: its name, what it writes on the wire, and how."""

    name: str
    enc: str  # the wire encoding
    scale: str | None = None  # int8/int4: token | channel
    clip: bool = False  # int8/int4: ACIQ clipping before quantizing

    @property
    def bits(self) -> int:
        return BITS[self.enc]

    @property
    def lossless(self) -> bool:
        return self.enc == RAW

    def describe(self) -> str:
        if self.enc == RAW:
            return "float32 as is (exact)"
        if self.enc in ("f16", "bf16"):
            return {"f16": "IEEE half", "bf16": "bfloat16 (float32's upper 16 bits)"}[self.enc] + \
                ", round to nearest even"
        per = "per token (row of the last dimension)" if self.scale == "token" else \
            "per channel (index of the last dimension)"
        return f"symmetric {self.enc}, scale {per}" + (", ACIQ clipping" if self.clip else "")


def _codecs() -> dict[str, Codec]:
    out = {n: Codec(n, n) for n in ("raw", "f16", "bf16")}
    for q in QUANTIZED:
        for scale, s in (("token", ""), ("channel", "-ch")):
            for clip, c in ((False, ""), (True, "-aciq")):
                out[f"{q}{s}{c}"] = Codec(f"{q}{s}{c}", q, scale, clip)
    return out


CODECS: dict[str, Codec] = _codecs()
NAMES: tuple[str, ...] = terms.ENCODINGS  # the planner reads them there (it imports no numpy)
assert set(NAMES) == set(CODECS), "terms.ENCODINGS and codecs.CODECS must name the same codecs"


def codec(name: str) -> Codec:
    """The codec called ``name``; ValueError naming the choices otherwise."""
    c = CODECS.get(name) if isinstance(name, str) else None
    if c is None:
        raise ValueError(f"unknown encoding {name!r}; expected one of {list(NAMES)}")
    return c


@dataclass(frozen=True)
class Encoded:
    """A tensor encoded for the wire: the header entry's fields and the buffer frames."""

    enc: str
    shape: tuple[int, ...]
    buffers: tuple[np.ndarray, ...]  # payload[, scales]: C-contiguous, sent as they are
    scale: str | None = None
    dtype: str = ENCODED_DTYPE

    def spec(self) -> dict[str, Any]:
        s: dict[str, Any] = {"dtype": self.dtype, "shape": list(self.shape), "enc": self.enc}
        if self.scale is not None:
            s["scale"] = self.scale
        return s

    @property
    def nbytes(self) -> int:
        return sum(int(b.nbytes) for b in self.buffers)


# ---------------------------------------------------------------- sizes


def groups(shape: Sequence[int], scale: str) -> int:
    """How many scales an int8/int4 tensor of ``shape`` carries (shape has >= 1 dimension)."""
    if scale == "token":
        return math.prod(shape[:-1])
    return int(shape[-1])


def payload_nbytes(enc: str, n: int) -> int:
    """Bytes of the payload frame for ``n`` elements."""
    if enc == "int4":
        return (n + 1) // 2
    return n * BITS[enc] // 8


def encoded_nbytes(name: str, shape: Sequence[int]) -> int:
    """Bytes on the wire (buffer frames, header excluded) of a float32 tensor of ``shape`` under codec ``name``."""
    c = codec(name)
    n = math.prod(shape)
    out = payload_nbytes(c.enc, n)
    if c.scale is not None:
        out += 4 * groups(shape, c.scale)
    return out


def ratio(name: str, shape: Sequence[int]) -> float:
    """Bytes on the wire relative to raw float32 (1.0 for raw; 0 elements: 1.0)."""
    n = math.prod(shape) * 4
    return encoded_nbytes(name, shape) / n if n else 1.0


# ---------------------------------------------------------------- encode


def encode(name: str, a: np.ndarray) -> Encoded:
    """Encode a float32 array with codec ``name``.

    Raises CodecError (``non_finite``) for int8/int4 and a tensor holding NaN or +-inf,
    ValueError/TypeError for what no codec takes (another dtype, 0-d for int8/int4).
    """
    c = codec(name)
    if not isinstance(a, np.ndarray):
        raise TypeError(f"expected numpy.ndarray, got {type(a).__name__}")
    if not a.flags.c_contiguous:  # (not ascontiguousarray: it makes a 0-d array 1-d)
        a = a.copy(order="C")
    if c.enc == RAW:
        return Encoded(RAW, tuple(a.shape), (a,), dtype=a.dtype.name)
    if a.dtype != np.float32:
        raise TypeError(f"encoding {name} takes float32 tensors, got {a.dtype.name}")
    shape = tuple(int(d) for d in a.shape)
    if c.enc == "f16":
        with np.errstate(over="ignore"):  # overflow -> inf is the documented behaviour
            return Encoded("f16", shape, (a.astype(np.float16),))
    if c.enc == "bf16":
        return Encoded("bf16", shape, (_to_bf16(a.reshape(-1)),))
    if a.ndim == 0:
        raise ValueError(f"encoding {name} needs a tensor of at least one dimension, got a scalar")
    assert c.scale is not None
    q, scales = _quantize(a, c.enc, c.scale, c.clip)
    payload = _pack4(q) if c.enc == "int4" else q
    return Encoded(c.enc, shape, (payload, scales), scale=c.scale)


def encode_all(rung: Sequence[str], tensors: Sequence[np.ndarray]) -> tuple[list[Encoded | None], int]:
    """A message's tensors encoded with a rung (one name for every tensor, or one per tensor):
    None where a tensor goes exact -- raw asked, not float32 (only float32 activations are
    compressed), a 0-d tensor for a scaled codec, or NaN/inf that int8/int4 refuse; the count
    of the last (fallbacks) with it."""
    out: list[Encoded | None] = []
    fallbacks = 0
    for i, a in enumerate(tensors):
        name = rung[i] if len(rung) > 1 else rung[0]
        if name == RAW or a.dtype != np.float32 or (a.ndim == 0 and codec(name).scale):
            out.append(None)
            continue
        try:
            out.append(encode(name, a))
        except CodecError:  # NaN/inf: the tensor goes exact
            fallbacks += 1
            out.append(None)
    return out, fallbacks


def _to_bf16(f: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits, round to nearest even; NaN stays a (quiet) NaN, inf stays inf."""
    u = f.view(np.uint32)
    t = u >> 16
    t &= 1
    t += 0x7FFF
    t += u  # wraps only for NaNs with all-ones mantissas: overwritten below
    t >>= 16
    out = t.astype(np.uint16)
    nan = np.isnan(f)
    if nan.any():
        out[nan] = ((u[nan] >> 16) | 0x0040).astype(np.uint16)
    return out


def _rows(a: np.ndarray, scale: str) -> tuple[np.ndarray, int]:
    """2-D view (rows, last dim) and the axis the scales vary along (0: per row, 1: per column)."""
    last = a.shape[-1]
    x = a.reshape(-1, last) if last else a.reshape(math.prod(a.shape[:-1]), 0)
    return x, (1 if scale == "token" else 0)


def _max_scale(qmax: int) -> np.float32:
    """The largest float32 scale s with qmax x s finite (in float32)."""
    s = np.float32(np.finfo(np.float32).max / np.float32(qmax))
    with np.errstate(over="ignore"):
        while not np.isfinite(np.float32(qmax) * s):
            s = np.nextafter(s, np.float32(0))
    return s


_MAX_SCALE = {q: _max_scale(m) for q, m in QMAX.items()}


def _quantize(a: np.ndarray, enc: str, scale: str, clip: bool) -> tuple[np.ndarray, np.ndarray]:
    qmax = QMAX[enc]
    x, axis = _rows(a, scale)
    n_scales = groups(a.shape, scale)
    if x.size == 0:
        return np.zeros(x.size, np.int8), np.zeros(n_scales, np.float32)
    # max and -min: two passes, no full-size |x| temporary; + 0 turns a -0.0 into 0.0
    amax = np.maximum(x.max(axis=axis), -x.min(axis=axis)) + np.float32(0)
    if not np.isfinite(amax).all():
        raise CodecError("non_finite", f"{enc} cannot encode NaN or +-inf (tensor of shape {a.shape})")
    if clip:
        b = np.abs(x).mean(axis=axis, dtype=np.float64).astype(np.float32)
        amax = np.minimum(amax, np.float32(ACIQ_ALPHA[BITS[enc]]) * b)
    # a scale rounded up could make qmax x scale overflow to inf near float32's max: cap it
    scales = np.minimum((amax / np.float32(qmax)).astype(np.float32), _MAX_SCALE[enc])
    with np.errstate(divide="ignore"):
        inv = np.where(amax > 0, np.float32(qmax) / amax, np.float32(0)).astype(np.float32)
    y = x * (inv[:, None] if axis == 1 else inv[None, :])
    np.rint(y, out=y)
    np.clip(y, -qmax, qmax, out=y)  # clipped tensors (ACIQ), and rounding at the edge
    return y.astype(np.int8).reshape(-1), scales


def _pack4(q: np.ndarray) -> np.ndarray:
    """int8 values in -8..7, two per byte: element 2k in the low nibble, 2k+1 in the high one."""
    u = q.view(np.uint8)
    if u.size % 2:
        u = np.append(u, np.uint8(0))
    lo = u[0::2] & 0x0F
    lo |= u[1::2] << 4
    return lo


# ---------------------------------------------------------------- decode

# byte -> its two signed nibbles (low, high): unpacking is one gather of 2-byte entries
_UNPACK4 = np.array([[((b & 15) ^ 8) - 8, ((b >> 4) ^ 8) - 8] for b in range(256)], dtype=np.int8)
_UNPACK4_PAIRS = _UNPACK4.view(np.uint16).reshape(256)  # take() on it is ~10x a fancy index of _UNPACK4


def check_spec(spec: dict[str, Any]) -> tuple[str, str] | None:
    """(error code, why) when a header entry's encoding fields are wrong (``enc`` known, ``shape``
    checked), else None: a non-raw encoding carries float32 only; int8/int4 need ``scale`` in
    SCALES and a shape of at least one dimension.
    """
    enc = spec.get("enc", RAW)
    if enc == RAW:
        return None
    if spec.get("dtype") != ENCODED_DTYPE:
        return "bad_encoding", f"enc {enc} carries {ENCODED_DTYPE} tensors only, got dtype {spec.get('dtype')!r}"
    if enc in QUANTIZED:
        s = spec.get("scale")
        if not isinstance(s, str) or s not in SCALES:
            return "bad_encoding", f"enc {enc} needs scale: one of {list(SCALES)}, got {s!r}"[:200]
        if not spec.get("shape"):
            return "bad_shape", f"enc {enc} needs a shape of at least one dimension"
    return None


def frame_lengths(spec: dict[str, Any]) -> list[int]:
    """The exact byte length of each buffer frame of a (checked) header entry."""
    enc, shape = spec.get("enc", RAW), spec["shape"]
    n = math.prod(shape)
    if enc == RAW:
        return [n * np.dtype(spec["dtype"]).itemsize]
    out = [payload_nbytes(enc, n)]
    if enc in QUANTIZED:
        out.append(4 * groups(shape, spec["scale"]))
    return out


def decode(spec: dict[str, Any], buffers: Sequence[Any]) -> np.ndarray:
    """Buffers of a checked header entry -> the float32 tensor (a new array; raw: a view, no copy).

    Lengths must already match ``frame_lengths`` (wire.decode checks them); raises
    CodecError ``bad_encoding`` for a negative or non-finite scale.
    """
    enc, shape = spec.get("enc", RAW), tuple(spec["shape"])
    if enc == RAW:
        return np.frombuffer(buffers[0], dtype=np.dtype(spec["dtype"])).reshape(shape)
    if enc == "f16":
        return np.frombuffer(buffers[0], dtype=np.float16).astype(np.float32).reshape(shape)
    if enc == "bf16":
        u = np.frombuffer(buffers[0], dtype=np.uint16)
        out = np.empty(u.size, np.uint32)
        out[:] = u
        out <<= 16
        return out.view(np.float32).reshape(shape)
    scales = np.frombuffer(buffers[1], dtype=np.float32)
    if not (np.isfinite(scales).all() and (scales >= 0).all()):
        raise CodecError("bad_encoding", f"enc {enc}: scales must be finite and >= 0")
    n = math.prod(shape)
    raw = np.frombuffer(buffers[0], dtype=np.int8 if enc == "int8" else np.uint8)
    q = raw if enc == "int8" else _UNPACK4_PAIRS.take(raw).view(np.int8)[:n]
    last = shape[-1]
    rows = q.reshape(-1, last) if last else q.reshape(math.prod(shape[:-1]), 0)
    s = scales[:, None] if spec["scale"] == "token" else scales[None, :]
    with np.errstate(over="ignore"):  # a peer's huge scale: the product is +-inf, as IEEE says
        return np.multiply(rows, s, dtype=np.float32).reshape(shape)


# ---------------------------------------------------------------- helpers


def roundtrip(name: str, a: Any) -> np.ndarray:
    """``a`` (float32 array, or anything np.asarray takes) encoded with codec ``name`` and decoded
    again, as the next stage sees it.  CodecError for int8/int4 and non-finite input (see module doc)."""
    arr = np.asarray(a)
    e = encode(name, arr)
    return decode(e.spec(), e.buffers)


@dataclass(frozen=True)
class CodecCost:
    """CPU seconds per MB (1e6 bytes) of float32 input, median of ``reps``; ``ratio``: wire bytes / raw bytes."""

    name: str
    encode_s_per_mb: float
    decode_s_per_mb: float
    ratio: float
    shape: tuple[int, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "encode_s_per_mb": self.encode_s_per_mb,
                "decode_s_per_mb": self.decode_s_per_mb, "ratio": self.ratio, "shape": list(self.shape)}


def measure_cost(name: str, shape: Sequence[int] = (8, 197, 768), reps: int = 5, seed: int = 0) -> CodecCost:
    """Time codec ``name`` on a seeded normal tensor of ``shape`` (default: ViT-Base at microbatch 8).

    CPU time of the calling thread (``time.thread_time``), so other load on the machine
    costs wall time, not these figures.
    """
    if not 1 <= reps <= 1000:
        raise ValueError(f"reps: expected 1..1000, got {reps}")
    a = np.random.default_rng(seed).standard_normal(tuple(shape), dtype=np.float32)
    mb = a.nbytes / MB
    enc_t, dec_t = [], []
    e = encode(name, a)  # warm-up: first-touch page faults are not the codec's steady cost
    decode(e.spec(), e.buffers)
    for _ in range(reps):
        t0 = time.thread_time()
        e = encode(name, a)
        t1 = time.thread_time()
        decode(e.spec(), e.buffers)
        t2 = time.thread_time()
        enc_t.append(t1 - t0)
        dec_t.append(t2 - t1)
    return CodecCost(name, float(np.median(enc_t)) / mb, float(np.median(dec_t)) / mb,
                     ratio(name, shape), tuple(int(d) for d in shape))
