"""The one place sockets are made: socket options, timeouts, binding, frame I/O.

Every data and control socket of the project comes from ``make_socket`` so that
LINGER, HWMs, MAXMSGSIZE, timeouts and CURVE keys are set in one place.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import zmq

from edgezmq.protocol import wire
from edgezmq.transport.security import Curve

# Activations are multi-MB: a few messages of queue per socket bound memory (the
# default HWM of 1000 would be gigabytes) while keeping the next stage fed.
DATA_HWM = 2
CONTROL_HWM = 16
DATA_MAXMSGSIZE = 1024 * 1024 * 1024  # a whole multipart message (bytes) on the data plane
CONTROL_MAXMSGSIZE = 4 * 1024 * 1024
LINGER_MS = 0  # never block close on a dead peer; delivery is acknowledged at the app level
SEND_TIMEOUT_MS = 500  # send loops retry so that they can notice shutdown
# A data PUSH whose plan gives its link's rate gets a kernel send buffer of LINK_BUFFER_S of
# that rate, at least LINK_BUFFER_MIN bytes; above LINK_BUFFER_MAX (links faster than ~168
# Mbit/s) the kernel's autotuning stays.  Why: an autotuned buffer grows to MBs, so a send
# "completes" into it while the link is slow and the adaptive policy sees no slow link;
# bounded, the backlog stays in ZeroMQ's queue and the send waits for the link
# (docs/compression.md, "Socket buffers"; measured there).
LINK_BUFFER_S = 0.05
# not below 64 kB: loopback's segments are 64 kB, and a buffer under one segment stalls TCP
# (measured: 6.4 MB messages at 1.6 MB/s with 32 kB, 325 MB/s with 64 kB)
LINK_BUFFER_MIN = 64 * 1024
LINK_BUFFER_MAX = 1024 * 1024


@dataclass(frozen=True)
class SocketSpec:
    hwm: int
    maxmsgsize: int
    immediate: bool = False


DATA = SocketSpec(hwm=DATA_HWM, maxmsgsize=DATA_MAXMSGSIZE, immediate=True)
CONTROL = SocketSpec(hwm=CONTROL_HWM, maxmsgsize=CONTROL_MAXMSGSIZE)


def make_socket(ctx: zmq.Context, kind: int, spec: SocketSpec = DATA, curve: Curve | None = None) -> zmq.Socket:
    """A socket with every option this project relies on set explicitly.

    With ``curve`` the socket speaks CurveZMQ: a server (binds; its context needs a
    ``security.Authenticator``) or a client of ``curve.server_key`` (connects)."""
    s = ctx.socket(kind)
    if curve is not None:
        set_curve(s, curve)
    s.setsockopt(zmq.LINGER, LINGER_MS)
    s.setsockopt(zmq.SNDHWM, spec.hwm)
    s.setsockopt(zmq.RCVHWM, spec.hwm)
    s.setsockopt(zmq.MAXMSGSIZE, spec.maxmsgsize)
    if kind in (zmq.PUSH, zmq.REQ, zmq.DEALER):
        s.setsockopt(zmq.SNDTIMEO, SEND_TIMEOUT_MS)
        # queue only to completed connections, so a message is never parked on a
        # peer that never came up
        s.setsockopt(zmq.IMMEDIATE, 1 if spec.immediate else 0)
    return s


def link_sndbuf(mbps: float | None) -> int | None:
    """The SO_SNDBUF (bytes) of a data socket sending on a link of ``mbps`` Mbit/s, or None:
    leave the kernel's autotuning (no rate given, or a fast link: see LINK_BUFFER_S)."""
    if mbps is None or not mbps > 0:
        return None
    size = mbps * 1e6 / 8 * LINK_BUFFER_S
    if not size <= LINK_BUFFER_MAX:  # also NaN/inf: the rate says nothing usable
        return None
    return max(LINK_BUFFER_MIN, int(size))


def set_curve(s: zmq.Socket, curve: Curve) -> None:
    """CURVE options of ``s``; a client may call it again to change the server key before
    its next ``connect`` (each connection keeps the key it was made with)."""
    s.setsockopt(zmq.CURVE_SECRETKEY, curve.keys.secret)
    s.setsockopt(zmq.CURVE_PUBLICKEY, curve.keys.public)
    if curve.is_server:
        s.setsockopt(zmq.CURVE_SERVER, 1)
    elif curve.server_key is not None:
        s.setsockopt(zmq.CURVE_SERVERKEY, curve.server_key)
    else:
        raise ValueError("a CURVE client needs the server's public key")


def connect(s: zmq.Socket, address: str, server_key: bytes | None = None) -> None:
    """Connect, to a CURVE server of public ``server_key`` when given (``s`` has CURVE keys)."""
    if server_key is not None:
        s.setsockopt(zmq.CURVE_SERVERKEY, server_key)
    s.connect(address)


_PORT_RE = re.compile(r"^(tcp://[^:]+|tcp://\[[^\]]+\]):(\d+|\*|0)$")


def bind(sock: zmq.Socket, address: str) -> str:
    """Bind to ``address`` (``tcp://HOST:0`` or ``tcp://HOST:*`` picks a free port) and
    return the endpoint actually bound."""
    m = _PORT_RE.match(address)
    if m and m.group(2) in ("0", "*"):
        sock.bind_to_random_port(m.group(1))
    else:
        sock.bind(address)
    ep = sock.getsockopt(zmq.LAST_ENDPOINT)
    return ep.decode() if isinstance(ep, bytes) else str(ep)


def host_of(address: str) -> str:
    """'tcp://127.0.0.1:5550' -> '127.0.0.1'."""
    m = _PORT_RE.match(address)
    if not m:
        raise ValueError(f"expected tcp://HOST:PORT, got {address!r}")
    return m.group(1)[len("tcp://"):]


def send_frames(sock: zmq.Socket, frames: Sequence[Any], flags: int = 0) -> None:
    """Send one multipart message; large frames go zero-copy, small ones by copy."""
    copies = wire.copy_flags(frames)
    last = len(frames) - 1
    for i, (f, c) in enumerate(zip(frames, copies)):
        sock.send(f, flags=flags | (zmq.SNDMORE if i < last else 0), copy=c)


def send_message(sock: zmq.Socket, msg: wire.Message, flags: int = 0) -> None:
    send_frames(sock, wire.encode(msg), flags)


def recv_frames(sock: zmq.Socket, timeout_ms: int | None) -> list[zmq.Frame] | None:
    """Receive one multipart message without copying; None if nothing came in time."""
    if timeout_ms is not None and not sock.poll(timeout_ms, zmq.POLLIN):
        return None
    return sock.recv_multipart(copy=False)


def close_all(*socks: zmq.Socket | None) -> None:
    for s in socks:
        if s is not None and not s.closed:
            s.close(linger=0)
