"""Measure the bandwidth and latency of a link over ZeroMQ: a probe server and the prober.

    >>> server = ProbeServer("127.0.0.1").start()             # lives inside a node
    >>> probe(server.endpoint, bytes_per_msg=4 << 20, seconds=1.0)
    {'bandwidth_mbps': ..., 'latency_ms': ..., 'rtt_ms_p50': ..., ...}
    >>> server.stop()

One ROUTER socket serves every prober (a DEALER each). Messages, frame by frame::

    ping   [b"ping", seq]            -> [b"pong", seq]            (echoed at once)
    bulk   [b"bulk", seq, payload]   -> [b"ack", seq, nbytes]     (after the whole payload arrived)
    cpu    [b"cpu", seq]             -> [b"cpu", seq, seconds]    (the server process's CPU time)
    other                            -> [b"err", reason]          (counted; the server goes on)

``seq`` and ``nbytes`` are unsigned 64-bit big-endian, ``seconds`` a big-endian double. Latency is half the median round
trip of small pings. Bandwidth is measured with credit flow control: at most ``window``
bulk messages are unacknowledged at any time, a new one is sent per ack, and the rate is
the acknowledged bytes over the time from the first send to the last ack, so it counts
bytes the peer actually received, never bytes parked in a queue. A first ping and a first
bulk message (connection set-up, TCP slow start) are not counted. Every receive is bounded
by ``timeout``: an unreachable or silent endpoint raises ``TimeoutError`` naming it.

What moving the bytes costs each end: the prober reads its own process's CPU time and asks
the server for its own around the timed bulk phase, and reports CPU seconds per byte sent
(``sender_cpu_s_per_byte``) and received (``receiver_cpu_s_per_byte``): kernel network
stack, ZeroMQ's I/O thread, copies. Both processes should be otherwise idle (a node is,
while it is being measured). The planner turns them into a stage's receive/send costs.

Several links at once (a device's NIC, shared by its peers): ``probe_many`` probes several
servers concurrently from this process (this host's uplink), and ``aggregate`` sums
concurrent results, wherever they ran, into the rate they moved together: the bytes of all
over the span from the first bulk start to the last bulk end (``bulk_started_at``,
``bulk_ended_at``: wall clock, so results of other hosts need synchronised clocks).
"""

from __future__ import annotations

import logging
import statistics
import struct
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import zmq

from edgezmq.errors import EdgezmqError
from edgezmq.protocol.messages import NETPROBE_MAX_BYTES, NETPROBE_MAX_SECONDS
from edgezmq.transport import sockets
from edgezmq.transport.security import CURVE_HINT, Curve

__all__ = ["ProbeServer", "probe", "probe_many", "aggregate", "ProbeError"]

log = logging.getLogger(__name__)

MiB = 1024 * 1024
DEFAULT_MSG_BYTES = 4 * MiB  # an activation: ViT-B at microbatch 8 is 4.8 MB
MAX_MSG_BYTES = NETPROBE_MAX_BYTES  # refused above this on both sides

DEFAULT_SECONDS = 1.0
DEFAULT_PINGS = 20
DEFAULT_TIMEOUT_S = 5.0
WINDOW = 2  # bulk messages in flight by default, as many as a data socket's HWM
MAX_WINDOW = 4
MIN_BULK_MESSAGES = 2  # a rate needs at least this many timed messages
SIZING_BYTES = 64 * 1024  # the first (untimed) bulk message: how fast is the link?
MESSAGE_SHARE = 0.25  # a window of bulk messages takes at most this share of the reply timeout
PAYLOAD_SEED = 0  # incompressible, reproducible payload bytes
SERVER_POLL_MS = 100  # how often the server loop looks at its stop flag
START_TIMEOUT_S = 5.0  # the server thread must have bound by then
P90 = 0.9

PING, PONG, BULK, ACK, ERR, CPU = b"ping", b"pong", b"bulk", b"ack", b"err", b"cpu"
MAX_TAG_BYTES = 4
REPLY_HWM = 1000  # the server's send queue, of replies only (pongs, acks, errors)
_U64 = struct.Struct("!Q")
_F64 = struct.Struct("!d")

