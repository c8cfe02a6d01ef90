"""Cut a timm model into a chain of units, and build or load one shard of them.

A model is a chain of units u0..u(L-1). A timm Vision Transformer is cut by hand: ``embed``,
the transformer blocks at one of three granularities (block, half, sublayer), ``head``. Any
other timm model (and a ViT at ``fine``) is cut from its traced graph (edgezmq.model.graph):
``block`` = timm's layer groups (stem, each residual block, head), ``fine`` = every cut
point. A shard is units [start, end): it is built on the ``meta`` device, pruned to its own
units, and only their tensors are read from a safetensors checkpoint, one tensor at a time.
See docs/model.md.

    >>> infos = unit_infos("vit_tiny_patch16_224", "half")       # 2 + 2*12 units, no weights
    >>> path = cached_checkpoint("vit_tiny_patch16_224", seed=0)  # seeded random init, written once
    >>> shard = build_shard("vit_tiny_patch16_224", 5, 13, granularity="half", checkpoint=path)
    >>> (y,) = shard(x)                                           # shards always return a tuple
"""

from __future__ import annotations

import collections
import contextlib
import copy
import difflib
import functools
import hashlib
import json
import logging
import os
import uuid
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeGuard

import timm
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from timm.layers import Attention, GluMlp, Mlp, SwiGLU
from timm.models.vision_transformer import Block, ResPostBlock, VisionTransformer
from torch import nn

from edgezmq.errors import EdgezmqError
from edgezmq.model import graph as fxg
from edgezmq.model import text
from edgezmq.paths import CACHE_ENV, CHECKPOINT_DIR, cache_root, checkpoints_dir  # noqa: F401 - re-exported
from edgezmq.terms import GRANULARITIES

__all__ = [
    "GRANULARITIES", "HAND_GRANULARITIES", "ModelError", "UnitInfo", "Shard", "create_model", "unit_infos", "num_units",
    "input_shape", "boundary_specs", "boundary_values", "example_inputs", "build_shard", "write_checkpoint", "cached_checkpoint",
    "save_checkpoint", "checkpoint_problem", "cache_root", "unit_names", "run_units", "input_specs",
    "random_inputs", "reference_forward", "torch_threads",
]

log = logging.getLogger(__name__)


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch's intra-op threads set to `n` inside the block, the previous setting restored after."""
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


HAND_GRANULARITIES = ("block", "half", "sublayer")  # a ViT's hand-written chain; others: traced
EMBED_UNIT = "embed"
HEAD_UNIT = "head"

# Top-level members of a VisionTransformer owned by the first and the last unit; anything
# else at the top level (besides `blocks`) is an unknown layout and is refused.
EMBED_MEMBERS = ("patch_embed", "cls_token", "reg_token", "dist_token", "pos_embed", "pos_drop",
                 "patch_drop", "norm_pre")
HEAD_MEMBERS = ("norm", "attn_pool", "fc_norm", "head_drop", "head", "head_dist")
REQUIRED_ATTRS = ("patch_embed", "_pos_embed", "patch_drop", "norm_pre", "blocks", "norm", "forward_head")

# How a block splits in two halves: (core module, modules before it, modules after it);
# a half computes x + post(core(pre(x))). Exact types only: a subclass may change forward.
HALF_SPECS: dict[type, tuple[tuple[str, tuple[str, ...], tuple[str, ...]], ...]] = {
    Block: (("attn", ("norm1",), ("ls1", "drop_path1")), ("mlp", ("norm2",), ("ls2", "drop_path2"))),
    ResPostBlock: (("attn", (), ("norm1", "drop_path1")), ("mlp", (), ("norm2", "drop_path2"))),
}
# Sublayer cut inside a core: its forward ends with these two children (projection, dropout),
# so the core with them replaced by Identity yields the tensor entering the projection.
ATTN_TAILS: dict[type, tuple[str, str]] = {Attention: ("proj", "proj_drop")}
MLP_TAILS: dict[type, tuple[str, str]] = {Mlp: ("fc2", "drop2"), GluMlp: ("fc2", "drop2"), SwiGLU: ("fc2", "drop2")}
try:  # newer timm only
    from timm.layers import DiffAttention
    ATTN_TAILS[DiffAttention] = ("proj", "proj_drop")
except ImportError:  # pragma: no cover
    pass
try:  # ViTamin's MLP lives with its model
    from timm.models.vitamin import GeGluMlp
    MLP_TAILS[GeGluMlp] = ("w2", "drop2")
except ImportError:  # pragma: no cover
    pass

CHECKPOINT_MODE = 0o644  # safetensors writes 0600; node daemons may run as another user
KWARGS_HASH_CHARS = 12
INFO_CACHE_SIZE = 64
PIECES_CACHE_SIZE = 8  # traced graphs held for shard builds: MBs of Python objects each for a large model
PLACEHOLDER_STD = 0.02  # weights of a shard built without a checkpoint (profiling only)
PLACEHOLDER_SEED = 0
SUGGESTIONS = 3  # registry names offered for an unknown model
SUGGESTION_CUTOFF = 0.75
MAX_LISTED = 5  # names listed in an error message before "..."
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16",
                torch.float64: "float64"}


class ModelError(EdgezmqError, ValueError):
    """Unknown or unsupported model, bad unit range, or a checkpoint that does not fit."""


