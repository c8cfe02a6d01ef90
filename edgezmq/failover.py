"""Keep a deployment serving: heartbeat every node, and on a dead one re-plan over the
survivors, redeploy and replay every unanswered microbatch.

    with ResilientPipeline(cluster, ModelSpec(...)) as rp:
        for y in rp.stream(batches):        # every batch answered exactly once, in order
            ...

Heartbeats ride the control channel (never the PUSH data path, where messages to a
dead peer would just queue): a ``ping`` to every node each ``interval`` seconds with a
timeout of one interval; a node that misses ``liveness`` in a row, or answers but no
longer runs its stage (it restarted), is declared dead and logged by name.  Recovery
uses ``edgezmq.autodeploy`` on the surviving nodes (their profiles come from the nodes'
caches), so memory limits and speeds are respected; if no plan fits the survivors, the
stream raises ``PipelineError`` for the unanswered microbatches instead of hanging.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

import numpy as np

from . import control
from .autodeploy import autodeploy
from .bootstrap import ModelSpec, Plan, unload
from .client import Client
from .cluster import Cluster
from .rpc import ControlClient

log = logging.getLogger("edgezmq.failover")

HEARTBEAT_S = 1.0
LIVENESS = 3  # missed heartbeats before a node is declared dead


class Heartbeat:
    """Pings nodes on the control channel from a background thread; calls ``on_dead(name)``
    once per node that misses ``liveness`` heartbeats in a row or stops running its stage."""

    def __init__(self, nodes: dict[str, str], on_dead: Callable[[str], None], *,
                 interval: float = HEARTBEAT_S, liveness: int = LIVENESS,
                 standby: dict[str, str] | None = None, on_back: Callable[[str], None] | None = None) -> None:
        self.nodes = dict(nodes)
        self.on_dead = on_dead
        # nodes out of the deployment (dead before): pinged too; `on_back` when one answers idle
        self.standby = dict(standby or {})
        self.on_back = on_back
        self.interval, self.liveness = interval, liveness
        self.misses = dict.fromkeys(nodes, 0)
        self.dead: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="edgezmq-heartbeat", daemon=True)

    def start(self) -> Heartbeat:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(self.interval * 3 + 1)

    def _state(self, address: str, name: str) -> str | None:
        try:
            with ControlClient(address, timeout=self.interval, retries=0, name=name) as c:
                return c.call("ping").get("state")
        except control.ControlError:
            return None

    def _beat(self, name: str) -> bool:
        return self._state(self.nodes[name], name) == "running"

    def _run(self) -> None:
        with ThreadPoolExecutor(max_workers=max(1, min(16, len(self.nodes)))) as ex:
            while not self._stop.wait(self.interval):
                live = [n for n in self.nodes if n not in self.dead]
                for name, ok in zip(live, ex.map(self._beat, live)):
                    self.misses[name] = 0 if ok else self.misses[name] + 1
                    if self.misses[name] >= self.liveness and not self._stop.is_set():
                        self.dead.add(name)
                        log.warning("node %s missed %d heartbeats (every %.1fs): declared dead",
                                    name, self.misses[name], self.interval)
                        self.on_dead(name)
                if self.on_back is not None:
                    for name, address in list(self.standby.items()):
                        if not self._stop.is_set() and self._state(address, name) in ("idle", "failed"):
                            del self.standby[name]
                            log.warning("node %s answers again: rejoining", name)
                            self.on_back(name)


class ResilientPipeline:
    """A deployment over ``cluster`` that survives dead nodes (see the module doc)."""

    def __init__(self, cluster: Cluster, model: ModelSpec, *, window: int = 4, timeout: float = 120.0,
                 interval: float = HEARTBEAT_S, liveness: int = LIVENESS, replication: bool = True,
                 rejoin: bool = True, say: Callable[[str], None] | None = None) -> None:
        self.cluster, self.model = cluster, model
        self.window, self.timeout = window, timeout
        self.interval, self.liveness, self.replication = interval, liveness, replication
        self.say = say or (lambda m: log.info("%s", m))
        self.dead: set[str] = set()
        self.rejoin = rejoin  # a dead node that answers again is planned back in
        self.rejoined: list[str] = []
        self.plan: Plan | None = None
        self.planned: Any = None
        self.failovers = 0
        self.client: Client | None = None
        self._heartbeat: Heartbeat | None = None

    def __enter__(self) -> ResilientPipeline:
        self.client = Client([], f"tcp://{self.cluster.client_address}:0", run="", window=self.window,
                             timeout=self.timeout, microbatch=self.model.microbatch)
        try:
            entry, run = self._deploy()
        except BaseException:
            self.client.close()
            raise
        self.client.attach(entry, run)
        self.client.recover = self._recover
        return self

    def _deploy(self) -> tuple[list[str], str]:
        alive = replace(self.cluster, nodes=[n for n in self.cluster.nodes if n.name not in self.dead])
        if not alive.nodes:
            raise RuntimeError(f"no node left alive (dead: {sorted(self.dead)})")
        assert self.client is not None
        dep, plan, _, planned, _ = autodeploy(alive, self.model, results=self.client.results_endpoint,
                                              replication=self.replication, say=self.say)
        assert dep is not None
        self.plan, self.planned = plan, planned
        nodes = {ref.name: ref.control for _, ref in plan.all_nodes}
        standby = {n.name: n.control for n in self.cluster.nodes if n.name in self.dead} if self.rejoin else None
        self._heartbeat = Heartbeat(nodes, self._on_dead, interval=self.interval, liveness=self.liveness,
                                    standby=standby, on_back=self._on_back if self.rejoin else None).start()
        self.say(f"deployed run {dep.run} on {sorted(nodes)}")
        return dep.entry, dep.run

    def _on_back(self, name: str) -> None:
        """A dead node answers again: re-plan with it (the same path as a failover)."""
        self.dead.discard(name)
        self.rejoined.append(name)
        if self.client is not None:
            self.client.failed.set()

    def _on_dead(self, name: str) -> None:
        self.dead.add(name)
        if self.client is not None:
            self.client.failed.set()

    def _recover(self) -> tuple[list[str], str]:
        if self._heartbeat is not None:
            self._heartbeat.stop()
        self.failovers += 1
        self.say(f"failover {self.failovers}: re-planning without {sorted(self.dead)}"
                 + (f", with {self.rejoined[-1]} back" if self.rejoined else ""))
        if self.plan is not None:  # the old run is broken: free the survivors (and let them profile)
            unload(self.plan, only=[ref.name for _, ref in self.plan.all_nodes if ref.name not in self.dead])
        return self._deploy()

    def stream(self, batches: Iterable[np.ndarray], **kw: Any) -> Iterator[np.ndarray]:
        assert self.client is not None, "use ResilientPipeline as a context manager"
        return self.client.stream(batches, **kw)

    def __exit__(self, *exc: object) -> None:
        if self._heartbeat is not None:
            self._heartbeat.stop()
        if self.plan is not None:
            alive = [ref.name for _, ref in self.plan.all_nodes if ref.name not in self.dead]
            unload(self.plan, only=alive)
        if self.client is not None:
            self.client.close()
