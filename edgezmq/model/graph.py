"""Unit chains from a model's traced graph (torch.fx): cut points, ownership, and unit callables.

A model that is not a hand-known ViT layout (edgezmq.model.chain) is cut from its graph: the
model's forward is traced symbolically (with timm's own leaf modules and functions that fx
must not trace into), every position between two graph nodes is a *cut point* where the
values still needed later — the *live* values — can cross a link, and units are the runs of
nodes between chosen cut points. See docs/model.md.

- A cut is valid when 1..MAX_TENSORS values are live and each is a tensor or a Python number
  or tuple of integers (a shape: ``B, N, C = x.shape`` taken before a cut and used after it).
  Such a value (or a None: an optional mask the model did not make) crosses as a small tensor
  (int64, float64 or bool; a 0-d one for a number or a None) and
  is turned back into the Python value on the other side. Parameters and buffers never cross:
  a unit reads its own (``get_attr`` nodes are copied into every unit that uses them).
- ``block``: cut where timm's layer grouping changes (``model.group_matcher()``, the groups
  timm uses for layer-wise learning-rate decay: stem, each residual block, head), at the
  first valid cut at or after the change; ``fine``: at every valid cut between two leaf
  modules or functions.
- A unit is a GraphModule over the model's own submodules and tensors (nothing copied):
  it runs exactly the model's own operations in the model's own order, hence the chain's
  output equals the model's forward bit for bit.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from edgezmq.errors import EdgezmqError
from edgezmq.terms import MAX_TENSORS

__all__ = ["GraphError", "GraphCut", "Traced", "trace", "graph_cuts", "GraphUnit", "GRAPH_GRANULARITIES"]

GRAPH_GRANULARITIES = ("block", "fine")
HEAD_GROUP = float("inf")  # timm's ordinal for parameters its group matcher leaves unmatched


class GraphError(EdgezmqError, ValueError):
    """A model that cannot be traced, or whose graph has no usable cut points."""


def _timm_fx() -> tuple[tuple[type, ...], tuple[Callable, ...]]:
    """timm's registrations: modules fx must call as leaves, functions it must not trace into."""
    try:
        from timm.layers import _fx as tfx
        return tuple(tfx._leaf_modules), tuple(tfx._autowrap_functions)
    except (ImportError, AttributeError):  # pragma: no cover - other timm layouts
        from timm.models import _features_fx as ffx
        return tuple(ffx.get_notrace_modules()), tuple(ffx.get_notrace_functions())


class _Tracer(fx.Tracer):
    def __init__(self) -> None:
        self._leaves, wrap = _timm_fx()
        super().__init__(autowrap_functions=wrap)
        # Buffers as graph values: an op on a buffer (`index.view(-1)`) is traced, not baked
        # into the graph as a constant computed from whatever the buffer held at trace time.
        self.proxy_buffer_attributes = True

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, self._leaves) or super().is_leaf_module(m, qualname)


MAX_SHAPE_VALUES = 64  # entries of a tuple of integers that may cross a cut as a tensor


@dataclass(frozen=True)
class ValueInfo:
    """What a graph node produced on the example input: its kind, and shape and dtype if a tensor.

    kind: ``tensor``; a Python ``int``, ``float`` or ``bool``; ``size`` / ``tuple`` / ``list`` of
    integers; ``none`` (these cross a cut as small tensors); or ``other`` (cannot cross: no cut there).
    """

    kind: str
    shape: tuple[int, ...] = ()
    dtype: torch.dtype | None = None

    @property
    def tensor(self) -> bool:
        return self.kind == "tensor"


def _kind(v: Any) -> ValueInfo:
    if isinstance(v, torch.Tensor):
        return ValueInfo("tensor", tuple(v.shape), v.dtype)
    if v is None:  # an optional value the model did not make (no attention mask): crosses as a marker
        return ValueInfo("none")
    if isinstance(v, bool):
        return ValueInfo("bool")
    if isinstance(v, int):
        return ValueInfo("int")
    if isinstance(v, float):
        return ValueInfo("float")
    if (isinstance(v, (tuple, list)) and 0 < len(v) <= MAX_SHAPE_VALUES
            and all(isinstance(e, int) and not isinstance(e, bool) for e in v)):
        return ValueInfo("size" if isinstance(v, torch.Size) else type(v).__name__)
    return ValueInfo("other")