@dataclass(frozen=True)
class UnitInfo:
    """One unit of the chain: its position, name, and the checkpoint tensors it owns."""

    index: int
    name: str
    param_names: tuple[str, ...]
    param_bytes: int  # bytes of its tensors at the model's own dtype (float32 for timm)

    def __post_init__(self) -> None:
        object.__setattr__(self, "param_names", tuple(self.param_names))
        if self.index < 0:
            raise ModelError(f"UnitInfo.index: expected >= 0, got {self.index}")
        if not self.name:
            raise ModelError("UnitInfo.name: expected a non-empty name")
        if self.param_bytes < 0:
            raise ModelError(f"UnitInfo.param_bytes: expected >= 0, got {self.param_bytes}")


@dataclass(frozen=True)
class _Piece:
    """How one unit is computed from the model, and the dotted names it owns."""

    name: str
    kind: str  # embed | block | half | context | output | head
    owns: tuple[str, ...]
    block: int = -1
    core: str = ""
    pre: tuple[str, ...] = ()
    post: tuple[str, ...] = ()
    tail: tuple[str, ...] = ()

    @property
    def arity_in(self) -> int:
        return 2 if self.kind == "output" else 1


def _listed(names: Iterable[str]) -> str:
    names = list(names)
    more = f", ... ({len(names)} in all)" if len(names) > MAX_LISTED else ""
    return ", ".join(names[:MAX_LISTED]) + more


def _check_granularity(granularity: str) -> None:
    if granularity not in GRANULARITIES:
        raise ModelError(f"unknown granularity {granularity!r}: expected one of {GRANULARITIES}")


