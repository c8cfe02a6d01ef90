"""The stage runtime: one loaded shard and its receive -> compute -> send threads.

Three threads joined by bounded queues: receive (PULL, decode, validate) -> compute
(torch, inference_mode) -> send (encode, PUSH).  Bad data messages are counted and turned
into ``error`` messages downstream; nothing a peer sends can stop the stage.  The send
thread encodes with the rung of the link's ladder that ``adaptive.LinkPolicy`` picks
(``start(encodings=...)``, docs/compression.md); without one everything goes raw.  A decoder's
stage also takes `gen` steps: each row runs against its sequence's KV cache (``kvcache``,
docs/generate.md).
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zmq

from edgezmq.node import kvcache
from edgezmq.node.adaptive import LinkPolicy
from edgezmq.protocol import codecs, sampling, wire
from edgezmq.protocol.messages import LoadRequest, StageStats
from edgezmq.transport import security, sockets

log = logging.getLogger(__name__)

QUEUE_DEPTH = 2  # between threads: enough to overlap compute with transfer, no more
POLL_MS = 100  # how often blocking loops look at their stop flags
DRAIN_TIMEOUT_S = 10.0  # SIGTERM: finish in-flight microbatches for at most this long
BUFFERS_PER_DIRECTION = QUEUE_DEPTH + sockets.DATA_HWM + 1  # for the memory estimate
WIRE_SEQ_LIMIT = 2**63  # wire.decode_header accepts seq in [-1, 2**63)
# Test hook, no root needed: a JSON file {"<stage>": Mbit/s, ...}; while it names this stage,
# its send thread sends no faster than that rate (one message may wait on the "wire"), so a
# test can slow a link and restore it live (tests/test_compression.py).  Unset: no cost.
THROTTLE_ENV = "EDGEZMQ_TEST_THROTTLE"
THROTTLE_CHECK_S = 0.1  # how often the throttle file is read again
_STOP = object()


@dataclass
class Counters:
    """The stage's counters; each is documented where it crosses the wire (protocol.messages.StageStats)."""

    received: int = 0
    processed: int = 0
    samples: int = 0
    sent: int = 0
    bad_messages: int = 0
    wrong_run: int = 0
    compute_errors: int = 0
    forwarded_errors: int = 0
    send_retries: int = 0
    bytes_in: int = 0  # data-plane frames received, header included
    bytes_out: int = 0
    recv_s: float = 0.0  # decoding + validating
    wait_s: float = 0.0  # compute thread idle, waiting for input
    compute_s: float = 0.0
    compute_cpu_s: float = 0.0  # CPU time of the compute thread inside forwards
    send_s: float = 0.0  # send thread inside send (includes back-pressure)
    encode_s: float = 0.0  # of send_s, encoding tensors (codecs)
    enc_messages: dict[str, int] = field(default_factory=dict)  # messages sent per rung
    enc_switches: int = 0
    enc_fallbacks: int = 0  # tensors sent raw because int8/int4 refused them (NaN/inf)
    last_error: str = ""

    def to_dict(self) -> dict[str, Any]:
        # a copy of enc_messages too: the send thread adds keys while stats are read
        return {k: dict(v) if isinstance(v, dict) else v for k, v in self.__dict__.items()}


@dataclass
class LoadSpec:
    """What a stage runs: a ``load`` request with the node's defaults filled in."""

    run: str
    model: str
    start: int
    end: int
    stage: int
    last: bool
    microbatch: int
    granularity: str = "block"
    kwargs: dict = field(default_factory=dict)
    checkpoint: str | None = None
    pretrained: bool = False
    dtype: str = "float32"
    threads: int | None = None
    cache_bytes: int | None = None  # a decoder's KV-cache budget (None: the node's default)
    cache_idle_s: float = kvcache.DEFAULT_IDLE_S
    exact_generation: bool = False  # a decoder's generation rows one by one (batch 1)
    generation_only: bool = False  # a decoder's stage taking gen steps only (buffers sized for them)

    @classmethod
    def from_request(cls, req: LoadRequest, threads: int | None = None) -> LoadSpec:
        """``threads``: the node's, used when the request does not say."""
        return cls(
            run=req.run, model=req.model, start=req.units[0], end=req.units[1], stage=req.stage,
            last=req.last, microbatch=req.microbatch, granularity=req.granularity,
            kwargs=dict(req.kwargs), checkpoint=req.checkpoint, pretrained=req.pretrained,
            dtype=req.dtype, threads=req.threads if req.threads is not None else threads,
            cache_bytes=req.cache_bytes, exact_generation=req.exact_generation,
            generation_only=req.generation_only,
            cache_idle_s=req.cache_idle_s if req.cache_idle_s is not None else kvcache.DEFAULT_IDLE_S,
        )


