"""The model keyword arguments a peer or a file may set: architecture only, each typed and bounded (pure).

``timm.create_model(name, **kwargs)`` accepts more than architecture: ``pretrained_cfg_overlay``
(a URL to download) and ``cache_dir`` (where to write it), layer classes, init schemes. A node
that passed a peer's kwargs through would fetch any URL into any directory on request
(docs/security.md). So kwargs that arrive over control or from plan, inventory and problem
files are checked against this table, by name, type and range; nothing else reaches timm.
Python callers of ``edgezmq.model.chain`` may still pass anything (a layer class, say).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from edgezmq.errors import EdgezmqError

MAX_SHOWN = 80  # characters of an offending value echoed in an error
MAX_STAGES = 16  # entries of a per-stage list (`layers`, `depths`, `dims`, `num_heads`)


class ModelKwargsError(EdgezmqError, ValueError):
    """A model keyword argument outside the allow-list, or out of its range."""


@dataclass(frozen=True)
class Arg:
    kind: str  # "int" | "float" | "bool" | "choice" | "size" | "ints" (an integer, or one per stage)
    lo: float = 0
    hi: float = 0
    choices: tuple[str, ...] = ()
    nullable: bool = False
    doc: str = ""


# timm's architecture arguments (text models take the same names): VisionTransformer's (timm.models.vision_transformer), and the
# per-stage sizes of the staged families (ResNet `layers`; ConvNeXt, Swin `depths`, `dims`,
# `num_heads`), which is how a test or a user shrinks those.  Ranges are generous bounds on
# what a model can be, there to keep a peer from asking for unbounded work.
ALLOWED: dict[str, Arg] = {
    "img_size": Arg("size", 8, 4096, doc="input side in pixels, or [height, width]"),
    "patch_size": Arg("size", 1, 64, doc="patch side in pixels, or [height, width]"),
    "in_chans": Arg("int", 1, 16, doc="input channels"),
    "num_classes": Arg("int", 0, 100_000, doc="classifier outputs (0: no head)"),
    "global_pool": Arg("choice", choices=("", "avg", "avgmax", "max", "token", "map"), doc="pooling before the head"),
    "embed_dim": Arg("ints", 1, 16_384, doc="token width (per stage: a list)"),
    "depth": Arg("int", 1, 256, doc="transformer blocks"),
    "num_heads": Arg("ints", 1, 256, doc="attention heads (per stage: a list)"),
    "layers": Arg("ints", 1, 256, doc="ResNet-family blocks per stage (a list)"),
    "depths": Arg("ints", 1, 256, doc="blocks per stage (a list: ConvNeXt, Swin, ...)"),
    "dims": Arg("ints", 1, 16_384, doc="width per stage (a list: ConvNeXt, ...)"),
    "mlp_ratio": Arg("float", 0.0625, 64, doc="MLP hidden width / token width"),
    "qkv_bias": Arg("bool"),
    "qk_norm": Arg("bool"),
    "proj_bias": Arg("bool"),
    "init_values": Arg("float", 0, 1e3, nullable=True, doc="LayerScale initial value (null: none)"),
    "class_token": Arg("bool"),
    "no_embed_class": Arg("bool"),
    "reg_tokens": Arg("int", 0, 64, doc="register tokens"),
    "pre_norm": Arg("bool"),
    "final_norm": Arg("bool"),
    "fc_norm": Arg("bool", nullable=True),
    "dynamic_img_size": Arg("bool"),
    "dynamic_img_pad": Arg("bool"),
    # text models (edgezmq.model.text) take depth, embed_dim, num_heads, mlp_ratio, num_classes and these
    "seq_len": Arg("int", 1, 8192, doc="tokens per sequence of a text model (at most its position embeddings)"),
    "vocab_size": Arg("int", 1, 1_000_000, doc="token vocabulary of a text model"),
}


def _shown(v: Any) -> str:
    r = repr(v)
    return r if len(r) <= MAX_SHOWN else r[:MAX_SHOWN] + "..."


def _number(v: Any, a: Arg, where: str, integer: bool) -> int | float:
    ok = isinstance(v, int) if integer else isinstance(v, (int, float))
    if not ok or isinstance(v, bool):
        raise ModelKwargsError(f"{where}: expected {'an integer' if integer else 'a number'}, got {_shown(v)}")
    if not (math.isfinite(v) and a.lo <= v <= a.hi):
        raise ModelKwargsError(f"{where}: {_shown(v)} outside {a.lo:g}..{a.hi:g}")
    return v


def check_model_kwargs(kwargs: Any, where: str = "kwargs") -> dict[str, Any]:
    """`kwargs` if every entry is an allowed architecture argument in range; else ModelKwargsError
    naming the field (``where.name``)."""
    if kwargs is None:
        return {}
    if not isinstance(kwargs, dict):
        raise ModelKwargsError(f"{where}: expected a mapping of architecture arguments, got {type(kwargs).__name__}")
    out: dict[str, Any] = {}
    for name, v in kwargs.items():
        a = ALLOWED.get(name) if isinstance(name, str) else None
        if a is None:
            raise ModelKwargsError(
                f"{where}.{_shown(name).strip(chr(39))}: not an architecture argument a node accepts "
                f"(allowed: {', '.join(sorted(ALLOWED))})")
        at = f"{where}.{name}"
        if v is None and a.nullable:
            out[name] = None
        elif a.kind == "bool":
            if not isinstance(v, bool):
                raise ModelKwargsError(f"{at}: expected true or false, got {_shown(v)}")
            out[name] = v
        elif a.kind == "choice":
            if v not in a.choices:
                raise ModelKwargsError(f"{at}: expected one of {list(a.choices)}, got {_shown(v)}")
            out[name] = v
        elif a.kind == "ints" and isinstance(v, (list, tuple)):
            if not 1 <= len(v) <= MAX_STAGES:
                raise ModelKwargsError(f"{at}: expected 1..{MAX_STAGES} integers (one per stage), got {_shown(v)}")
            out[name] = [_number(x, a, at, True) for x in v]
        elif a.kind == "size" and isinstance(v, list):
            if len(v) != 2:
                raise ModelKwargsError(f"{at}: expected an integer or [height, width], got {_shown(v)}")
            out[name] = [_number(x, a, at, True) for x in v]
        else:
            out[name] = _number(v, a, at, a.kind in ("int", "size", "ints"))
    return out
