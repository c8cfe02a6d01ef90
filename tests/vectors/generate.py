"""Write the conformance vectors (control.json, data.json) from readable definitions below.

    PYTHONPATH=. python tests/vectors/generate.py

Requests and frames are written as hex (the exact bytes) next to their JSON (to read);
tests/test_vectors.py replays them against a real node process.  See README.md.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

HERE = Path(__file__).resolve().parent
MODEL = "vit_tiny_patch16_224"
KWARGS = {"img_size": 64, "depth": 4}
RUN = "vec"
LOAD = {"run": RUN, "model": MODEL, "units": [0, 6], "stage": 0, "last": True, "microbatch": 2,
        "kwargs": KWARGS, "checkpoint": "$CHECKPOINT", "threads": 1}


def req(name: str, request: dict[str, Any] | bytes, *, ok: bool = True, code: str | None = None,
        fields: dict[str, Any] | None = None, has: list[str] | None = None,
        capture: dict[str, str] | None = None, until: dict[str, Any] | None = None) -> dict[str, Any]:
    case: dict[str, Any] = {"name": name}
    if isinstance(request, bytes):
        case["request_hex"] = request.hex()
    else:
        case["request"] = request
        if not any(isinstance(v, str) and v.startswith("$") for v in _leaves(request)):
            case["request_hex"] = msgpack.packb(request, use_bin_type=True).hex()
    case["expect"] = {"ok": ok, **({"code": code} if code else {}), **({"fields": fields} if fields else {}),
                      **({"has": has} if has else {})}
    if capture:
        case["capture"] = capture
    if until:
        case["repeat_until"] = until
    return case


def _leaves(v: Any) -> list[Any]:
    if isinstance(v, dict):
        return [x for y in v.values() for x in _leaves(y)]
    if isinstance(v, list):
        return [x for y in v for x in _leaves(y)]
    return [v]


def cmd(c: str, **args: Any) -> dict[str, Any]:
    return {"v": 1, "cmd": c, **args}


CONTROL = [
    req("ping when idle", cmd("ping"), fields={"state": "idle", "run": None, "data": None}, has=["name", "time"]),
    req("info", cmd("info"), has=["name", "threads", "memory_limit_arg", "device", "control", "probe", "public_key"]),
    req("describe the test model", cmd("describe", model=MODEL, kwargs=KWARGS, microbatch=2),
        fields={"n_units": 6, "units.0.name": "embed", "units.0.inputs.0.shape": [2, 3, 64, 64],
                "units.0.inputs.0.dtype": "float32", "units.1.inputs.0.shape": [2, 17, 192],
                "output.0.shape": [2, 1000]}),
    req("not msgpack", b"\xc1garbage", ok=False, code="bad_request"),
    req("not a map", msgpack.packb([1, 2]), ok=False, code="bad_request"),
    req("wrong version", cmd("ping") | {"v": 2}, ok=False, code="bad_request"),
    req("empty request id", cmd("ping", rid=""), ok=False, code="bad_request"),
    req("unknown command", cmd("format_disk"), ok=False, code="unknown_command"),
    req("unknown argument", cmd("ping", bogus=True), ok=False, code="bad_args"),
    req("missing argument", cmd("load", run=RUN), ok=False, code="bad_args"),
    req("wrong type", cmd("load", **{**LOAD, "stage": "0"}), ok=False, code="bad_args"),
    req("microbatch out of range", cmd("load", **{**LOAD, "microbatch": 0}), ok=False, code="bad_args"),
    req("both checkpoint and pretrained", cmd("load", **{**LOAD, "pretrained": True}), ok=False, code="bad_args"),
    req("netprobe seconds out of range", cmd("netprobe", peer="tcp://127.0.0.1:1", seconds=0), ok=False,
        code="bad_args"),
    req("no such job", cmd("job", id="profile-999"), ok=False, code="bad_args"),
    req("start before load", cmd("start", connect=["tcp://127.0.0.1:1"]), ok=False, code="bad_state"),
    req("pause when idle", cmd("pause"), ok=False, code="bad_state"),
    req("unknown model", cmd("load", **{**LOAD, "model": "no_such_model_xyz"}), ok=False, code="load_failed"),
    req("unit range out of bounds", cmd("load", **{**LOAD, "units": [0, 99]}), ok=False, code="load_failed"),
    req("checkpoint not on the node", cmd("load", **{**LOAD, "checkpoint": "/nonexistent/x.safetensors"}),
        ok=False, code="load_failed"),
    req("unload when idle", cmd("unload"), fields={"state": "idle"}),
    req("profile (a job: reprofile)", cmd("profile", model=MODEL, microbatch=2, kwargs=KWARGS, threads=1, reprofile=True,
                                                    reps=1, warmup=0), fields={"cached": False, "state": "running"},
        capture={"PROFILE_JOB": "job"}),
    req("wait for the profile", cmd("job", id="$PROFILE_JOB"), until={"state": ["done"]},
        fields={"kind": "profile"}, has=["result", "progress"]),
    req("netprobe to nowhere (a job that fails)", cmd("netprobe", peer="tcp://127.0.0.1:1", seconds=0.2, pings=2),
        fields={"state": "running"}, capture={"PROBE_JOB": "job"}),
    req("the failed job", cmd("job", id="$PROBE_JOB"), until={"state": ["failed"]},
        fields={"kind": "netprobe", "result": None}, has=["error"]),
    req("cancel a job that ended", cmd("cancel", id="$PROFILE_JOB"), fields={"state": "done", "kind": "profile"}),
    req("cancel: no such job", cmd("cancel", id="profile-999"), ok=False, code="bad_args"),
    req("profile deadline out of range", cmd("profile", model=MODEL, microbatch=2, kwargs=KWARGS, deadline=0),
        ok=False, code="bad_args"),
    req("a long profile (a job: 1000 rounds per unit)", cmd("profile", model=MODEL, microbatch=2, kwargs=KWARGS,
                                                             threads=1, reprofile=True, reps=1000, warmup=0),
        fields={"state": "running"}, capture={"LONG_JOB": "job"}),
    req("another job while it runs", cmd("netprobe", peer="tcp://127.0.0.1:1", seconds=0.2, pings=2), ok=False,
        code="bad_state"),
    req("cancel it", cmd("cancel", id="$LONG_JOB"), fields={"kind": "profile"}),
    req("cancel it again (a resend)", cmd("cancel", id="$LONG_JOB"), fields={"kind": "profile"}),
    req("the cancelled job", cmd("job", id="$LONG_JOB"), until={"state": ["cancelled"]},
        fields={"result": None}, has=["error"]),
    req("load", cmd("load", rid="vec-load-1", **LOAD), fields={"state": "loading"},
        has=["data", "param_bytes", "public_key"]),
    req("the same load resent with its request id", cmd("load", rid="vec-load-1", **LOAD),
        fields={"state": "loading"}, has=["data"]),
    req("a request id reused for another request", cmd("ping", rid="vec-load-1"), ok=False, code="bad_request"),
    req("wait until loaded", cmd("ping"), until={"state": ["loaded"]}, fields={"run": RUN}),
    req("the same load again, no request id", cmd("load", **LOAD), fields={"state": "loaded"}),
    req("another load while loaded", cmd("load", **{**LOAD, "run": "other"}), ok=False, code="bad_state"),
    req("start", cmd("start", connect=["$RESULTS"]), fields={"state": "running"}),
    req("start again, same addresses", cmd("start", connect=["$RESULTS"]), fields={"state": "running"}),
    req("start again, other addresses", cmd("start", connect=["tcp://127.0.0.1:1"]), ok=False, code="bad_state"),
    req("profile while serving", cmd("profile", model=MODEL, microbatch=2, kwargs=KWARGS), ok=False,
        code="bad_state"),
    req("stats", cmd("stats"), fields={"state": "running", "stage.run": RUN, "stage.units": [0, 6]},
        has=["requests", "bad_requests", "rss", "peak_rss", "stage.bytes_in", "stage.compute_cpu_s"]),
    req("pause", cmd("pause"), fields={"paused": True, "state": "running"}),
    req("pause again", cmd("pause"), fields={"paused": True}),
    req("resume", cmd("resume"), fields={"paused": False}),
    req("resume again", cmd("resume"), fields={"paused": False}),
]
# the data cases run between "resume again" and these (see README.md)
CONTROL_AFTER_DATA = [
    req("unload", cmd("unload"), fields={"state": "idle"}),
    req("shutdown", cmd("shutdown"), fields={"state": "shutting down"}),
]


def header(seq: int, **over: Any) -> dict[str, Any]:
    return {"v": 1, "kind": "act", "run": RUN, "seq": seq, "stage": -1,
            "tensors": [{"dtype": "float32", "shape": [1, 3, 2, 2], "enc": "raw"}], "t": [], **over}


def frames(h: dict[str, Any] | bytes, *buffers: bytes) -> list[str]:
    head = h if isinstance(h, bytes) else msgpack.packb(h, use_bin_type=True)
    return [head.hex(), *(b.hex() for b in buffers)]


IMAGE = np.random.default_rng(0).standard_normal((1, 3, 64, 64), dtype=np.float32).tobytes()
TINY = np.zeros((1, 3, 2, 2), np.float32).tobytes()
# the image encoded the way docs/wire.md's Encodings table says (built here by hand, not by codecs.py)
_X = np.frombuffer(IMAGE, np.float32).reshape(1, 3, 64, 64)
F16 = _X.astype(np.float16).tobytes()
BF16 = (_X.view(np.uint32) >> 16).astype(np.uint16).tobytes()  # truncation is a valid bf16 too
S_TOKEN = (np.abs(_X).max(axis=3) / 127).astype(np.float32).reshape(-1)
Q8 = np.clip(np.rint(_X / S_TOKEN.reshape(1, 3, 64, 1)), -127, 127).astype(np.int8).tobytes()
S_TOKEN = S_TOKEN.tobytes()
_SC = (np.abs(_X).reshape(-1, 64).max(axis=0) / 7).astype(np.float32)
_Q = np.clip(np.rint(_X.reshape(-1, 64) / _SC), -7, 7).astype(np.int8).reshape(-1).view(np.uint8) & 0x0F
Q4 = (_Q[0::2] | (_Q[1::2] << 4)).astype(np.uint8).tobytes()
S_CHANNEL = _SC.tobytes()


def data(name: str, fr: list[str], seq: int, code: str | None, run: str = RUN) -> dict[str, Any]:
    expect: dict[str, Any] = {"kind": "error", "seq": seq, "code": code, "run": run, "stage": 0} if code else {
        "kind": "result", "seq": seq, "run": run, "stage": 0, "shapes": [[1, 1000]]}
    return {"name": name, "frames_hex": fr, "expect": expect}


def spec(shape: list[int], dtype: str = "float32", **over: Any) -> dict[str, Any]:
    return {"dtype": dtype, "shape": shape, "enc": "raw", **over}


DATA = [
    data("not msgpack", [b"not msgpack".hex()], -1, "bad_header"),
    data("wrong version", frames(header(101, v=2), TINY), 101, "bad_version"),
    data("unknown kind", frames(header(102, kind="bogus"), TINY), 102, "bad_kind"),
    data("a result sent to a stage", frames(header(103, kind="result"), TINY), 103, "bad_kind"),
    data("an error forged by the client", frames(header(104, kind="error", tensors=[],
                                                        error={"code": "compute_failed", "message": "x"})),
         104, "bad_kind"),
    data("run not a string", frames(header(105, run=7), TINY), 105, "bad_field"),
    data("unknown encoding", frames(header(106, tensors=[spec([1, 3, 2, 2], enc="zstd")]), TINY), 106,
         "bad_encoding"),
    data("dtype not allowed on the wire", frames(header(107, tensors=[spec([1], "object")]), b"\0" * 8), 107,
         "bad_dtype"),
    data("dtype the stage does not take", frames(header(108, tensors=[spec([1, 3, 2, 2], "float64")]),
                                                  np.zeros((1, 3, 2, 2)).tobytes()), 108, "bad_dtype"),
    data("shape the stage does not take", frames(header(109, tensors=[spec([1, 3, 2, 2])]), TINY), 109,
         "bad_shape"),
    data("two tensors where one is taken", frames(header(110, tensors=[spec([1, 3, 2, 2])] * 2), TINY, TINY),
         110, "bad_arity"),
    data("buffer too short", frames(header(111), TINY[:10]), 111, "bad_length"),
    data("a buffer frame missing", frames(header(112)), 112, "missing_frames"),
    data("an extra frame", frames(header(113), TINY, b"x"), 113, "extra_frames"),
    data("declared tensor too large", frames(header(114, tensors=[spec([1 << 20, 1 << 10])]), b""), 114,
         "oversize"),
    data("another run", frames(header(115, run="other"), TINY), 115, "wrong_run", run="other"),
    data("from a stage other than the previous one", frames(header(116, stage=4), TINY), 116, "bad_stage"),
    data("a good microbatch still goes through", frames(header(117, tensors=[spec([1, 3, 64, 64])]), IMAGE), 117,
         None),
    # encodings (docs/wire.md, Encodings): the stage decodes whatever its input carries
    data("an f16 microbatch", frames(header(118, tensors=[spec([1, 3, 64, 64], enc="f16")]), F16), 118, None),
    data("a bf16 microbatch", frames(header(119, tensors=[spec([1, 3, 64, 64], enc="bf16")]), BF16), 119, None),
    data("an int8 microbatch, a scale per token (row of the last dimension)",
         frames(header(120, tensors=[spec([1, 3, 64, 64], enc="int8", scale="token")]), Q8, S_TOKEN), 120, None),
    data("an int4 microbatch, a scale per channel (index of the last dimension)",
         frames(header(121, tensors=[spec([1, 3, 64, 64], enc="int4", scale="channel")]), Q4, S_CHANNEL), 121,
         None),
    data("int8 with its scales frame one scale short", frames(header(122, tensors=[
        spec([1, 3, 64, 64], enc="int8", scale="token")]), Q8, S_TOKEN[:-4]), 122, "bad_length"),
    data("int8 without its scales frame", frames(header(123, tensors=[
        spec([1, 3, 64, 64], enc="int8", scale="token")]), Q8), 123, "missing_frames"),
    data("int4 with a packed frame one byte long", frames(header(124, tensors=[
        spec([1, 3, 64, 64], enc="int4", scale="channel")]), Q4 + b"\0", S_CHANNEL), 124, "bad_length"),
    data("int8 with an unknown scale layout", frames(header(125, tensors=[
        spec([1, 3, 64, 64], enc="int8", scale="tensor")]), Q8, S_TOKEN), 125, "bad_encoding"),
    data("int8 with a NaN scale", frames(header(126, tensors=[spec([1, 3, 64, 64], enc="int8", scale="token")]), Q8,
                                         np.full(3 * 64, np.nan, np.float32).tobytes()), 126, "bad_encoding"),
    data("f16 on a tensor that is not float32", frames(header(127, tensors=[
        spec([1, 3, 64, 64], "int64", enc="f16")]), F16), 127, "bad_encoding"),
    data("0 elements declaring 2^217 scales", frames(header(128, tensors=[
        spec([2**31 - 1] * 7 + [0], enc="int8", scale="token")]), b"", b""), 128, "oversize"),
    # generation (docs/generate.md): a decoder's step sent to this ViT's stage
    data("a gen step to a stage that is not a decoder's", frames(header(129, session="c0ffee", tensors=[
        spec([1, 1], "int64")], gen={"op": "step", "ids": [1], "pos": [0], "lens": [1], "max_len": [4]}),
        np.zeros((1, 1), np.int64).tobytes()), 129, "gen_state"),
]


def main() -> None:
    (HERE / "control.json").write_text(json.dumps(
        {"model": MODEL, "kwargs": KWARGS, "before_data": CONTROL, "after_data": CONTROL_AFTER_DATA},
        indent=1) + "\n")
    (HERE / "data.json").write_text(json.dumps({"run": RUN, "cases": DATA}, indent=1) + "\n")


if __name__ == "__main__":
    main()