# Small HWMs bound memory (a few multi-MB messages per peer); room for the window plus a ping.
# Not IMMEDIATE: with it libzmq ends a connecting socket's pipe when the peer goes, and a
# reader between two frames of a reply then aborts the process (`Assertion failed: !_more
# (src/fq.cpp:80)`, libzmq#3485; seen here once in 40 runs of a server stopped mid-probe).
# Without it the pipe outlives the connection; an unreachable peer shows as no reply.
PROBE_SOCKET = sockets.SocketSpec(hwm=MAX_WINDOW + 1, maxmsgsize=MAX_MSG_BYTES + MiB, immediate=False)


class ProbeError(EdgezmqError, RuntimeError):
    """The probe server answered with an error or with something that is not the protocol."""


def _tag(frame: zmq.Frame) -> bytes | None:
    return frame.bytes if len(frame) <= MAX_TAG_BYTES else None


def _percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    return float(np.percentile(values, q * 100))


class ProbeServer:
    """Echoes pings and acknowledges bulk messages on one ROUTER socket, in its own thread.

    `host` is the interface to bind (any free port unless `port` is given); `.endpoint`
    is the address actually bound (with a wildcard host, advertise a routable one instead).
    """

    def __init__(self, host: str = "127.0.0.1", *, port: int = 0, ctx: zmq.Context | None = None,
                 curve: Curve | None = None) -> None:
        self.address = f"tcp://{host}:{port}"
        self.curve = curve  # a CURVE server: its context must run a security.Authenticator
        self._own_ctx = ctx is None
        self.ctx = ctx or zmq.Context()
        self.endpoint: str | None = None
        self.pings = self.messages = self.bytes = self.bad = self.dropped = 0
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> ProbeServer:
        """Bind and serve in a background thread; returns self once bound (raises if it cannot bind)."""
        if self._thread is not None:
            raise RuntimeError(f"probe server {self.endpoint or self.address} already started")
        self._thread = threading.Thread(target=self._serve, name="edgezmq-netprobe", daemon=True)
        self._thread.start()
        if not self._ready.wait(START_TIMEOUT_S):
            self.stop()
            raise TimeoutError(f"probe server on {self.address} not bound within {START_TIMEOUT_S} s")
        if self._error is not None:
            err, self._error = self._error, None
            self.stop()
            raise OSError(f"probe server cannot bind {self.address}: {err}") from err
        return self

    def stop(self, timeout: float = START_TIMEOUT_S) -> None:
        """Stop serving and close the socket (and the context, if the server made it). Idempotent."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():  # pragma: no cover - the loop polls every SERVER_POLL_MS
                log.warning("probe server %s did not stop within %s s", self.endpoint, timeout)
                return
        if self._own_ctx and not self.ctx.closed:
            self.ctx.term()

    def __enter__(self) -> ProbeServer:
        return self.start()

    def __exit__(self, *_: Any) -> None:
        self.stop()

    def stats(self) -> dict[str, Any]:
        return {"endpoint": self.endpoint, "pings": self.pings, "messages": self.messages,
                "bytes": self.bytes, "bad": self.bad, "dropped": self.dropped}

    def _serve(self) -> None:
        sock = None
        try:
            sock = sockets.make_socket(self.ctx, zmq.ROUTER, PROBE_SOCKET, curve=self.curve)
            sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a reply that cannot go raises, is counted
            # Replies are a few bytes: a deep send queue costs nothing, while a shallow one
            # drops acks (libzmq tells a writer of reads only every HWM/2 messages).
            sock.setsockopt(zmq.SNDHWM, REPLY_HWM)
            self.endpoint = sockets.bind(sock, self.address)
        except Exception as e:  # reported by start() in the caller's thread
            self._error = e
            sockets.close_all(sock)
            self._ready.set()
            return
        self._ready.set()
        try:
            while not self._stop.is_set():
                frames = sockets.recv_frames(sock, SERVER_POLL_MS)
                if frames is not None:
                    self._answer(sock, frames)
        finally:
            sock.close(linger=0)

    def _answer(self, sock: zmq.Socket, frames: list[zmq.Frame]) -> None:
        ident, body = frames[0], frames[1:]
        tag = _tag(body[0]) if body else None
        reply: list[Any]
        if tag == PING and len(body) == 2:
            self.pings += 1
            reply = [PONG, body[1]]
        elif tag == BULK and len(body) == 3:
            n = len(body[2])
            self.messages += 1
            self.bytes += n
            reply = [ACK, body[1], _U64.pack(n)]
        elif tag == CPU and len(body) == 2:
            reply = [CPU, body[1], _F64.pack(time.process_time())]
        else:
            self.bad += 1
            shape = [len(f) for f in body]
            reply = [ERR, f"not a netprobe message: {len(body)} frame(s) of {shape} bytes".encode()]
        try:
            sock.send_multipart([ident, *reply], flags=zmq.NOBLOCK)
        except zmq.ZMQError as e:  # peer gone, or its queue full (not reading): never block
            self.dropped += 1
            log.debug("probe server %s: reply dropped: %s", self.endpoint, e)


class _Prober:
    """One DEALER connected to a probe server; every wait bounded by `timeout`."""

    def __init__(self, ctx: zmq.Context, endpoint: str, timeout: float, curve: Curve | None = None) -> None:
        self.endpoint, self.timeout = endpoint, timeout
        self.hint = CURVE_HINT if curve is not None else ""
        self.sock = sockets.make_socket(ctx, zmq.DEALER, PROBE_SOCKET, curve=curve)
        try:
            self.sock.connect(endpoint)
        except zmq.ZMQError as e:
            self.sock.close(linger=0)
            raise ValueError(f"netprobe: cannot connect to {endpoint!r}: {e}") from e

    def close(self) -> None:
        self.sock.close(linger=0)

    def send(self, frames: list[Any], what: str) -> None:
        # not writable when the peer stopped reading (its queue full); an unreachable peer
        # takes the message into the queue and times out in recv (PROBE_SOCKET)
        if not self.sock.poll(int(self.timeout * 1000), zmq.POLLOUT):
            raise TimeoutError(f"netprobe: {self.endpoint} unreachable: cannot send {what} "
                               f"within {self.timeout} s (no connection, or the peer stopped reading){self.hint}")
        sockets.send_frames(self.sock, frames, zmq.NOBLOCK)

    def recv(self, expect: bytes, seq: int, what: str) -> list[zmq.Frame]:
        frames = sockets.recv_frames(self.sock, int(self.timeout * 1000))
        if frames is None:
            raise TimeoutError(f"netprobe: no reply from {self.endpoint} to {what} within {self.timeout} s{self.hint}")
        tag = _tag(frames[0])
        if tag == ERR:
            raise ProbeError(f"netprobe: {self.endpoint} refused {what}: "
                             f"{frames[-1].bytes.decode(errors='replace')}")
        if tag != expect or len(frames) < 2 or frames[1].bytes != _U64.pack(seq):
            raise ProbeError(f"netprobe: {self.endpoint} answered {what} with {tag!r} "
                             f"({len(frames)} frames), expected {expect!r} for seq {seq}")
        return frames

    def ping(self, seq: int) -> float:
        t = time.perf_counter()
        self.send([PING, _U64.pack(seq)], f"ping {seq}")
        self.recv(PONG, seq, f"ping {seq}")
        return time.perf_counter() - t

    def cpu(self, seq: int) -> float | None:
        """The server process's CPU seconds (None from a server that predates the request)."""
        self.send([CPU, _U64.pack(seq)], f"cpu {seq}")
        try:
            frames = self.recv(CPU, seq, f"cpu {seq}")
        except ProbeError:
            return None
        return _F64.unpack(frames[2].bytes)[0] if len(frames) == 3 and len(frames[2]) == _F64.size else None