def _model_name(model: nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return str(cfg.get("architecture") or type(model).__name__)


def _close_names(name: str, names: list[str]) -> list[str]:
    """Registry names nearest to a typo: whole-name or same-length-prefix similarity."""
    def score(m: str) -> float:
        return max(difflib.SequenceMatcher(None, name, m).ratio(),
                   difflib.SequenceMatcher(None, name, m[:len(name)]).ratio())
    ranked = sorted(names, key=score, reverse=True)[:SUGGESTIONS]
    return [m for m in ranked if score(m) >= SUGGESTION_CUTOFF]


def create_model(name: str, *, pretrained: bool = False, device: str | torch.device = "cpu",
                 **kwargs: Any) -> nn.Module:
    """timm.create_model(name, pretrained=..., **kwargs) on `device`, in eval mode (a text model
    of edgezmq.model.text: its BERT classifier)."""
    if text.is_text_model(name):
        try:
            return text.create_model(name, pretrained=pretrained, device=device, **kwargs)
        except text.TextModelError as e:
            raise ModelError(str(e)) from e
    if not timm.is_model(name):
        close = _close_names(name, [*timm.list_models(), *text.TEXT_MODELS])
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ModelError(f"unknown model {name!r}: not in timm {timm.__version__}'s registry{hint}")
    # on `meta` there are no values to initialise: timm's init of a ViT-Large skeleton costs
    # ~0.5 s of CPU, paid by every shard built (a profile builds one per unit: 98 for ViT-Large
    # sublayers, minutes on a slow board)
    skip: dict[str, Any] = ({"weight_init": "skip"} if torch.device(device).type == "meta"
                            and "weight_init" not in kwargs else {})
    try:
        with torch.device(device):
            try:
                model = timm.create_model(name, pretrained=pretrained, **kwargs, **skip)
            except (TypeError, AssertionError):  # a family without that argument: build it as it is
                if not skip:
                    raise
                model = timm.create_model(name, pretrained=pretrained, **kwargs)
    except Exception as e:  # timm raises many types for bad kwargs, offline hubs, bad files
        what = "pretrained weights for " if pretrained else ""
        raise ModelError(f"cannot create {what}{name} with kwargs {kwargs}: {type(e).__name__}: {e}") from e
    return model.eval()


# ---------------------------------------------------------------- units: structure


def _check_members(module: nn.Module, where: str, allowed: Iterable[str]) -> None:
    allowed = set(allowed)
    members = [*module._modules, *module._parameters, *module._buffers]
    unknown = [m for m in members if m not in allowed]
    if unknown:
        raise ModelError(
            f"{where} ({type(module).__name__}) has members {unknown} outside the known layout "
            f"{sorted(allowed)}; unsupported variant")


def _block_pieces(block: nn.Module, i: int, granularity: str) -> list[_Piece]:
    prefix = f"blocks.{i}"
    if granularity == "block":
        return [_Piece(prefix, "block", (prefix,), block=i)]
    spec = HALF_SPECS.get(type(block))
    if spec is None:
        raise ModelError(
            f"{prefix} is a {type(block).__name__}: granularity {granularity!r} needs a sequential "
            f"attention-then-MLP block ({', '.join(t.__name__ for t in HALF_SPECS)}); use 'block'")
    _check_members(block, prefix, [m for core, pre, post in spec for m in (core, *pre, *post)])
    pieces = []
    for core, pre, post in spec:
        core_name = f"{prefix}.{core}"
        if granularity == "half":
            owns = tuple(f"{prefix}.{m}" for m in (*pre, core, *post))
            pieces.append(_Piece(core_name, "half", owns, i, core, pre, post))
            continue
        mod = getattr(block, core)
        tails = ATTN_TAILS if core == "attn" else MLP_TAILS
        tail = tails.get(type(mod))
        if tail is None:
            raise ModelError(
                f"{core_name} is a {type(mod).__name__}: granularity 'sublayer' supports "
                f"{', '.join(t.__name__ for t in tails)} there; use 'half' or 'block'")
        pre_owns = tuple(f"{prefix}.{m}" for m in (*pre, core))
        post_owns = tuple(f"{core_name}.{t}" for t in tail) + tuple(f"{prefix}.{m}" for m in post)
        pieces.append(_Piece(core_name, "context", pre_owns, i, core, pre, (), tail))
        pieces.append(_Piece(f"{core_name}.{tail[0]}", "output", post_owns, i, core, (), post, tail))
    return pieces


Piece = _Piece | fxg.GraphCut | text.TextPiece  # a unit: hand-written (ViT, BERT) or a run of traced graph nodes
_TRACES: weakref.WeakKeyDictionary[nn.Module, fxg.Traced] = weakref.WeakKeyDictionary()
_CUTS: weakref.WeakKeyDictionary[nn.Module, dict[str, list[fxg.GraphCut]]] = weakref.WeakKeyDictionary()
_UNITS: weakref.WeakKeyDictionary[nn.Module, dict[int, fxg.GraphUnit]] = weakref.WeakKeyDictionary()  # by id(cut)


def _is_hand_vit(model: nn.Module) -> TypeGuard[VisionTransformer]:
    """A timm VisionTransformer whose forward the hand-written units reproduce."""
    cls = type(model)
    return (isinstance(model, VisionTransformer) and cls.forward is VisionTransformer.forward
            and getattr(cls, "forward_features", None) is VisionTransformer.forward_features
            and all(hasattr(model, a) for a in REQUIRED_ATTRS))


def _input_chw(model: nn.Module) -> tuple[int, int, int]:
    """(C, H, W) of the images a model takes: its patch embedding's size, else its timm config."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    size = cfg.get("input_size") or (3, 224, 224)
    chans = getattr(model, "in_chans", None)
    if chans is None:
        conv = next((m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Conv1d))), None)
        chans = conv.in_channels if conv is not None else size[0]
    embed = getattr(model, "patch_embed", None)
    hw = getattr(embed, "img_size", None)
    if isinstance(hw, (tuple, list)) and len(hw) == 2:
        return int(chans), int(hw[0]), int(hw[1])
    return int(chans), int(size[1]), int(size[2])


def _traced(model: nn.Module) -> fxg.Traced:
    """The model's traced graph (once per model object)."""
    hit = _TRACES.get(model)
    if hit is None:
        # on the model's own device: meta for planning and shards (no memory), or the CPU for a
        # materialised model (one sample's forward, once per model object)
        device = next((t.device for t in [*model.parameters(), *model.buffers()]), torch.device("meta"))
        example = torch.zeros((1, *_input_chw(model)), device=device)
        try:
            hit = fxg.trace(model, (example,), _model_name(model))
        except fxg.GraphError as e:
            raise ModelError(str(e)) from e
        _TRACES[model] = hit
    return hit


def _pieces(model: nn.Module, granularity: str) -> list[Piece]:
    _check_granularity(granularity)
    name = _model_name(model)
    if text.is_text(model):
        try:
            return list(text.pieces(model, granularity))
        except text.TextModelError as e:
            raise ModelError(str(e)) from e
    if _is_hand_vit(model) and granularity in HAND_GRANULARITIES:
        try:
            return list(_vit_pieces(model, granularity))
        except ModelError:
            if granularity != "block":
                raise
            # a ViT variant the hand-written chain does not know: its blocks from the graph
    elif granularity not in fxg.GRAPH_GRANULARITIES:
        raise ModelError(
            f"{name} ({type(model).__name__}) is cut from its traced graph: granularity "
            f"{granularity!r} needs a timm VisionTransformer layout; use one of {fxg.GRAPH_GRANULARITIES}")
    cuts = _CUTS.setdefault(model, {})
    if granularity not in cuts:
        try:
            cuts[granularity] = fxg.graph_cuts(model, _traced(model), granularity, name)
        except fxg.GraphError as e:
            raise ModelError(str(e)) from e
    return list(cuts[granularity])


def _vit_pieces(model: VisionTransformer, granularity: str) -> list[_Piece]:
    _check_members(model, _model_name(model), (*EMBED_MEMBERS, "blocks", *HEAD_MEMBERS))
    if model._buffers:
        raise ModelError(f"{_model_name(model)}: top-level buffers {list(model._buffers)} are unsupported")
    pieces = [_Piece(EMBED_UNIT, "embed", EMBED_MEMBERS)]
    for i, block in enumerate(model.blocks):
        pieces.extend(_block_pieces(block, i, granularity))
    pieces.append(_Piece(HEAD_UNIT, "head", HEAD_MEMBERS))
    return pieces


@functools.lru_cache(maxsize=PIECES_CACHE_SIZE)
def _pieces_cached(name: str, granularity: str, kwargs_key: tuple) -> tuple[Piece, ...]:
    return tuple(_pieces(create_model(name, device="meta", **dict(kwargs_key)), granularity))


def _named_pieces(name: str, granularity: str, kwargs: Mapping[str, Any], model: nn.Module) -> list[Piece]:
    """The units of `name` (as `_pieces(model, granularity)` for `model`, an instance of it):
    pieces name modules and tensors, never hold them, so one trace serves every shard built."""
    key = _frozen(kwargs)
    return _pieces(model, granularity) if key is None else list(_pieces_cached(name, granularity, key))


def _owners(pieces: list[Piece]) -> Callable[[str], tuple[int, ...]]:
    """A lookup: dotted tensor name -> indices of the units reading it (the longest owned
    prefix wins; a traced model may read one tensor in several units, e.g. tied weights)."""
    table: dict[str, tuple[int, ...]] = {}
    for i, piece in enumerate(pieces):
        for p in piece.owns:
            table[p] = (*table.get(p, ()), i)

    def owner(key: str) -> tuple[int, ...]:
        parts = key.split(".")
        for j in range(len(parts), 0, -1):
            hit = table.get(".".join(parts[:j]))
            if hit is not None:
                return hit
        return ()

    return owner


def _infos(model: nn.Module, pieces: list[Piece]) -> list[UnitInfo]:
    """Each unit's tensors. A hand-written chain owns every tensor; a traced one owns the tensors
    its forward reads (a tensor the forward never reads belongs to no unit and no shard)."""
    owner = _owners(pieces)
    strict = not any(isinstance(p, fxg.GraphCut) for p in pieces)
    names: list[list[str]] = [[] for _ in pieces]
    nbytes = [0] * len(pieces)
    for key, t in model.state_dict(keep_vars=True).items():
        units = owner(key)
        if not units and strict:
            raise ModelError(f"{_model_name(model)}: tensor {key!r} belongs to no unit; unsupported layout")
        for i in units:
            names[i].append(key)
            nbytes[i] += t.numel() * t.element_size()
    if strict:
        for key, _ in model.named_buffers():  # non-persistent ones too: a shard must rebuild them
            if not owner(key):
                raise ModelError(f"{_model_name(model)}: buffer {key!r} belongs to no unit; unsupported layout")
    return [UnitInfo(i, p.name, tuple(names[i]), nbytes[i]) for i, p in enumerate(pieces)]


def _frozen(kwargs: Mapping[str, Any]) -> tuple | None:
    """kwargs as a hashable cache key, or None when some value is unhashable."""
    key = tuple(sorted(kwargs.items()))
    try:
        hash(key)
    except TypeError:
        return None
    return key


@functools.lru_cache(maxsize=INFO_CACHE_SIZE)
def _unit_infos_cached(name: str, granularity: str, kwargs_key: tuple) -> tuple[UnitInfo, ...]:
    return tuple(_unit_infos(name, granularity, dict(kwargs_key)))


def _unit_infos(name: str, granularity: str, kwargs: dict[str, Any]) -> list[UnitInfo]:
    _check_granularity(granularity)
    model = create_model(name, device="meta", **kwargs)
    return _infos(model, _named_pieces(name, granularity, kwargs, model))


def unit_infos(name: str, granularity: str = "block", **kwargs: Any) -> list[UnitInfo]:
    """The unit chain of a model, computed on the meta device (no weights allocated)."""
    key = _frozen(kwargs)
    if key is None:
        return _unit_infos(name, granularity, kwargs)
    return list(_unit_infos_cached(name, granularity, key))


def num_units(name: str, granularity: str = "block", **kwargs: Any) -> int:
    return len(unit_infos(name, granularity, **kwargs))


def input_shape(name: str, microbatch: int, **kwargs: Any) -> tuple[int, ...]:
    """(B, C, H, W) of the images an image model takes, from its configuration."""
    specs = input_specs(name, microbatch, **kwargs)
    if len(specs) != 1:
        raise ModelError(f"{name} takes {len(specs)} tensors ({', '.join(text.INPUT_NAMES)}), not images")
    return specs[0][0]


def _input_specs(model: nn.Module, microbatch: int) -> list[tuple[tuple[int, ...], str]]:
    if microbatch < 1:
        raise ModelError(f"microbatch: expected >= 1, got {microbatch}")
    if text.is_text(model):
        return text.input_specs(model, microbatch)
    return [((microbatch, *_input_chw(model)), "float32")]


def input_specs(name: str, microbatch: int, **kwargs: Any) -> list[tuple[tuple[int, ...], str]]:
    """[(shape, dtype name)] of the tensors the model takes: one float32 (B, C, H, W) for an
    image model, three int64 (B, S) for a text model (edgezmq.model.text.INPUT_NAMES)."""
    return _input_specs(create_model(name, device="meta", **kwargs), microbatch)


def random_inputs(name: str, n: int, seed: int, **kwargs: Any) -> Any:
    """`n` random samples as the client takes them (demos, calibration, --random): standard
    normal images, one float32 array; or a text model's random token sequences with padding,
    a tuple of its three arrays (edgezmq.model.text). `edgezmq.client.split` cuts either."""
    import numpy as np

    model = create_model(name, device="meta", **kwargs)
    if text.is_text(model):
        return text.model_inputs(model, text.random_inputs(text.vocab_size(model), n, text.seq_len(model), seed))
    (shape, _), = _input_specs(model, n)
    return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)


