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
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zmq

from edgezmq.node import device
from edgezmq.node.stage import BUFFERS_PER_DIRECTION, POLL_MS, LoadSpec, StageRuntime
from edgezmq.protocol import control
from edgezmq.transport import security, sockets

log = logging.getLogger(__name__)

READY_PREFIX = "EDGEZMQ-NODE-READY"  # first stdout line, parsed by edgezmq.orchestrate.local
MAX_JOBS_KEPT = 16  # finished jobs remembered for `job` queries
LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")




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
        from edgezmq.transport.netprobe import ProbeServer

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

        from edgezmq.model import chain as models
        from edgezmq.model import profile_cache as cache
        from edgezmq.model.profiling import profile_units

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
                    from edgezmq.model.profiling import rescale, spot_check

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
        from edgezmq.transport import netprobe

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
        from edgezmq.model import chain as models

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
        from edgezmq.model import profile_cache
        from edgezmq.planner.cost import shard_memory_bytes

        param = sum(u.param_bytes for u in infos[spec.start:spec.end])
        n_in, n_out = sum(_nbytes(s) for s in specs[spec.start]), sum(_nbytes(s) for s in specs[spec.end])
        work = profile_cache.work_bytes(spec.model, spec.start, spec.end, granularity=spec.granularity,
                                        microbatch=spec.microbatch, threads=spec.threads, kwargs=spec.kwargs)
        need = shard_memory_bytes(param, work or 0, n_in, n_out, BUFFERS_PER_DIRECTION)
        budget = self._memory_budget()
        if need > budget:
            buffers = need - param - (work or 0)
            working = (f"{work / 1e6:.0f} MB working memory by this node's profile" if work is not None
                       else "working memory unknown: not profiled on this node")
            raise control.ControlError(
                control.LOAD_FAILED,
                f"node {self.name}: shard units [{spec.start}, {spec.end}) of {spec.model} needs "
                f"{need / 1e6:.0f} MB ({param / 1e6:.0f} MB parameters + {buffers / 1e6:.0f} MB activation "
                f"buffers + {working}), the node has {budget / 1e6:.0f} MB available")
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

        from edgezmq.model import chain as models

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
