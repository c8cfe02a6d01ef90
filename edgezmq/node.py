"""The stage node daemon: a control REP loop plus receive -> compute -> send threads.

States: idle -> loading -> loaded -> running -> (unload) idle; a failed load goes to
``failed`` (with its error) and may be loaded again.  ``load`` validates
synchronously (model, unit range, checkpoint, memory), binds the data PULL socket and
returns its endpoint, then builds the shard in the background; the bootstrapper
polls ``ping`` until ``loaded``.  ``start`` connects the PUSH socket downstream and
starts the three data threads; ``pause`` holds the compute thread (maintenance: a
client's heartbeat then sees the stage stop producing and fails over without it),
``resume`` lets it go on.  With a key pair and an allow-list every socket of the
node speaks CurveZMQ (docs/security.md).  Bad data messages are counted and turned into
``error`` messages downstream; nothing a peer sends can stop the node.
"""

from __future__ import annotations

import logging
import queue
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zmq

from . import control, device, security, sockets, wire

log = logging.getLogger("edgezmq.node")

QUEUE_DEPTH = 2  # between threads: enough to overlap compute with transfer, no more
POLL_MS = 100  # how often blocking loops look at their stop flags
DRAIN_TIMEOUT_S = 10.0  # SIGTERM: finish in-flight microbatches for at most this long
READY_PREFIX = "EDGEZMQ-NODE-READY"  # first stdout line, parsed by edgezmq.local
SUPPORTED_DTYPES = ("float32",)
BUFFERS_PER_DIRECTION = QUEUE_DEPTH + sockets.DATA_HWM + 1  # for the memory estimate
MAX_JOBS_KEPT = 16  # finished jobs remembered for `job` queries
LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")
WIRE_SEQ_LIMIT = 2**63  # wire.decode_header accepts seq in [-1, 2**63)
_STOP = object()


@dataclass
class Counters:
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
    last_error: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class LoadSpec:
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

    @classmethod
    def from_args(cls, a: dict[str, Any]) -> LoadSpec:
        units = a["units"]
        if len(units) != 2 or not all(isinstance(u, int) and not isinstance(u, bool) for u in units):
            raise control.ControlError(control.BAD_ARGS, f"load.units: expected [start, end] ints, got {units!r}")
        if a["microbatch"] < 1:
            raise control.ControlError(control.BAD_ARGS, f"load.microbatch: must be >= 1, got {a['microbatch']}")
        if a.get("threads") is not None and a["threads"] < 1:
            raise control.ControlError(control.BAD_ARGS, f"load.threads: must be >= 1, got {a['threads']}")
        dtype = a.get("dtype", "float32")
        if dtype not in SUPPORTED_DTYPES:
            raise control.ControlError(control.BAD_ARGS, f"load.dtype: supported {SUPPORTED_DTYPES}, got {dtype!r}")
        return cls(
            run=a["run"], model=a["model"], start=units[0], end=units[1], stage=a["stage"],
            last=a["last"], microbatch=a["microbatch"], granularity=a.get("granularity", "block"),
            kwargs=dict(a.get("kwargs") or {}), checkpoint=a.get("checkpoint"),
            pretrained=bool(a.get("pretrained", False)), dtype=dtype, threads=a.get("threads"),
        )