def reference_forward(model: nn.Module, *xs: torch.Tensor) -> torch.Tensor:
    """The model's own forward on its input tensors: the logits a chain must equal."""
    return text.forward(model, *xs) if text.is_text(model) else model(*xs)


# ---------------------------------------------------------------- units: computation


class _Unit:
    """One unit as a callable over (shared) model modules: tensors in -> tuple of tensors out."""

    modules: tuple[nn.Module, ...] = ()  # modules whose train/eval flag it owns beyond the model's

    # Each kind takes its own number of tensors (its piece's arity_in), so the base declares
    # only the return type; a method here would make every narrower override an LSP error.
    __call__: Callable[..., tuple[torch.Tensor, ...]]


class _Embed(_Unit):
    def __init__(self, model: VisionTransformer) -> None:
        self.model = model

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        m = self.model  # the model's own methods, exactly as in VisionTransformer.forward_features
        x = m.patch_embed(x)
        x = m._pos_embed(x)
        x = m.patch_drop(x)
        x = m.norm_pre(x)
        return (x,)


class _Head(_Unit):
    def __init__(self, model: VisionTransformer) -> None:
        self.model = model

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (self.model.forward_head(self.model.norm(x)),)


class _Block(_Unit):
    def __init__(self, block: nn.Module) -> None:
        self.block = block

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (self.block(x),)