def _check_args(bytes_per_msg: int, seconds: float | None, count: int | None, pings: int,
                timeout: float, window: int) -> None:
    if not 1 <= bytes_per_msg <= MAX_MSG_BYTES:
        raise ValueError(f"bytes_per_msg: expected 1..{MAX_MSG_BYTES}, got {bytes_per_msg}")
    if count is None and (seconds is None or not 0 < seconds <= NETPROBE_MAX_SECONDS):
        raise ValueError(f"give seconds in (0, {NETPROBE_MAX_SECONDS:g}] or a count: got seconds={seconds}, count={count}")
    if count is not None and count < MIN_BULK_MESSAGES:
        raise ValueError(f"count: expected >= {MIN_BULK_MESSAGES}, got {count}")
    if pings < 1:
        raise ValueError(f"pings: expected >= 1, got {pings}")
    if timeout <= 0:
        raise ValueError(f"timeout: expected > 0 s, got {timeout}")
    if not 1 <= window <= MAX_WINDOW:
        raise ValueError(f"window: expected 1..{MAX_WINDOW} (bounded by the sockets' HWM), got {window}")


def _bulk(p: _Prober, payload: memoryview, seconds: float | None, count: int | None,
          window: int, first_seq: int, stop: Callable[[], None]) -> tuple[int, int, float]:
    """(messages, bytes acknowledged, seconds) of a credit-controlled bulk transfer."""
    seq, acked, nbytes = first_seq, 0, 0
    outstanding: list[int] = []
    t0 = time.perf_counter()

    def more() -> bool:
        sent = seq - first_seq
        if count is not None:
            return sent < count
        assert seconds is not None  # _check_args: a count or seconds
        return sent < MIN_BULK_MESSAGES or time.perf_counter() - t0 < seconds

    while True:
        stop()
        while len(outstanding) < window and more():
            p.send([BULK, _U64.pack(seq), payload], f"bulk message {seq}")
            outstanding.append(seq)
            seq += 1
        if not outstanding:
            break
        done = outstanding.pop(0)
        frames = p.recv(ACK, done, f"bulk message {done}")
        # (a reply cut by a lost connection arrives completed with empty frames: counted 0)
        nbytes += _U64.unpack(frames[2].bytes)[0] if len(frames) == 3 and len(frames[2]) == _U64.size else 0
        acked += 1
    return acked, nbytes, time.perf_counter() - t0


