"""control.py: request/reply encoding and validation of every command's arguments."""

from __future__ import annotations

import msgpack
import pytest

from edgezmq.protocol import control

LOAD = dict(run="r", model="vit_tiny_patch16_224", units=[0, 3], stage=0, last=False, microbatch=8)


def test_every_command_round_trips():
    for cmd, schema in control.COMMANDS.items():
        sample = {**LOAD, "connect": ["tcp://127.0.0.1:1"], "peer": "tcp://127.0.0.1:2", "id": "profile-1"}
        args = {k: v for k, v in sample.items() if k in schema and schema[k].required}
        got_cmd, got_args = control.parse_request(control.request(cmd, **args))
        assert got_cmd == cmd and got_args == args


@pytest.mark.parametrize(
    "raw, code, text",
    [
        (b"\xc1garbage", control.BAD_REQUEST, "not msgpack"),
        (msgpack.packb([1, 2]), control.BAD_REQUEST, "must be a map"),
        (msgpack.packb({"v": 9, "cmd": "ping"}), control.BAD_REQUEST, "version"),
        (msgpack.packb({"v": 1}), control.BAD_REQUEST, "cmd must be a string"),
        (msgpack.packb({"v": 1, "cmd": "rm -rf"}), control.UNKNOWN_COMMAND, "unknown command 'rm -rf'"),
        (control.request("ping", extra=1), control.BAD_ARGS, "unknown argument"),
        (control.request("load", **{k: v for k, v in LOAD.items() if k != "model"}), control.BAD_ARGS, "missing argument 'model'"),
        (control.request("load", **{**LOAD, "stage": "0"}), control.BAD_ARGS, "load.stage: expected int, got str"),
        (control.request("load", **{**LOAD, "stage": True}), control.BAD_ARGS, "load.stage"),
        (control.request("load", **{**LOAD, "last": 1}), control.BAD_ARGS, "load.last: expected bool"),
        (control.request("start", connect="tcp://x:1"), control.BAD_ARGS, "start.connect: expected list"),
        (b"x" * (control.MAX_REQUEST_BYTES + 1), control.BAD_REQUEST, "limit"),
    ],
)
def test_bad_requests_get_the_right_code(raw, code, text):
    with pytest.raises(control.ControlError) as ei:
        control.parse_request(raw)
    assert ei.value.code == code
    assert text in ei.value.message


def test_replies():
    assert control.parse_reply(control.reply_ok(state="idle"))["state"] == "idle"
    with pytest.raises(control.ControlError) as ei:
        control.parse_reply(control.reply_error(control.BAD_STATE, "not loaded"))
    assert ei.value.code == control.BAD_STATE and ei.value.message == "not loaded"
    with pytest.raises(control.ControlError, match="malformed reply"):
        control.parse_reply(msgpack.packb({"v": 1, "ok": "yes"}))
