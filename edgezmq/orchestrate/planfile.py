"""Plan files (plans/README.md): the model, the stages and the nodes serving them, parsed and checked.

A plan says which units each stage runs and on which node(s); ``parse_plan`` turns the
YAML mapping into a ``Plan`` or raises ``PlanFileError`` naming the field.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgezmq.errors import EdgezmqError
from edgezmq.transport import security
from edgezmq.yamlfile import read_yaml

DEFAULT_RESULTS = "tcp://127.0.0.1:5560"
GRANULARITIES = ("block", "half", "sublayer")


class PlanFileError(EdgezmqError, ValueError):
    """A plan file that cannot be deployed; the message carries the field path."""


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
    from edgezmq.model import chain as models

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