def _apply_seq(mods: tuple[nn.Module, ...], x: torch.Tensor) -> torch.Tensor:
    for m in mods:
        x = m(x)
    return x


class _Half(_Unit):
    """x + post(core(pre(x))): one residual branch of a block, the residual add inside."""

    def __init__(self, pre: tuple[nn.Module, ...], core: nn.Module, post: tuple[nn.Module, ...]) -> None:
        self.pre, self.core, self.post = pre, core, post

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (x + _apply_seq(self.post, self.core(_apply_seq(self.pre, x))),)


class _Context(_Unit):
    """(core-without-tail(pre(x)), x): the tensor entering the projection, and the residual."""

    def __init__(self, pre: tuple[nn.Module, ...], core: nn.Module, tail: tuple[str, ...]) -> None:
        # timm's own forward of a shallow copy whose tail children are Identity: parameters and
        # other children stay shared with the model, so the math is timm's, not a re-implementation.
        clone = copy.copy(core)
        clone._modules = dict(core._modules)
        for t in tail:
            clone._modules[t] = nn.Identity()
        self.pre, self.core = pre, clone
        self.modules = (clone,)

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (self.core(_apply_seq(self.pre, x)), x)


class _Output(_Unit):
    """x + post(tail(context)): the projection, layer scale, drop path and residual add."""

    def __init__(self, tail: tuple[nn.Module, ...], post: tuple[nn.Module, ...]) -> None:
        self.tail, self.post = tail, post

    def __call__(self, ctx: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (x + _apply_seq(self.post, _apply_seq(self.tail, ctx)),)


def _make_unit(model: nn.Module, piece: Piece) -> _Unit | fxg.GraphUnit | text.TextUnit:
    if isinstance(piece, fxg.GraphCut):
        return fxg.GraphUnit(model, piece)
    if isinstance(piece, text.TextPiece):
        return text.TextUnit(model, piece)
    assert isinstance(model, VisionTransformer)
    if piece.kind == "embed":
        return _Embed(model)
    if piece.kind == "head":
        return _Head(model)
    block = model.blocks[piece.block]
    if piece.kind == "block":
        return _Block(block)
    pre = tuple(block.get_submodule(m) for m in piece.pre)
    post = tuple(block.get_submodule(m) for m in piece.post)
    core = block.get_submodule(piece.core)
    if piece.kind == "half":
        return _Half(pre, core, post)
    if piece.kind == "context":
        return _Context(pre, core, piece.tail)
    return _Output(tuple(core.get_submodule(t) for t in piece.tail), post)


def _range_error(name: str, granularity: str, start: int, end: int, n: int) -> ModelError | None:
    if not 0 <= start < end <= n:
        why = "out of bounds" if start < 0 or end > n else "empty"
        return ModelError(
            f"unit range [{start}, {end}) {why} for {name} at {granularity} granularity ({n} units): "
            f"expected 0 <= start < end <= {n}")
    return None


def unit_names(model: nn.Module, granularity: str = "block") -> list[str]:
    """The names of a materialised model's units, in chain order (its length is L)."""
    return [p.name for p in _pieces(model, granularity)]


def run_units(model: nn.Module, granularity: str, *tensors: torch.Tensor, start: int = 0,
              end: int | None = None) -> tuple[torch.Tensor, ...]:
    """Apply units [start, end) of a whole, materialised model one by one (tests, profiling)."""
    pieces = _pieces(model, granularity)
    end = len(pieces) if end is None else end
    err = _range_error(_model_name(model), granularity, start, end, len(pieces))
    if err:
        raise err
    units = _UNITS.setdefault(model, {})
    for piece in pieces[start:end]:
        if isinstance(piece, fxg.GraphCut):  # cached: building a graph unit generates code
            unit = units.get(id(piece)) or units.setdefault(id(piece), fxg.GraphUnit(model, piece))
            tensors = unit(*tensors)
        else:
            tensors = _make_unit(model, piece)(*tensors)
    return tensors


def _dtype_name(dtype: torch.dtype) -> str:
    return _DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))


Specs = list[list[tuple[tuple[int, ...], str]]]
Values = list[dict[int, torch.Tensor]]


@functools.lru_cache(maxsize=INFO_CACHE_SIZE)
def _boundaries_cached(name: str, granularity: str, microbatch: int, dtype: torch.dtype,
                       kwargs_key: tuple) -> tuple[Specs, Values]:
    return _boundaries(name, granularity, microbatch, dtype, dict(kwargs_key))


def _boundaries(name: str, granularity: str, microbatch: int, dtype: torch.dtype,
                kwargs: dict[str, Any]) -> tuple[Specs, Values]:
    """The chain run on meta tensors: each boundary's (shape, dtype) and the tensors whose
    values the model fixes (a shape that crosses a cut, edgezmq.model.graph), by position."""
    _check_granularity(granularity)
    model = create_model(name, device="meta", **kwargs).to(dtype)
    pieces = _named_pieces(name, granularity, kwargs, model)
    xs: tuple[torch.Tensor, ...] = tuple(
        torch.empty(shape, device="meta", dtype=dtype if dt == "float32" else getattr(torch, dt))
        for shape, dt in _input_specs(model, microbatch))
    specs: Specs = []
    values: Values = []
    with torch.no_grad():
        for piece in [*pieces, None]:
            specs.append([(tuple(x.shape), _dtype_name(x.dtype)) for x in xs])
            values.append({j: x for j, x in enumerate(xs) if not x.is_meta})
            if piece is not None:
                xs = _make_unit(model, piece)(*xs)
    return specs, values


