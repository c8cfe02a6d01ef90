"""Plan files (plans/README.md): the model, the stages and the nodes serving them, parsed and checked.

A plan says which units each stage runs and on which node(s); ``parse_plan`` turns the
YAML mapping into a ``DeployPlan`` or raises ``PlanFileError`` naming the field. (The
planner's result, the costed ``edgezmq.planner.Plan``, becomes a ``DeployPlan`` through
``edgezmq.planner.deployable`` or ``edgezmq.orchestrate.autodeploy.to_deploy_plan``.)
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from edgezmq.argtypes import MAX_WINDOW, pipeline_window
from edgezmq.errors import EdgezmqError
from edgezmq.fields import Fields, prefixed, read_yaml, shown
from edgezmq.orchestrate.address import NodeAddress
from edgezmq.protocol.model_kwargs import ModelKwargsError, check_model_kwargs
from edgezmq.terms import (
    ENCODINGS,
    GRANULARITIES,
    MAX_MBPS,
    MAX_MICROBATCH,
    MAX_RUNGS,
    MAX_THREADS,
    MAX_UNITS,
)
from edgezmq.transport import security

DEFAULT_RESULTS = "tcp://127.0.0.1:5560"


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
    # a decoder's generation: every row on its own, bit for bit `generate` (docs/generate.md)
    exact_generation: bool = False
    # a decoder deployed to generate only: the last stage's buffers hold next-token logits
    generation_only: bool = False


@dataclass
class StagePlan:
    units: tuple[int, int]
    nodes: list[NodeAddress]
    # the link to the next stage: a ladder of rungs, largest first, each one encoding for every
    # tensor or one per tensor (docs/compression.md); None: raw
    encodings: list[list[str]] | None = None
    # that link's rate (Mbit/s, the slowest pair when replicated): the stage's data socket gets a
    # send buffer of this size (transport.sockets.link_sndbuf, docs/compression.md); None: autotuned
    link_mbps: float | None = None
    # a decoder's KV-cache budget on each of the stage's nodes (docs/generate.md); None: the node's default
    cache_bytes: int | None = None


@dataclass
class DeployPlan:
    """A plan file: the model, its stages and the nodes serving them (plans/README.md)."""

    model: ModelSpec
    stages: list[StagePlan]
    results: str = DEFAULT_RESULTS
    run: str | None = None
    source: str | None = None
    keyring: security.Keyring | None = None  # from the plan's `keys:` section: CurveZMQ
    keys: dict | None = None  # that section, paths resolved
    window: int | None = None  # predicted.window: microbatches in flight that keep the pipeline full
    # how the client sends its inputs to stage 0 (docs/compression.md): raw, or a lossy encoding
    # the planner chose within an accuracy budget
    input_encoding: str = ENCODINGS[0]

    def curve(self, n: NodeAddress) -> security.Curve | None:
        """How to reach node ``n``'s control socket: CURVE client of its key, or plaintext
        (from the plan's keyring, so that plans built in code answer it too)."""
        return security.client_curve(self.keyring, n.name)

    @property
    def all_nodes(self) -> list[tuple[int, NodeAddress]]:
        return [(i, n) for i, st in enumerate(self.stages) for n in st.nodes]

    @property
    def in_flight(self) -> int:
        """Microbatches a client keeps in flight: the plan's ``predicted.window``, else two per
        node and two more (argtypes.pipeline_window, without the latency the planner knows)."""
        return self.window or pipeline_window(len(self.all_nodes))

    def to_dict(self) -> dict[str, Any]:
        m = self.model
        return {
            "model": {"name": m.name, "microbatch": m.microbatch, "granularity": m.granularity,
                      "dtype": m.dtype, "checkpoint": m.checkpoint, "pretrained": m.pretrained,
                      "kwargs": m.kwargs, **({"exact_generation": True} if m.exact_generation else {}),
                      **({"generation_only": True} if m.generation_only else {})},
            "nodes": {n.name: n.control for _, n in self.all_nodes},
            "stages": [{"units": list(s.units), "nodes": [n.name for n in s.nodes],
                        **({"threads": s.nodes[0].threads} if s.nodes[0].threads else {}),
                        **({"encoding": [list(r) for r in s.encodings]} if s.encodings else {}),
                        **({"link_mbps": s.link_mbps} if s.link_mbps is not None else {}),
                        **({"cache_bytes": s.cache_bytes} if s.cache_bytes is not None else {})}
                       for s in self.stages],
            "results": self.results,
            **({"input_encoding": self.input_encoding} if self.input_encoding != ENCODINGS[0] else {}),
            **({"keys": self.keys} if self.keys else {}),
        }


F = Fields(prefixed(PlanFileError))


def _model_kwargs(kwargs: dict) -> dict:
    """Architecture arguments only (the nodes refuse anything else: docs/security.md), checked here
    so that a bad plan fails before any node is asked."""
    try:
        return check_model_kwargs(kwargs, "model.kwargs")
    except ModelKwargsError as e:
        raise PlanFileError(str(e)) from None


def parse_plan(d: Any, source: str | None = None) -> DeployPlan:
    """Validate a plan dict; PlanFileError names the offending field."""
    m = F.need({"model": d} if not isinstance(d, dict) else d, "model", dict, "plan")
    model = ModelSpec(
        name=F.need(m, "name", str, "model"),
        microbatch=F.need(m, "microbatch", int, "model", 8),
        granularity=F.need(m, "granularity", str, "model", "block"),
        dtype=F.need(m, "dtype", str, "model", "float32"),
        checkpoint=F.need(m, "checkpoint", str, "model", None),
        pretrained=F.need(m, "pretrained", bool, "model", False),
        kwargs=_model_kwargs(F.need(m, "kwargs", dict, "model", {})),
        exact_generation=F.need(m, "exact_generation", bool, "model", False),
        generation_only=F.need(m, "generation_only", bool, "model", False),
    )
    F.integer(model.microbatch, "model.microbatch", lo=1, hi=MAX_MICROBATCH)
    F.choice(model.granularity, "model.granularity", GRANULARITIES)
    if model.checkpoint is None and not model.pretrained:
        raise PlanFileError("model.checkpoint: missing (or set model.pretrained: true)")
    if model.checkpoint is not None:
        model.checkpoint = str(Path(model.checkpoint).expanduser())
    if model.checkpoint is not None and source is not None and not Path(model.checkpoint).is_absolute():
        # relative to the plan file, so plans can travel with their checkpoint
        model.checkpoint = str((Path(source).parent / model.checkpoint).resolve())
    names = F.need(d, "nodes", dict, "plan", {})
    for k, v in names.items():
        F.address(v, f"nodes.{k}")
    raw_stages = F.need(d, "stages", list, "plan")
    if not raw_stages:
        raise PlanFileError("stages: at least one stage is needed")
    stages: list[StagePlan] = []
    seen: dict[str, str] = {}
    for i, s in enumerate(raw_stages):
        path = f"stages[{i}]"
        units = F.need(s, "units", list, path)
        if len(units) != 2 or not all(isinstance(u, int) and not isinstance(u, bool) for u in units):
            raise PlanFileError(f"{path}.units: expected [start, end] integers, got {shown(units)}")
        units = [F.integer(u, f"{path}.units[{j}]", lo=0, hi=MAX_UNITS) for j, u in enumerate(units)]
        if units[0] >= units[1]:
            raise PlanFileError(f"{path}.units: empty range {units!r} (start must be < end)")
        prev_end = stages[-1].units[1] if stages else 0
        if units[0] != prev_end:
            raise PlanFileError(f"{path}.units: starts at {units[0]}, expected {prev_end} (stages must be contiguous from unit 0)")
        threads = F.need(s, "threads", int, path, None)
        if threads is not None:
            F.integer(threads, f"{path}.threads", lo=1, hi=MAX_THREADS)
        refs = s.get("nodes", [s["node"]] if "node" in s else None) if isinstance(s, dict) else None
        if not isinstance(refs, list) or not refs:
            raise PlanFileError(f"{path}.nodes: expected a non-empty list of node names or control addresses")
        nodes = []
        for j, r in enumerate(refs):
            if not isinstance(r, str):
                raise PlanFileError(f"{path}.nodes[{j}]: expected a string, got {r!r}")
            if r in names:
                ref = NodeAddress(name=r, control=names[r], threads=threads)
            elif r.startswith("tcp://"):
                ref = NodeAddress(name=r, control=r, threads=threads)
            else:
                raise PlanFileError(f"{path}.nodes[{j}]: unknown node {r!r} (not in nodes: and not a tcp:// address)")
            if ref.control in seen:
                raise PlanFileError(f"{path}.nodes[{j}]: node {r!r} already serves {seen[ref.control]}")
            seen[ref.control] = path
            nodes.append(ref)
        encodings = _encodings(s.get("encoding"), f"{path}.encoding", last=i == len(raw_stages) - 1)
        mbps = s.get("link_mbps")
        if mbps is not None:
            mbps = F.number(mbps, f"{path}.link_mbps", lo=0, hi=MAX_MBPS, lo_open=True, strings=True)
        cache = s.get("cache_bytes")
        if cache is not None:
            cache = F.size(cache, f"{path}.cache_bytes", lo=0)
        stages.append(StagePlan(units=(units[0], units[1]), nodes=nodes, encodings=encodings, link_mbps=mbps,
                                cache_bytes=cache))
    results = F.need(d, "results", str, "plan", DEFAULT_RESULTS)
    keys, keyring = _parse_keys(d, [n.name for st in stages for n in st.nodes], source)
    if keyring is not None:  # each address carries how to reach it
        stages = [replace(st, nodes=[replace(n, curve=security.client_curve(keyring, n.name)) for n in st.nodes])
                  for st in stages]
    input_encoding = F.choice(F.need(d, "input_encoding", str, "plan", ENCODINGS[0]), "input_encoding", ENCODINGS)
    return DeployPlan(model=model, stages=stages, results=results, run=F.need(d, "run", str, "plan", None),
                      source=source, keyring=keyring, keys=keys, window=_window(d), input_encoding=input_encoding)


def _window(d: dict) -> int | None:
    """``predicted.window`` (what `edgezmq plan -o` writes: edgezmq.planner.Plan.window), if any."""
    predicted = F.need(d, "predicted", dict, "plan", None)
    if predicted is None:
        return None
    w = F.need(predicted, "window", int, "predicted", None)
    return None if w is None else F.integer(w, "predicted.window", lo=1, hi=MAX_WINDOW)


MAX_RUNG_TENSORS = 8  # tensors a message carries at most (wire.MAX_TENSORS)


def _encodings(v: Any, path: str, last: bool) -> list[list[str]] | None:
    """A stage's ``encoding``: a name, a ladder of names, or a ladder of per-tensor lists -> rungs."""
    if v is None:
        return None
    if last:
        raise PlanFileError(f"{path}: the last stage sends results to the client, which stay raw (exact); "
                            "give encodings on the links between stages")
    ladder = [v] if isinstance(v, str) else v
    if not isinstance(ladder, list) or not 1 <= len(ladder) <= MAX_RUNGS:
        raise PlanFileError(f"{path}: expected an encoding, or a list of 1..{MAX_RUNGS} rungs (largest first), "
                            f"got {shown(v)}")
    rungs = []
    for j, r in enumerate(ladder):
        rung = [r] if isinstance(r, str) else r
        if not isinstance(rung, list) or not 1 <= len(rung) <= MAX_RUNG_TENSORS:
            raise PlanFileError(f"{path}[{j}]: expected an encoding or a list of 1..{MAX_RUNG_TENSORS} (one per "
                                f"tensor), got {shown(r)}")
        for k, name in enumerate(rung):
            F.choice(name, f"{path}[{j}]" + (f"[{k}]" if len(rung) > 1 else ""), ENCODINGS)
        rungs.append(list(rung))
    return rungs


def _parse_keys(d: dict, names: list[str], source: str | None) -> tuple[dict | None, security.Keyring | None]:
    """The plan's optional ``keys:`` section (plans/README.md) -> (resolved section, Keyring)."""
    k = F.need(d, "keys", dict, "plan", None)
    if k is None:
        return None, None
    try:
        return security.parse_keys_section(k, names, Path(source).parent if source is not None else Path.cwd())
    except security.KeyFileError as e:
        raise PlanFileError(str(e)) from None


def load_plan(path: str | Path) -> DeployPlan:
    p = Path(path)
    d = read_yaml(p, PlanFileError, "plan file")
    if not isinstance(d, dict):
        raise PlanFileError(f"{path}: expected a mapping at the top level, got {type(d).__name__}")
    return parse_plan(d, source=str(p))


def check_units(plan: DeployPlan) -> int:
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


