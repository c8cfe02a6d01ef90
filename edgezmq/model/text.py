"""Text encoders (BERT family, Hugging Face ``transformers``) as hand-written unit chains.

A BERT sequence classifier is cut like PipeEdge cuts it: ``embed`` (token, position and
token-type embeddings), the encoder layers at one of three granularities, ``head`` (pooler +
classifier). ``block`` = one unit per layer; ``half`` = attention | feed-forward; ``sublayer`` =
PipeEdge's four: self-attention, its output projection (+ residual, LayerNorm), the
intermediate dense, the output dense (+ residual, LayerNorm). The model takes three int64
tensors of shape (B, S): token ids, attention mask (1 = token, 0 = padding), token types; the
attention mask crosses every cut next to the activations (a few kB), and each layer turns it
into the additive mask the model's own forward makes, with the same function
(``create_bidirectional_mask``): the chain's logits equal the model's bit for bit.

Models are named here, not on the hub: ``bert_base_uncased`` etc. (``TEXT_MODELS``); a peer can
ask for one of these names, never for a hub id. Weights: a seeded random init (tests and
demos; no hub is needed), or ``pretrained=True``: ``from_pretrained`` of the name's hub id (a
machine with the hub, or with the model in its Hugging Face cache). Architecture arguments use
the names timm's use (``depth``, ``embed_dim``, ``num_heads``, ``mlp_ratio``, ``num_classes``)
plus ``seq_len`` (tokens per sequence, the deployment's fixed input length) and
``vocab_size``. ``transformers`` is an optional extra: ``pip install -e '.[text]'``.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from edgezmq.errors import EdgezmqError

EMBED_UNIT = "embed"
HEAD_UNIT = "head"
DEFAULT_SEQ_LEN = 128  # GLUE's usual length; a deployment's inputs all have its seq_len
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
INPUT_DTYPE = "int64"
TEXT_GRANULARITIES = ("block", "half", "sublayer")
EXTRA = "pip install -e '.[text]'"


class TextModelError(EdgezmqError, ValueError):
    """An unknown text model, an argument it does not take, or transformers missing."""


@dataclass(frozen=True)
class TextModel:
    """A named text classifier: its hub id (for ``pretrained``) and its configuration."""

    hub_id: str
    config: tuple[tuple[str, Any], ...] = ()  # BertConfig fields that differ from BERT-base's
    num_labels: int = 2


_LARGE = (("hidden_size", 1024), ("num_hidden_layers", 24), ("num_attention_heads", 16), ("intermediate_size", 4096))


def _small(layers: int, hidden: int) -> tuple[tuple[str, Any], ...]:
    """Google's compact BERTs (Turc et al. 2019): heads = hidden / 64, intermediate = 4 x hidden."""
    return (("num_hidden_layers", layers), ("hidden_size", hidden), ("num_attention_heads", hidden // 64),
            ("intermediate_size", 4 * hidden))


TEXT_MODELS: dict[str, TextModel] = {
    "bert_base_uncased": TextModel("google-bert/bert-base-uncased"),
    "bert_base_cased": TextModel("google-bert/bert-base-cased", (("vocab_size", 28996),)),
    "bert_large_uncased": TextModel("google-bert/bert-large-uncased", _LARGE),
    "bert_large_cased": TextModel("google-bert/bert-large-cased", (*_LARGE, ("vocab_size", 28996))),
    # PipeEdge's BERT default: BERT-base fine-tuned on CoLA (2 labels)
    "bert_base_uncased_cola": TextModel("textattack/bert-base-uncased-CoLA"),
    "bert_tiny": TextModel("google/bert_uncased_L-2_H-128_A-2", _small(2, 128)),
    "bert_mini": TextModel("google/bert_uncased_L-4_H-256_A-4", _small(4, 256)),
    "bert_small": TextModel("google/bert_uncased_L-4_H-512_A-8", _small(4, 512)),
    "bert_medium": TextModel("google/bert_uncased_L-8_H-512_A-8", _small(8, 512)),
}

# timm's architecture argument -> BertConfig field (edgezmq.protocol.model_kwargs bounds them)
_CONFIG_ARGS = {"depth": "num_hidden_layers", "embed_dim": "hidden_size", "num_heads": "num_attention_heads",
                "num_classes": "num_labels", "vocab_size": "vocab_size"}
_OWN_ARGS = ("seq_len", "mlp_ratio")
ARGS = (*_CONFIG_ARGS, *_OWN_ARGS)


def is_text_model(name: str) -> bool:
    return name in TEXT_MODELS


def available() -> bool:
    return importlib.util.find_spec("transformers") is not None


def _require() -> None:
    if not available():
        raise TextModelError(f"text models need Hugging Face transformers, which is not installed: {EXTRA}")


def _config(name: str, kwargs: Mapping[str, Any]) -> tuple[Any, int]:
    """(BertConfig, seq_len) of `name` with the architecture arguments applied."""
    _require()
    from transformers import BertConfig

    spec = TEXT_MODELS[name]
    fields: dict[str, Any] = dict(spec.config)
    fields["num_labels"] = spec.num_labels
    unknown = [k for k in kwargs if k not in ARGS]
    if unknown:
        raise TextModelError(f"{name}: {', '.join(map(repr, unknown))} not an argument of a text model "
                             f"(it takes: {', '.join(ARGS)})")
    for k, v in kwargs.items():
        if k in _CONFIG_ARGS:
            if not isinstance(v, int) or isinstance(v, bool):
                raise TextModelError(f"{name}: {k} must be one integer for a text model, got {v!r}")
            fields[_CONFIG_ARGS[k]] = v
    config = BertConfig(**fields)
    if "mlp_ratio" in kwargs:
        config.intermediate_size = max(1, round(config.hidden_size * float(kwargs["mlp_ratio"])))
    if config.hidden_size % config.num_attention_heads:
        raise TextModelError(f"{name}: embed_dim {config.hidden_size} is not a multiple of num_heads "
                             f"{config.num_attention_heads}")
    seq_len = kwargs.get("seq_len", DEFAULT_SEQ_LEN)
    if not 1 <= seq_len <= config.max_position_embeddings:
        raise TextModelError(f"{name}: seq_len {seq_len} outside 1..{config.max_position_embeddings} "
                             "(its position embeddings)")
    return config, seq_len


def create_model(name: str, *, pretrained: bool = False, device: str | torch.device = "cpu",
                 **kwargs: Any) -> nn.Module:
    """BertForSequenceClassification for `name`, in eval mode, on `device` (meta: no memory)."""
    config, seq_len = _config(name, kwargs)
    from transformers import BertForSequenceClassification

    model: Any  # transformers' modules are dynamically typed (their attributes come from the config)
    try:
        if pretrained:
            model = BertForSequenceClassification.from_pretrained(TEXT_MODELS[name].hub_id, config=config)
            model = model.to(torch.device(device))
        else:
            with torch.device(device):
                model = BertForSequenceClassification(config)
    except Exception as e:  # offline hub, a cache without the model, a config the weights do not fit
        what = "pretrained weights for " if pretrained else ""
        raise TextModelError(f"cannot create {what}{name} with kwargs {dict(kwargs)}: {type(e).__name__}: {e}") from e
    _check_layout(model, name)
    # edgezmq's name and input length travel with the model (chain._model_name, input specs)
    model.pretrained_cfg = {"architecture": name, "seq_len": seq_len}
    # the embeddings' computed buffers (positions 0..max-1, zero token types) are in no
    # checkpoint: a shard built on meta rebuilds them (chain._materialise_non_persistent)
    emb = model.bert.embeddings
    emb.init_non_persistent_buffers = functools.partial(_init_embedding_buffers, emb)
    return model.eval()


def _init_embedding_buffers(emb: Any) -> None:
    n = emb.position_ids.shape[-1]
    emb.position_ids.copy_(torch.arange(n).expand((1, -1)))
    emb.token_type_ids.zero_()


def _check_layout(model: Any, name: str) -> None:
    cfg = model.config
    if cfg.is_decoder or cfg.add_cross_attention or cfg.chunk_size_feed_forward:
        raise TextModelError(f"{name}: only encoders without cross-attention or chunked feed-forward are cut "
                             "(is_decoder, add_cross_attention, chunk_size_feed_forward)")
    if model.bert.pooler is None:
        raise TextModelError(f"{name}: the classifier needs the pooler")


def is_text(model: nn.Module) -> bool:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return isinstance(cfg, dict) and is_text_model(str(cfg.get("architecture", "")))


def seq_len(model: Any) -> int:
    return int(model.pretrained_cfg["seq_len"])


def vocab_size(model: Any) -> int:
    return int(model.config.vocab_size)


def input_specs(model: Any, microbatch: int) -> list[tuple[tuple[int, ...], str]]:
    """The three int64 (B, S) tensors the model takes, in INPUT_NAMES order."""
    return [((microbatch, seq_len(model)), INPUT_DTYPE)] * len(INPUT_NAMES)


# ---------------------------------------------------------------- units


@dataclass(frozen=True)
class TextPiece:
    """One unit of a text chain: its kind, the layer it is in, the dotted names it owns."""

    name: str
    kind: str  # embed | layer | attn | ffn | context | attn_out | inter | out | head
    owns: tuple[str, ...]
    layer: int = -1

    @property
    def arity_in(self) -> int:
        return _ARITY[self.kind]


# tensors entering each kind: activations, then the attention mask last
_ARITY = {"embed": 3, "layer": 2, "attn": 2, "ffn": 2, "context": 2, "attn_out": 3, "inter": 2, "out": 3, "head": 2}
_SPLITS = {"block": (("", "layer", ""),),
           "half": (("attn", "attn", "attention"), ("ffn", "ffn", "")),
           "sublayer": (("attn.self", "context", "attention.self"), ("attn.out", "attn_out", "attention.output"),
                        ("ffn.inter", "inter", "intermediate"), ("ffn.out", "out", "output"))}


def pieces(model: Any, granularity: str) -> list[TextPiece]:
    if granularity not in TEXT_GRANULARITIES:
        raise TextModelError(f"{model.pretrained_cfg['architecture']}: granularity {granularity!r} is not "
                             f"one of a text model's {TEXT_GRANULARITIES}")
    out = [TextPiece(EMBED_UNIT, "embed", ("bert.embeddings",))]
    for i in range(len(model.bert.encoder.layer)):
        layer = f"bert.encoder.layer.{i}"
        for suffix, kind, member in _SPLITS[granularity]:
            owns: tuple[str, ...] = (f"{layer}.{member}",) if member else (layer,)
            if kind == "ffn":
                owns = (f"{layer}.intermediate", f"{layer}.output")
            out.append(TextPiece(f"layer{i}" + (f".{suffix}" if suffix else ""), kind, owns, i))
    out.append(TextPiece(HEAD_UNIT, "head", ("bert.pooler", "dropout", "classifier")))
    return out


def _mask(model: Any, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor | None:
    """The additive/boolean mask the model's forward gives its layers, by the model's own function.
    On meta tensors (shapes only) none: the mask never changes a shape, and its function reads values."""
    if h.is_meta:
        return None
    from transformers.masking_utils import create_bidirectional_mask

    return create_bidirectional_mask(config=model.config, inputs_embeds=h, attention_mask=mask)


class TextUnit:
    """One text unit as a callable: (activations..., mask) -> (activations..., mask)."""

    modules: tuple[nn.Module, ...] = ()

    def __init__(self, model: Any, piece: TextPiece) -> None:
        self.model, self.kind = model, piece.kind
        self.layer = model.bert.encoder.layer[piece.layer] if piece.layer >= 0 else None

    def __call__(self, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        m, layer, kind = self.model, self.layer, self.kind
        if kind == "embed":
            ids, mask, types = xs
            return m.bert.embeddings(input_ids=ids, token_type_ids=types), mask
        if kind == "head":
            h, _ = xs
            return (m.classifier(m.dropout(m.bert.pooler(h))),)
        assert layer is not None
        *acts, mask = xs
        if kind == "layer":
            return layer(acts[0], _mask(m, acts[0], mask)), mask
        if kind == "attn":
            return layer.attention(acts[0], _mask(m, acts[0], mask))[0], mask
        if kind == "ffn":
            return layer.feed_forward_chunk(acts[0]), mask
        if kind == "context":
            return layer.attention.self(acts[0], attention_mask=_mask(m, acts[0], mask))[0], acts[0], mask
        if kind == "attn_out":
            return layer.attention.output(acts[0], acts[1]), mask
        if kind == "inter":
            return layer.intermediate(acts[0]), acts[0], mask
        return layer.output(acts[0], acts[1]), mask  # "out"


def forward(model: Any, *xs: torch.Tensor) -> torch.Tensor:
    """The model's own forward on the three input tensors: its logits (the reference)."""
    ids, mask, types = xs
    return model(input_ids=ids, attention_mask=mask, token_type_ids=types).logits


def random_inputs(vocab_size: int, n: int, seq: int, seed: int) -> list[Any]:
    """`n` random sequences as numpy arrays (ids, mask, types): ids uniform over the vocabulary
    after a [CLS]-like first token, each sequence padded after a random length in seq/2..seq."""
    import numpy as np

    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab_size, size=(n, seq), dtype=np.int64)
    lengths = rng.integers(max(1, seq // 2), seq + 1, size=n)
    mask = (np.arange(seq)[None, :] < lengths[:, None]).astype(np.int64)
    ids *= mask  # padding is token 0, BERT's [PAD]
    return [ids, mask, np.zeros((n, seq), dtype=np.int64)]


# ---------------------------------------------------------------- inputs from files


def token_inputs(ids: Any, seq: int, vocab_size: int, what: str) -> list[Any]:
    """Token ids (N, S) or (S,) -> the model's three arrays: ids padded with 0 ([PAD]) to `seq`,
    mask = 1 where a token is not padding, types 0. TextModelError naming `what` if the ids
    are not integers in 0..vocab_size-1 or longer than `seq`."""
    import numpy as np

    if not isinstance(ids, np.ndarray) or ids.dtype.kind not in "iu":
        raise TextModelError(f"{what}: expected integer token ids, got {getattr(ids, 'dtype', type(ids).__name__)}")
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2 or 0 in ids.shape:
        raise TextModelError(f"{what}: expected token ids of shape (N, S) or (S,), got {ids.shape}")
    if ids.shape[1] > seq:
        raise TextModelError(f"{what}: sequences of {ids.shape[1]} tokens, the model takes at most {seq} (seq_len)")
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab_size:
        raise TextModelError(f"{what}: token ids {lo}..{hi} outside the vocabulary 0..{vocab_size - 1}")
    out = np.zeros((ids.shape[0], seq), dtype=np.int64)
    out[:, :ids.shape[1]] = ids
    return [out, (out != 0).astype(np.int64), np.zeros_like(out)]


def load_tokenizer(name: str, path: str | None) -> Any:
    """A BERT tokenizer: from `path` (a directory with tokenizer files, or a WordPiece vocab.txt),
    else the model's own from the local Hugging Face cache (never the network). TextModelError
    if there is none: token ids (.npy) are the way in without one."""
    _require()
    from transformers import AutoTokenizer, BertTokenizer

    try:
        if path is not None:
            import os

            if os.path.isfile(path):
                return BertTokenizer(vocab=path, do_lower_case="uncased" in name or "cased" not in name)
            return AutoTokenizer.from_pretrained(path, local_files_only=True)
        return AutoTokenizer.from_pretrained(TEXT_MODELS[name].hub_id, local_files_only=True)
    except (OSError, ValueError) as e:
        where = path or f"the Hugging Face cache ({TEXT_MODELS[name].hub_id})"
        raise TextModelError(f"no tokenizer for {name} in {where} ({type(e).__name__}); give --tokenizer "
                             "DIR_OR_VOCAB_TXT, or token ids with --tokens FILE.npy") from None


def encode_texts(lines: list[str], tokenizer: Any, seq: int, vocab_size: int, what: str) -> list[Any]:
    """Lines of text -> the model's three arrays (padded/truncated to `seq` tokens)."""
    import numpy as np

    enc = tokenizer(lines, padding="max_length", truncation=True, max_length=seq, return_tensors="np")
    ids = np.asarray(enc["input_ids"], dtype=np.int64)
    if ids.size and int(ids.max()) >= vocab_size:
        raise TextModelError(f"{what}: the tokenizer's ids reach {int(ids.max())}, beyond the model's "
                             f"vocabulary of {vocab_size}: a tokenizer of another model?")
    types = enc.get("token_type_ids")
    return [ids, np.asarray(enc["attention_mask"], dtype=np.int64),
            np.asarray(types, dtype=np.int64) if types is not None else np.zeros_like(ids)]
