"""Control-channel client: REQ with the Lazy Pirate pattern (poll, recreate, bounded retries)."""

from __future__ import annotations

import logging
import uuid
from typing import Any

import zmq

from edgezmq.protocol import control
from edgezmq.transport import sockets
from edgezmq.transport.security import CURVE_HINT, Curve

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 5.0
DEFAULT_RETRIES = 2


def new_rid() -> str:
    """A request id: unique enough that two clients of one node never share one."""
    return uuid.uuid4().hex


class ControlClient:
    """Talks to one node's REP control socket.

    A request that gets no reply within ``timeout`` is retried on a fresh socket
    (a REQ socket that lost a reply is stuck in its send/recv lockstep) up to
    ``retries`` times; then ``ControlError(UNREACHABLE)`` names the address.  Every attempt
    of one call carries the same request id (``rid``), so a node that did get the request
    answers the resend with the reply it already gave: every command is safe to retry.
    With ``curve`` (a client of the node's public key) the channel is CurveZMQ; a node
    that does not know our key never answers, which looks like UNREACHABLE.
    """

    def __init__(
        self,
        address: str,
        *,
        timeout: float = DEFAULT_TIMEOUT_S,
        retries: int = DEFAULT_RETRIES,
        ctx: zmq.Context | None = None,
        name: str | None = None,
        curve: Curve | None = None,
    ) -> None:
        self.address = address
        self.name = name or address
        self.timeout = timeout
        self.retries = retries
        self.curve = curve
        self._ctx = ctx or zmq.Context.instance()
        self._sock: zmq.Socket | None = None

    def _socket(self) -> zmq.Socket:
        if self._sock is None:
            self._sock = sockets.make_socket(self._ctx, zmq.REQ, sockets.CONTROL, curve=self.curve)
            self._sock.connect(self.address)
        return self._sock

    def _reset(self) -> None:
        sockets.close_all(self._sock)
        self._sock = None

    def call(
        self, cmd: str, *, timeout: float | None = None, retries: int | None = None, **args: Any
    ) -> dict[str, Any]:
        """Send one command, return the ok reply's fields; raise ControlError otherwise."""
        payload = control.request(cmd, rid=new_rid(), **args)
        return control.parse_reply(self.send(payload, cmd, timeout=timeout, retries=retries))

    def send(self, payload: bytes, cmd: str, *, timeout: float | None = None,
             retries: int | None = None) -> bytes:
        """Send request bytes (resent as they are on silence), return the reply's bytes."""
        timeout = self.timeout if timeout is None else timeout
        retries = self.retries if retries is None else retries
        for attempt in range(retries + 1):
            sock = self._socket()
            try:
                sock.send(payload)
            except zmq.Again:
                self._reset()
                continue
            if sock.poll(int(timeout * 1000), zmq.POLLIN):
                return sock.recv()
            log.debug("%s: no reply to %s in %.1fs (attempt %d)", self.name, cmd, timeout, attempt + 1)
            self._reset()
        raise control.ControlError(
            control.UNREACHABLE,
            f"node {self.name} ({self.address}) did not answer {cmd!r} "
            f"within {timeout:g}s ({retries + 1} attempt(s))" + (CURVE_HINT if self.curve is not None else ""),
        )

    def close(self) -> None:
        self._reset()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
