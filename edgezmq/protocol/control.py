"""Control-plane protocol: every command's typed request and reply, the error codes, encode/parse (pure).

Every request is one msgpack map ``{v: 1, cmd: str, rid?: str, ...arguments}``; every
reply is ``{v: 1, ok: true, ...fields}`` or ``{v: 1, ok: false, error: {code, message}}``.
``parse_request`` checks a request against its command's definition (names, types, ranges)
and returns the typed request, or raises ``ControlError`` with the code to reply with; a
node answers every request, good or bad, so its REP socket never wedges.  ``rid`` is an
optional request id: a node answers a repeat of a request id from its memory, so a client
may resend any command (Lazy Pirate) safely.  docs/control.md's tables are generated from
this module (``python -m edgezmq.protocol.docs``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

import msgpack

from edgezmq.errors import EdgezmqError
from edgezmq.protocol.messages import (
    COMMANDS,
    MAX_RID,
    Command,
    Reply,
    Request,
)
from edgezmq.protocol.schema import JSONMap, SchemaError

__all__ = [
    "VERSION", "MAX_REQUEST_BYTES", "COMMANDS", "Command", "Request", "Reply", "ControlError",
    "ERRORS", "CLIENT_ERRORS", "BAD_REQUEST", "UNKNOWN_COMMAND", "BAD_ARGS", "BAD_STATE",
    "LOAD_FAILED", "INTERNAL", "UNREACHABLE", "BAD_REPLY", "request", "encode_request",
    "parse_request", "reply_ok", "reply_error", "parse_reply", "parse_typed_reply",
]

VERSION = 1
MAX_REQUEST_BYTES = 1024 * 1024  # control messages are small; weights never ride here

# error codes a node replies with
BAD_REQUEST = "bad_request"
UNKNOWN_COMMAND = "unknown_command"
BAD_ARGS = "bad_args"
BAD_STATE = "bad_state"
LOAD_FAILED = "load_failed"
INTERNAL = "internal"
# error codes a client raises itself
UNREACHABLE = "unreachable"
BAD_REPLY = "bad_reply"

# code -> when: the one table the node, the client and docs/control.md use
ERRORS: dict[str, str] = {
    BAD_REQUEST: "not msgpack, not a map, `v` is not 1, over 1 MiB, more than one frame, "
                 "`cmd` not a string, a bad `rid`, or a `rid` reused for a different request",
    UNKNOWN_COMMAND: "`cmd` is not a command of the table (the message lists the known ones)",
    BAD_ARGS: "a missing, unknown, wrongly typed or out-of-range argument "
              "(`load.microbatch: expected 1..4096, got 0`), or arguments that contradict "
              "each other or the node (`load` with both `checkpoint` and `pretrained`, "
              "`start.server_keys` on a plaintext node, `job.id` of no job)",
    BAD_STATE: "the command does not fit the node's state: `start` before a shard is loaded, "
               "a different `load` while loading/loaded/running, `profile` while serving, "
               "a second job while one runs, `pause`/`resume` unless running",
    LOAD_FAILED: "`load` refused synchronously: unknown model or granularity, unit range out of "
                 "bounds, checkpoint file not found on the node, shard does not fit in memory, "
                 "data socket cannot bind",
    INTERNAL: "a bug in the node; the node keeps serving",
}
CLIENT_ERRORS: dict[str, str] = {
    UNREACHABLE: "raised by the client, never sent: no reply within the timeout after the "
                 "retries (or a secured node that refused the client's key)",
    BAD_REPLY: "raised by the client, never sent: a reply that does not follow the protocol",
}


class ControlError(EdgezmqError):
    """A control request failed; ``code`` is one of ``ERRORS`` or ``CLIENT_ERRORS``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


def _pack(msg: Mapping[str, Any]) -> bytes:
    return msgpack.packb(dict(msg), use_bin_type=True)


def request(cmd: str, *, rid: str | None = None, **args: Any) -> bytes:
    """Raw request bytes from a command name and its arguments (unchecked: tests send bad ones)."""
    head: dict[str, Any] = {"v": VERSION, "cmd": cmd}
    if rid is not None:
        head["rid"] = rid
    return _pack({**head, **args})


def encode_request(req: Request, rid: str | None = None) -> bytes:
    """A typed request -> its bytes; optional fields left at their default are not sent."""
    wire = req.to_wire()
    args = {f.name: wire[f.name] for f in req.fields()
            if f.required or getattr(req, f.name) != f.default}
    return request(req.CMD, rid=rid, **args)


def reply_ok(reply: Reply) -> bytes:
    return _pack({"v": VERSION, "ok": True, **reply.to_wire()})


def reply_error(code: str, message: str) -> bytes:
    return _pack({"v": VERSION, "ok": False, "error": {"code": code, "message": message}})


def _unpack(raw: Any, what: str, code: str) -> dict[str, Any]:
    data = bytes(raw)
    if len(data) > MAX_REQUEST_BYTES and what == "request":
        raise ControlError(code, f"{what} is {len(data)} bytes, limit {MAX_REQUEST_BYTES}")
    try:
        msg = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception as e:
        raise ControlError(code, f"{what} is not msgpack ({type(e).__name__})") from None
    if not isinstance(msg, dict):
        raise ControlError(code, f"{what} must be a map, got {type(msg).__name__}")
    if msg.get("v") != VERSION:
        raise ControlError(code, f"{what} version: expected {VERSION}, got {msg.get('v')!r}"[:300])
    return msg


def parse_request(raw: Any) -> tuple[Request, str | None]:
    """Request bytes -> (typed request, request id or None); raises ControlError."""
    msg = _unpack(raw, "request", BAD_REQUEST)
    msg.pop("v")
    cmd = msg.pop("cmd", None)
    rid = msg.pop("rid", None)
    if not isinstance(cmd, str):
        raise ControlError(BAD_REQUEST, f"cmd must be a string, got {type(cmd).__name__}")
    if rid is not None and not (isinstance(rid, str) and 1 <= len(rid) <= MAX_RID):
        raise ControlError(BAD_REQUEST, f"rid: expected a string of 1..{MAX_RID} characters, got {rid!r}"[:300])
    command = COMMANDS.get(cmd)
    if command is None:
        raise ControlError(UNKNOWN_COMMAND, f"unknown command {cmd!r}; known: {', '.join(COMMANDS)}"[:1000])
    try:
        req = command.request.from_wire(msg, strict=True, path=cmd)
        req.validate()
    except SchemaError as e:
        raise ControlError(BAD_ARGS, str(e)) from None
    return req, rid


def parse_reply(raw: Any) -> JSONMap:
    """Reply bytes -> the fields of an ok reply (``v`` and ``ok`` removed); an error reply raises
    ControlError with the node's code."""
    msg = _unpack(raw, "reply", BAD_REPLY)
    if msg.get("ok") is True:
        msg.pop("v")
        msg.pop("ok")
        return msg
    err = msg.get("error")
    if msg.get("ok") is False and isinstance(err, dict):
        raise ControlError(str(err.get("code", INTERNAL)), str(err.get("message", "")))
    raise ControlError(BAD_REPLY, f"malformed reply: {msg!r}"[:500])


R = TypeVar("R", bound=Reply)


def parse_typed_reply(raw: Any, cls: type[R]) -> R:
    """Reply bytes -> the command's typed reply (fields a newer node added are ignored)."""
    fields = parse_reply(raw)
    try:
        return cls.from_wire(fields, strict=False)
    except SchemaError as e:
        raise ControlError(BAD_REPLY, f"reply: {e}") from None