def probe(endpoint: str, *, bytes_per_msg: int = DEFAULT_MSG_BYTES, seconds: float | None = DEFAULT_SECONDS,
          count: int | None = None, pings: int = DEFAULT_PINGS, timeout: float = DEFAULT_TIMEOUT_S,
          window: int = WINDOW, ctx: zmq.Context | None = None, curve: Curve | None = None,
          stop: Callable[[], None] | None = None, ready: Callable[[], None] | None = None) -> dict[str, Any]:
    """Latency (`pings` round trips) then bandwidth (bulk messages of `bytes_per_msg`, fewer
    bytes on a link too slow to move them within the timeout: ``bytes_per_msg`` in the result)
    to a ProbeServer.

    The bulk phase sends `count` messages when given, else runs for `seconds`. Raises
    TimeoutError (naming `endpoint`) when any reply takes longer than `timeout` seconds.
    Bandwidth is in megabits per second (10**6 bit/s); also given in bytes per second.
    With ``curve`` (a client of the server's public key) the probe runs over CurveZMQ.
    ``stop()``, called before every ping and every bulk acknowledgement, raises to end the
    probe early (a cancelled job). ``ready()``, called once between the warm-up and the timed
    bulk phase, may block: ``probe_many`` lines its probes up there.
    """
    halt = stop or (lambda: None)
    _check_args(bytes_per_msg, seconds, count, pings, timeout, window)
    payload = memoryview(np.random.default_rng(PAYLOAD_SEED).bytes(bytes_per_msg))
    own = ctx is None
    ctx = ctx or zmq.Context()
    p = _Prober(ctx, endpoint, timeout, curve)
    try:
        p.ping(0)  # connection set-up: not counted
        rtts = []
        for seq in range(1, pings + 1):
            halt()
            rtts.append(p.ping(seq))
        first = pings + 1
        # slow start, not counted: a small message first, whose time says whether the link
        # carries `bytes_per_msg` within the timeout; on a slow link (an edge board's 1.5
        # Mbit/s NIC takes 22 s for 4 MiB) the bulk messages shrink to what moves in
        # MESSAGE_SHARE of the timeout, never below SIZING_BYTES (the result says what was used)
        sizing = payload[:min(bytes_per_msg, SIZING_BYTES)]
        t = time.perf_counter()
        p.send([BULK, _U64.pack(first), sizing], f"bulk message {first}")
        p.recv(ACK, first, f"bulk message {first}")
        fits = int(len(sizing) / max(time.perf_counter() - t, 1e-9) * MESSAGE_SHARE * timeout / window)
        bytes_per_msg = max(len(sizing), min(bytes_per_msg, fits))
        payload = payload[:bytes_per_msg]
        if ready is not None:
            ready()
        server_cpu0, own_cpu0 = p.cpu(first + 1), time.process_time()
        started_at = time.time()
        messages, nbytes, elapsed = _bulk(p, payload, seconds, count, window, first + 2, halt)
        own_cpu, server_cpu1 = time.process_time() - own_cpu0, p.cpu(first + 3 + messages)
    finally:
        p.close()
        if own:
            ctx.term()
    if nbytes != messages * bytes_per_msg:
        raise ProbeError(f"netprobe: {endpoint} acknowledged {nbytes} bytes of {messages} messages, "
                         f"expected {messages * bytes_per_msg}")
    rate = nbytes / elapsed
    rtt_ms = [r * 1e3 for r in rtts]
    return {
        "endpoint": endpoint,
        "bandwidth_mbps": rate * 8 / 1e6,
        "bandwidth_bytes_per_s": rate,
        "latency_ms": statistics.median(rtt_ms) / 2,
        "rtt_ms_p50": statistics.median(rtt_ms),
        "rtt_ms_p90": _percentile(rtt_ms, P90),
        "rtt_ms_min": min(rtt_ms),
        "pings": len(rtt_ms),
        "bytes": nbytes,
        "messages": messages,
        "bytes_per_msg": bytes_per_msg,
        "seconds": elapsed,
        "bulk_started_at": started_at,
        "bulk_ended_at": started_at + elapsed,
        "window": window,
        "sender_cpu_s_per_byte": own_cpu / nbytes,
        "receiver_cpu_s_per_byte": (None if server_cpu0 is None or server_cpu1 is None
                                    else (server_cpu1 - server_cpu0) / nbytes),
    }


