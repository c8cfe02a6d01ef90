"""Deploy a plan: read the plan file, `load` every stage over REQ/REP, wire PULL/PUSH, wait for READY.

The plan file format is documented in plans/README.md.  ``deploy`` is all or
nothing: any node that is unreachable, refuses its shard or fails to build it makes
the whole deployment fail with an error naming the node, and every node that had
already loaded is unloaded again.
"""

from __future__ import annotations

import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import control, security
from .rpc import ControlClient
from .yamlfile import read_yaml

log = logging.getLogger("edgezmq.bootstrap")

PING_TIMEOUT_S = 3.0
LOAD_TIMEOUT_S = 600.0  # building a ViT-Huge shard on a slow board takes minutes
LOAD_POLL_S = 0.2
DEFAULT_RESULTS = "tcp://127.0.0.1:5560"
GRANULARITIES = ("block", "half", "sublayer")


class PlanFileError(ValueError):
    """A plan file that cannot be deployed; the message carries the field path."""


class DeployError(RuntimeError):
    """Deployment failed; ``errors`` maps node name -> what went wrong there."""

    def __init__(self, message: str, errors: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.errors = errors or {}


@dataclass
class ModelSpec:
    name: str
    microbatch: int = 8
    granularity: str = "block"
    dtype: str = "float32"
    checkpoint: str | None = None
    pretrained: bool = False
    kwargs: dict = field(default_factory=dict)


@dataclass
class NodeRef:
    name: str
    control: str
    threads: int | None = None


@dataclass
class StagePlan:
    units: tuple[int, int]
    nodes: list[NodeRef]


@dataclass
class Plan:
    model: ModelSpec
    stages: list[StagePlan]
    results: str = DEFAULT_RESULTS
    run: str | None = None
    source: str | None = None
    keyring: security.Keyring | None = None  # from the plan's `keys:` section: CurveZMQ
    keys: dict | None = None  # that section, paths resolved

    def curve(self, n: NodeRef) -> security.Curve | None:
        """How to reach node ``n``'s control socket: CURVE client of its key, or plaintext."""
        return security.client_curve(self.keyring, n.name)

    @property
    def all_nodes(self) -> list[tuple[int, NodeRef]]:
        return [(i, n) for i, st in enumerate(self.stages) for n in st.nodes]

    def to_dict(self) -> dict[str, Any]:
        m = self.model
        return {
            "model": {"name": m.name, "microbatch": m.microbatch, "granularity": m.granularity,
                      "dtype": m.dtype, "checkpoint": m.checkpoint, "pretrained": m.pretrained,
                      "kwargs": m.kwargs},
            "nodes": {n.name: n.control for _, n in self.all_nodes},
            "stages": [{"units": list(s.units), "nodes": [n.name for n in s.nodes],
                        **({"threads": s.nodes[0].threads} if s.nodes[0].threads else {})}
                       for s in self.stages],
            "results": self.results,
            **({"keys": self.keys} if self.keys else {}),
        }


def _need(d: Any, key: str, types: type | tuple, path: str, default: Any = ...) -> Any:
    if not isinstance(d, dict):
        raise PlanFileError(f"{path}: expected a mapping, got {type(d).__name__}")
    if key not in d or d[key] is None:
        if default is ...:
            raise PlanFileError(f"{path}.{key}: missing")
        return default
    v = d[key]
    if not isinstance(v, types) or (isinstance(v, bool) and types in (int, (int,))):
        want = types.__name__ if isinstance(types, type) else " or ".join(t.__name__ for t in types)
        raise PlanFileError(f"{path}.{key}: expected {want}, got {type(v).__name__} {v!r}")
    return v


def parse_plan(d: Any, source: str | None = None) -> Plan:
    """Validate a plan dict; PlanFileError names the offending field."""
    m = _need({"model": d} if not isinstance(d, dict) else d, "model", dict, "plan")
    model = ModelSpec(
        name=_need(m, "name", str, "model"),
        microbatch=_need(m, "microbatch", int, "model", 8),
        granularity=_need(m, "granularity", str, "model", "block"),
        dtype=_need(m, "dtype", str, "model", "float32"),
        checkpoint=_need(m, "checkpoint", str, "model", None),
        pretrained=_need(m, "pretrained", bool, "model", False),
        kwargs=_need(m, "kwargs", dict, "model", {}),
    )
    if model.microbatch < 1:
        raise PlanFileError(f"model.microbatch: must be >= 1, got {model.microbatch}")
    if model.granularity not in GRANULARITIES:
        raise PlanFileError(f"model.granularity: expected one of {GRANULARITIES}, got {model.granularity!r}")
    if model.checkpoint is None and not model.pretrained:
        raise PlanFileError("model.checkpoint: missing (or set model.pretrained: true)")
    if model.checkpoint is not None:
        model.checkpoint = str(Path(model.checkpoint).expanduser())
    if model.checkpoint is not None and source is not None and not Path(model.checkpoint).is_absolute():
        # relative to the plan file, so plans can travel with their checkpoint
        model.checkpoint = str((Path(source).parent / model.checkpoint).resolve())
    names = _need(d, "nodes", dict, "plan", {})
    for k, v in names.items():
        if not isinstance(k, str) or not isinstance(v, str) or not v.startswith("tcp://"):
            raise PlanFileError(f"nodes.{k}: expected a tcp:// control address, got {v!r}")
    raw_stages = _need(d, "stages", list, "plan")
    if not raw_stages:
        raise PlanFileError("stages: at least one stage is needed")
    stages: list[StagePlan] = []
    seen: dict[str, str] = {}
    for i, s in enumerate(raw_stages):
        path = f"stages[{i}]"
        units = _need(s, "units", list, path)
        if len(units) != 2 or not all(isinstance(u, int) and not isinstance(u, bool) for u in units):
            raise PlanFileError(f"{path}.units: expected [start, end] integers, got {units!r}")
        if units[0] >= units[1]:
            raise PlanFileError(f"{path}.units: empty range {units!r} (start must be < end)")
        prev_end = stages[-1].units[1] if stages else 0
        if units[0] != prev_end:
            raise PlanFileError(f"{path}.units: starts at {units[0]}, expected {prev_end} (stages must be contiguous from unit 0)")
        threads = _need(s, "threads", int, path, None)
        refs = s.get("nodes", [s["node"]] if "node" in s else None) if isinstance(s, dict) else None
        if not isinstance(refs, list) or not refs:
            raise PlanFileError(f"{path}.nodes: expected a non-empty list of node names or control addresses")
        nodes = []
        for j, r in enumerate(refs):
            if not isinstance(r, str):
                raise PlanFileError(f"{path}.nodes[{j}]: expected a string, got {r!r}")
            if r in names:
                ref = NodeRef(name=r, control=names[r], threads=threads)
            elif r.startswith("tcp://"):
                ref = NodeRef(name=r, control=r, threads=threads)
            else:
                raise PlanFileError(f"{path}.nodes[{j}]: unknown node {r!r} (not in nodes: and not a tcp:// address)")
            if ref.control in seen:
                raise PlanFileError(f"{path}.nodes[{j}]: node {r!r} already serves {seen[ref.control]}")
            seen[ref.control] = path
            nodes.append(ref)
        stages.append(StagePlan(units=(units[0], units[1]), nodes=nodes))
    results = _need(d, "results", str, "plan", DEFAULT_RESULTS)
    keys, keyring = _parse_keys(d, [n.name for st in stages for n in st.nodes], source)
    return Plan(model=model, stages=stages, results=results, run=_need(d, "run", str, "plan", None),
                source=source, keyring=keyring, keys=keys)


def _parse_keys(d: dict, names: list[str], source: str | None) -> tuple[dict | None, security.Keyring | None]:
    """The plan's optional ``keys:`` section (plans/README.md) -> (resolved section, Keyring)."""
    k = _need(d, "keys", dict, "plan", None)
    if k is None:
        return None, None
    try:
        return security.parse_keys_section(k, names, Path(source).parent if source is not None else Path.cwd())
    except security.KeyFileError as e:
        raise PlanFileError(str(e)) from None


def load_plan(path: str | Path) -> Plan:
    p = Path(path)
    d = read_yaml(p, PlanFileError, "plan file")
    if not isinstance(d, dict):
        raise PlanFileError(f"{path}: expected a mapping at the top level, got {type(d).__name__}")
    return parse_plan(d, source=str(p))


def check_units(plan: Plan) -> int:
    """Check the stages cover exactly the model's units; returns the unit count."""
    from . import model as models

    try:
        n = len(models.unit_infos(plan.model.name, plan.model.granularity, **plan.model.kwargs))
    except models.ModelError as e:
        raise PlanFileError(f"model.name: {e}") from None
    end = plan.stages[-1].units[1]
    if end != n:
        raise PlanFileError(
            f"stages: cover units [0, {end}), {plan.model.name} has {n} units at "
            f"{plan.model.granularity} granularity")
    return n


@dataclass
class Deployment:
    plan: Plan
    run: str
    endpoints: list[list[str]]  # per stage: data PULL endpoint of each replica
    server_keys: list[list[bytes]] | None = None  # per stage: each replica's public key (secured)

    @property
    def entry(self) -> list[str]:
        return self.endpoints[0]

    @property
    def entry_keys(self) -> list[bytes] | None:
        return self.server_keys[0] if self.server_keys else None


def _each(nodes: list[tuple[int, NodeRef]], fn) -> dict[str, Any]:
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


def unload(plan: Plan, *, timeout: float = PING_TIMEOUT_S, only: list[str] | None = None) -> dict[str, Any]:
    """Unload every (or the named) node of a plan; best effort, returns per-node outcome."""
    nodes = [(i, n) for i, n in plan.all_nodes if only is None or n.name in only]

    def one(_: int, n: NodeRef) -> Any:
        with ControlClient(n.control, timeout=timeout, retries=0, name=n.name, curve=plan.curve(n)) as c:
            return c.call("unload")

    return _each(nodes, one)


def deploy(
    plan: Plan, *, load_timeout: float = LOAD_TIMEOUT_S, ping_timeout: float = PING_TIMEOUT_S,
    progress=None,
) -> Deployment:
    """Load and wire every stage of ``plan``; all or nothing (see module doc)."""
    check_units(plan)
    run = plan.run or uuid.uuid4().hex[:12]
    nodes = plan.all_nodes
    say = progress or (lambda msg: log.info("%s", msg))

    def ping(_: int, n: NodeRef) -> dict:
        with ControlClient(n.control, timeout=ping_timeout, retries=1, name=n.name, curve=plan.curve(n)) as c:
            r = c.call("ping")
            if r.get("state") not in ("idle", "failed"):
                c.call("unload", retries=0, timeout=30.0)
            return r

    errors = _fail(_each(nodes, ping))
    if errors:
        raise DeployError(_summary("unreachable", errors), errors)

    m = plan.model
    n_stages = len(plan.stages)

    def load(i: int, n: NodeRef) -> dict:
        st = plan.stages[i]
        args: dict[str, Any] = dict(
            run=run, model=m.name, units=list(st.units), stage=i, last=(i == n_stages - 1),
            microbatch=m.microbatch, granularity=m.granularity, kwargs=m.kwargs,
            checkpoint=m.checkpoint, pretrained=m.pretrained, dtype=m.dtype)
        if n.threads:
            args["threads"] = n.threads
        with ControlClient(n.control, timeout=60.0, retries=0, name=n.name, curve=plan.curve(n)) as c:
            r = c.call("load", **args)
        if plan.keyring and r.get("public_key") != plan.keyring.node_key(n.name).decode():
            # the node answered, so it holds the secret of the key we used; a mismatch is a
            # misconfigured keys directory, not an attack, but deploying on it would be a guess
            raise control.ControlError(control.BAD_STATE, f"node {n.name} reports public key "
                                       f"{r.get('public_key')!r}, the plan's keys say {plan.keyring.node_key(n.name).decode()!r}")
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
    clients = {n.name: ControlClient(n.control, timeout=ping_timeout, retries=2, name=n.name, curve=plan.curve(n))
               for _, n in nodes}
    try:
        while waiting:
            for name in list(waiting):
                try:
                    r = clients[name].call("ping")
                except control.ControlError as e:
                    errors[name] = e.message
                    waiting.pop(name)
                    continue
                if r["state"] == "loaded":
                    waiting.pop(name)
                    say(f"{name}: ready")
                elif r["state"] == "failed":
                    errors[name] = r.get("error") or "load failed"
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

    endpoints = [[loaded[n.name]["data"] for n in st.nodes] for st in plan.stages]
    ring = plan.keyring
    keys = [[ring.node_key(n.name) for n in st.nodes] for st in plan.stages] if ring else None

    def start(i: int, n: NodeRef) -> dict:
        downstream = endpoints[i + 1] if i + 1 < n_stages else [plan.results]
        args: dict[str, Any] = {"connect": downstream}
        if keys is not None and ring is not None:
            down_keys = keys[i + 1] if i + 1 < n_stages else [ring.results_public]
            args["server_keys"] = [k.decode() for k in down_keys]
        with ControlClient(n.control, timeout=ping_timeout, retries=0, name=n.name, curve=plan.curve(n)) as c:
            return c.call("start", **args)

    started = _each(nodes, start)
    errors = _fail(started)
    if errors:
        unload(plan)
        raise DeployError(_summary("start failed", errors), errors)
    return Deployment(plan=plan, run=run, endpoints=endpoints, server_keys=keys)


def _summary(what: str, errors: dict[str, str]) -> str:
    lines = [f"deploy failed ({what}) on {len(errors)} node(s):"]
    lines += [f"  {name}: {msg}" for name, msg in errors.items()]
    return "\n".join(lines)


def stage_table(plan: Plan, unit_names: list[str] | None = None, endpoints: list[list[str]] | None = None) -> str:
    """The stages as a fixed-width text table."""
    rows = [("stage", "units", "layers", "nodes", "data")]
    for i, st in enumerate(plan.stages):
        a, b = st.units
        layers = f"{unit_names[a]} .. {unit_names[b - 1]}" if unit_names else ""
        data = ", ".join(endpoints[i]) if endpoints else ""
        rows.append((str(i), f"[{a}, {b})", layers, ", ".join(n.name for n in st.nodes), data))
    widths = [max(len(r[k]) for r in rows) for k in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)