def _boundaries_for(name: str, granularity: str, microbatch: int, dtype: torch.dtype,
                    kwargs: dict[str, Any]) -> tuple[Specs, Values]:
    if microbatch < 1:
        raise ModelError(f"microbatch: expected >= 1, got {microbatch}")
    key = _frozen(kwargs)
    if key is None:
        return _boundaries(name, granularity, microbatch, dtype, kwargs)
    return _boundaries_cached(name, granularity, microbatch, dtype, key)


def boundary_values(name: str, granularity: str, microbatch: int, *, dtype: torch.dtype = torch.float32,
                    **kwargs: Any) -> Values:
    """Entry i: {position: tensor} of the tensors entering unit i whose values the model fixes
    at this microbatch (shapes crossing a cut as int64 tensors); the others are activations."""
    return [dict(v) for v in _boundaries_for(name, granularity, microbatch, dtype, kwargs)[1]]


def example_inputs(spec: list[tuple[tuple[int, ...], str]], fixed: Mapping[int, torch.Tensor],
                   generator: torch.Generator) -> list[torch.Tensor]:
    """Tensors entering a unit, for timing it: its fixed values as they are, random normal
    floats for its activations (zeros for any other dtype)."""
    out = []
    for j, (shape, dt) in enumerate(spec):
        dtype = getattr(torch, dt)
        if j in fixed:
            out.append(fixed[j].clone())
        elif dtype.is_floating_point:
            out.append(torch.randn(shape, generator=generator, dtype=dtype))
        else:
            out.append(torch.zeros(shape, dtype=dtype))
    return out


def boundary_specs(name: str, granularity: str, microbatch: int, *, dtype: torch.dtype = torch.float32,
                   **kwargs: Any) -> list[list[tuple[tuple[int, ...], str]]]:
    """Entry i: [(shape, dtype name)] of the tensors entering unit i; entry L: the logits.

    Computed by running the chain on meta tensors: exact shapes, no memory, no weights.
    """
    return [list(s) for s in _boundaries_for(name, granularity, microbatch, dtype, kwargs)[0]]


# ---------------------------------------------------------------- shards


class Shard(nn.Module):
    """Units [start, end) of a model: holds only their tensors, under their timm names."""

    def __init__(self, name: str, granularity: str, start: int, end: int, units: list[UnitInfo],
                 model: nn.Module, steps: list[_Unit | fxg.GraphUnit | text.TextUnit], arity_in: int) -> None:
        super().__init__()
        self.name, self.granularity, self.start, self.end = name, granularity, start, end
        self.units = list(units)
        self.arity_in = arity_in
        # The pruned model's children and top-level parameters, registered here under their own
        # names: state_dict() keys are exactly the units' param_names (timm's names).
        for child_name, child in model.named_children():
            self.add_module(child_name, child)
        for pname, p in model._parameters.items():
            if p is not None:
                self.register_parameter(pname, p)
        for bname, b in model._buffers.items():
            if b is not None:
                self.register_buffer(bname, b, persistent=bname not in model._non_persistent_buffers_set)
        self._steps = tuple(steps)
        self._extra = (model, *(m for s in steps for m in s.modules))  # not registered: no duplicates

    def train(self, mode: bool = True) -> Shard:
        super().train(mode)
        for m in self._extra:
            m.train(mode)
        return self

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if len(tensors) != self.arity_in:
            raise ModelError(
                f"shard {self.name} [{self.start}, {self.end}) takes {self.arity_in} tensor(s) "
                f"entering unit {self.units[0].name}, got {len(tensors)}")
        for step in self._steps:
            tensors = step(*tensors)
        return tensors

    def param_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.state_dict().values())

    # ---- generation (a decoder's shard; docs/generate.md) --------------------------------
    @property
    def is_decoder(self) -> bool:
        return text.is_text(self._extra[0]) and text.family(self._extra[0]) in text.DECODER_FAMILIES

    def new_cache(self) -> Any:
        """An empty KV cache for one sequence on this shard."""
        return text.new_cache(self._extra[0])

    def cache_bytes_per_token(self) -> int:
        """What one token of one sequence costs this shard's KV cache."""
        layers = sum(1 for s in self._steps if isinstance(s, text.TextUnit) and s.kind in text.CACHE_KINDS)
        return text.cache_bytes_per_token(self._extra[0], layers)

    def max_positions(self) -> int:
        return text.max_positions(self._extra[0].config)

    def decode_inputs(self, microbatch: int, context: int, generator: torch.Generator) -> tuple[torch.Tensor, list[Any]]:
        """What a decode step of `microbatch` sequences with `context` tokens cached brings this
        shard (for timing it): its one new token each (ids, or random hidden states) and caches
        of random keys and values."""
        m: Any = self._extra[0]
        first = self._steps[0]
        assert isinstance(first, text.TextUnit)
        if first.kind == "dembed":
            x = torch.zeros((microbatch, 1), dtype=torch.long)
        else:
            x = torch.randn((microbatch, 1, m.config.hidden_size), generator=generator)
        heads, size = text.kv_shape(m)
        caches = []
        for _ in range(microbatch):
            c = self.new_cache()
            for i in self._layer_ids():
                c.layers[i].update(torch.randn((1, heads, context, size), generator=generator),
                                   torch.randn((1, heads, context, size), generator=generator))
            caches.append(c)
        return x, caches

    def _layer_ids(self) -> list[int]:
        return [s.index for s in self._steps if isinstance(s, text.TextUnit) and s.kind in text.CACHE_KINDS]

    def step_batch(self, x: torch.Tensor, caches: list[Any], lengths: list[int]) -> torch.Tensor:
        """T new tokens of each of B sequences (`x`: (B, T) ids or (B, T, D)), each with its cache
        of lengths[i] tokens (0: it starts now), as one batch: the model's own forward on the
        left-padded batch; each cache is extended by its T tokens."""
        new = x.shape[1]
        layers = self._layer_ids()
        batch, mask = (text.stack_caches(self._extra[0], caches, lengths, layers, new) if layers
                       else (None, torch.ones(len(caches), max(lengths) + new, dtype=torch.long)))
        positions = torch.tensor(lengths).unsqueeze(1) + torch.arange(new)
        for s in self._steps:
            assert isinstance(s, text.TextUnit)
            x = s.step_batch(x, batch, positions, mask)
        if layers:
            text.unstack_caches(batch, caches, layers, new)
        return x

    def step(self, x: torch.Tensor, cache: Any, pos: int) -> torch.Tensor:
        """One sequence's new tokens `x` (batch 1) at positions pos.. through this shard's units,
        extending `cache`; a decoder's shard only (see `is_decoder`)."""
        positions = torch.arange(pos, pos + x.shape[1]).unsqueeze(0)
        for s in self._steps:
            assert isinstance(s, text.TextUnit)
            x = s.step(x, cache, positions)
        return x

    def extra_repr(self) -> str:
        return f"{self.name} units [{self.start}, {self.end}) at {self.granularity} granularity"


