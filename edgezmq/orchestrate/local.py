"""Start N node daemons as separate processes on this machine (the embedded default cluster)."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from edgezmq.errors import EdgezmqError
from edgezmq.node.daemon import READY_PREFIX

log = logging.getLogger(__name__)

START_TIMEOUT_S = 180.0  # importing torch takes 5 s on a quiet 2-core box, over 60 s on a busy one
STOP_TIMEOUT_S = 15.0


class NodeStartError(EdgezmqError, RuntimeError):
    """A local node process that exited or said nothing before its start timeout."""


@dataclass
class LocalNode:
    name: str
    control: str
    proc: subprocess.Popen
    threads: int | None

    @property
    def pid(self) -> int:
        return self.proc.pid


class LocalCluster:
    """``with LocalCluster(3, threads=1) as c: c.nodes[0].control``.

    Each node is ``python -m edgezmq node --control tcp://HOST:0``; the node picks
    its port and prints it on its first stdout line.  Stopping sends SIGTERM (the
    nodes drain and exit 0), then SIGKILL for any that hang.
    """

    def __init__(
        self,
        n: int,
        *,
        threads: int | list[int | None] | None = None,
        host: str = "127.0.0.1",
        names: list[str] | None = None,
        log_dir: str | Path | None = None,
        extra_args: list[str] | None = None,
        node_args: dict[str, list[str]] | None = None,
    ) -> None:
        if n < 1:
            raise ValueError(f"need at least one node, got {n}")
        self.n = n
        self.threads = threads if isinstance(threads, list) else [threads] * n
        if len(self.threads) != n:
            raise ValueError(f"threads: {len(self.threads)} entries for {n} nodes")
        self.host = host
        self.names = names or [f"node{i}" for i in range(n)]
        self.log_dir = Path(log_dir) if log_dir else None
        self.extra_args = extra_args or []  # for every node
        self.node_args = node_args or {}  # name -> more arguments for that node (e.g. its own --secret-key)
        unknown = sorted(set(self.node_args) - set(self.names))
        if unknown:
            raise ValueError(f"node_args: no node named {unknown} (nodes: {self.names})")
        self.nodes: list[LocalNode] = []

    def start(self) -> LocalCluster:
        try:
            procs = [self._spawn(i) for i in range(self.n)]  # start all, then wait: imports overlap
            for i, p in enumerate(procs):
                self.nodes.append(self._wait_ready(self.names[i], p, self.threads[i]))
        except BaseException:
            for p in procs if "procs" in locals() else []:
                p.kill()
            raise
        return self

    def _spawn(self, i: int) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "edgezmq", "node", "--control", f"tcp://{self.host}:0",
               "--name", self.names[i], *self.extra_args, *self.node_args.get(self.names[i], [])]
        if self.threads[i]:
            cmd += ["--threads", str(self.threads[i])]
        stderr = None
        if self.log_dir:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            stderr = open(self.log_dir / f"{self.names[i]}.log", "ab")  # noqa: SIM115 - owned by the child
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=stderr, env=env, text=True)

    def _wait_ready(self, name: str, p: subprocess.Popen, threads: int | None) -> LocalNode:
        line: list[str] = []
        out = p.stdout
        assert out is not None  # started with stdout=PIPE
        reader = threading.Thread(target=lambda: line.append(out.readline()), daemon=True)
        reader.start()
        reader.join(START_TIMEOUT_S)
        text = line[0].strip() if line else ""
        if not text.startswith(READY_PREFIX):
            p.kill()
            raise NodeStartError(f"node {name} did not start within {START_TIMEOUT_S:g}s "
                               f"(exit code {p.poll()}, first line {text!r})")
        fields = dict(kv.split("=", 1) for kv in text.split()[1:])
        return LocalNode(name=name, control=fields["control"], proc=p, threads=threads)

    def stop(self) -> dict[str, int | None]:
        """SIGTERM every node, wait, SIGKILL stragglers; name -> exit code."""
        for nd in self.nodes:
            if nd.proc.poll() is None:
                nd.proc.send_signal(signal.SIGTERM)
        deadline = time.time() + STOP_TIMEOUT_S
        codes: dict[str, int | None] = {}
        for nd in self.nodes:
            try:
                codes[nd.name] = nd.proc.wait(max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                log.warning("node %s did not stop in time; killing it", nd.name)
                nd.proc.kill()
                codes[nd.name] = nd.proc.wait()
            if nd.proc.stdout:
                nd.proc.stdout.close()
        return codes

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
