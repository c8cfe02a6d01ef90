"""Deploy a plan: `load` every stage over REQ/REP, wire PULL/PUSH, wait for READY.

The plan file format is documented in plans/README.md (``edgezmq.orchestrate.planfile``).
``deploy`` is all or nothing: any node that is unreachable, refuses its shard or fails to
build it makes the whole deployment fail with an error naming the node, and every node
that had already loaded is unloaded again.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from edgezmq.errors import EdgezmqError
from edgezmq.orchestrate.address import NodeAddress
from edgezmq.orchestrate.planfile import DeployPlan, check_units
from edgezmq.protocol import control
from edgezmq.protocol.messages import LoadRequest
from edgezmq.transport import security
from edgezmq.transport.nodeclient import NodeClient

log = logging.getLogger(__name__)
T = TypeVar("T")

PING_TIMEOUT_S = 3.0
LOAD_TIMEOUT_S = 600.0  # building a ViT-Huge shard on a slow board takes minutes
LOAD_POLL_S = 0.2
UNLOAD_TIMEOUT_S = 30.0  # unloading a running stage joins its threads and its loader
HOLDING = ("loading", "loaded", "running")  # the node states that hold a shard


class DeployError(EdgezmqError, RuntimeError):
    """Deployment failed; ``errors`` maps node name -> what went wrong there."""

    def __init__(self, message: str, errors: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.errors = errors or {}


@dataclass
class Deployment:
    plan: DeployPlan
    run: str
    endpoints: list[list[str]]  # per stage: data PULL endpoint of each replica
    server_keys: list[list[bytes]] | None = None  # per stage: each replica's public key (secured)

    @property
    def entry(self) -> list[str]:
        return self.endpoints[0]

    @property
    def entry_keys(self) -> list[bytes] | None:
        return self.server_keys[0] if self.server_keys else None


def _each(nodes: list[tuple[int, NodeAddress]], fn) -> dict[str, Any]:
    """Run fn(stage, node) on every node in parallel; node name -> result or Exception."""
    out: dict[str, Any] = {}
    with ThreadPoolExecutor(max_workers=max(1, min(32, len(nodes)))) as ex:
        futs = {n.name: ex.submit(fn, i, n) for i, n in nodes}
        for name, f in futs.items():
            try:
                out[name] = f.result()
            except Exception as e:
                out[name] = e
    return out


def _fail(errors: dict[str, Any]) -> dict[str, str]:
    return {k: (e.message if isinstance(e, control.ControlError) else str(e))
            for k, e in errors.items() if isinstance(e, Exception)}


def staggered(downstream: list[T], replica: int, replicas: int) -> list[T]:
    """The next stage's addresses in the order replica `replica` (of `replicas`) of a stage
    connects to them: starting at ``replica * len(downstream) // replicas``.

    A PUSH socket deals messages round-robin in connect order, first address first. Replicas
    of a stage serve at one pace and start together (the stage before deals to them in
    turn), so had they all connected in one order, their k-th activations would all go to
    downstream replica k at the same moment: one link carries a whole wave while the others
    idle. On the EdgePipe testbed eight RCC-VE-like replicas sending to eight MinnowBoard-like
    ones together, through a 1.95 Mbit/s downlink each, measured 0.33 samples/s against 0.59
    predicted. Staggered, each wave spreads over every downstream replica."""
    off = (replica * len(downstream)) // replicas if replicas > 0 else 0
    return downstream[off:] + downstream[:off]


def unload(plan: DeployPlan, *, timeout: float = PING_TIMEOUT_S, only: list[str] | None = None) -> dict[str, Any]:
    """Unload every (or the named) node of a plan; best effort, returns per-node outcome."""
    nodes = [n for _, n in plan.all_nodes if only is None or n.name in only]
    return unload_nodes(nodes, timeout=timeout, curve=plan.curve)


def take_over(nodes: list[NodeAddress], *, curve: Callable[[NodeAddress], security.Curve | None] = lambda n: n.curve,
              say: Callable[[str], None] | None = None, timeout: float = PING_TIMEOUT_S) -> dict[str, Any]:
    """Ping each node and unload one that holds a shard (another deployment's, or a run whose
    client is gone): a deployment takes its nodes. Node name -> its ping reply, or the exception
    (unreachable, or the unload failed)."""

    def one(_: int, n: NodeAddress) -> Any:
        with NodeClient(n.control, timeout=timeout, retries=1, name=n.name, curve=curve(n)) as c:
            r = c.ping()
            if r.state in HOLDING:
                if say is not None:
                    say(f"{n.name}: {r.state} run {r.run}: taking it over (unloading)")
                c.unload(retries=0, timeout=UNLOAD_TIMEOUT_S)
            return r

    return _each([(0, n) for n in nodes], one)


def unload_nodes(nodes: list[NodeAddress], *, timeout: float = PING_TIMEOUT_S,
                 curve: Callable[[NodeAddress], security.Curve | None] = lambda n: n.curve) -> dict[str, Any]:
    """Unload each node, whatever it serves (a stale run nobody drives included); best effort:
    node name -> its reply or the exception."""

    def one(_: int, n: NodeAddress) -> Any:
        with NodeClient(n.control, timeout=timeout, retries=0, name=n.name, curve=curve(n)) as c:
            return c.unload()

    return _each([(0, n) for n in nodes], one)


def deploy(
    plan: DeployPlan, *, load_timeout: float = LOAD_TIMEOUT_S, ping_timeout: float = PING_TIMEOUT_S,
    progress=None,
) -> Deployment:
    """Load and wire every stage of ``plan``; all or nothing (see module doc)."""
    check_units(plan)
    run = plan.run or uuid.uuid4().hex[:12]
    nodes = plan.all_nodes
    say = progress or (lambda msg: log.info("%s", msg))

    errors = _fail(take_over([n for _, n in nodes], curve=plan.curve, timeout=ping_timeout))
    if errors:
        raise DeployError(_summary("unreachable", errors), errors)

    m = plan.model
    n_stages = len(plan.stages)

    def load(i: int, n: NodeAddress) -> Any:
        st = plan.stages[i]
        req = LoadRequest(
            run=run, model=m.name, units=(st.units[0], st.units[1]), stage=i, last=(i == n_stages - 1),
            microbatch=m.microbatch, granularity=m.granularity, kwargs=dict(m.kwargs),
            checkpoint=m.checkpoint, pretrained=m.pretrained, dtype=m.dtype, threads=n.threads or None,
            cache_bytes=st.cache_bytes, exact_generation=m.exact_generation,
            generation_only=m.generation_only)
        # a resent load is answered as the first (request id), so it may be retried like any command
        with NodeClient(n.control, timeout=60.0, retries=1, name=n.name, curve=plan.curve(n)) as c:
            r = c.load(req)
        if plan.keyring and r.public_key != plan.keyring.node_key(n.name).decode():
            # the node answered, so it holds the secret of the key we used; a mismatch is a
            # misconfigured keys directory, not an attack, but deploying on it would be a guess
            raise control.ControlError(control.BAD_STATE, f"node {n.name} reports public key "
                                       f"{r.public_key!r}, the plan's keys say {plan.keyring.node_key(n.name).decode()!r}")
        return r

    say(f"loading {len(nodes)} node(s)")
    loaded = _each(nodes, load)
    errors = _fail(loaded)
    if errors:
        unload(plan, only=[k for k, v in loaded.items() if not isinstance(v, Exception)])
        raise DeployError(_summary("load refused", errors), errors)

    # wait until every shard is built
    deadline = time.time() + load_timeout
    waiting = {n.name: n for _, n in nodes}
    clients = {n.name: NodeClient(n.control, timeout=ping_timeout, retries=2, name=n.name, curve=plan.curve(n))
               for _, n in nodes}
    try:
        while waiting:
            for name in list(waiting):
                try:
                    r = clients[name].ping()
                except control.ControlError as e:
                    errors[name] = e.message
                    waiting.pop(name)
                    continue
                if r.state == "loaded":
                    waiting.pop(name)
                    say(f"{name}: ready")
                elif r.state == "failed":
                    errors[name] = r.error or "load failed"
                    waiting.pop(name)
            if errors:
                break
            if time.time() > deadline:
                errors.update({k: f"not loaded after {load_timeout:g}s" for k in waiting})
                break
            if waiting:
                time.sleep(LOAD_POLL_S)
    finally:
        for c in clients.values():
            c.close()
    if errors:
        unload(plan)
        raise DeployError(_summary("load failed", errors), errors)

    endpoints = [[loaded[n.name].data for n in st.nodes] for st in plan.stages]
    ring = plan.keyring
    keys = [[ring.node_key(n.name) for n in st.nodes] for st in plan.stages] if ring else None

    def start(i: int, n: NodeAddress) -> Any:
        replicas = [x.name for x in plan.stages[i].nodes]
        j, k = replicas.index(n.name), len(replicas)
        downstream = staggered(endpoints[i + 1], j, k) if i + 1 < n_stages else [plan.results]
        server_keys = None
        if keys is not None and ring is not None:
            down_keys = staggered(keys[i + 1], j, k) if i + 1 < n_stages else [ring.results_public]
            server_keys = [k_.decode() for k_ in down_keys]
        with NodeClient(n.control, timeout=ping_timeout, retries=0, name=n.name, curve=plan.curve(n)) as c:
            return c.start(downstream, server_keys, encodings=plan.stages[i].encodings,
                           link_mbps=plan.stages[i].link_mbps)

    started = _each(nodes, start)
    errors = _fail(started)
    if errors:
        unload(plan)
        raise DeployError(_summary("start failed", errors), errors)
    say(f"started {n_stages} stage(s) on {len(nodes)} node(s): run {run}")
    return Deployment(plan=plan, run=run, endpoints=endpoints, server_keys=keys)


def _summary(what: str, errors: dict[str, str]) -> str:
    lines = [f"deploy failed ({what}) on {len(errors)} node(s):"]
    lines += [f"  {name}: {msg}" for name, msg in errors.items()]
    return "\n".join(lines)


def stage_table(plan: DeployPlan, unit_names: list[str] | None = None, endpoints: list[list[str]] | None = None) -> str:
    """The stages as a fixed-width text table."""
    rows = [("stage", "units", "layers", "nodes", "data")]
    for i, st in enumerate(plan.stages):
        a, b = st.units
        layers = f"{unit_names[a]} .. {unit_names[b - 1]}" if unit_names else ""
        data = ", ".join(endpoints[i]) if endpoints else ""
        rows.append((str(i), f"[{a}, {b})", layers, ", ".join(n.name for n in st.nodes), data))
    widths = [max(len(r[k]) for r in rows) for k in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)