def _prune(model: nn.Module, owner: Callable[[str], tuple[int, ...]], start: int, end: int) -> None:
    """Drop every parameter and buffer outside units [start, end) (they stay None, never used)."""
    for mod_name, mod in model.named_modules():
        for table in (mod._parameters, mod._buffers):
            for key, t in table.items():
                units = owner(f"{mod_name}.{key}" if mod_name else key)
                if t is not None and not any(start <= i < end for i in units):
                    table[key] = None


def _read_checkpoint(path: Path, expected: Mapping[str, torch.Tensor], dtype: torch.dtype,
                     name: str, mmap: bool, check: Callable[[], None]) -> dict[str, torch.Tensor]:
    """The expected tensors, read one by one from a safetensors file (never the whole file).

    safetensors >= 0.8 hands out tensors backed by a private mapping of the file: without
    `mmap` each is copied into memory the process owns, so the shard neither pages in from
    disk during its first microbatches nor dies of SIGBUS if the file is rewritten in place.
    """
    if not path.is_file():
        raise ModelError(f"checkpoint file {str(path)!r} not found (expected a safetensors file for {name})")
    out = {}
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            have = set(f.keys())
            missing = [k for k in expected if k not in have]
            if missing:
                raise ModelError(
                    f"checkpoint {str(path)!r} lacks {len(missing)} tensor(s) this shard of {name} needs: "
                    f"{_listed(missing)}")
            for key, meta in expected.items():
                check()
                t = f.get_tensor(key)
                if tuple(t.shape) != tuple(meta.shape):
                    raise ModelError(
                        f"checkpoint {str(path)!r}: tensor {key!r} has shape {tuple(t.shape)}, "
                        f"expected {tuple(meta.shape)} for {name}")
                if t.is_floating_point() != meta.is_floating_point():
                    raise ModelError(
                        f"checkpoint {str(path)!r}: tensor {key!r} has dtype {t.dtype}, expected {meta.dtype}")
                out[key] = t.to(dtype if t.is_floating_point() else meta.dtype, copy=not mmap)
                del t  # drop the mapped view now: pages are released when the file closes
    except (SafetensorError, OSError) as e:
        raise ModelError(f"checkpoint {str(path)!r} is not a readable safetensors file: {e}") from e
    return out


def _placeholder(expected: Mapping[str, torch.Tensor], dtype: torch.dtype,
                 check: Callable[[], None]) -> dict[str, torch.Tensor]:
    """Deterministic stand-in weights of the right shapes: for timing and memory, not accuracy."""
    gen = torch.Generator().manual_seed(PLACEHOLDER_SEED)
    out = {}
    for key, meta in expected.items():
        check()
        leaf = key.rsplit(".", 1)[-1]
        if not meta.is_floating_point():
            out[key] = torch.zeros(meta.shape, dtype=meta.dtype)
        elif leaf == "bias" or leaf == "running_mean":
            out[key] = torch.zeros(meta.shape, dtype=dtype)
        elif meta.dim() <= 1 and leaf in ("weight", "gamma", "running_var"):
            out[key] = torch.ones(meta.shape, dtype=dtype)
        else:
            out[key] = torch.randn(meta.shape, generator=gen).mul_(PLACEHOLDER_STD).to(dtype)
    return out


def _materialise_non_persistent(model: nn.Module, name: str) -> None:
    """Rebuild the computed (non-persistent) buffers the shard kept: they are in no checkpoint."""
    for mod_name, mod in model.named_modules():
        stale = [k for k, b in mod._buffers.items() if b is not None and b.is_meta]
        if not stale:
            continue
        for k in stale:
            mod._buffers[k] = torch.empty_like(mod._buffers[k], device="cpu")
        if hasattr(mod, "init_non_persistent_buffers"):
            mod.init_non_persistent_buffers()
        elif any(mod._buffers[k].numel() for k in stale):
            raise ModelError(
                f"{name}: {mod_name or '(root)'} ({type(mod).__name__}) has computed buffers {stale} "
                "and no init_non_persistent_buffers() to rebuild them")


