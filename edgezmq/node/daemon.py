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

import dataclasses
import errno
import logging
import signal
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from edgezmq.node import device
from edgezmq.node.kvcache import DEFAULT_BUDGET_SHARE, KVStore
from edgezmq.node.stage import BUFFERS_PER_DIRECTION, POLL_MS, LoadSpec, StageRuntime
from edgezmq.paths import checkpoints_dir
from edgezmq.protocol import control, wire
from edgezmq.protocol import messages as m
from edgezmq.protocol.messages import Reply, Request
from edgezmq.transport import security, sockets

log = logging.getLogger(__name__)

READY_PREFIX = "EDGEZMQ-NODE-READY"  # first stdout line, parsed by edgezmq.orchestrate.local
MAX_JOBS_KEPT = 16  # finished jobs remembered for `job` queries
INBOUND_SLACK = 2  # a data message may be this many times the stage's declared input (see cmd_load)
LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")
UNLOAD_JOIN_S = 10.0  # unload waits this long for an abandoned load to stop (it stops between tensors)


class JobStopped(Exception):
    """Raised inside a job's work by ``Job.check``: cancelled, or past its deadline."""


class _LoadAbandoned(Exception):
    """Raised inside a shard build when the node's `unload` abandoned it."""


@dataclass
class Job:
    """A long command (profile, netprobe) running beside the control loop.

    Its work calls ``check`` between steps (each timed forward, each probe message): a
    ``cancel`` or the deadline ends it there, so a job never holds the node past either by
    more than one step."""

    id: str
    kind: str
    request: Request  # what started it: an identical request while it runs gets `reply` again
    deadline_s: float  # seconds after start
    reply: Reply | None = None
    state: str = "running"  # one of messages.JOB_STATES
    progress: list = field(default_factory=list)  # profile: [done, total, unit name, time_s]
    result: dict | None = None
    error: str | None = None
    started: float = field(default_factory=time.monotonic)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def check(self) -> None:
        if self.cancelled.is_set():
            raise JobStopped("cancelled")
        if time.monotonic() - self.started > self.deadline_s:
            raise JobStopped(f"deadline: still running after {self.deadline_s:g}s")

    def to_reply(self) -> m.JobReply:
        return m.JobReply(id=self.id, kind=self.kind, state=self.state, progress=list(self.progress),
                          result=self.result, error=self.error)


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
        weights_dirs: list[str] | None = None,
    ) -> None:
        # where `load` may read checkpoints: a peer names a file, the node decides where files may be
        self.weights_dirs = [Path(d).expanduser().resolve() for d in
                             (weights_dirs or [str(checkpoints_dir())])]
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
        # request id -> (request bytes, reply bytes): a resent request gets its first reply
        self._replies: OrderedDict[str, tuple[bytes, bytes]] = OrderedDict()
        # the load (and start) under way, so that an identical resend answers as the first did
        self._load_request: m.LoadRequest | None = None
        self._load_reply: m.LoadReply | None = None
        self._start_request: m.StartRequest | None = None
        self._job_seq = 0
        from edgezmq.transport.netprobe import ProbeServer

        # always on: peers and the bootstrapper measure their links to this node through it
        self.probe = ProbeServer(sockets.host_of(self.control_endpoint), ctx=self.ctx, curve=self.curve).start()
        assert self.probe.endpoint is not None  # start() returns once bound
        self.probe_endpoint = self._advertised(self.probe.endpoint)
        if self.keys is None and sockets.host_of(self.probe.endpoint) not in LOOPBACK:
            log.warning("node %s: probe server %s bound without encryption: anyone who can reach it can "
                        "use this node's bandwidth (docs/security.md)", self.name, self.probe.endpoint)

    def _advertised(self, endpoint: str) -> str:
        if self.advertise:
            return f"tcp://{self.advertise}:{endpoint.rsplit(':', 1)[1]}"
        return endpoint

    # ---- control commands: each takes its typed request, returns its typed reply ----
    def cmd_ping(self, _: m.PingRequest) -> m.PingReply:
        return m.PingReply(name=self.name, state=self.state, error=self.error,
                           run=self.runtime.spec.run if self.runtime else None,
                           data=self.runtime.endpoint if self.runtime else None,
                           time=time.time())  # this node's clock, for trace clock offsets

    def cmd_info(self, _: m.InfoRequest) -> m.InfoReply:
        return m.InfoReply(name=self.name, state=self.state, threads=self.threads,
                           memory_limit_arg=self.memory_limit,
                           device=m.DeviceFacts.from_wire(device.describe()),
                           control=self.control_endpoint, probe=self.probe_endpoint,
                           public_key=self._public_key())

    def cmd_describe(self, req: m.DescribeRequest) -> m.DescribeReply:
        from edgezmq.model import chain as models

        kwargs: dict[str, Any] = dict(req.kwargs)
        try:
            infos = models.unit_infos(req.model, req.granularity, **kwargs)
            specs = models.boundary_specs(req.model, req.granularity, req.microbatch, **kwargs)
        except (models.ModelError, TypeError) as e:
            raise control.ControlError(control.BAD_ARGS, f"node {self.name}: {e}") from None

        def tensors(i: int) -> list[m.TensorSpec]:
            return [m.TensorSpec(shape=list(shape), dtype=dtype) for shape, dtype in specs[i]]

        return m.DescribeReply(
            model=req.model, granularity=req.granularity, microbatch=req.microbatch, n_units=len(infos),
            units=[m.UnitDesc(index=u.index, name=u.name, param_bytes=u.param_bytes, inputs=tensors(i))
                   for i, u in enumerate(infos)],
            output=tensors(len(infos)))

    def _public_key(self) -> str | None:
        return self.keys.public_text if self.keys is not None else None

    # ---- jobs: profile and netprobe run beside the control loop ----------
    def _running_job(self, req: Request) -> Job | None:
        """The job running for an identical request (a resend), if any."""
        return next((j for j in self.jobs.values() if j.state == "running" and j.request == req), None)

    def _start_job(self, kind: str, req: Request, fn: Callable[[Job], dict], deadline_s: float) -> Job:
        busy = [j for j in self.jobs.values() if j.state == "running"]
        if busy:
            what = "cancelled, stopping at its next step" if busy[0].cancelled.is_set() else "running"
            raise control.ControlError(control.BAD_STATE, f"node {self.name} is busy with {busy[0].kind} "
                                       f"job {busy[0].id} ({what})")
        self._job_seq += 1
        job = Job(id=f"{kind}-{self._job_seq}", kind=kind, request=req, deadline_s=deadline_s)
        self.jobs[job.id] = job
        for old in list(self.jobs)[:-MAX_JOBS_KEPT]:
            if self.jobs[old].state != "running":
                del self.jobs[old]

        def run() -> None:
            try:
                job.result = fn(job)
                job.state = "done"
            except JobStopped as e:
                log.info("%s job %s stopped: %s", kind, job.id, e)
                job.error = f"node {self.name}: {kind} job {job.id} {e}"
                job.state = "cancelled" if job.cancelled.is_set() else "failed"
            except Exception as e:  # the job's failure is reported, not raised
                log.warning("%s job %s failed: %s", kind, job.id, e)
                job.error, job.state = f"node {self.name}: {type(e).__name__}: {e}", "failed"

        threading.Thread(target=run, name=job.id, daemon=True).start()
        return job

    def cmd_profile(self, req: m.ProfileRequest) -> m.ProfileReply:
        import torch

        from edgezmq.model import chain as models
        from edgezmq.model import profile_cache as cache
        from edgezmq.model.profiling import profile_units

        running = self._running_job(req)
        if running is not None and isinstance(running.reply, m.ProfileReply):
            return running.reply
        if self.state in ("loading", "running"):
            raise control.ControlError(
                control.BAD_STATE, f"node {self.name} is {self.state}: profiling measures the whole "
                "process, so profile before deploying (or unload first)")
        kwargs: dict[str, Any] = dict(req.kwargs)
        threads = req.threads or self.threads or torch.get_num_threads()
        try:
            models.unit_infos(req.model, req.granularity, **kwargs)
        except (models.ModelError, TypeError) as e:
            raise control.ControlError(control.BAD_ARGS, f"node {self.name}: {e}") from None
        if req.context is not None and not models.text.is_decoder(req.model):
            raise control.ControlError(control.BAD_ARGS, f"node {self.name}: profile.context: {req.model} is not "
                                       "a decoder (decode steps are a decoder's)")
        key = cache.profile_key(req.model, granularity=req.granularity, microbatch=req.microbatch,
                                threads=threads, kwargs=kwargs, context=req.context)
        if not req.reprofile:
            hit = cache.get(key)
            if hit is not None and not req.check:
                return m.ProfileReply(state="done", cached=True, result=hit, job=None)
            if hit is not None:  # `check`: time the profile's reference again, rescale on drift
                def recheck(job: Job) -> dict:
                    from edgezmq.model.profiling import rescale, spot_check

                    prof = rescale(hit, spot_check(hit, kwargs=kwargs, warmup=req.warmup, reps=req.reps,
                                                   stop=job.check))
                    cache.put(key, prof)  # the next check compares with this level
                    return prof

                job = self._start_job("spot-check", req, recheck, req.deadline)
                job.reply = m.ProfileReply(state=job.state, cached=True, job=job.id, result=None)
                return job.reply

        def work(job: Job) -> dict:
            def report(i: int, n: int, name: str, t: float) -> None:
                job.progress = [i + 1, n, name, t]  # units done, of n

            prof = profile_units(
                req.model, granularity=req.granularity, microbatch=req.microbatch, threads=threads,
                kwargs=kwargs, warmup=req.warmup, reps=req.reps, progress=report, stop=job.check,
                context=req.context)
            cache.put(key, prof)
            return prof

        job = self._start_job("profile", req, work, req.deadline)
        job.reply = m.ProfileReply(state=job.state, cached=False, job=job.id, result=None)
        return job.reply

    def cmd_netprobe(self, req: m.NetprobeRequest) -> m.NetprobeReply:
        from edgezmq.transport import netprobe

        running = self._running_job(req)
        if running is not None and isinstance(running.reply, m.NetprobeReply):
            return running.reply
        curve = None
        if self.keys is not None:
            if req.peer_key is None:
                raise control.ControlError(control.BAD_ARGS, "netprobe.peer_key: this node is secured; give the peer's public key")
            curve = security.Curve(self.keys, server_key=self._key_arg(req.peer_key, "netprobe.peer_key"))
        job = self._start_job("netprobe", req, lambda job: netprobe.probe(
            req.peer, ctx=self.ctx, curve=curve, bytes_per_msg=req.bytes_per_msg, seconds=req.seconds,
            pings=req.pings, stop=job.check), m.NETPROBE_JOB_DEADLINE_S)
        job.reply = m.NetprobeReply(state=job.state, job=job.id)
        return job.reply

    def _job(self, cmd: str, job_id: str) -> Job:
        job = self.jobs.get(job_id)
        if job is None:
            raise control.ControlError(control.BAD_ARGS, f"{cmd}.id: no job {job_id!r} on node {self.name}")
        return job

    def cmd_job(self, req: m.JobRequest) -> m.JobReply:
        return self._job("job", req.id).to_reply()

    def cmd_cancel(self, req: m.CancelRequest) -> m.JobReply:
        job = self._job("cancel", req.id)
        if job.state == "running":
            job.cancelled.set()  # its thread stops at the job's next check
        return job.to_reply()

    def _memory_budget(self) -> int:
        return device.memory_budget(self.memory_limit)

    def cmd_load(self, req: m.LoadRequest) -> m.LoadReply:
        from edgezmq.model import chain as models

        if self.state in ("loading", "running", "loaded"):
            if req == self._load_request and self._load_reply is not None:
                # a resend of the load that is under way (its reply was lost): same answer
                return dataclasses.replace(self._load_reply, state=self.state)
            raise control.ControlError(control.BAD_STATE, f"node {self.name} is {self.state}; unload first")
        spec = LoadSpec.from_request(req, self.threads)
        try:
            infos = models.unit_infos(spec.model, spec.granularity, **spec.kwargs)
            if not 0 <= spec.start < spec.end <= len(infos):
                raise models.ModelError(
                    f"unit range [{spec.start}, {spec.end}) out of bounds for {spec.model} at "
                    f"{spec.granularity} granularity ({len(infos)} units)")
            specs = models.boundary_specs(spec.model, spec.granularity, spec.microbatch, **spec.kwargs)
        except (models.ModelError, TypeError, ValueError) as e:
            raise control.ControlError(control.LOAD_FAILED, f"node {self.name}: {e}") from None
        if spec.checkpoint is not None:
            self._check_weights_path(spec.checkpoint)
        from edgezmq.model import profile_cache
        from edgezmq.planner.cost import shard_memory_bytes

        param = sum(u.param_bytes for u in infos[spec.start:spec.end])
        out_specs = specs[spec.end]
        if spec.generation_only:
            if not models.text.is_decoder(spec.model):
                raise control.ControlError(control.LOAD_FAILED, f"node {self.name}: load.generation_only is for "
                                           f"a decoder language model, {spec.model} is not one")
            if spec.last:  # a gen step's result: each row's next-token logits (B, V), not (B, T, V)
                out_specs = [((shape[0], *shape[2:]), dtype) for shape, dtype in out_specs]
        n_in, n_out = sum(_nbytes(s) for s in specs[spec.start]), sum(_nbytes(s) for s in out_specs)
        work = profile_cache.work_bytes(spec.model, spec.start, spec.end, granularity=spec.granularity,
                                        microbatch=spec.microbatch, threads=spec.threads, kwargs=spec.kwargs)
        need = shard_memory_bytes(param, work or 0, n_in, n_out, BUFFERS_PER_DIRECTION)
        buffers = shard_memory_bytes(0, 0, n_in, n_out, BUFFERS_PER_DIRECTION)  # the activation buffers' share
        budget = self._memory_budget()
        if need > budget:
            working = (f"{work / 1e6:.0f} MB working memory by this node's profile" if work is not None
                       else "working memory unknown: not profiled on this node")
            raise control.ControlError(
                control.LOAD_FAILED,
                f"node {self.name}: shard units [{spec.start}, {spec.end}) of {spec.model} needs "
                f"{need / 1e6:.0f} MB ({param / 1e6:.0f} MB parameters + {buffers / 1e6:.0f} MB activation "
                f"buffers + {working}), the node has {budget / 1e6:.0f} MB available")
        cache_budget = None
        if models.text.is_decoder(spec.model):  # KV caches: the budget asked, else a share of what is left
            left = budget - need
            if spec.cache_bytes is not None and spec.cache_bytes > left:
                raise control.ControlError(
                    control.LOAD_FAILED, f"node {self.name}: load.cache_bytes {spec.cache_bytes} is over the "
                    f"{max(0, left)} bytes left after the shard ({need / 1e6:.0f} MB of {budget / 1e6:.0f} MB)")
            cache_budget = spec.cache_bytes if spec.cache_bytes is not None else int(DEFAULT_BUDGET_SHARE * left)
        # messages are capped at INBOUND_SLACK x this stage's input at the microbatch, plus a header:
        # libzmq drops anything bigger before Python reads it (a flood of 1 GiB messages costs
        # nothing), while a sender's mistake up to that size (float64, a batch too big, a tensor
        # too many) still gets its error message back
        inbound = dataclasses.replace(sockets.DATA, maxmsgsize=INBOUND_SLACK * n_in + wire.MAX_HEADER_BYTES)
        pull = sockets.make_socket(self.ctx, zmq.PULL, inbound, curve=self.curve)
        bind_addr = req.bind or f"tcp://{sockets.host_of(self.control_endpoint)}:0"
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
        if cache_budget is not None:  # a gen step carries the first of them: ids, or hidden states
            rt.gen_expected = rt.expected_in[0]
            rt.cache_budget = cache_budget
        rt.n_out = len(specs[spec.end])
        rt.observers = self.observers
        self.runtime, self.state, self.error = rt, "loading", None
        self._load_request, self._start_request = req, None
        self._load_reply = m.LoadReply(state=self.state, data=endpoint, param_bytes=param,
                                       buffer_bytes=buffers,
                                       public_key=self._public_key())
        self._loader = threading.Thread(target=self._build, args=(rt,), name="loader", daemon=True)
        self._loader.start()
        return self._load_reply

    def _check_weights_path(self, checkpoint: str) -> None:
        """A checkpoint inside one of the node's weights directories (symlinks resolved), or refused."""
        path = Path(checkpoint).expanduser().resolve()
        if not any(path.is_relative_to(d) for d in self.weights_dirs):
            raise control.ControlError(
                control.LOAD_FAILED, f"node {self.name}: checkpoint {checkpoint!r} is outside this node's "
                f"weights directories {[str(d) for d in self.weights_dirs]} (edgezmq node --weights-dir)")
        if not path.is_file():
            raise control.ControlError(control.LOAD_FAILED, f"node {self.name}: checkpoint {checkpoint!r} not found")

    def _build(self, rt: StageRuntime) -> None:
        import torch

        from edgezmq.model import chain as models

        spec = rt.spec
        t0 = time.time()

        def check() -> None:  # `unload` while loading: stop within one tensor, free what was made
            if rt.stop.is_set():
                raise _LoadAbandoned

        try:
            if spec.threads:
                torch.set_num_threads(spec.threads)
            rt.shard = models.build_shard(
                spec.model, spec.start, spec.end, granularity=spec.granularity,
                checkpoint=spec.checkpoint, pretrained=spec.pretrained, check=check, **spec.kwargs)
        except _LoadAbandoned:
            log.info("load of %s units [%d, %d) abandoned by unload after %.1fs",
                     spec.model, spec.start, spec.end, time.time() - t0)
            return
        except Exception as e:  # any failure becomes the node's reported error
            log.error("load failed: %s", e)
            if self.runtime is rt:
                self.error = f"node {self.name}: {type(e).__name__}: {e}"
                self.state = "failed"
                rt.close()
                self.runtime = None
                self._load_request = self._load_reply = None
            return
        if rt.gen_expected is not None:
            shard = rt.shard
            rt.kv = KVStore(shard.new_cache, shard.cache_bytes_per_token(), rt.cache_budget,
                            shard.max_positions(), spec.cache_idle_s)
        if self.runtime is rt:
            self.state = "loaded"
            log.info("loaded %s units [%d, %d) in %.1fs", spec.model, spec.start, spec.end, time.time() - t0)

    def _key_arg(self, key: str, what: str) -> bytes:
        try:
            return security.check_key(key, what)
        except security.KeyFileError as e:
            raise control.ControlError(control.BAD_ARGS, str(e)) from None

    def cmd_start(self, req: m.StartRequest) -> m.StartReply:
        if self.state == "running" and req == self._start_request:
            return m.StartReply(state=self.state)  # a resend: already started this way
        if self.state != "loaded" or self.runtime is None:
            raise control.ControlError(control.BAD_STATE, f"node {self.name} is {self.state}; start needs a loaded shard")
        connect, server_keys = list(req.connect), req.server_keys
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
        n_out = self.runtime.n_out
        for i, rung in enumerate(req.encodings or ()):
            if len(rung) not in (1, n_out):
                raise control.ControlError(
                    control.BAD_ARGS, f"start.encodings[{i}]: expected one encoding or one per tensor this "
                    f"stage sends ({n_out}), got {len(rung)}")
        try:
            self.runtime.start(connect, keys, [list(r) for r in req.encodings] if req.encodings else None,
                               link_mbps=req.link_mbps)
        except zmq.ZMQError as e:
            raise control.ControlError(control.BAD_ARGS, f"start.connect: {e}") from None
        self.state, self._start_request = "running", req
        return m.StartReply(state=self.state)

    def _running(self, cmd: str) -> StageRuntime:
        if self.state != "running" or self.runtime is None:
            raise control.ControlError(control.BAD_STATE, f"node {self.name} is {self.state}; {cmd} needs a running stage")
        return self.runtime

    def cmd_pause(self, _: m.PauseRequest) -> m.PauseReply:
        self._running("pause").paused.set()
        log.warning("node %s: stage paused (resume with `resume`); a client's heartbeat will declare it stalled",
                    self.name)
        return m.PauseReply(name=self.name, state=self.state, paused=True)

    def cmd_resume(self, _: m.ResumeRequest) -> m.PauseReply:
        self._running("resume").paused.clear()
        log.warning("node %s: stage resumed", self.name)
        return m.PauseReply(name=self.name, state=self.state, paused=False)

    def cmd_stats(self, _: m.StatsRequest) -> m.StatsReply:
        return m.StatsReply(name=self.name, state=self.state, error=self.error,
                            rss=device.rss_bytes(), peak_rss=device.peak_rss_bytes(),
                            requests=self.requests, bad_requests=self.bad_requests,
                            stage=self.runtime.stats() if self.runtime is not None else None)

    def cmd_unload(self, _: m.UnloadRequest) -> m.StateReply:
        self._unload()
        return m.StateReply(state=self.state)

    def cmd_shutdown(self, _: m.ShutdownRequest) -> m.StateReply:
        self._exit.set()
        return m.StateReply(state="shutting down")

    def _unload(self) -> None:
        rt, self.runtime = self.runtime, None
        if rt is not None:
            rt.close()  # sets rt.stop: a loader still building stops before its next tensor
        if self._loader is not None:
            self._loader.join(UNLOAD_JOIN_S)
            if self._loader.is_alive():  # one tensor took longer: it drops its shard when done
                log.warning("node %s: unload: the abandoned load is still finishing a tensor", self.name)
            self._loader = None
        self.state, self.error = "idle", None
        self._load_request = self._load_reply = self._start_request = None
        del rt  # the last reference to the shard: released before the memory is handed back
        device.release_memory()

    # ---- serving -------------------------------------------------------
    def handle(self, raw: Any) -> bytes:
        """One request -> one reply; never raises.  A repeated request id gets the reply its
        first request got (the client resent because that reply was lost)."""
        self.requests += 1
        data = bytes(raw)
        try:
            req, rid = control.parse_request(data)
            if rid is not None and rid in self._replies:
                first, reply = self._replies[rid]
                if first != data:
                    raise control.ControlError(control.BAD_REQUEST, f"rid {rid!r} was used for another request")
                return reply
            reply = self._dispatch(req)
        except control.ControlError as e:
            self.bad_requests += 1
            reply = control.reply_error(e.code, e.message)
            rid = None  # an error about the request itself is not this request's answer to keep
        if rid is not None:
            self._replies[rid] = (data, reply)
            while len(self._replies) > m.REPLIES_KEPT:
                self._replies.popitem(last=False)
        return reply

    def _dispatch(self, req: Request) -> bytes:
        try:
            handler = getattr(self, f"cmd_{req.CMD}")
            return control.reply_ok(handler(req))
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
                if e.errno == errno.EINTR:
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
            if self.state == "running" and not rt.paused.is_set():
                clean = rt.drain()
            else:
                rt.close()
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