@dataclass
class Job:
    """A long command (profile, netprobe) running beside the control loop."""

    id: str
    kind: str
    state: str = "running"  # running | done | failed
    progress: list = field(default_factory=list)  # profile: [done, total, unit name, time_s]
    result: dict | None = None
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


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
        self.counters = Counters()
        self.in_q: queue.Queue = queue.Queue(maxsize=QUEUE_DEPTH)
        self.out_q: queue.Queue = queue.Queue(maxsize=QUEUE_DEPTH)
        self.stop = threading.Event()  # hard stop
        self.draining = threading.Event()  # stop taking input, finish the rest
        self.paused = threading.Event()  # `pause`: the compute thread computes nothing until `resume`
        self.threads: list[threading.Thread] = []
        self.started_at: float | None = None
        self.started_cpu = 0.0
        # called by the send thread with each sent microbatch's [stage, t_recv, t_start,
        # t_end, t_send] and its send seconds (edgezmq.metrics histograms)
        self.observers: list[Callable[[list, float], None]] = []

    # ---- data threads -------------------------------------------------
    def _put(self, q: queue.Queue, item: Any) -> bool:
        while not self.stop.is_set():
            try:
                q.put(item, timeout=POLL_MS / 1000)
                return True
            except queue.Full:
                continue
        return False

    def _reject(self, run: str, seq: Any, code: str, message: str, t: list | None = None) -> None:
        # the error must itself be a valid message: a seq out of the wire's range (read from a
        # header that failed validation) becomes -1, texts are cut to the wire's byte limit
        if not isinstance(seq, int) or isinstance(seq, bool) or not -1 <= seq < WIRE_SEQ_LIMIT:
            seq = -1
        message = message.encode()[:wire.MAX_TEXT].decode(errors="ignore")
        c = self.counters
        c.last_error = f"seq {seq}: {code}: {message}"[:500]
        log.warning("stage %d: rejected message seq=%s: %s: %s", self.spec.stage, seq, code, message)
        self._put(self.out_q, wire.error_message(run, seq, self.spec.stage, code, message, t))

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
            try:
                msg = wire.decode(frames)
                if msg.kind == "error":  # an upstream stage's error: pass it on untouched
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
                wire.check_tensors(msg.tensors, self.expected_in, max_batch=spec.microbatch, seq=msg.seq)
                if len({a.shape[0] for a in msg.tensors}) > 1:
                    raise wire.WireError("bad_shape", "tensors disagree on the batch size", msg.seq)
            except wire.WireError as e:
                c.bad_messages += 1
                self._reject(reply_run, e.seq if e.seq is not None else -1, e.code, e.message)
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
        while not self.stop.is_set():
            t0 = time.time()
            try:
                msg = self.in_q.get(timeout=POLL_MS / 1000)
            except queue.Empty:
                c.wait_s += time.time() - t0
                continue
            t1, cpu1 = time.time(), time.thread_time()
            c.wait_s += t1 - t0
            if msg is _STOP:
                self._put(self.out_q, _STOP)
                return
            if self.paused.is_set():  # also holds a microbatch taken just before `pause`
                if not self._hold_while_paused():
                    return
                t1 = time.time()  # paused time is neither waiting for input nor computing
            try:
                # received frames are writable, aligned views: no copy; anything else is copied
                xs = [torch.from_numpy(a if a.flags.aligned and a.flags.writeable else a.copy())
                      for a in msg.tensors]
                with torch.inference_mode():
                    outs = self.shard(*xs)
                arrays = [np.ascontiguousarray(o.numpy()) for o in outs]
            except Exception as e:  # a shard failure is this message's error, not the node's
                c.compute_errors += 1
                self._reject(spec.run, msg.seq, "compute_failed", f"{type(e).__name__}: {e}", msg.t)
                continue
            t2 = time.time()
            c.compute_s += t2 - t1
            c.compute_cpu_s += time.thread_time() - cpu1
            c.processed += 1
            c.samples += int(arrays[0].shape[0]) if arrays else 0
            msg.t[-1][2:4] = [t1, t2]
            out = wire.Message(
                kind="result" if spec.last else "act", run=spec.run, seq=msg.seq,
                stage=spec.stage, tensors=arrays, t=msg.t,
            )
            self._put(self.out_q, out)

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
            frames = wire.encode(msg)
            while True:
                try:
                    sockets.send_frames(self.push, frames)
                    c.sent += 1
                    c.bytes_out += sum(memoryview(f).nbytes for f in frames)
                    break
                except zmq.Again:  # downstream full or not connected: retry until told to stop
                    c.send_retries += 1
                    if self.stop.is_set():
                        return
            dt = time.time() - t0
            c.send_s += dt
            if self.observers and msg.kind != "error" and msg.t:
                self._observe(msg.t[-1], dt)

    def _observe(self, entry: list, send_s: float) -> None:
        for fn in self.observers:
            try:
                fn(entry, send_s)
            except Exception:  # an observer must never stop the send thread
                log.exception("stage %d: observer failed", self.spec.stage)

    # ---- lifecycle ---------------------------------------------------
    def start(self, connect: list[str], server_keys: list[bytes] | None = None) -> None:
        keys = server_keys or [None] * len(connect)
        curve = security.Curve(self.keys, server_key=keys[0]) if self.keys is not None else None
        self.push = sockets.make_socket(self.ctx, zmq.PUSH, sockets.DATA, curve=curve)
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

    def stats(self) -> dict[str, Any]:
        d = self.counters.to_dict()
        d.update(
            stage=self.spec.stage, units=[self.spec.start, self.spec.end], model=self.spec.model,
            run=self.spec.run, in_queue=self.in_q.qsize(), out_queue=self.out_q.qsize(),
            uptime_s=(time.time() - self.started_at) if self.started_at else 0.0,
            # CPU time of the whole process (all threads) since the stage started: with
            # compute_cpu_s, what receiving, decoding, encoding and sending cost
            cpu_s=(time.process_time() - self.started_cpu) if self.started_at else 0.0,
            # a stage whose output queue is full waits on its downstream, not on itself
            in_flight=self.in_flight(), backpressured=self.out_q.full(), paused=self.paused.is_set(),
        )
        return d


