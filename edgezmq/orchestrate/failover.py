"""Keep a deployment serving: heartbeat every node, and on a dead or stalled one re-plan over
the survivors, redeploy and replay every unanswered microbatch.

    with ResilientPipeline(cluster, ModelSpec(...)) as rp:
        for y in rp.stream(batches):        # every batch answered exactly once, in order
            ...

Heartbeats ride the control channel (never the PUSH data path, where messages to a
dead peer would just queue): a ``stats`` request to every node each ``interval`` seconds
with a timeout of one interval.  A node is declared dead, and logged by name with the
reason, when it misses ``liveness`` heartbeats in a row, answers but no longer runs its
stage (it restarted), or **stalls**: it holds microbatches but finishes none for longer
than its stall limit, ``max(stall_floor, stall_factor x its predicted time per
microbatch)`` (so slow boards get longer); time blocked on a full downstream does not
count.  Recovery uses ``edgezmq.orchestrate.autodeploy`` on the surviving nodes (their profiles come
from the nodes' caches), so memory limits and speeds are respected; if no plan fits the
survivors, the stream raises ``PipelineError`` for the unanswered microbatches instead of
hanging.  With a ``keys:`` section in the inventory every socket involved speaks CurveZMQ.
With an accuracy ``budget`` (docs/compression.md) every deployment, the recoveries' too, is
planned within it: the first measures the encodings on the calibration batch, the next ones
reuse that measurement (the per-cut errors belong to the model, not to the devices), so a
recovery neither runs the model on the client nor falls back to a budget it was not given.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import numpy as np

from edgezmq.client import DEFAULT_WINDOW, Client, PipelineError
from edgezmq.errors import EdgezmqError
from edgezmq.orchestrate.autodeploy import EXACT, Budget, Generation, autodeploy
from edgezmq.orchestrate.calibrate import CALIBRATION_MICROBATCHES
from edgezmq.orchestrate.deploy import DeployError, Deployment, unload
from edgezmq.orchestrate.inventory import Cluster
from edgezmq.orchestrate.planfile import DeployPlan, ModelSpec
from edgezmq.protocol import control
from edgezmq.protocol import messages as m
from edgezmq.transport.nodeclient import NodeClient
from edgezmq.transport.security import Keyring, client_curve

log = logging.getLogger(__name__)

HEARTBEAT_S = 1.0
LIVENESS = 3  # missed heartbeats before a node is declared dead
STALL_FLOOR_S = 5.0  # a stage holding work that finishes none for this long is stalled...
STALL_FACTOR = 10.0  # ...or for this many times its predicted time per microbatch, when longer


def stall_limit(predicted_s: float | None, floor: float = STALL_FLOOR_S, factor: float = STALL_FACTOR) -> float:
    """Seconds a stage may hold work without finishing any before it is stalled."""
    return max(floor, factor * (predicted_s or 0.0))


def stall_limits(planned: Any, floor: float = STALL_FLOOR_S, factor: float = STALL_FACTOR) -> dict[str, float]:
    """Node -> its stall limit, from the planner's predicted time of the stage it serves."""
    return {d: stall_limit(cost.unreplicated_s, floor, factor)
            for st, cost in zip(planned.stages, planned.stage_costs) for d in st.devices}


class Progress:
    """How long one stage has held work without finishing any, from its successive
    ``stats.stage`` replies.  Time without work, and time blocked on a full downstream
    (``backpressured``: the downstream's stall, not this stage's), restart the clock."""

    def __init__(self) -> None:
        self.mark: tuple | None = None  # (run, microbatches finished) at the last look
        self.since: float | None = None  # busy at this mark since

    def stalled_for(self, stage: m.StageStats | None, now: float) -> float:
        busy = stage is not None and stage.in_flight > 0 and not stage.backpressured
        mark = (stage.run, stage.received - stage.in_flight) if stage is not None else None
        if not busy:
            self.since = None
        elif mark != self.mark or self.since is None:
            self.since = now
        self.mark = mark
        return 0.0 if self.since is None else now - self.since


