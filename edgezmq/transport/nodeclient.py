"""A typed client of one node: one method per control command, typed replies, safe retries."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

import zmq

from edgezmq.protocol import control
from edgezmq.protocol import messages as m
from edgezmq.protocol.schema import JSON, JSONMap
from edgezmq.transport.rpc import DEFAULT_RETRIES, ControlClient, new_rid
from edgezmq.transport.security import Curve

R = TypeVar("R", bound=m.Reply)

JOB_POLL_S = 0.2  # how often wait_job asks
CANCEL_TIMEOUT_S = 2.0  # a wait that gives up asks the node once to cancel its job


class JobFailed(control.ControlError):
    """A job ended ``failed``; ``message`` is the node's error (it names the node)."""


class JobTimeout(control.ControlError):
    """A job still running when ``wait_job``'s time was up (code UNREACHABLE, as a silent node):
    callers that tell the two apart catch this one."""


class NodeClient:
    """Talks to one node's control socket with typed requests and replies.

    Built on ``ControlClient`` (Lazy Pirate: poll, recreate the socket, resend).  Every call
    sends a request id and resends it unchanged, so a reply lost on the way (a short timeout
    during a slow ``load``) is answered from the node's memory instead of being executed twice.
    Each command's default timeout is ``protocol.messages.COMMANDS[cmd].timeout_s``; a request
    is checked here as the node would check it before it is sent.
    """

    def __init__(self, address: str, *, name: str | None = None, curve: Curve | None = None,
                 ctx: zmq.Context | None = None, timeout: float | None = None,
                 retries: int = DEFAULT_RETRIES) -> None:
        self.timeout = timeout  # None: each command's own default
        self.rpc = ControlClient(address, name=name, curve=curve, ctx=ctx, retries=retries,
                                 timeout=timeout if timeout is not None else 5.0)

    @property
    def name(self) -> str:
        return self.rpc.name

    def call(self, req: m.Request, reply: type[R], *, timeout: float | None = None,
             retries: int | None = None) -> R:
        """Send a typed request, return its typed reply; raise ControlError (with the node's code)."""
        payload = control.encode_request(req, rid=new_rid())
        control.parse_request(payload)  # refuse here what the node would refuse
        if timeout is None:
            timeout = self.timeout if self.timeout is not None else m.COMMANDS[req.CMD].timeout_s
        raw = self.rpc.send(payload, req.CMD, timeout=timeout, retries=retries)
        return control.parse_typed_reply(raw, reply)

    # ---- one method per command --------------------------------------
    def ping(self, *, timeout: float | None = None, retries: int | None = None) -> m.PingReply:
        return self.call(m.PingRequest(), m.PingReply, timeout=timeout, retries=retries)

    def info(self, *, timeout: float | None = None, retries: int | None = None) -> m.InfoReply:
        return self.call(m.InfoRequest(), m.InfoReply, timeout=timeout, retries=retries)

    def describe(self, model: str, *, granularity: str = "block", kwargs: dict[str, JSON] | None = None,
                 microbatch: int = 1, timeout: float | None = None) -> m.DescribeReply:
        req = m.DescribeRequest(model=model, granularity=granularity, kwargs=dict(kwargs or {}),
                                microbatch=microbatch)
        return self.call(req, m.DescribeReply, timeout=timeout)

    def load(self, req: m.LoadRequest, *, timeout: float | None = None,
             retries: int | None = None) -> m.LoadReply:
        return self.call(req, m.LoadReply, timeout=timeout, retries=retries)

    def start(self, connect: list[str], server_keys: list[str] | None = None, *,
              encodings: list[list[str]] | None = None, link_mbps: float | None = None,
              timeout: float | None = None, retries: int | None = None) -> m.StartReply:
        req = m.StartRequest(connect=tuple(connect),
                             server_keys=tuple(server_keys) if server_keys is not None else None,
                             encodings=tuple(tuple(r) for r in encodings) if encodings else None,
                             link_mbps=link_mbps)
        return self.call(req, m.StartReply, timeout=timeout, retries=retries)

    def stats(self, *, timeout: float | None = None, retries: int | None = None) -> m.StatsReply:
        return self.call(m.StatsRequest(), m.StatsReply, timeout=timeout, retries=retries)

    def profile(self, req: m.ProfileRequest, *, timeout: float | None = None) -> m.ProfileReply:
        return self.call(req, m.ProfileReply, timeout=timeout)

    def netprobe(self, req: m.NetprobeRequest, *, timeout: float | None = None,
                 retries: int | None = None) -> m.NetprobeReply:
        return self.call(req, m.NetprobeReply, timeout=timeout, retries=retries)

    def job(self, job_id: str, *, timeout: float | None = None) -> m.JobReply:
        return self.call(m.JobRequest(id=job_id), m.JobReply, timeout=timeout)

    def cancel(self, job_id: str, *, timeout: float | None = None, retries: int | None = None) -> m.JobReply:
        return self.call(m.CancelRequest(id=job_id), m.JobReply, timeout=timeout, retries=retries)

    def wait_job(self, job_id: str, timeout: float, *, poll_s: float = JOB_POLL_S,
                 on_progress: Callable[[list[JSON]], None] | None = None) -> JSONMap:
        """Poll ``job`` until the job ends: its result; ``JobFailed`` when it failed or was
        cancelled, ``JobTimeout`` (a ``ControlError(UNREACHABLE)``) when it is still running
        after ``timeout`` seconds.  A wait that ends without the job's end (the timeout,
        Ctrl-C, SIGTERM) cancels the job, so that the node is not left busy for nobody."""
        deadline = time.monotonic() + timeout
        seen: list[JSON] = []
        ended = False
        try:
            while True:
                j = self.job(job_id)
                if on_progress is not None and j.progress and j.progress != seen:
                    seen = j.progress
                    on_progress(seen)
                if j.state == "done":
                    ended = True
                    return j.result or {}
                if j.state in ("failed", "cancelled"):
                    ended = True
                    raise JobFailed(control.INTERNAL, j.error or f"job {job_id} {j.state}")
                if time.monotonic() > deadline:
                    raise JobTimeout(control.UNREACHABLE, f"node {self.name}: job {job_id} did not "
                                     f"finish in {timeout:g}s")
                time.sleep(poll_s)
        finally:
            if not ended:
                self._cancel_quietly(job_id)

    def _cancel_quietly(self, job_id: str) -> None:
        """Best effort: a node that does not answer now has its own deadline for the job."""
        try:
            self.cancel(job_id, timeout=CANCEL_TIMEOUT_S, retries=0)
        except control.ControlError:
            pass

    def pause(self, *, timeout: float | None = None) -> m.PauseReply:
        return self.call(m.PauseRequest(), m.PauseReply, timeout=timeout)

    def resume(self, *, timeout: float | None = None) -> m.PauseReply:
        return self.call(m.ResumeRequest(), m.PauseReply, timeout=timeout)

    def unload(self, *, timeout: float | None = None, retries: int | None = None) -> m.StateReply:
        return self.call(m.UnloadRequest(), m.StateReply, timeout=timeout, retries=retries)

    def shutdown(self, *, timeout: float | None = None, retries: int | None = None) -> m.StateReply:
        return self.call(m.ShutdownRequest(), m.StateReply, timeout=timeout, retries=retries)

    def close(self) -> None:
        self.rpc.close()

    def __enter__(self) -> NodeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