class StageRuntime:
    """One loaded shard and its three data threads."""

    def __init__(self, ctx: zmq.Context, spec: LoadSpec, pull: zmq.Socket, endpoint: str,
                 keys: security.KeyPair | None = None) -> None:
        self.ctx = ctx
        self.keys = keys  # the node's: the PUSH downstream is then a CURVE client
        self.spec = spec
        self.pull = pull
        self.endpoint = endpoint
        self.push: zmq.Socket | None = None
        self.shard: Any = None
        self.expected_in: list[tuple[tuple[int, ...], str]] = []
        # a decoder's stage: the one tensor a gen step carries in (at the microbatch and seq_len),
        # and the caches (made by the loader once the shard is built); None: not a decoder
        self.gen_expected: tuple[tuple[int, ...], str] | None = None
        self.kv: kvcache.KVStore | None = None
        self.cache_budget = 0
        self.counters = Counters()
        self.in_q: queue.Queue = queue.Queue(maxsize=QUEUE_DEPTH)
        self.out_q: queue.Queue = queue.Queue(maxsize=QUEUE_DEPTH)
        self.stop = threading.Event()  # hard stop
        self.draining = threading.Event()  # stop taking input, finish the rest
        self.paused = threading.Event()  # `pause`: the compute thread computes nothing until `resume`
        self.threads: list[threading.Thread] = []
        self.started_at: float | None = None
        self.started_cpu = 0.0
        self._compute_clock: int | None = None  # the compute thread's CPU clock
        self._forward_cpu0: float | None = None  # its CPU time when the forward now running began
        # called by the send thread with each sent microbatch's [stage, t_recv, t_start,
        # t_end, t_send] and its send seconds (edgezmq.node.metrics histograms)
        self.observers: list[Callable[[list, float], None]] = []
        self.n_out = 0  # tensors this stage sends (the daemon knows it from the model's boundary specs)
        self.ladder: list[list[str]] = []  # the outgoing link's rungs (start(encodings=...)); [] = raw
        self.policy: LinkPolicy | None = None
        self.sndbuf: int | None = None  # the data PUSH's SO_SNDBUF (start(link_mbps=...)); None: autotuned
        self._throttle = _Throttle.from_env(spec.stage)

    # ---- data threads -------------------------------------------------
    def _put(self, q: queue.Queue, item: Any) -> bool:
        while not self.stop.is_set():
            try:
                q.put(item, timeout=POLL_MS / 1000)
                return True
            except queue.Full:
                continue
        return False

    def _reject(self, run: str, seq: Any, code: str, message: str, t: list | None = None,
                session: str | None = None) -> None:
        # the error must itself be a valid message: a seq out of the wire's range (read from a
        # header that failed validation) becomes -1, texts are cut to the wire's byte limit
        if not isinstance(seq, int) or isinstance(seq, bool) or not -1 <= seq < WIRE_SEQ_LIMIT:
            seq = -1
        message = message.encode()[:wire.MAX_TEXT].decode(errors="ignore")
        c = self.counters
        c.last_error = f"seq {seq}: {code}: {message}"[:500]
        log.warning("stage %d: rejected message seq=%s: %s: %s", self.spec.stage, seq, code, message)
        self._put(self.out_q, wire.error_message(run, seq, self.spec.stage, code, message, t, session))

    def _recv_loop(self) -> None:
        c, spec = self.counters, self.spec
        while not self.stop.is_set() and not self.draining.is_set():
            try:
                # blocking receive with RCVTIMEO: one call per message, no separate poll
                frames = self.pull.recv_multipart(copy=False)
            except zmq.Again:
                continue
            except zmq.ZMQError as e:
                log.warning("stage %d: receive failed: %s", spec.stage, e)
                continue
            t_recv = time.time()
            c.received += 1
            c.bytes_in += sum(len(f) for f in frames)
            reply_run = spec.run  # errors go out under the run they belong to
            session = None  # ... and to the client session of the message they answer
            try:
                msg = wire.decode(frames)
                session = msg.session
                if msg.kind == "error":
                    # errors come from stages only, so a client cannot fail microbatches with
                    # invented codes; a stage's error keeps its run (wrong_run names the sender's)
                    if msg.stage < 0:
                        raise wire.WireError("bad_kind", f"error messages come from stages; got one from "
                                             f"stage {msg.stage} (a client)", msg.seq)
                    # forwarded untouched, an error keeps the stage that raised it: any stage
                    # upstream of this one (one that fails at stage 0 of 4 reaches stage 3 as 0)
                    if msg.stage >= spec.stage:
                        raise wire.WireError("bad_stage", f"stage {spec.stage} takes errors of stages "
                                             f"0..{spec.stage - 1}, got stage {msg.stage}", msg.seq)
                    c.forwarded_errors += 1
                    self._put(self.out_q, msg)
                    continue
                if msg.run != spec.run:
                    c.wrong_run += 1
                    reply_run = msg.run
                    raise wire.WireError("wrong_run", f"message of run {msg.run!r}, this stage serves {spec.run!r}", msg.seq)
                if msg.kind != "act":
                    raise wire.WireError("bad_kind", f"a stage accepts 'act' messages, got {msg.kind!r}", msg.seq)
                if msg.stage != spec.stage - 1:
                    raise wire.WireError("bad_stage", f"stage {spec.stage} takes output of stage {spec.stage - 1}, got stage {msg.stage}", msg.seq)
                if msg.gen is not None:
                    if self.gen_expected is None:
                        raise wire.WireError("gen_state", f"a gen message to a stage of {spec.model}, which is "
                                             "not a decoder", msg.seq)
                    kvcache.check_step_tensors(msg, self.gen_expected, spec.microbatch)
                elif spec.generation_only:
                    raise wire.WireError("gen_state", "a whole-sequence message to a stage loaded for generation "
                                         "only (load.generation_only): send gen steps", msg.seq)
                else:
                    wire.check_tensors(msg.tensors, self.expected_in, max_batch=spec.microbatch, seq=msg.seq)
                if len({a.shape[0] for a in msg.tensors}) > 1:
                    raise wire.WireError("bad_shape", "tensors disagree on the batch size", msg.seq)
            except wire.WireError as e:
                c.bad_messages += 1
                self._reject(reply_run, e.seq if e.seq is not None else -1, e.code, e.message,
                             session=e.session if e.session is not None else session)
                continue
            except Exception as e:  # a decoder bug must cost one message, never the receive thread
                log.exception("stage %d: decoding a message failed", spec.stage)
                c.bad_messages += 1
                self._reject(reply_run, -1, "bad_message", f"undecodable message ({type(e).__name__})")
                continue
            finally:
                c.recv_s += time.time() - t_recv
            msg.t.append([spec.stage, t_recv, 0.0, 0.0, 0.0])
            self._put(self.in_q, msg)
        self._put(self.in_q, _STOP)

    def _compute_loop(self) -> None:
        import torch

        c, spec = self.counters, self.spec
        if spec.threads:
            torch.set_num_threads(spec.threads)
        self._compute_clock = time.pthread_getcpuclockid(threading.get_ident())
        waited = 0.0  # for the link policy's pace: input waits since the last microbatch went out
        while not self.stop.is_set():
            t0 = time.time()
            try:
                msg = self.in_q.get(timeout=POLL_MS / 1000)
            except queue.Empty:
                c.wait_s += time.time() - t0
                waited += time.time() - t0
                if self.kv is not None:
                    self.kv.expire()
                continue
            t1, cpu1 = time.time(), time.thread_time()
            c.wait_s += t1 - t0
            waited += t1 - t0
            if msg is _STOP:
                self._put(self.out_q, _STOP)
                return
            self._forward_cpu0 = cpu1
            if self.paused.is_set():  # also holds a microbatch taken just before `pause`
                if not self._hold_while_paused():
                    return
                t1 = time.time()  # paused time is neither waiting for input nor computing
            try:
                # received frames are writable, aligned views: no copy; anything else is copied
                xs = [torch.from_numpy(a if a.flags.aligned and a.flags.writeable else a.copy())
                      for a in msg.tensors]
                with torch.inference_mode():
                    outs = self._gen_step(msg, xs) if msg.gen is not None else self.shard(*xs)
                arrays = [np.ascontiguousarray(o.numpy()) for o in outs]
            except kvcache.GenError as e:  # refused before anything changed
                self._forward_cpu0 = None
                c.bad_messages += 1
                self._reject(spec.run, msg.seq, e.code, e.message, msg.t, msg.session)
                continue
            except Exception as e:  # a shard failure is this message's error, not the node's
                self._forward_cpu0 = None
                c.compute_errors += 1
                self._reject(spec.run, msg.seq, "compute_failed", f"{type(e).__name__}: {e}", msg.t, msg.session)
                continue
            t2 = time.time()
            c.compute_s += t2 - t1
            c.compute_cpu_s += time.thread_time() - cpu1
            c.processed += 1
            self._forward_cpu0 = None
            c.samples += int(arrays[0].shape[0]) if arrays else 0
            if self.kv is not None:
                self.kv.expire()
            msg.t[-1][2:4] = [t1, t2]
            if self.policy is not None:
                self.policy.observe_pace(waited + (t2 - t1))
            waited = 0.0
            out = wire.Message(
                kind="result" if spec.last else "act", run=spec.run, seq=msg.seq,
                stage=spec.stage, tensors=arrays, t=msg.t, session=msg.session, gen=msg.gen,
            )
            self._put(self.out_q, out)

    def _gen_step(self, msg: wire.Message, xs: list[Any]) -> list[Any]:
        """A gen message through the shard: each row on its own (batch 1) against its sequence's
        cache; out: hidden states right-padded to the message's tokens, or (last stage) each row's
        next-token logits (B, V), or with a ``pick`` each row's token (B,) int64, the most likely
        or drawn (wire.GEN_PICKS, edgezmq.protocol.sampling). A release drops the caches and
        travels on without tensors."""
        import torch

        g, kv, session = msg.gen, self.kv, msg.session
        assert g is not None and session is not None
        if kv is None:  # the shard is still being built: the node is not running yet
            raise kvcache.GenError("gen_state", "this stage has no caches yet")
        if g["op"] == "release":
            kv.drop(session, g["ids"])
            return []
        x = xs[0]
        seqs = kv.admit(session, g, int(x.shape[1]))
        ys = []
        # rows adding as many tokens each (decode steps; prompts of one length): one batch, unless
        # every row must be batch 1; rows of different lengths go one by one (never padded inside)
        new = g["lens"][0]
        batched = len(seqs) > 1 and not self.spec.exact_generation and all(n == new for n in g["lens"])
        try:
            if batched:
                y = self.shard.step_batch(x[:, :new], [s.cache for s in seqs], [s.length for s in seqs])
                ys = [y[i:i + 1] for i in range(len(seqs))]
                for s in seqs:
                    kv.advanced(s, new)
            for i, s in enumerate(seqs if not batched else []):
                n = g["lens"][i]
                ys.append(self.shard.step(x[i:i + 1, :n], s.cache, g["pos"][i]))
                kv.advanced(s, n)
        except Exception:  # caches half extended: gone, so that the client starts them again
            kv.drop(session, g["ids"], released=False)
            raise
        if self.spec.last:
            logits = torch.cat(ys)
            if g.get("pick") == "argmax":
                return [logits.argmax(-1)]
            if g.get("pick") == "sample":  # at the client's draws, by the rule the client would apply
                rows = logits.float().numpy()
                return [torch.tensor([sampling.sample(rows[i], u, g["temperature"], g["top_k"])
                                      for i, u in enumerate(g["u"])], dtype=torch.int64)]
            return [logits]
        out = torch.zeros((len(ys), x.shape[1], *ys[0].shape[2:]), dtype=ys[0].dtype)
        for i, y in enumerate(ys):
            out[i, :y.shape[1]] = y[0]
        return [out]

    def _hold_while_paused(self) -> bool:
        """Wait until `resume`; False if the stage is stopped meanwhile."""
        while self.paused.is_set():
            if self.stop.wait(POLL_MS / 1000):
                return False
        return True

    def _send_loop(self) -> None:
        c = self.counters
        while True:
            try:
                msg = self.out_q.get(timeout=POLL_MS / 1000)
            except queue.Empty:
                if self.stop.is_set():
                    return
                continue
            if msg is _STOP:
                return
            t0 = time.time()
            if msg.kind != "error" and msg.t:
                msg.t[-1][4] = t0
            rung, encoded = self._encode(msg) if self.ladder and msg.kind != "error" else (None, [])
            frames = wire.encode(msg, encoded)
            assert self.push is not None  # made by start() before the threads
            t_enc = time.time()
            nbytes = sum(memoryview(f).nbytes for f in frames)
            while True:
                try:
                    sockets.send_frames(self.push, frames)
                    c.sent += 1
                    c.bytes_out += nbytes
                    break
                except zmq.Again:  # downstream full or not connected: retry until told to stop
                    c.send_retries += 1
                    if self.stop.is_set():
                        return
            if self._throttle is not None:
                self._throttle.wait(nbytes)
            dt = time.time() - t0
            c.send_s += dt
            c.encode_s += t_enc - t0
            if rung is not None:
                c.enc_messages[rung] = c.enc_messages.get(rung, 0) + 1
                if self.policy is not None:
                    before = self.policy.level
                    if self.policy.observe_send(nbytes, time.time() - t_enc) != before:
                        c.enc_switches += 1
                        log.info("stage %d: link encoding %s -> %s (%s)", self.spec.stage, rung,
                                 rung_name(self.ladder[self.policy.level]), self.policy.switches[-1].why)
            if self.observers and msg.kind != "error" and msg.t:
                self._observe(msg.t[-1], dt)

    def _encode(self, msg: wire.Message) -> tuple[str, list[codecs.Encoded | None]]:
        """msg's tensors encoded with the current rung (None: raw), and the rung's name."""
        rung = self.ladder[self.policy.level if self.policy is not None else 0]
        out, fallbacks = codecs.encode_all(rung, msg.tensors)
        self.counters.enc_fallbacks += fallbacks
        return rung_name(rung), out

    def _observe(self, entry: list, send_s: float) -> None:
        for fn in self.observers:
            try:
                fn(entry, send_s)
            except Exception:  # an observer must never stop the send thread
                log.exception("stage %d: observer failed", self.spec.stage)

    # ---- lifecycle ---------------------------------------------------
    def start(self, connect: list[str], server_keys: list[bytes] | None = None,
              encodings: list[list[str]] | None = None, link_mbps: float | None = None) -> None:
        """Connect downstream and start the threads; ``encodings``: the outgoing link's ladder
        (rungs largest first, each one codec name or one per tensor), None: raw; ``link_mbps``:
        the link's planned rate, which sizes the socket's send buffer (sockets.link_sndbuf)."""
        if encodings:
            self.ladder = [list(r) for r in encodings]
            self.policy = LinkPolicy(len(self.ladder)) if len(self.ladder) > 1 else None
        keys: list[bytes | None] = list(server_keys) if server_keys else [None] * len(connect)
        curve = security.Curve(self.keys, server_key=keys[0]) if self.keys is not None else None
        self.push = sockets.make_socket(self.ctx, zmq.PUSH, sockets.DATA, curve=curve)
        self.sndbuf = sockets.link_sndbuf(link_mbps)
        if self.sndbuf is not None:  # before connecting: each connection takes it when made
            self.push.setsockopt(zmq.SNDBUF, self.sndbuf)
        for addr, key in zip(connect, keys):
            sockets.connect(self.push, addr, key)
        for fn in (self._recv_loop, self._compute_loop, self._send_loop):
            th = threading.Thread(target=fn, name=f"stage{self.spec.stage}-{fn.__name__[1:]}", daemon=True)
            th.start()
            self.threads.append(th)
        self.started_at = time.time()
        self.started_cpu = time.process_time()

    def drain(self, timeout: float = DRAIN_TIMEOUT_S) -> bool:
        """Stop taking input, finish what is in flight; True if it all went out in time."""
        self.draining.set()
        deadline = time.time() + timeout
        for th in self.threads:
            th.join(max(0.0, deadline - time.time()))
        clean = not any(th.is_alive() for th in self.threads)
        if self.push is not None:
            # the last messages may still sit in the socket's pipe: give them time to leave
            self.push.setsockopt(zmq.LINGER, int(max(0.5, deadline - time.time()) * 1000))
        self.stop.set()
        for th in self.threads:
            th.join(2.0)
        self.pull.close(linger=0)
        if self.push is not None:
            self.push.close()
        return clean

    def close(self) -> None:
        self.stop.set()
        for th in self.threads:
            th.join(2.0)
        sockets.close_all(self.pull, self.push)

    def in_flight(self) -> int:
        """Microbatches received and not yet through compute (queued, or being computed)."""
        c = self.counters
        return max(0, c.received - c.processed - c.compute_errors - c.bad_messages - c.forwarded_errors)

    def _forward_in_progress_cpu(self) -> float:
        """CPU seconds the forward now running has used so far (0 between forwards): left out
        of ``cpu_s``, so that between two snapshots ``cpu_s`` grows by whole forwards, as
        ``compute_cpu_s`` and ``processed`` do (a calibration divides it by ``processed``)."""
        clock, start = self._compute_clock, self._forward_cpu0
        if clock is None or start is None:
            return 0.0
        try:
            return max(0.0, time.clock_gettime(clock) - start)
        except OSError:  # the compute thread has ended
            return 0.0

    def stats(self) -> StageStats:
        return StageStats(
            **self.counters.to_dict(),
            stage=self.spec.stage, units=[self.spec.start, self.spec.end], model=self.spec.model,
            run=self.spec.run, in_queue=self.in_q.qsize(), out_queue=self.out_q.qsize(),
            uptime_s=(time.time() - self.started_at) if self.started_at else 0.0,
            # CPU time of the whole process (all threads) since the stage started: with
            # compute_cpu_s, what receiving, decoding, encoding and sending cost
            cpu_s=(time.process_time() - self.started_cpu - self._forward_in_progress_cpu()) if self.started_at else 0.0,
            # a stage whose output queue is full waits on its downstream, not on itself
            in_flight=self.in_flight(), backpressured=self.out_q.full(), paused=self.paused.is_set(),
            encoding=rung_name(self.ladder[self.policy.level if self.policy else 0]) if self.ladder else codecs.RAW,
            goodput_bps=self.policy.goodput if self.policy is not None else None,
            cache=self.kv.stats() if self.kv is not None else None,
        )