_PACKED = {"none": torch.bool, "int": torch.int64, "float": torch.float64, "bool": torch.bool,
           "size": torch.int64, "tuple": torch.int64, "list": torch.int64}


def pack(v: Any, kind: str) -> torch.Tensor:
    """A Python value that crosses a cut, as the tensor that carries it."""
    if kind == "none":
        if v is not None:  # the graph holds for every input: a None when traced stays None
            raise GraphError(f"a value that was None when the model was traced is a {type(v).__name__}")
        return torch.tensor(False)
    return torch.tensor(list(v) if kind in ("size", "tuple") else v, dtype=_PACKED[kind])


def unpack(t: torch.Tensor, kind: str) -> Any:
    """The Python value a crossing tensor carries (the inverse of `pack`)."""
    if kind == "none":
        return None
    if kind == "int":
        return int(t)
    if kind == "float":
        return float(t)
    if kind == "bool":
        return bool(t)
    values = [int(e) for e in t.tolist()]
    return torch.Size(values) if kind == "size" else tuple(values) if kind == "tuple" else values


@dataclass(frozen=True, eq=False)
class Traced:
    """A model's traced graph, its nodes in execution order, and what each produced on meta.

    `constants`: tensors the forward made from Python values while it was traced (fx keeps
    them as graph constants, `_tensor_constant<i>`); they belong to the graph, not the model.
    """

    graph: fx.Graph
    nodes: tuple[fx.Node, ...]
    values: dict[str, ValueInfo] = field(repr=False)
    constants: dict[str, torch.Tensor] = field(repr=False)


def _concrete_args(model: nn.Module, name: str) -> dict[str, Any]:
    """The forward's optional arguments fixed at their defaults: the chain's input is the first."""
    params = list(inspect.signature(model.forward).parameters.values())
    fixed = {}
    for p in params[1:]:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.default is p.empty:
            raise GraphError(f"{name}: its forward takes more than one required input "
                             f"({', '.join(q.name for q in params)}); unsupported")
        fixed[p.name] = p.default
    return fixed