class Node:
    """A stage node: serves the control protocol on ``control_address``."""

    def __init__(
        self,
        control_address: str,
        *,
        name: str | None = None,
        threads: int | None = None,
        memory_limit: int | None = None,
        advertise: str | None = None,
        ctx: zmq.Context | None = None,
        keys: security.KeyPair | None = None,
        allow_dir: str | None = None,
    ) -> None:
        if (keys is None) != (allow_dir is None):
            raise ValueError(f"a secured node needs both a key pair and an allow-list directory "
                             f"(got keys={keys is not None}, allow_dir={allow_dir!r})")
        self.name = name or control_address
        self.threads = threads
        self.memory_limit = memory_limit
        self.advertise = advertise
        self._own_ctx = ctx is None
        self.ctx = ctx or zmq.Context()
        self.keys = keys
        self.curve = security.Curve(keys) if keys is not None else None  # every bound socket: a CURVE server
        self.auth = security.Authenticator(self.ctx, allow_dir) if allow_dir is not None else None
        self.rep = sockets.make_socket(self.ctx, zmq.REP, sockets.CONTROL, curve=self.curve)
        self.control_endpoint = sockets.bind(self.rep, control_address)
        self.state = "idle"
        self.error: str | None = None
        self.runtime: StageRuntime | None = None
        self._loader: threading.Thread | None = None
        self._exit = threading.Event()
        self.requests = 0
        self.bad_requests = 0
        self.started = time.time()
        self.observers: list[Callable[[list, float], None]] = []  # handed to every stage loaded
        self.jobs: dict[str, Job] = {}
        self._job_seq = 0
        from .netprobe import ProbeServer

        # always on: peers and the bootstrapper measure their links to this node through it
        self.probe = ProbeServer(sockets.host_of(self.control_endpoint), ctx=self.ctx, curve=self.curve).start()
        self.probe_endpoint = self._advertised(self.probe.endpoint)

    def _advertised(self, endpoint: str) -> str:
        if self.advertise:
            return f"tcp://{self.advertise}:{endpoint.rsplit(':', 1)[1]}"
        return endpoint

    # ---- control commands ----------------------------------------------
    def cmd_ping(self) -> dict[str, Any]:
        return {"name": self.name, "state": self.state, "error": self.error,
                "run": self.runtime.spec.run if self.runtime else None,
                "data": self.runtime.endpoint if self.runtime else None,
                "time": time.time()}  # this node's clock, for trace clock offsets

    def cmd_info(self) -> dict[str, Any]:
        return {"name": self.name, "state": self.state, "threads": self.threads,
                "memory_limit_arg": self.memory_limit, "device": device.describe(),
                "control": self.control_endpoint, "probe": self.probe_endpoint,
                "public_key": self._public_key()}

    def _public_key(self) -> str | None:
        return self.keys.public_text if self.keys is not None else None

    # ---- jobs: profile and netprobe run beside the control loop ----------
    def _start_job(self, kind: str, fn, progress: bool = False) -> Job:
        busy = [j for j in self.jobs.values() if j.state == "running"]
        if busy:
            raise control.ControlError(control.BAD_STATE, f"node {self.name} is busy with {busy[0].kind} job {busy[0].id}")
        self._job_seq += 1
        job = Job(id=f"{kind}-{self._job_seq}", kind=kind)
        self.jobs[job.id] = job
        for old in list(self.jobs)[:-MAX_JOBS_KEPT]:
            if self.jobs[old].state != "running":
                del self.jobs[old]

        def run() -> None:
            try:
                job.result = fn(job)
                job.state = "done"
            except Exception as e:  # the job's failure is reported, not raised
                log.warning("%s job %s failed: %s", kind, job.id, e)
                job.error, job.state = f"node {self.name}: {type(e).__name__}: {e}", "failed"

        threading.Thread(target=run, name=job.id, daemon=True).start()
        return job

    def cmd_profile(self, **a: Any) -> dict[str, Any]:
        import torch

        from . import cache
        from . import model as models
        from .profile import profile_units

        if self.state in ("loading", "running"):
            raise control.ControlError(
                control.BAD_STATE, f"node {self.name} is {self.state}: profiling measures the whole "
                "process, so profile before deploying (or unload first)")
        granularity, kwargs = a.get("granularity", "block"), dict(a.get("kwargs") or {})
        threads = a.get("threads") or self.threads or torch.get_num_threads()
        for k in ("microbatch", "threads", "reps"):
            if k in a and a[k] < 1:
                raise control.ControlError(control.BAD_ARGS, f"profile.{k}: must be >= 1, got {a[k]}")
        try:
            models.unit_infos(a["model"], granularity, **kwargs)
        except (models.ModelError, TypeError) as e:
            raise control.ControlError(control.BAD_ARGS, f"node {self.name}: {e}") from None
        key = cache.profile_key(a["model"], granularity=granularity, microbatch=a["microbatch"],
                                threads=threads, kwargs=kwargs)
        if not a.get("reprofile"):
            hit = cache.get(key)
            if hit is not None and not a.get("check"):
                return {"state": "done", "cached": True, "result": hit, "job": None}
            if hit is not None:  # `check`: time the profile's reference again, rescale on drift
                def recheck(job: Job) -> dict:
                    from .profile import rescale, spot_check

                    prof = rescale(hit, spot_check(hit, kwargs=kwargs, warmup=a.get("warmup", 1),
                                                   reps=a.get("reps", 3)))
                    cache.put(key, prof)  # the next check compares with this level
                    return prof

                job = self._start_job("spot-check", recheck)
                return {"state": job.state, "cached": True, "job": job.id}

        def work(job: Job) -> dict:
            def report(i: int, n: int, name: str, t: float) -> None:
                job.progress = [i + 1, n, name, t]  # units done, of n

            prof = profile_units(
                a["model"], granularity=granularity, microbatch=a["microbatch"], threads=threads,
                kwargs=kwargs, warmup=a.get("warmup", 1), reps=a.get("reps", 3), progress=report)
            cache.put(key, prof)
            return prof

        job = self._start_job("profile", work)
        return {"state": job.state, "cached": False, "job": job.id}

    def cmd_netprobe(self, peer: str, peer_key: str | None = None, **a: Any) -> dict[str, Any]:
        from . import netprobe

        if not isinstance(peer, str) or not peer.startswith("tcp://"):
            raise control.ControlError(control.BAD_ARGS, f"netprobe.peer: expected tcp://HOST:PORT, got {peer!r}")
        curve = None
        if self.keys is not None:
            if peer_key is None:
                raise control.ControlError(control.BAD_ARGS, "netprobe.peer_key: this node is secured; give the peer's public key")
            curve = security.Curve(self.keys, server_key=self._key_arg(peer_key, "netprobe.peer_key"))
        job = self._start_job("netprobe", lambda job: netprobe.probe(peer, ctx=self.ctx, curve=curve, **a))
        return {"state": job.state, "job": job.id}

    def cmd_job(self, id: str) -> dict[str, Any]:  # noqa: A002 - the protocol's field name
        job = self.jobs.get(id)
        if job is None:
            raise control.ControlError(control.BAD_ARGS, f"job.id: no job {id!r} on node {self.name}")
        return job.to_dict()

    def _memory_budget(self) -> int:
        return device.memory_budget(self.memory_limit)

    def cmd_load(self, **args: Any) -> dict[str, Any]:
        from . import model as models

        if self.state in ("loading", "running", "loaded"):
            raise control.ControlError(control.BAD_STATE, f"node {self.name} is {self.state}; unload first")
        spec = LoadSpec.from_args(args)
        if spec.threads is None:
            spec.threads = self.threads
        try:
            infos = models.unit_infos(spec.model, spec.granularity, **spec.kwargs)
            if not 0 <= spec.start < spec.end <= len(infos):
                raise models.ModelError(
                    f"unit range [{spec.start}, {spec.end}) out of bounds for {spec.model} at "
                    f"{spec.granularity} granularity ({len(infos)} units)")
            specs = models.boundary_specs(spec.model, spec.granularity, spec.microbatch, **spec.kwargs)
        except (models.ModelError, TypeError, ValueError) as e:
            raise control.ControlError(control.LOAD_FAILED, f"node {self.name}: {e}") from None
        if spec.checkpoint is not None and not spec.pretrained:
            from pathlib import Path
            if not Path(spec.checkpoint).is_file():
                raise control.ControlError(control.LOAD_FAILED, f"node {self.name}: checkpoint {spec.checkpoint!r} not found")
        elif not spec.pretrained:
            raise control.ControlError(control.BAD_ARGS, "load: give a checkpoint path or pretrained: true")
        param = sum(u.param_bytes for u in infos[spec.start:spec.end])
        io = sum(_nbytes(s) for s in specs[spec.start]) + sum(_nbytes(s) for s in specs[spec.end])
        need = param + BUFFERS_PER_DIRECTION * io
        budget = self._memory_budget()
        if need > budget:
            raise control.ControlError(
                control.LOAD_FAILED,
                f"node {self.name}: shard units [{spec.start}, {spec.end}) of {spec.model} needs "
                f"{need / 1e6:.0f} MB ({param / 1e6:.0f} MB parameters + buffers), "
                f"the node has {budget / 1e6:.0f} MB available")
        pull = sockets.make_socket(self.ctx, zmq.PULL, sockets.DATA, curve=self.curve)
        bind_addr = args.get("bind") or f"tcp://{sockets.host_of(self.control_endpoint)}:0"
        try:
            endpoint = sockets.bind(pull, bind_addr)
        except (zmq.ZMQError, ValueError) as e:
            sockets.close_all(pull)
            raise control.ControlError(control.LOAD_FAILED, f"node {self.name}: cannot bind data socket {bind_addr}: {e}") from None
        if self.keys is None and sockets.host_of(endpoint) not in LOOPBACK:
            log.warning("node %s: data socket %s bound without encryption: anyone who can reach it "
                        "can inject activations and read results (docs/security.md)", self.name, endpoint)
        endpoint = self._advertised(endpoint)
        pull.setsockopt(zmq.RCVTIMEO, POLL_MS)
        rt = StageRuntime(self.ctx, spec, pull, endpoint, keys=self.keys)
        rt.expected_in = [(tuple(s), d) for s, d in specs[spec.start]]
        rt.observers = self.observers
        self.runtime, self.state, self.error = rt, "loading", None
        self._loader = threading.Thread(target=self._build, args=(rt,), name="loader", daemon=True)
        self._loader.start()
        return {"state": self.state, "data": endpoint, "param_bytes": param, "public_key": self._public_key()}

    def _build(self, rt: StageRuntime) -> None:
        import torch

        from . import model as models

        spec = rt.spec
        t0 = time.time()
        try:
            if spec.threads:
                torch.set_num_threads(spec.threads)
            rt.shard = models.build_shard(
                spec.model, spec.start, spec.end, granularity=spec.granularity,
                checkpoint=spec.checkpoint, pretrained=spec.pretrained, **spec.kwargs)
        except Exception as e:  # any failure becomes the node's reported error
            log.error("load failed: %s", e)
            if self.runtime is rt:
                self.error = f"node {self.name}: {type(e).__name__}: {e}"
                self.state = "failed"
                rt.close()
                self.runtime = None
            return
        if self.runtime is rt:
            self.state = "loaded"
            log.info("loaded %s units [%d, %d) in %.1fs", spec.model, spec.start, spec.end, time.time() - t0)

    def _key_arg(self, key: Any, what: str) -> bytes:
        if not isinstance(key, str):
            raise control.ControlError(control.BAD_ARGS, f"{what}: expected a Z85 public key string, got {type(key).__name__}")
        try:
            return security.check_key(key, what)
        except security.KeyFileError as e:
            raise control.ControlError(control.BAD_ARGS, str(e)) from None

    def cmd_start(self, connect: list, server_keys: list | None = None) -> dict[str, Any]:
        if self.state != "loaded" or self.runtime is None:
            raise control.ControlError(control.BAD_STATE, f"node {self.name} is {self.state}; start needs a loaded shard")
        if not connect or not all(isinstance(a, str) for a in connect):
            raise control.ControlError(control.BAD_ARGS, "start.connect: expected a non-empty list of addresses")
        keys = None
        if self.keys is not None:
            if server_keys is None or len(server_keys) != len(connect):
                raise control.ControlError(
                    control.BAD_ARGS, f"start.server_keys: this node is secured; expected one public key per "
                    f"address ({len(connect)}), got {None if server_keys is None else len(server_keys)}")
            keys = [self._key_arg(k, f"start.server_keys[{i}]") for i, k in enumerate(server_keys)]
        elif server_keys is not None:
            raise control.ControlError(control.BAD_ARGS, f"start.server_keys: node {self.name} has no key pair "
                                       "(start it with --secret-key and --allow)")
        try:
            self.runtime.start(connect, keys)
        except zmq.ZMQError as e:
            raise control.ControlError(control.BAD_ARGS, f"start.connect: {e}") from None
        self.state = "running"
        return {"state": self.state}

    def _running(self, cmd: str) -> StageRuntime:
        if self.state != "running" or self.runtime is None:
            raise control.ControlError(control.BAD_STATE, f"node {self.name} is {self.state}; {cmd} needs a running stage")
        return self.runtime

    def cmd_pause(self) -> dict[str, Any]:
        self._running("pause").paused.set()
        log.warning("node %s: stage paused (resume with `resume`); a client's heartbeat will declare it stalled",
                    self.name)
        return {"name": self.name, "state": self.state, "paused": True}

    def cmd_resume(self) -> dict[str, Any]:
        self._running("resume").paused.clear()
        log.warning("node %s: stage resumed", self.name)
        return {"name": self.name, "state": self.state, "paused": False}

    def cmd_stats(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "state": self.state, "error": self.error,
                             "rss": device.rss_bytes(), "peak_rss": device.peak_rss_bytes(),
                             "requests": self.requests, "bad_requests": self.bad_requests}
        if self.runtime is not None:
            d["stage"] = self.runtime.stats()
        return d

    def cmd_unload(self) -> dict[str, Any]:
        self._unload()
        return {"state": self.state}

    def cmd_shutdown(self) -> dict[str, Any]:
        self._exit.set()
        return {"state": "shutting down"}

    def _unload(self) -> None:
        rt, self.runtime = self.runtime, None
        if rt is not None:
            rt.close()
        if self._loader is not None:
            self._loader.join(60.0)
            self._loader = None
        self.state, self.error = "idle", None
        import gc
        gc.collect()

    # ---- serving -------------------------------------------------------
    def handle(self, raw: Any) -> bytes:
        """One request -> one reply; never raises."""
        self.requests += 1
        try:
            cmd, args = control.parse_request(raw)
            fields = getattr(self, f"cmd_{cmd}")(**args)
            return control.reply_ok(**fields)
        except control.ControlError as e:
            self.bad_requests += 1
            return control.reply_error(e.code, e.message)
        except Exception as e:  # a bug must not take the control socket down with it
            self.bad_requests += 1
            log.exception("control request failed")
            return control.reply_error(control.INTERNAL, f"{type(e).__name__}: {e}")

    def request_exit(self, *_: Any) -> None:
        self._exit.set()

    def serve(self) -> int:
        """Serve until ``shutdown`` or SIGTERM/SIGINT; drain the stage; return the exit code."""
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self.request_exit)
            signal.signal(signal.SIGINT, self.request_exit)
        log.info("node %s serving control on %s", self.name, self.control_endpoint)
        while not self._exit.is_set():
            try:
                if not self.rep.poll(POLL_MS, zmq.POLLIN):
                    continue
                # the whole message: a REP socket that left parts unread cannot reply
                parts = self.rep.recv_multipart(copy=False)
            except zmq.ZMQError as e:
                if e.errno == zmq.EINTR:
                    continue
                log.warning("control receive failed: %s", e)
                continue
            if len(parts) == 1:
                reply = self.handle(parts[0].bytes)
            else:
                self.requests += 1
                self.bad_requests += 1
                reply = control.reply_error(control.BAD_REQUEST, f"a request is 1 frame, got {len(parts)}")
            try:
                self.rep.send(reply)
            except zmq.ZMQError as e:  # never let one reply take the control loop down
                log.warning("control reply failed: %s", e)
        return self.close()

    def close(self) -> int:
        rt, self.runtime = self.runtime, None
        clean = True
        if rt is not None:
            # a paused stage's microbatches were given up (failed over): nothing to drain
            clean = rt.drain() if self.state == "running" and not rt.paused.is_set() else (rt.close() or True)
        self.probe.stop()
        sockets.close_all(self.rep)
        if self.auth is not None:
            self.auth.stop()
        if self._own_ctx:
            self.ctx.term()
        log.info("node %s stopped (%s)", self.name, "drained" if clean else "drain timed out")
        return 0


def _nbytes(spec: tuple) -> int:
    shape, dtype = spec
    return int(np.prod(shape)) * np.dtype(dtype).itemsize
