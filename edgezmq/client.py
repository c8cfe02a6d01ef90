"""Submit microbatches to a deployed pipeline and collect results in submission order.

The client PUSHes to every replica of stage 0 and binds the PULL socket the last
stage sends results to.  At most ``window`` microbatches are in flight (a credit is
returned by each result), so the pipeline stays full but memory stays bounded.  A
microbatch with no result after ``timeout`` seconds is resubmitted up to
``retries`` times (inference is idempotent; ``seq`` drops duplicates), then
``TimeoutError``.  An ``error`` message for a microbatch raises ``PipelineError``.
With a ``Keyring`` both sockets speak CurveZMQ: the results PULL is a CURVE server
that admits only the nodes' keys, the PUSH a CURVE client of each stage-0 node.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable, Container, Iterable, Iterator
from typing import Any

import numpy as np
import zmq

from edgezmq.errors import EdgezmqError
from edgezmq.orchestrate.planfile import DeployPlan
from edgezmq.protocol import codecs, wire
from edgezmq.protocol.control import BAD_STATE, ControlError
from edgezmq.transport import security, sockets
from edgezmq.transport.nodeclient import NodeClient

log = logging.getLogger(__name__)

DEFAULT_WINDOW = 4
TIMESTAMPS_KEPT = 100_000  # results whose per-stage timestamps a client keeps (the latest)
SESSION_BYTES = 8  # 16 hex characters: collisions between clients of one deployment are not a concern
DEFAULT_TIMEOUT_S = 120.0
POLL_MS = 50
# what stage 0 takes: one array (images), or a tuple of arrays (a text model's token ids, mask, types)
Batch = np.ndarray | tuple[np.ndarray, ...] | list[np.ndarray]


class FailoverNeeded(Exception):
    """Raised by ``send_frames`` (and inside the stream loop) when the deployment must be
    replaced (a node died) before anything more can be sent; the caller fails over and resends."""


class ResultTimeout(EdgezmqError, TimeoutError):
    """A microbatch was not accepted, or not answered, in time (after its retries)."""


class PipelineError(EdgezmqError, RuntimeError):
    """The pipeline answered a microbatch with an error."""

    def __init__(self, seq: int, code: str, message: str, stage: int) -> None:
        super().__init__(f"microbatch {seq} failed at stage {stage}: {code}: {message}")
        self.seq, self.code, self.message, self.stage = seq, code, message, stage


class Client:
    def __init__(
        self,
        entry: list[str],
        results: str,
        run: str,
        *,
        window: int = DEFAULT_WINDOW,
        timeout: float = DEFAULT_TIMEOUT_S,
        retries: int = 0,
        microbatch: int | None = None,
        ctx: zmq.Context | None = None,
        keyring: security.Keyring | None = None,
        entry_keys: list[bytes] | None = None,
        keep_timestamps: int = TIMESTAMPS_KEPT,
        input_encoding: str = codecs.RAW,
    ) -> None:
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        codecs.codec(input_encoding)  # a known name, or ValueError
        # how inputs cross to stage 0 (the plan's input_encoding; float32 tensors only, stage 0
        # decodes whatever the header says): set it for each deployment followed
        self.input_encoding = input_encoding
        self.window, self.timeout, self.retries = window, timeout, retries
        self.microbatch = microbatch
        self._own_ctx = ctx is None
        self.ctx = ctx or zmq.Context()
        self.keyring = keyring
        self.auth = None
        server = push = None
        if keyring is not None:
            # only the nodes may deliver results; one ZAP handler per context
            self.auth = security.Authenticator(self.ctx, allow=list(keyring.nodes.values()))
            server = keyring.server
            # a placeholder server key: attach() sets each stage-0 node's before connecting
            push = security.Curve(keyring.own, server_key=next(iter(keyring.nodes.values()), keyring.own.public))
        self.pull = sockets.make_socket(self.ctx, zmq.PULL, sockets.DATA, curve=server)
        self.results_endpoint = sockets.bind(self.pull, results)
        self.push = sockets.make_socket(self.ctx, zmq.PUSH, sockets.DATA, curve=push)
        self._connected: list[tuple[str, bytes | None]] = []  # (stage-0 endpoint, its key)
        self.attach(entry, run, entry_keys)
        self._seq = 0
        # failover (edgezmq.orchestrate.failover): set `failed` from any thread; the stream loop then calls
        # `recover()` -> (entry, run, entry_keys), re-attaches and replays every unanswered microbatch
        self.failed = threading.Event()
        self.recover: Callable[[], tuple[list[str], str, list[bytes] | None]] | None = None
        self.replayed = 0
        self.ignored = 0  # duplicates, other runs, malformed
        # who this client is on the wire: stages echo it, so that results left in the pipeline by
        # a client that gave up are not taken by the next one on the same results address
        self.session = secrets.token_hex(SESSION_BYTES)
        self.foreign = 0  # results and errors of other sessions, dropped
        self.resubmitted = 0
        # seq -> per-stage [stage, recv, start, end, send] + [-1, received]: of the latest
        # `keep_timestamps` results only, so that a client streaming for days stays bounded
        self.timestamps: dict[int, list] = {}
        self.keep_timestamps = max(1, keep_timestamps)

    @property
    def next_seq(self) -> int:
        """The sequence number the next microbatch submitted gets (``timestamps`` is keyed by them)."""
        return self._seq

    def take_seq(self) -> int:
        """The next microbatch's sequence number, taken (each message this client sends has its own)."""
        seq = self._seq
        self._seq += 1
        return seq

    def arrivals(self, first_seq: int, n: int) -> list[float]:
        """When the results of microbatches ``first_seq .. first_seq + n - 1`` reached this client
        (their receive times, kept in ``timestamps``), in the order they arrived.  A stream hands
        results over in submission order, in bunches when replicas finish out of order; these
        are the times to take a pipeline's pace from."""
        return sorted(self.timestamps[s][-1][1] for s in range(first_seq, first_seq + n) if s in self.timestamps)

    def attach(self, entry: list[str], run: str, entry_keys: list[bytes] | None = None) -> None:
        """Point the client at a deployment (stage-0 endpoints and run id; with a keyring,
        ``entry_keys`` are their public keys, ``Deployment.entry_keys``).

        A client may be made before its deployment (``entry=[]``) so that the
        results address it binds can be given to the last stage."""
        if self.keyring is not None and entry and (entry_keys is None or len(entry_keys) != len(entry)):
            raise ValueError(f"a secured client needs one public key per stage-0 endpoint: "
                             f"{len(entry)} endpoint(s), {0 if entry_keys is None else len(entry_keys)} key(s)")
        keys = list(entry_keys) if self.keyring is not None and entry_keys else [None] * len(entry)
        new = list(zip(entry, keys))
        if new == self._connected:  # the same deployment again: keep the connections (and what is queued)
            self.run = run
            return
        for addr, _ in self._connected:  # a new deployment replaces the old entry points
            try:
                self.push.disconnect(addr)
            except zmq.ZMQError:
                pass
        for addr, key in new:
            sockets.connect(self.push, addr, key)
        self._connected = new
        self.run = run

    @classmethod
    def from_plan(cls, plan: DeployPlan, **kw: Any) -> Client:
        """Find the running deployment of ``plan``: ask stage 0's nodes for run id and endpoint."""
        entry: list[str] = []
        run = ""  # every node of stage 0 reports it
        for ref in plan.stages[0].nodes:
            with NodeClient(ref.control, timeout=3.0, retries=1, name=ref.name, curve=plan.curve(ref)) as c:
                r = c.ping()
            if r.state != "running" or r.data is None or r.run is None:  # running: both are set
                raise ControlError(BAD_STATE, f"node {ref.name} is {r.state}, not running: deploy the plan first")
            entry.append(r.data)
            run = r.run
        kw.setdefault("microbatch", plan.model.microbatch)
        kw.setdefault("input_encoding", plan.input_encoding)
        if kw.get("window") is None:  # the plan's own (predicted.window, Plan.window), else from its nodes
            kw["window"] = plan.in_flight
        if plan.keyring is not None:
            kw.setdefault("keyring", plan.keyring)
            kw.setdefault("entry_keys", [plan.keyring.node_key(r.name) for r in plan.stages[0].nodes])
        return cls(entry, plan.results, run, **kw)

    # ------------------------------------------------------------------
    def _check(self, x: Batch) -> list[np.ndarray]:
        """A batch as the list of arrays stage 0 takes: images as one float32 (B, C, H, W) array;
        a text model's three int64 (B, S) arrays (token ids, attention mask, token types) as a
        tuple or list. Stage 0 checks shapes and dtypes against the model's; here, the batch size."""
        if isinstance(x, (tuple, list)):
            xs = list(x)
            if not xs or not all(isinstance(a, np.ndarray) and a.ndim >= 1 for a in xs):
                raise TypeError("a batch of several tensors must be a non-empty tuple of numpy arrays, "
                                "each with a batch dimension")
            if len({a.shape[0] for a in xs}) > 1:
                raise ValueError(f"the arrays of a batch disagree on its size: {[a.shape for a in xs]}")
        elif isinstance(x, np.ndarray):
            if x.dtype != np.float32:
                x = x.astype(np.float32)
            if x.ndim != 4:
                raise ValueError(f"a batch must be (B, C, H, W), got shape {x.shape}")
            xs = [x]
        else:
            raise TypeError(f"a batch must be a numpy array or a tuple of them, got {type(x).__name__}")
        n = xs[0].shape[0]
        if self.microbatch is not None and not 1 <= n <= self.microbatch:
            raise ValueError(f"batch of {n} outside 1..{self.microbatch} (the deployment's microbatch)")
        return [np.ascontiguousarray(a) for a in xs]

    def _frames(self, seq: int, xs: list[np.ndarray]) -> list:
        msg = wire.Message("act", self.run, seq, -1, xs, t=[[-1, time.time()]], session=self.session)
        if self.input_encoding == codecs.RAW:
            return wire.encode(msg)
        return wire.encode(msg, codecs.encode_all([self.input_encoding], xs)[0])

    def _send(self, seq: int, x: list[np.ndarray], deadline: float) -> None:
        """Send, waiting for stage 0 to take it (resubmissions and failover replays only: the
        stream's own sends never wait, see ``stream``)."""
        self.send_frames(seq, self._frames(seq, x), deadline)

    def send_frames(self, seq: int, frames: list, deadline: float) -> None:
        """Send an encoded message (microbatch `seq`), waiting until `deadline` for stage 0 to take it."""
        while True:
            try:
                sockets.send_frames(self.push, frames)
                return
            except zmq.Again:
                if self.failed.is_set() and self.recover is not None:
                    raise FailoverNeeded() from None
                if time.time() > deadline:
                    raise ResultTimeout(f"stage 0 did not accept microbatch {seq} within {self.timeout:g}s") from None

    def infer(self, x: Batch) -> np.ndarray:
        """One batch -> its logits."""
        return next(iter(self.stream([x])))

    def stream(
        self, batches: Iterable[Batch], *, on_result: Callable[[int, np.ndarray], None] | None = None
    ) -> Iterator[np.ndarray]:
        """Results of ``batches`` in their order, with at most ``window`` in flight;
        ``on_result(i, y)`` is called with the i-th batch's result (i counts from 0 in each
        stream; the wire's sequence numbers run on across streams).

        The loop never blocks in a send: when stage 0 cannot take the next microbatch yet (its
        queues and the link are full, as they are whenever the window holds more than the
        pipeline's buffers), it waits for the first of a result and room to send. A loop that
        waited in the send took results one per send: they queued in the socket and were
        timestamped late, in bunches (a stream's measured rate came out 1.5x the link's)."""
        it = iter(batches)
        first = self._seq
        exhausted = False
        order: deque[int] = deque()  # submitted, not yet yielded
        pending: dict[int, list] = {}  # seq -> [batch, sent_at, attempts]: sent, unanswered
        done: dict[int, np.ndarray] = {}
        unsent: tuple[int, list[np.ndarray], float] | None = None  # the next microbatch, (seq, batch, deadline)
        poller = zmq.Poller()
        poller.register(self.pull, zmq.POLLIN)
        while True:
            try:
                if self.failed.is_set() and self.recover is not None:
                    raise FailoverNeeded()
                # every result already in, each timestamped as it is taken (Client.arrivals)
                while (frames := sockets.recv_frames(self.pull, 0)) is not None:
                    self._accept(frames, pending, done)
                while True:
                    if unsent is None:
                        if exhausted or len(order) >= self.window:
                            break
                        try:
                            x = self._check(next(it))
                        except StopIteration:
                            exhausted = True
                            break
                        seq = self.take_seq()
                        unsent = (seq, x, time.time() + self.timeout)
                        order.append(seq)
                    seq, x, deadline = unsent
                    try:
                        sockets.send_frames(self.push, self._frames(seq, x), zmq.NOBLOCK)
                    except zmq.Again:
                        if time.time() > deadline:
                            raise ResultTimeout(f"stage 0 did not accept microbatch {seq} within "
                                                f"{self.timeout:g}s") from None
                        break
                    pending[seq] = [x, time.time(), 1]
                    unsent = None
            except FailoverNeeded:
                if unsent is not None:  # replayed with the others, to the new deployment
                    pending[unsent[0]] = [unsent[1], time.time(), 1]
                    unsent = None
                self._fail_over(pending)
                continue
            while order and order[0] in done:
                seq = order.popleft()
                y = done.pop(seq)
                if on_result:
                    on_result(seq - first, y)
                yield y
            if exhausted and not order:
                return
            if unsent is not None:
                poller.register(self.push, zmq.POLLOUT)
            elif self.push in poller:
                poller.unregister(self.push)
            poller.poll(POLL_MS)  # a result, room for the next microbatch, or a turn to check timeouts
            if not (self.failed.is_set() and self.recover is not None):
                self._expire(pending)

    def _fail_over(self, pending: dict) -> None:
        """Move to a new deployment and send every unanswered microbatch again (same seq)."""
        self.failed.clear()
        assert self.recover is not None
        try:
            entry, run, entry_keys = self.recover()
        except Exception as e:
            seqs = sorted(pending)
            raise PipelineError(seqs[0] if seqs else -1, "failover_failed",
                                f"{e}; unanswered microbatches: {seqs}", -1) from e
        self.attach(entry, run, entry_keys)
        now = time.time()
        for seq, entry_ in sorted(pending.items()):
            entry_[1] = now
            try:
                self._send(seq, entry_[0], now + self.timeout)
            except FailoverNeeded:  # another node died meanwhile: the loop fails over again
                return
        self.replayed += len(pending)
        log.warning("failed over to run %s: replayed %d microbatch(es)", run, len(pending))

    def admit(self, frames: list, pending: Container[int]) -> wire.Message | None:
        """The message in `frames` if it answers one of the `pending` sequence numbers of this
        client's session and run, else None: a malformed message, another run's or a duplicate
        (of a resent one) counted in ``ignored``, another session's in ``foreign``. The filter
        every reader of the results socket applies (``stream``; edgezmq.generation)."""
        try:
            msg = wire.decode(frames)
        except wire.WireError as e:
            self.ignored += 1
            log.warning("ignored malformed result: %s", e)
            return None
        if msg.session != self.session:
            self.foreign += 1  # another client's (one that gave up on this address), or forged
            log.warning("dropped a %s message of another client session (seq %d)", msg.kind, msg.seq)
            return None
        if msg.run != self.run or msg.seq not in pending:
            self.ignored += 1  # another run's, or a duplicate of a resubmitted microbatch
            return None
        return msg

    def _accept(self, frames: list, pending: dict, done: dict) -> None:
        msg = self.admit(frames, pending)
        if msg is None:
            return
        if msg.kind == "error":
            err = msg.error or {}
            raise PipelineError(msg.seq, err.get("code", "?"), err.get("message", ""), msg.stage)
        if msg.kind != "result" or len(msg.tensors) != 1:
            self.ignored += 1
            return
        pending.pop(msg.seq)
        self.keep_trace(msg)
        done[msg.seq] = msg.tensors[0].copy()  # logits are small; give the caller a writable array

    def keep_trace(self, msg: wire.Message) -> None:
        """Keep a result's per-stage timestamps (its ``t``, plus its receive time here) in
        ``timestamps``: the latest ``keep_timestamps`` results' only."""
        self.timestamps[msg.seq] = msg.t + [[-1, time.time()]]
        while len(self.timestamps) > self.keep_timestamps:  # the oldest first (insertion order)
            del self.timestamps[next(iter(self.timestamps))]

    def _expire(self, pending: dict) -> None:
        now = time.time()
        for seq, entry in list(pending.items()):
            x, sent, attempts = entry
            if now - sent <= self.timeout:
                continue
            if attempts > self.retries:
                raise ResultTimeout(f"no result for microbatch {seq} within {self.timeout:g}s ({attempts} attempt(s))")
            log.warning("microbatch %d timed out, resubmitting (attempt %d)", seq, attempts + 1)
            self.resubmitted += 1
            self._send(seq, x, now + self.timeout)
            entry[1], entry[2] = time.time(), attempts + 1

    def close(self) -> None:
        """Close the sockets (and the context the client made); a second call does nothing."""
        if self.pull.closed:
            return
        sockets.close_all(self.push, self.pull)
        if self.auth is not None:
            self.auth.stop()
        if self._own_ctx:
            self.ctx.term()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def split(x: Batch, microbatch: int) -> list:
    """N samples -> microbatches of at most ``microbatch`` (the last may be short); a tuple of
    arrays (a text model's inputs) -> tuples of their slices."""
    if isinstance(x, (tuple, list)):
        n = len(x[0])
        return [tuple(a[i:i + microbatch] for a in x) for i in range(0, n, microbatch)]
    return [x[i:i + microbatch] for i in range(0, len(x), microbatch)]