def trace(model: nn.Module, example: Sequence[torch.Tensor], name: str) -> Traced:
    """Trace `model.forward` and run the graph once on `example` (meta tensors: no memory)."""
    before = set(vars(model))
    try:
        graph = _Tracer().trace(model, concrete_args=_concrete_args(model, name) or None)
    except GraphError:
        raise
    except Exception as e:  # fx raises many types on dynamic control flow
        raise GraphError(f"{name}: torch.fx cannot trace its forward ({type(e).__name__}: {_first_line(e)})") from e
    finally:
        added = {k: vars(model)[k] for k in set(vars(model)) - before}
        for k in added:  # the tracer hangs its constants on the model: they belong to the graph
            delattr(model, k)
    constants = {k: v for k, v in added.items() if isinstance(v, torch.Tensor)}
    meta = [k for k, v in constants.items() if v.is_meta]
    if meta:
        raise GraphError(f"{name}: its forward computes tensors outside the graph from model state "
                         f"({', '.join(meta)}); unsupported")
    gm = fx.GraphModule({**_targets(model, graph, constants)}, graph)
    values: dict[str, ValueInfo] = {}

    class _Record(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            out = super().run_node(n)
            values[n.name] = _kind(out)
            return out

    try:
        with torch.no_grad():
            _Record(gm).run(*example)
    except Exception as e:
        raise GraphError(f"{name}: its traced graph does not run on meta tensors "
                         f"({type(e).__name__}: {_first_line(e)})") from e
    return Traced(graph, tuple(graph.nodes), values, constants)


def _targets(model: nn.Module, graph: fx.Graph, constants: dict[str, torch.Tensor],
             nodes: Sequence[fx.Node] | None = None) -> dict[str, Any]:
    """The modules and tensors the graph's nodes name, from `model` (and the graph's constants)."""
    out: dict[str, Any] = {}
    for n in graph.nodes if nodes is None else nodes:
        if n.op == "call_module":
            out[str(n.target)] = model.get_submodule(str(n.target))
        elif n.op == "get_attr":
            t = str(n.target)
            if t in constants:
                out[t] = constants[t]
            else:
                owner, _, leaf = t.rpartition(".")
                out[t] = getattr(model.get_submodule(owner), leaf)
    return out


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else ""


@dataclass(frozen=True, eq=False)
class GraphCut:
    """One unit of a traced chain: graph nodes [lo, hi), the live values in and out, what it owns."""

    name: str
    lo: int
    hi: int
    inputs: tuple[str, ...]  # node names, in definition order
    outputs: tuple[str, ...]
    owns: tuple[str, ...]  # dotted module / tensor names it reads
    traced: Traced = field(repr=False)

    @property
    def arity_in(self) -> int:
        return len(self.inputs)


def _last_uses(nodes: Sequence[fx.Node]) -> dict[str, int]:
    index = {n.name: i for i, n in enumerate(nodes)}
    last: dict[str, int] = {}
    for i, n in enumerate(nodes):
        for a in n.all_input_nodes:
            last[a.name] = max(last.get(a.name, -1), i)
    return {k: v for k, v in last.items() if k in index}


def _live_after(nodes: Sequence[fx.Node]) -> list[tuple[str, ...]]:
    """live[i]: names of the values defined at or before node i and used after it (no get_attr)."""
    last = _last_uses(nodes)
    live: dict[str, None] = {}  # ordered by definition
    out = []
    for i, n in enumerate(nodes):
        if not _fixed(n) and last.get(n.name, -1) > i:
            live[n.name] = None
        for a in n.all_input_nodes:
            if a.name in live and last[a.name] <= i:
                del live[a.name]
        out.append(tuple(live))
    return out


def _fixed(n: fx.Node) -> bool:
    """A value every unit has without receiving it: a parameter or buffer it reads, or an
    optional forward argument fixed at its default (a placeholder carrying its value)."""
    return n.op == "get_attr" or (n.op == "placeholder" and bool(n.args))


_CALL = re.compile(r"@\d+$")  # fx marks the second and later calls of one module: `cpe1@1`


def _module_path(n: fx.Node) -> str:
    """The deepest module this node was recorded in ('' at the model's top level)."""
    if n.op == "call_module":
        return str(n.target)
    if n.op == "get_attr":
        return str(n.target).rpartition(".")[0]
    stack = n.meta.get("nn_module_stack") or {}
    return _CALL.sub("", str(list(stack)[-1])) if stack else ""


def _stack_paths(n: fx.Node) -> list[str]:
    stack = [_CALL.sub("", str(k)) for k in (n.meta.get("nn_module_stack") or {})]
    if n.op in ("call_module", "get_attr"):
        stack.append(_module_path(n))
    return stack


def _reads(nodes: Sequence[fx.Node]) -> Iterator[str]:
    """The modules these nodes call and the tensors they read (where read, not where defined:
    a get_attr node may sit before a cut and be used after it)."""
    for n in nodes:
        if n.op == "call_module":
            yield str(n.target)
        for a in n.all_input_nodes:
            if a.op == "get_attr":
                yield str(a.target)


def _layer_groups(model: nn.Module) -> dict[str, float] | None:
    """Dotted tensor name -> timm layer group ordinal (stem 0, blocks 1.., head last), or None."""
    matcher = getattr(model, "group_matcher", None)
    if matcher is None:
        return None
    try:
        from timm.models._manipulate import group_with_matcher
        spec = matcher(coarse=False)
        named = [*model.named_parameters(), *model.named_buffers()]
        mapping = group_with_matcher(iter(named), spec, reverse=True)
    except Exception:  # a model whose matcher is not implemented or does not apply
        return None
    return {k: float(v) for k, v in mapping.items()}


def _repeated_blocks(model: nn.Module) -> set[str]:
    """Modules that are elements of a Sequential or ModuleList and have submodules of their own:
    residual blocks, stages (the fallback for models without timm's layer grouping)."""
    out = set()
    for path, mod in model.named_modules():
        if isinstance(mod, (nn.Sequential, nn.ModuleList)):
            for child_name, child in mod.named_children():
                if any(True for _ in child.children()):
                    out.add(f"{path}.{child_name}" if path else child_name)
    return out


def _node_groups(model: nn.Module, nodes: Sequence[fx.Node]) -> list[float | None]:
    """Each node's layer group: the group of the deepest module around it whose tensors are all
    in one group; None where none is (inherits its predecessor's)."""
    groups = _layer_groups(model)
    if groups is None:  # no timm grouping: the deepest repeated block around each node
        blocks = _repeated_blocks(model)
        order: dict[str, float] = {}
        keys = []
        for n in nodes:
            paths = _stack_paths(n)
            key = next((p for p in reversed(paths) if p in blocks), paths[0].split(".")[0] if paths else None)
            keys.append(key)
        return [None if k is None else order.setdefault(k, float(len(order))) for k in keys]
    by_prefix: dict[str, set[float]] = {}
    for key, g in groups.items():
        parts = key.split(".")
        for j in range(1, len(parts) + 1):
            by_prefix.setdefault(".".join(parts[:j]), set()).add(g)
    out: list[float | None] = []
    for n in nodes:
        hit = None
        for path in reversed(_stack_paths(n)):
            gs = by_prefix.get(path)
            if gs is not None and len(gs) == 1:
                hit = next(iter(gs))
                break
            if gs is not None:  # a module spanning several groups: too coarse to say
                break
        out.append(hit)
    # Group-less nodes (parameter-free modules and ops) join their predecessor's group, except
    # after the last node of a group below the last one: pooling before the classifier is head.
    top = max((g for g in out if g is not None), default=None)
    tail = max((i for i, g in enumerate(out) if g is not None and g != top), default=-1)
    return [top if g is None and i > tail else g for i, g in enumerate(out)]


def _valid(live: tuple[str, ...], values: dict[str, ValueInfo]) -> bool:
    return 1 <= len(live) <= MAX_TENSORS and all(values[v].kind != "other" for v in live)


def _computes(n: fx.Node) -> bool:
    return n.op in ("call_module", "call_function", "call_method")


def graph_cuts(model: nn.Module, traced: Traced, granularity: str, name: str) -> list[GraphCut]:
    """The units of a traced model at `granularity` (block | fine)."""
    if granularity not in GRAPH_GRANULARITIES:
        raise GraphError(f"{name}: granularity {granularity!r} is not one a traced model has: "
                         f"expected one of {GRAPH_GRANULARITIES}")
    nodes = traced.nodes
    out_idx = next((i for i, n in enumerate(nodes) if n.op == "output"), len(nodes) - 1)
    result = nodes[out_idx].args[0] if nodes[out_idx].args else None
    if not isinstance(result, fx.Node) or not traced.values.get(result.name, ValueInfo("other")).tensor:
        raise GraphError(f"{name}: its forward returns {type(result).__name__}, not one tensor; unsupported")
    required = [n.name for n in nodes if n.op == "placeholder" and not _fixed(n)]
    if len(required) != 1:
        raise GraphError(f"{name}: its traced forward takes {len(required)} inputs ({', '.join(required)}), "
                         "expected one tensor")
    live = _live_after(nodes)
    paths = [_module_path(n) for n in nodes]
    marks: list[bool] = [False] * len(nodes)  # marks[i]: a cut is wanted before node i
    works = [_computes(n) and traced.values[n.name].tensor for n in nodes]  # shape arithmetic, asserts: no
    if granularity == "fine":  # before each leaf module, and each op outside the previous op's module
        prev = None
        for i in range(1, out_idx):
            if works[i]:
                marks[i] = paths[i] != prev or not paths[i] or nodes[i].op == "call_module"
                prev = paths[i]
    else:
        groups = _node_groups(model, nodes)
        cur: float | None = None
        for i in range(1, out_idx):
            g = groups[i]
            if g is not None and cur is not None and g != cur:
                marks[i] = True
            if g is not None:
                cur = g
    # Cut before node i (after node i-1) when wanted and valid. `fine`: a wanted cut that is
    # invalid moves to the next valid position. `block`: between one wanted position and the
    # next, the valid position where the fewest values are live (then the fewest non-tensors,
    # then the earliest): a block's boundary where the least crosses. Never a unit without work.
    starts = [0]
    wanted = [i for i in range(1, out_idx) if marks[i]] + [out_idx]
    if granularity == "fine":
        pending = False
        for i in range(1, out_idx):
            pending = pending or marks[i]
            if pending and _valid(live[i - 1], traced.values) and any(works[starts[-1]:i]):
                starts.append(i)
                pending = False
    else:
        for a, b in zip(wanted, wanted[1:]):
            ok = [i for i in range(max(a, starts[-1] + 1), b)
                  if _valid(live[i - 1], traced.values) and any(works[starts[-1]:i])]
            if ok:
                starts.append(min(ok, key=lambda i: (len(live[i - 1]), sum(
                    not traced.values[v].tensor for v in live[i - 1]), i)))
    bounds = [*starts, out_idx]
    cuts = []
    names: dict[str, int] = {}
    for k in range(len(starts)):
        lo, hi = bounds[k], bounds[k + 1]
        inputs = tuple(required) if lo == 0 else live[lo - 1]
        outputs = (result.name,) if k == len(starts) - 1 else live[hi - 1]
        owns = tuple(dict.fromkeys(_reads(nodes[lo:hi])))
        base = _unit_name([n for n, w in zip(nodes[lo:hi], works[lo:hi]) if w], k, len(starts), granularity)
        seen = names.get(base, 0)
        names[base] = seen + 1
        cuts.append(GraphCut(base if not seen else f"{base}#{seen + 1}", lo, hi, inputs, outputs, owns, traced))
    return cuts


def _unit_name(nodes: Sequence[fx.Node], k: int, count: int, granularity: str) -> str:
    """A readable name from the unit's working nodes (`fine`: the first one's module or op; `block`:
    the deepest module enclosing them all, or stem/head)."""
    paths = [p for n in nodes if (p := _module_path(n))]
    if granularity == "fine":
        first = nodes[0]
        return _module_path(first) or (first.target if isinstance(first.target, str) else getattr(
            first.target, "__name__", first.name))
    tops: dict[str, list[str]] = {}  # top-level module -> its paths, in order of appearance
    for p in paths:
        tops.setdefault(p.split(".")[0], []).append(p)
    parts = [_common_prefix(ps) for ps in tops.values()]
    if len(parts) == 1:
        return parts[0]
    if k == 0:
        return "stem"
    if k == count - 1:
        return "head"
    return "+".join(parts[:2]) + ("+..." if len(parts) > 2 else "") if parts else f"unit{k}"


def _common_prefix(paths: Sequence[str]) -> str:
    common = paths[0].split(".")
    for p in paths[1:]:
        parts = p.split(".")
        j = 0
        while j < min(len(common), len(parts)) and common[j] == parts[j]:
            j += 1
        common = common[:j]
    return ".".join(common)


class GraphUnit:
    """One unit as a callable: the model's own graph nodes [lo, hi) over its own modules."""

    modules: tuple[nn.Module, ...] = ()

    def __init__(self, model: nn.Module, cut: GraphCut) -> None:
        g = fx.Graph()
        env: dict[str, fx.Node] = {}
        kinds = cut.traced.values
        for v in cut.inputs:
            env[v] = g.placeholder(v)
        for v in cut.inputs:  # a number or shape that crossed as a tensor: the Python value again
            if not kinds[v].tensor:
                env[v] = g.call_function(unpack, (env[v], kinds[v].kind))
        nodes = cut.traced.nodes
        by_name = {n.name: n for n in nodes}

        def arg(n: fx.Node) -> Any:
            if n.op == "placeholder" and n.args:  # an optional forward argument: its fixed default
                return n.args[0]
            if n.name not in env:  # a parameter or buffer read here, first defined before this unit
                if n.op != "get_attr":  # pragma: no cover - guards the live sets
                    raise GraphError(f"unit {cut.name}: value {n.name} is neither an input nor its own")
                env[n.name] = g.node_copy(by_name[n.name])
            return env[n.name]

        for n in nodes[cut.lo:cut.hi]:
            if n.op == "placeholder":
                continue
            env[n.name] = g.node_copy(n, arg)
        outs = [arg(by_name[v]) for v in cut.outputs]
        g.output(tuple(o if kinds[v].tensor else g.call_function(pack, (o, kinds[v].kind))
                       for o, v in zip(outs, cut.outputs)))
        # root: a table of exactly the objects the unit names (the model's own, not copies)
        self.gm = fx.GraphModule(_targets(model, g, cut.traced.constants), g)
        self.arity = len(cut.inputs)

    def __call__(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.gm(*tensors))