def rung_name(rung: list[str]) -> str:
    """A rung as stats and logs show it: `int8`, or per tensor `int8+f16`."""
    return "+".join(rung)


class _Throttle:
    """The THROTTLE_ENV test hook: holds the send thread so that it sends at most at the file's rate."""

    def __init__(self, path: str, stage: int) -> None:
        self.path, self.key = path, str(stage)
        self.rate: float | None = None  # bytes per second; None: not throttled
        self.checked = 0.0
        self.free = 0.0  # when the emulated wire finishes the last message

    @classmethod
    def from_env(cls, stage: int) -> _Throttle | None:
        path = os.environ.get(THROTTLE_ENV)
        return cls(path, stage) if path else None

    def _read(self) -> None:
        self.checked = time.time()
        try:
            mbps = json.loads(open(self.path).read()).get(self.key)
        except (OSError, ValueError, AttributeError):
            mbps = None
        self.rate = float(mbps) * 1e6 / 8 if isinstance(mbps, (int, float)) and 0 < mbps < 1e7 else None

    def wait(self, nbytes: int) -> None:
        now = time.time()
        if now - self.checked > THROTTLE_CHECK_S:
            self._read()
        if self.rate is None:
            return
        # one message may be "on the wire" while the next is handed over, as with a socket buffer:
        # a send waits only while the previous message is still being transmitted
        start = max(now, self.free)
        self.free = start + nbytes / self.rate
        if start > now:
            time.sleep(start - now)


