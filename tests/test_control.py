"""control.py + messages.py: typed requests and replies, their checks, and every command's round trip."""

from __future__ import annotations

import dataclasses
import re

import msgpack
import pytest

from edgezmq.protocol import control
from edgezmq.protocol import messages as m
from edgezmq.protocol.schema import type_text

LOAD = dict(run="r", model="vit_tiny_patch16_224", units=[0, 3], stage=0, last=False, microbatch=8,
            checkpoint="/c.safetensors")
SAMPLE = {**LOAD, "connect": ["tcp://127.0.0.1:1"], "peer": "tcp://127.0.0.1:2", "id": "profile-1"}


def _required(cmd: str) -> dict:
    return {f.name: SAMPLE[f.name] for f in control.COMMANDS[cmd].request.fields() if f.name in SAMPLE}


def test_every_command_round_trips_typed():
    for cmd, command in control.COMMANDS.items():
        args = _required(cmd)
        req, rid = control.parse_request(control.request(cmd, rid="a1", **args))
        assert isinstance(req, command.request) and rid == "a1" and req.CMD == cmd
        assert control.parse_request(control.encode_request(req))[0] == req


def test_every_number_has_a_finite_range():
    for command in control.COMMANDS.values():
        for f in command.request.fields():
            if re.search(r"\b(int|float)\b", type_text(f.type)):
                assert f.meta.lo is not None and f.meta.hi is not None, f"{command.name}.{f.name}"


def test_every_field_is_documented():
    for command in control.COMMANDS.values():
        for cls in (command.request, command.reply):
            for f in cls.fields():
                assert f.meta.doc, f"{cls.__name__}.{f.name}"
            if issubclass(cls, m.Request):
                assert (cls.__doc__ or "").strip(), cls.__name__


@pytest.mark.parametrize(
    "raw, code, text",
    [
        (b"\xc1garbage", control.BAD_REQUEST, "not msgpack"),
        (msgpack.packb([1, 2]), control.BAD_REQUEST, "must be a map"),
        (msgpack.packb({"v": 9, "cmd": "ping"}), control.BAD_REQUEST, "version"),
        (msgpack.packb({"v": 1}), control.BAD_REQUEST, "cmd must be a string"),
        (control.request("ping", rid=""), control.BAD_REQUEST, "rid"),
        (control.request("ping", rid="x" * 65), control.BAD_REQUEST, "rid"),
        (msgpack.packb({"v": 1, "cmd": "rm -rf"}), control.UNKNOWN_COMMAND, "unknown command 'rm -rf'"),
        (control.request("ping", extra=1), control.BAD_ARGS, "unknown field(s) ['extra']"),
        (control.request("load", **{k: v for k, v in LOAD.items() if k != "model"}), control.BAD_ARGS, "load.model: missing"),
        (control.request("load", **{**LOAD, "stage": "0"}), control.BAD_ARGS, "load.stage: expected int, got str"),
        (control.request("load", **{**LOAD, "stage": True}), control.BAD_ARGS, "load.stage: expected int, got bool"),
        (control.request("load", **{**LOAD, "last": 1}), control.BAD_ARGS, "load.last: expected bool"),
        (control.request("load", **{**LOAD, "microbatch": 0}), control.BAD_ARGS, "load.microbatch: expected 1..4096, got 0"),
        (control.request("load", **{**LOAD, "microbatch": 4097}), control.BAD_ARGS, "load.microbatch"),
        (control.request("load", **{**LOAD, "threads": 257}), control.BAD_ARGS, "load.threads: expected 1..256"),
        (control.request("load", **{**LOAD, "units": [0, 1, 2]}), control.BAD_ARGS, "load.units"),
        (control.request("load", **{**LOAD, "units": [-1, 2]}), control.BAD_ARGS, "load.units[0]"),
        (control.request("load", **{**LOAD, "dtype": "int8"}), control.BAD_ARGS, "load.dtype"),
        (control.request("load", **{**LOAD, "kwargs": {1: 2}}), control.BAD_ARGS, "load.kwargs"),
        (control.request("load", **{**LOAD, "pretrained": True}), control.BAD_ARGS, "exactly one of checkpoint"),
        (control.request("load", **{**LOAD, "checkpoint": None}), control.BAD_ARGS, "exactly one of checkpoint"),
        (control.request("start", connect="tcp://x:1"), control.BAD_ARGS, "start.connect: expected [str]"),
        (control.request("start", connect=[]), control.BAD_ARGS, "start.connect: expected a non-empty list"),
        (control.request("netprobe", peer="tcp://x:1", seconds=0), control.BAD_ARGS, "netprobe.seconds: expected (0, 60]"),
        (control.request("netprobe", peer="tcp://x:1", seconds=61.0), control.BAD_ARGS, "netprobe.seconds"),
        (control.request("netprobe", peer="tcp://x:1", seconds=float("nan")), control.BAD_ARGS, "finite"),
        (control.request("netprobe", peer="x:1"), control.BAD_ARGS, "netprobe.peer: expected tcp://"),
        (control.request("netprobe", peer="tcp://x:1", bytes_per_msg=1 << 30), control.BAD_ARGS, "netprobe.bytes_per_msg"),
        (control.request("profile", model="m", microbatch=1, reps=0), control.BAD_ARGS, "profile.reps: expected 1..1000"),
        (control.request("profile", model="m", microbatch=1, warmup=101), control.BAD_ARGS, "profile.warmup"),
        (b"x" * (control.MAX_REQUEST_BYTES + 1), control.BAD_REQUEST, "limit"),
    ],
)
def test_bad_requests_get_the_right_code(raw, code, text):
    with pytest.raises(control.ControlError) as ei:
        control.parse_request(raw)
    assert ei.value.code == code
    assert text in ei.value.message