def probe_many(endpoints: Sequence[str], *, curves: Sequence[Curve | None] | None = None,
               **kw: Any) -> list[dict[str, Any]]:
    """``probe`` to every endpoint at once, one thread each, from this process (one context);
    keyword arguments go to every probe. Each probe pings and warms up on its own, then waits
    for the others, so that the timed bulk phases start together. Returns the results in the
    order of `endpoints`; when a probe fails, the others are still waited for (the ones waiting
    for it give up), then the first failure is raised."""
    if not endpoints:
        raise ValueError("probe_many: no endpoints")
    if curves is not None and len(curves) != len(endpoints):
        raise ValueError(f"probe_many: {len(curves)} curves for {len(endpoints)} endpoints")
    ctx = zmq.Context()
    outcomes: list[tuple[bool, Any]] = [(False, None)] * len(endpoints)
    # the warm-ups are a few round trips each; a probe waits that long for the slowest, at most
    line_up = threading.Barrier(len(endpoints), timeout=float(kw.get("timeout", DEFAULT_TIMEOUT_S)))

    def ready() -> None:
        line_up.wait()

    def run(i: int) -> None:
        try:
            outcomes[i] = (True, probe(endpoints[i], ctx=ctx, curve=curves[i] if curves else None,
                                       ready=ready, **kw))
        except BaseException as e:  # noqa: B036 - handed to the caller's thread, re-raised there
            line_up.abort()
            outcomes[i] = (False, e)

    threads = [threading.Thread(target=run, args=(i,), name=f"edgezmq-netprobe-{i}", daemon=True)
               for i in range(len(endpoints))]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()  # each probe bounds its own waits by `timeout`
    finally:
        ctx.term()
    failures = [value for ok, value in outcomes if not ok]
    if failures:  # the cause, not a probe that gave up waiting for the one that failed
        raise next((e for e in failures if not isinstance(e, threading.BrokenBarrierError)), failures[0])
    return [value for _, value in outcomes]


def aggregate(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """What concurrent probes moved together: all their bytes over the span from the first
    bulk start to the last bulk end (a lower bound when they did not run in step), the sum
    of their own rates (an upper bound then), and ``overlap``, the fraction of that span in
    which all of them ran (near 1: the two agree and the figure is the shared capacity)."""
    if not results:
        raise ValueError("aggregate: no results")
    for r in results:
        if "bulk_started_at" not in r or "bulk_ended_at" not in r:
            raise ValueError(f"aggregate: the result from {r.get('endpoint')!r} has no bulk_started_at/"
                             "bulk_ended_at (measured by an older edgezmq)")
    start = min(r["bulk_started_at"] for r in results)
    end = max(r["bulk_ended_at"] for r in results)
    common = min(r["bulk_ended_at"] for r in results) - max(r["bulk_started_at"] for r in results)
    span = end - start
    nbytes = sum(int(r["bytes"]) for r in results)
    return {
        "flows": len(results),
        "bandwidth_mbps": nbytes * 8 / span / 1e6,
        "sum_of_rates_mbps": sum(float(r["bandwidth_mbps"]) for r in results),
        "bytes": nbytes,
        "seconds": span,
        "overlap": max(0.0, common) / span,
    }