class NodeLost(EdgezmqError, RuntimeError):
    """A node of a deployment died (or stalled) while the deployment was being set up."""

    def __init__(self, name: str, why: str) -> None:
        super().__init__(f"node {name} lost during calibration: {why}")
        self.name, self.why = name, why


@contextmanager
def watched(dep: Deployment, client: Client, *, keyring: Keyring | None = None,
            stall_limits: dict[str, float] | None = None, interval: float = HEARTBEAT_S,
            liveness: int = LIVENESS, stall_floor: float | None = STALL_FLOOR_S) -> Iterator[None]:
    """Heartbeat `dep`'s nodes while `client` streams through it outside a ResilientPipeline
    (the calibration burst): a node that dies or stalls ends the stream at once with
    ``NodeLost`` naming it, instead of the client waiting out its timeout."""
    lost: list[tuple[str, str]] = []

    def on_dead(name: str, why: str) -> None:
        lost.append((name, why))
        client.failed.set()

    def give_up() -> tuple[list[str], str, list[bytes] | None]:
        raise NodeLost(*lost[0])

    nodes = {ref.name: ref.control for _, ref in dep.plan.all_nodes}
    hb = Heartbeat(nodes, on_dead, interval=interval, liveness=liveness, keyring=keyring,
                   stall_limits=stall_limits, stall_floor=stall_floor).start()
    saved = client.recover
    client.recover = give_up  # the stream notices `failed` and "recovers": by raising NodeLost
    try:
        yield
    except PipelineError as e:
        if isinstance(e.__cause__, NodeLost):
            raise e.__cause__ from None
        raise
    finally:
        hb.stop()
        client.recover = saved
        client.failed.clear()


class Heartbeat:
    """Asks nodes for ``stats`` on the control channel from a background thread; calls
    ``on_dead(name, reason)`` once per node that misses ``liveness`` heartbeats in a row,
    stops running its stage, or stalls longer than its limit (``stall_limits[name]``, else
    ``stall_floor``; None: no stall check).  ``keyring``: reach the nodes over CurveZMQ."""

    def __init__(self, nodes: dict[str, str], on_dead: Callable[[str, str], None], *,
                 interval: float = HEARTBEAT_S, liveness: int = LIVENESS,
                 standby: dict[str, str] | None = None, on_back: Callable[[str], None] | None = None,
                 keyring: Keyring | None = None, stall_limits: dict[str, float] | None = None,
                 stall_floor: float | None = STALL_FLOOR_S) -> None:
        self.nodes = dict(nodes)
        self.on_dead = on_dead
        # nodes out of the deployment (dead before): asked too; `on_back` when one answers idle
        self.standby = dict(standby or {})
        self.on_back = on_back
        self.interval, self.liveness = interval, liveness
        self.keyring = keyring
        self.stall_limits = {n: (stall_limits or {}).get(n, stall_floor) for n in nodes}
        self.progress = {n: Progress() for n in nodes}
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

    def _stats(self, name: str, address: str) -> m.StatsReply | None:
        try:
            with NodeClient(address, timeout=self.interval, retries=0, name=name,
                            curve=client_curve(self.keyring, name)) as c:
                return c.stats()
        except control.ControlError:
            return None

    def verdict(self, name: str, reply: m.StatsReply | None, now: float) -> str | None:
        """Why node ``name`` is dead after this heartbeat's ``reply`` (None: no reply), or None."""
        if reply is None or reply.state != "running":
            self.misses[name] += 1
            if self.misses[name] < self.liveness:
                return None
            if reply is None:
                return f"missed {self.misses[name]} heartbeats (every {self.interval:.1f}s)"
            return f"is {reply.state}, not running its stage ({self.misses[name]} heartbeats in a row)"
        self.misses[name] = 0
        stalled = self.progress[name].stalled_for(reply.stage, now)
        limit = self.stall_limits[name]
        if limit is None or stalled <= limit:
            return None
        return (f"stalled: finished no microbatch for {stalled:.1f}s (limit {limit:.1f}s) "
                f"with {reply.stage.in_flight if reply.stage else 0} in flight")

    def _run(self) -> None:
        with ThreadPoolExecutor(max_workers=max(1, min(16, len(self.nodes)))) as ex:
            while not self._stop.wait(self.interval):
                live = [n for n in self.nodes if n not in self.dead]
                replies = list(ex.map(lambda n: self._stats(n, self.nodes[n]), live))
                now = time.monotonic()
                for name, reply in zip(live, replies):
                    why = self.verdict(name, reply, now)
                    if why is not None and not self._stop.is_set():
                        self.dead.add(name)
                        log.warning("node %s %s: declared dead", name, why)
                        self.on_dead(name, why)
                if self.on_back is not None:
                    for name, address in list(self.standby.items()):
                        r = None if self._stop.is_set() else self._stats(name, address)
                        if r is not None and r.state in ("idle", "failed"):
                            del self.standby[name]
                            log.warning("node %s answers again: rejoining", name)
                            self.on_back(name)