def build_shard(name: str, start: int, end: int, *, granularity: str = "block",
                checkpoint: str | os.PathLike | None = None, pretrained: bool = False,
                dtype: torch.dtype = torch.float32, mmap: bool = False,
                check: Callable[[], None] = lambda: None, **kwargs: Any) -> Shard:
    """Build units [start, end) of `name` holding only their own tensors.

    Weights: `checkpoint` (a safetensors file; only the shard's tensors are read), or
    `pretrained` (timm's hub weights: the whole model is created once, then sliced), or
    neither (deterministic placeholder weights, for profiling compute time and memory).
    `mmap=True` keeps checkpoint tensors backed by the file's mapping (zero-copy, paged in on
    first use, shared with the page cache; the file must not be modified in place meanwhile).
    `check` is called before each tensor is read or made: it raises to abandon the build (a
    node's `unload` of a shard still loading stops it within one tensor).
    """
    if checkpoint is not None and pretrained:
        raise ModelError(f"{name}: give a checkpoint or pretrained=True, not both")
    model = create_model(name, device="meta", **kwargs)
    pieces = _named_pieces(name, granularity, kwargs, model)
    infos = _infos(model, pieces)
    err = _range_error(name, granularity, start, end, len(infos))
    if err:
        raise err
    _prune(model, _owners(pieces), start, end)
    expected = model.state_dict(keep_vars=True)
    if checkpoint is not None:
        tensors = _read_checkpoint(Path(checkpoint), expected, dtype, name, mmap, check)
    elif pretrained:
        full = create_model(name, pretrained=True, **kwargs).state_dict()
        tensors = {k: full[k].to(dtype) if full[k].is_floating_point() else full[k] for k in expected}
        del full
    else:
        log.debug("%s units [%d, %d): no checkpoint, placeholder weights", name, start, end)
        tensors = _placeholder(expected, dtype, check)
    # the modules' state-dict versions: without them BatchNorm reads the file as pre-1.0 and
    # invents `num_batches_tracked` for every BatchNorm, the pruned ones included
    loadable: collections.OrderedDict[str, torch.Tensor] = collections.OrderedDict(tensors)
    loadable._metadata = getattr(expected, "_metadata", None)  # type: ignore[attr-defined]
    model.load_state_dict(loadable, strict=True, assign=True)
    del loadable
    del tensors
    _materialise_non_persistent(model, name)
    left = [k for k, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:  # pragma: no cover - guards the ownership tables above
        raise ModelError(f"{name} units [{start}, {end}): tensors left unmaterialised: {_listed(left)}")
    model.requires_grad_(False)
    steps = [_make_unit(model, p) for p in pieces[start:end]]
    return Shard(name, granularity, start, end, infos[start:end], model, steps,
                 pieces[start].arity_in).eval()


# ---------------------------------------------------------------- checkpoints


def write_checkpoint(name: str, path: str | os.PathLike, *, seed: int = 0, **kwargs: Any) -> Path:
    """A seeded random init (timm's own, under torch.manual_seed(seed)) saved as safetensors.

    The write is atomic (temporary file + rename): a reader never sees half a checkpoint.
    """
    path = Path(path)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = create_model(name, **kwargs)
    meta = {"model": name, "seed": str(seed), "kwargs": _kwargs_json(kwargs), "timm": timm.__version__}
    return save_checkpoint(model.state_dict(), path, meta)


def save_checkpoint(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike,
                    meta: Mapping[str, str]) -> Path:
    """`tensors` saved as safetensors at `path` with string metadata `meta`, atomically
    (temporary file + rename: a reader never sees half a checkpoint), readable by all."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        # tied tensors (a language model's input embedding and output head) are written under
        # each name: a shard that owns one of them reads it without the other
        seen: set[tuple[int, Any]] = set()
        out = {}
        for k, t in tensors.items():
            key = (t.untyped_storage().data_ptr(), t.storage_offset())
            out[k] = t.contiguous() if key not in seen else t.clone()
            seen.add(key)
        save_file(out, str(tmp), metadata=dict(meta))
        os.chmod(tmp, CHECKPOINT_MODE)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _kwargs_json(kwargs: Mapping[str, Any]) -> str:
    return json.dumps(kwargs, sort_keys=True, default=repr)


def cached_checkpoint(name: str, *, seed: int = 0, cache_dir: str | os.PathLike | None = None,
                      **kwargs: Any) -> Path:
    """<root>/checkpoints/<name>-<kwargs hash>-seed<seed>.safetensors, written on first use."""
    digest = hashlib.sha256(_kwargs_json(kwargs).encode()).hexdigest()[:KWARGS_HASH_CHARS]
    path = checkpoints_dir(cache_dir) / f"{name}-{digest}-seed{seed}.safetensors"
    why = checkpoint_problem(path, {"model": name, "seed": str(seed), "kwargs": _kwargs_json(kwargs)})
    if why is not None:
        if path.exists():
            log.warning("seeded checkpoint %s %s: writing it again", path, why)
        else:
            log.info("writing seeded checkpoint %s", path)
        write_checkpoint(name, path, seed=seed, **kwargs)
    return path


def checkpoint_problem(path: Path, want: Mapping[str, str]) -> str | None:
    """Why the cached checkpoint at `path` cannot be used as it is (its metadata differs from
    `want` on some key, or it is missing or unreadable), or None.

    Opening the file makes safetensors check its header against the file's length, so a
    truncated or overwritten file is caught here, not when a node loads it.
    """
    if not path.is_file():
        return "is missing"
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        return f"is not a readable safetensors file ({e})"
    got = {k: meta.get(k) for k in want}
    if got != want:
        return f"was written for {got}, not {want}"
    return None
