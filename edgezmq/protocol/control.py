"""Control-plane protocol: commands, argument schemas, replies and error codes (pure, no I/O).

Every request is one msgpack map ``{v: 1, cmd: str, ...args}``; every reply is
``{v: 1, ok: true, ...fields}`` or ``{v: 1, ok: false, error: {code, message}}``.
``parse_request`` validates a request against ``COMMANDS`` and raises
``ControlError`` with the code to reply with; a node answers every request, good
or bad, so its REP socket never wedges.  See docs/control.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgpack

from edgezmq.errors import EdgezmqError

VERSION = 1
MAX_REQUEST_BYTES = 1024 * 1024  # control messages are small; weights never ride here

# error codes
BAD_REQUEST = "bad_request"  # not msgpack, not a map, wrong version
UNKNOWN_COMMAND = "unknown_command"
BAD_ARGS = "bad_args"  # missing/unknown/wrong-typed argument
BAD_STATE = "bad_state"  # e.g. start before load
LOAD_FAILED = "load_failed"  # model/checkpoint/memory problem while building the shard
TIMEOUT = "timeout"  # client side: no reply in time
UNREACHABLE = "unreachable"  # client side: gave up after retries
INTERNAL = "internal"

_ANY_INT = (int,)
_NUM = (int, float)


@dataclass(frozen=True)
class Arg:
    types: tuple[type, ...]
    required: bool = False
    doc: str = ""


# The command table: argument name -> Arg.  docs/control.md mirrors it.
COMMANDS: dict[str, dict[str, Arg]] = {
    "ping": {},
    "info": {},
    "load": {
        "run": Arg((str,), True, "deployment id; data messages of other runs are refused"),
        "model": Arg((str,), True, "timm model name"),
        "units": Arg((list,), True, "[start, end) unit range of this shard"),
        "stage": Arg(_ANY_INT, True, "stage index in the pipeline"),
        "last": Arg((bool,), True, "this stage sends results to the client"),
        "microbatch": Arg(_ANY_INT, True, "largest batch a message may carry"),
        "granularity": Arg((str,), False, "block | half | sublayer (default block)"),
        "kwargs": Arg((dict,), False, "extra timm.create_model keyword arguments"),
        "checkpoint": Arg((str, type(None)), False, "safetensors path on the node"),
        "pretrained": Arg((bool,), False, "load timm pretrained weights (needs a hub)"),
        "dtype": Arg((str,), False, "float32 (default)"),
        "threads": Arg(_ANY_INT, False, "torch threads for compute"),
        "bind": Arg((str,), False, "data PULL address to bind (default: the control host, any port)"),
    },
    "start": {
        "connect": Arg((list,), True, "downstream data addresses (next stage replicas or the client)"),
        "server_keys": Arg((list,), False, "secured nodes: the Z85 public key of each connect address"),
    },
    "stats": {},
    "profile": {
        "model": Arg((str,), True, "timm model name"),
        "microbatch": Arg(_ANY_INT, True, "microbatch size to time each unit at"),
        "granularity": Arg((str,), False, "block | half | sublayer (default block)"),
        "kwargs": Arg((dict,), False, "extra timm.create_model keyword arguments"),
        "threads": Arg(_ANY_INT, False, "torch threads (default: the node's)"),
        "warmup": Arg(_ANY_INT, False, "untimed forwards per unit (default 1)"),
        "reps": Arg(_ANY_INT, False, "timed forwards per unit; the median is reported (default 3)"),
        "reprofile": Arg((bool,), False, "ignore the node's profile cache"),
        "check": Arg((bool,), False, "on a cache hit, time the profile's chain window again and "
                                     "rescale the profile if the device has drifted (a job)"),
    },
    "netprobe": {
        "peer": Arg((str,), True, "a probe endpoint (another node's `info.probe`)"),
        "peer_key": Arg((str,), False, "secured nodes: the peer's Z85 public key (`info.public_key`)"),
        "bytes_per_msg": Arg(_ANY_INT, False, "bulk message size (default 4 MiB)"),
        "seconds": Arg(_NUM, False, "bulk transfer duration (default 1)"),
        "pings": Arg(_ANY_INT, False, "round trips for the latency (default 20)"),
    },
    "job": {
        "id": Arg((str,), True, "job id returned by profile or netprobe"),
    },
    "pause": {},
    "resume": {},
    "unload": {},
    "shutdown": {},
}


class ControlError(EdgezmqError):
    """A control request failed; ``code`` is one of the module's error codes."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


def request(cmd: str, **args: Any) -> bytes:
    return msgpack.packb({"v": VERSION, "cmd": cmd, **args}, use_bin_type=True)


def reply_ok(**fields: Any) -> bytes:
    return msgpack.packb({"v": VERSION, "ok": True, **fields}, use_bin_type=True)


def reply_error(code: str, message: str) -> bytes:
    return msgpack.packb(
        {"v": VERSION, "ok": False, "error": {"code": code, "message": message}}, use_bin_type=True
    )


def _unpack(raw: Any, what: str) -> dict[str, Any]:
    data = bytes(raw)
    if len(data) > MAX_REQUEST_BYTES:
        raise ControlError(BAD_REQUEST, f"{what} is {len(data)} bytes, limit {MAX_REQUEST_BYTES}")
    try:
        msg = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception as e:
        raise ControlError(BAD_REQUEST, f"{what} is not msgpack ({type(e).__name__})") from None
    if not isinstance(msg, dict):
        raise ControlError(BAD_REQUEST, f"{what} must be a map, got {type(msg).__name__}")
    if msg.get("v") != VERSION:
        raise ControlError(BAD_REQUEST, f"{what} version: expected {VERSION}, got {msg.get('v')!r}")
    return msg


def parse_request(raw: Any) -> tuple[str, dict[str, Any]]:
    """Request bytes -> (cmd, args), validated against COMMANDS; raises ControlError."""
    msg = _unpack(raw, "request")
    cmd = msg.pop("cmd", None)
    msg.pop("v")
    if not isinstance(cmd, str):
        raise ControlError(BAD_REQUEST, f"cmd must be a string, got {type(cmd).__name__}")
    schema = COMMANDS.get(cmd)
    if schema is None:
        raise ControlError(UNKNOWN_COMMAND, f"unknown command {cmd!r}; known: {', '.join(sorted(COMMANDS))}")
    unknown = sorted(set(msg) - set(schema))
    if unknown:
        raise ControlError(BAD_ARGS, f"{cmd}: unknown argument(s) {unknown}; expected {sorted(schema)}")
    for name, arg in schema.items():
        if name not in msg:
            if arg.required:
                raise ControlError(BAD_ARGS, f"{cmd}: missing argument {name!r} ({arg.doc})")
            continue
        v = msg[name]
        if not isinstance(v, arg.types) or (isinstance(v, bool) and bool not in arg.types):
            want = " or ".join(t.__name__ for t in arg.types)
            raise ControlError(BAD_ARGS, f"{cmd}.{name}: expected {want}, got {type(v).__name__}")
    return cmd, msg


def parse_reply(raw: Any) -> dict[str, Any]:
    """Reply bytes -> fields of an ok reply; an error reply raises ControlError."""
    msg = _unpack(raw, "reply")
    if msg.get("ok") is True:
        return msg
    err = msg.get("error")
    if msg.get("ok") is False and isinstance(err, dict):
        raise ControlError(str(err.get("code", INTERNAL)), str(err.get("message", "")))
    raise ControlError(BAD_REQUEST, f"malformed reply: {msg!r}"[:500])