class ResilientPipeline:
    """A deployment over ``cluster`` that survives dead nodes (see the module doc)."""

    def __init__(self, cluster: Cluster, model: ModelSpec, *, window: int | None = None, timeout: float = 120.0,
                 interval: float = HEARTBEAT_S, liveness: int = LIVENESS, replication: bool = True,
                 rejoin: bool = True, say: Callable[[str], None] | None = None,
                 stall_floor: float | None = STALL_FLOOR_S, stall_factor: float = STALL_FACTOR,
                 generation: Generation | None = None, budget: Budget = EXACT, encodings: Any = None,
                 calibration: Any = None, calibration_samples: int | None = None) -> None:
        if stall_floor is not None and not stall_floor > 0:
            raise ValueError(f"stall_floor: expected seconds > 0 (or None: no stall check), got {stall_floor!r}")
        if not stall_factor >= 0:
            raise ValueError(f"stall_factor: expected a factor >= 0, got {stall_factor!r}")
        # the pipeline receives its results itself: a keys.results receiver does not apply
        self.keyring = replace(cluster.keyring, results_key=None) if cluster.keyring else None
        self.cluster, self.model = replace(cluster, keyring=self.keyring), model
        self.stall_floor, self.stall_factor = stall_floor, stall_factor
        self.window, self.timeout = window, timeout  # window None: each plan's own (Plan.window)
        self.interval, self.liveness, self.replication = interval, liveness, replication
        self.generation = generation  # a decoder planned for generation (`generator()`)
        # the accuracy budget every deployment keeps, the first one's measured encodings reused
        # by the next (autodeploy's budget, encodings, calibration, calibration_samples)
        self.budget, self.encodings, self.calibration_images = budget, encodings, calibration
        self.calibration_samples = calibration_samples
        self.measured: Any = None  # edgezmq.orchestrate.compress.Measured, once measured
        self.say = say or (lambda m: log.info("%s", m))
        self.dead: set[str] = set()
        self.causes: dict[str, str] = {}  # dead node -> why the heartbeat declared it dead
        self.rejoin = rejoin  # a dead node that answers again is planned back in
        self.rejoined: list[str] = []
        self.plan: DeployPlan | None = None
        self.planned: Any = None
        self.failovers = 0
        self.client: Client | None = None
        self.calibration = None  # the first deployment's (edgezmq.orchestrate.calibrate.Calibration)
        self._heartbeat: Heartbeat | None = None

    def __enter__(self) -> ResilientPipeline:
        self.client = Client([], f"tcp://{self.cluster.client_address}:0", run="", window=self.window or DEFAULT_WINDOW,
                             timeout=self.timeout, microbatch=self.model.microbatch, keyring=self.keyring)
        try:
            entry, run, keys = self._deploy()
        except BaseException:
            self.client.close()
            raise
        self.client.attach(entry, run, keys)
        self.client.recover = self._recover
        return self

    def _deploy(self) -> tuple[list[str], str, list[bytes] | None]:
        alive = self.cluster.without(self.dead)
        if not alive.nodes:
            raise DeployError(f"no node left alive (dead: {sorted(self.dead)})",
                              {n: self.causes.get(n, "dead") for n in sorted(self.dead)})
        assert self.client is not None
        # a recovery reuses the profiles as they are and does not calibrate: a spot check or a
        # calibration would add seconds of downtime
        first = not self.dead
        try:
            dep, plan, _, planned, g = autodeploy(alive, self.model, results=self.client.results_endpoint,
                                                  replication=self.replication, say=self.say, spot_check=first,
                                                  calibrate=CALIBRATION_MICROBATCHES if first else 0,
                                                  client=self.client, generation=self.generation,
                                                  budget=self.budget, encodings=self.encodings,
                                                  calibration=self.calibration_images,
                                                  calibration_samples=self.calibration_samples, measured=self.measured)
        except NodeLost as e:  # died during the first calibration: fail over as at any other time
            self.say(f"node {e.name} lost while calibrating ({e.why}): re-planning without it")
            self._on_dead(e.name, e.why)
            self.client.failed.clear()
            return self._deploy()
        assert dep is not None
        self.plan, self.planned = plan, planned
        self.client.window = self.window or planned.window
        self.client.input_encoding = plan.input_encoding
        if g.calibration is not None:
            self.calibration = g.calibration
        if g.encodings is not None:
            self.measured = g.encodings
        nodes = {ref.name: ref.control for _, ref in plan.all_nodes}
        standby = {n.name: n.control for n in self.cluster.nodes if n.name in self.dead} if self.rejoin else None
        limits = self._stall_limits(planned)
        self._heartbeat = Heartbeat(nodes, self._on_dead, interval=self.interval, liveness=self.liveness,
                                    standby=standby, on_back=self._on_back if self.rejoin else None,
                                    keyring=self.keyring, stall_limits=limits, stall_floor=self.stall_floor).start()
        self.say(f"deployed run {dep.run} on {sorted(nodes)}")
        log.info("stall limits: %s", limits)
        return dep.entry, dep.run, dep.entry_keys

    def _stall_limits(self, planned: Any) -> dict[str, float] | None:
        """Node -> seconds its stage may hold work without finishing any (None: no stall check)."""
        if self.stall_floor is None:
            return None
        return stall_limits(planned, self.stall_floor, self.stall_factor)

    def _on_back(self, name: str) -> None:
        """A dead node answers again: re-plan with it (the same path as a failover)."""
        self.dead.discard(name)
        self.rejoined.append(name)
        if self.client is not None:
            self.client.failed.set()

    def _on_dead(self, name: str, why: str) -> None:
        self.dead.add(name)
        self.causes[name] = why
        if self.client is not None:
            self.client.failed.set()

    def _recover(self) -> tuple[list[str], str, list[bytes] | None]:
        if self._heartbeat is not None:
            self._heartbeat.stop()
        self.failovers += 1
        self.say(f"failover {self.failovers}: re-planning without {sorted(self.dead)}"
                 + (f", with {self.rejoined[-1]} back" if self.rejoined else ""))
        if self.plan is not None:  # the old run is broken: free the survivors (and let them profile)
            unload(self.plan, only=[ref.name for _, ref in self.plan.all_nodes if ref.name not in self.dead])
        return self._deploy()

    def generator(self, *, retries: int = 1) -> Any:
        """A Generator (edgezmq.generation) over this pipeline: it starts its live sequences
        again on each new deployment."""
        from edgezmq.generation import Generator

        assert self.client is not None, "use ResilientPipeline as a context manager"
        return Generator.for_model(self.client, self.model.name, dict(self.model.kwargs), retries=retries)

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