def test_optional_fields_left_at_default_are_not_sent():
    req = m.ProfileRequest(model="m", microbatch=2)
    assert msgpack.unpackb(control.encode_request(req)) == {"v": 1, "cmd": "profile", "model": "m", "microbatch": 2}


def test_replies():
    assert control.parse_reply(control.reply_ok(m.StateReply(state="idle"))) == {"state": "idle"}
    with pytest.raises(control.ControlError) as ei:
        control.parse_reply(control.reply_error(control.BAD_STATE, "not loaded"))
    assert ei.value.code == control.BAD_STATE and ei.value.message == "not loaded"
    with pytest.raises(control.ControlError, match="malformed reply") as ei:
        control.parse_reply(msgpack.packb({"v": 1, "ok": "yes"}))
    assert ei.value.code == control.BAD_REPLY


def test_typed_replies_ignore_new_fields_and_refuse_wrong_ones():
    raw = control.reply_ok(m.PingReply(name="n", state="idle", error=None, run=None, data=None, time=1.5))
    got = control.parse_typed_reply(raw, m.PingReply)
    assert got.time == 1.5 and got.data is None
    newer = msgpack.packb({**msgpack.unpackb(raw), "something_new": 1})
    assert control.parse_typed_reply(newer, m.PingReply) == got
    wrong = msgpack.packb({**msgpack.unpackb(raw), "time": "noon"})
    with pytest.raises(control.ControlError) as ei:
        control.parse_typed_reply(wrong, m.PingReply)
    assert ei.value.code == control.BAD_REPLY and "ping.time" in ei.value.message


def test_one_error_table():
    assert set(control.ERRORS) == {"bad_request", "unknown_command", "bad_args", "bad_state", "load_failed", "internal"}
    assert set(control.CLIENT_ERRORS) == {"unreachable", "bad_reply"}
    assert not hasattr(control, "TIMEOUT")  # a client-side code no one raised


def test_stage_stats_match_the_runtime_counters():
    from edgezmq.node.stage import Counters

    names = {f.name for f in m.StageStats.fields()}
    assert {f.name for f in dataclasses.fields(Counters)} <= names


def test_docs_tables_are_generated_from_the_protocol(tmp_path):
    import shutil

    from edgezmq.protocol import docs

    assert docs.stale() == [], "run: python -m edgezmq.protocol.docs"
    # a field that drifts in the docs is caught
    for name in docs.BLOCKS:
        shutil.copy(docs.DOCS / name, tmp_path / name)
    text = (tmp_path / "control.md").read_text()
    (tmp_path / "control.md").write_text(text.replace("| `microbatch` | int | **required** | 1..4096 |",
                                                      "| `microbatch` | int | optional | 1..64 |", 1))
    assert docs.stale(tmp_path) == [str(tmp_path / "control.md")]
    assert docs.main(["--docs", str(tmp_path)]) == 0 and docs.stale(tmp_path) == []
    wire_md = (docs.DOCS / "wire.md").read_text()
    assert "512 KiB or more" in wire_md and "`bad_arity`" in wire_md
    assert "| `timeout` |" not in text
