"""Text models (Hugging Face ``transformers``) as hand-written unit chains: BERT classifiers, and
decoder-only language models (Llama, Qwen2, Mistral, GPT-2) over whole sequences.

A BERT sequence classifier is cut like PipeEdge cuts it: ``embed`` (token, position and
token-type embeddings), the encoder layers at one of three granularities, ``head`` (pooler +
classifier). ``block`` = one unit per layer; ``half`` = attention | feed-forward; ``sublayer`` =
PipeEdge's four: self-attention, its output projection (+ residual, LayerNorm), the
intermediate dense, the output dense (+ residual, LayerNorm). The model takes three int64
tensors of shape (B, S): token ids, attention mask (1 = token, 0 = padding), token types; the
attention mask crosses every cut next to the activations (a few kB), and each layer turns it
into the additive mask the model's own forward makes, with the same function
(``create_bidirectional_mask``): the chain's logits equal the model's bit for bit.

A decoder (``gpt2``, ``tinyllama_1_1b``, ``qwen2_5_0_5b``, ``mistral_7b_v0_1``, ...) is cut into ``embed``, its decoder
layers, ``head`` (final norm + LM head): ``block`` = one unit per layer; ``half`` = its
attention (pre-norm, attention, residual: the unit that holds the layer's KV cache) | its MLP
(pre-norm, MLP, residual), the layer forward's own operations in its order. It takes token
ids and the attention mask, and its chain's logits over the whole sequence equal the model's
own forward; generation steps each unit against its KV cache (docs/generate.md). Tied input/output embeddings
are written to a checkpoint under both names, so each shard reads its own.

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
    """A named text model: its hub id (for ``pretrained``), family and configuration."""

    hub_id: str
    config: tuple[tuple[str, Any], ...] = ()  # config fields that differ from the family's defaults
    num_labels: int = 2  # a classifier's (BERT)
    family: str = "bert"  # bert (sequence classifier) | llama | qwen2 | mistral | gpt2 (decoder-only language models)


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
    # decoder-only language models: configs as the hub's config.json (GPT2Config's defaults = gpt2)
    "gpt2": TextModel("openai-community/gpt2", family="gpt2"),
    "gpt2_medium": TextModel("openai-community/gpt2-medium", (("n_layer", 24), ("n_embd", 1024), ("n_head", 16)),
                             family="gpt2"),
    "gpt2_large": TextModel("openai-community/gpt2-large", (("n_layer", 36), ("n_embd", 1280), ("n_head", 20)),
                            family="gpt2"),
    "gpt2_xl": TextModel("openai-community/gpt2-xl", (("n_layer", 48), ("n_embd", 1600), ("n_head", 25)), family="gpt2"),
    "tinyllama_1_1b": TextModel("TinyLlama/TinyLlama-1.1B-Chat-v1.0", (
        ("hidden_size", 2048), ("intermediate_size", 5632), ("num_hidden_layers", 22), ("num_attention_heads", 32),
        ("num_key_value_heads", 4), ("vocab_size", 32000), ("max_position_embeddings", 2048), ("rms_norm_eps", 1e-5),
        ("bos_token_id", 1), ("eos_token_id", 2), ("tie_word_embeddings", False)), family="llama"),
    "llama_3_2_1b": TextModel("meta-llama/Llama-3.2-1B", (
        ("hidden_size", 2048), ("intermediate_size", 8192), ("num_hidden_layers", 16), ("num_attention_heads", 32),
        ("num_key_value_heads", 8), ("head_dim", 64), ("vocab_size", 128256), ("max_position_embeddings", 131072),
        ("rms_norm_eps", 1e-5), ("bos_token_id", 128000), ("eos_token_id", 128001), ("tie_word_embeddings", True),
        ("rope_parameters", (("rope_type", "llama3"), ("rope_theta", 500000.0), ("factor", 32.0),
                             ("low_freq_factor", 1.0), ("high_freq_factor", 4.0),
                             ("original_max_position_embeddings", 8192)))), family="llama"),
    # Qwen2: Llama's layout with biased q/k/v projections (and optional sliding-window layers)
    "qwen2_5_0_5b": TextModel("Qwen/Qwen2.5-0.5B", (
        ("hidden_size", 896), ("intermediate_size", 4864), ("num_hidden_layers", 24), ("num_attention_heads", 14),
        ("num_key_value_heads", 2), ("vocab_size", 151936), ("max_position_embeddings", 32768),
        ("rms_norm_eps", 1e-6), ("bos_token_id", 151643), ("eos_token_id", 151643), ("tie_word_embeddings", True),
        ("use_sliding_window", False), ("rope_parameters", (("rope_type", "default"), ("rope_theta", 1000000.0)))),
        family="qwen2"),
    # Mistral: Llama's layout; v0.1 attends within a 4,096-token sliding window, v0.3 has none
    "mistral_7b_v0_1": TextModel("mistralai/Mistral-7B-v0.1", (
        ("hidden_size", 4096), ("intermediate_size", 14336), ("num_hidden_layers", 32), ("num_attention_heads", 32),
        ("num_key_value_heads", 8), ("vocab_size", 32000), ("max_position_embeddings", 32768), ("rms_norm_eps", 1e-5),
        ("sliding_window", 4096), ("bos_token_id", 1), ("eos_token_id", 2), ("tie_word_embeddings", False),
        ("rope_parameters", (("rope_type", "default"), ("rope_theta", 10000.0)))), family="mistral"),
    "mistral_7b_v0_3": TextModel("mistralai/Mistral-7B-v0.3", (
        ("hidden_size", 4096), ("intermediate_size", 14336), ("num_hidden_layers", 32), ("num_attention_heads", 32),
        ("num_key_value_heads", 8), ("vocab_size", 32768), ("max_position_embeddings", 32768), ("rms_norm_eps", 1e-5),
        ("sliding_window", None), ("bos_token_id", 1), ("eos_token_id", 2), ("tie_word_embeddings", False),
        ("rope_parameters", (("rope_type", "default"), ("rope_theta", 1000000.0)))), family="mistral"),
}
LLAMA_LIKE = ("llama", "qwen2", "mistral")  # one layout: embed_tokens, layers (self_attn, mlp), norm, lm_head, RoPE
DECODER_FAMILIES = (*LLAMA_LIKE, "gpt2")
_CLASSES = {"bert": ("BertConfig", "BertForSequenceClassification"), "llama": ("LlamaConfig", "LlamaForCausalLM"),
            "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"), "mistral": ("MistralConfig", "MistralForCausalLM"),
            "gpt2": ("GPT2Config", "GPT2LMHeadModel")}

# timm's architecture argument -> each family's config field (edgezmq.protocol.model_kwargs bounds them)
_FIELDS = {
    "bert": {"depth": "num_hidden_layers", "embed_dim": "hidden_size", "num_heads": "num_attention_heads",
             "num_classes": "num_labels", "vocab_size": "vocab_size", "mlp_ratio": "intermediate_size"},
    **{f: {"depth": "num_hidden_layers", "embed_dim": "hidden_size", "num_heads": "num_attention_heads",
           "vocab_size": "vocab_size", "mlp_ratio": "intermediate_size"} for f in LLAMA_LIKE},
    "gpt2": {"depth": "n_layer", "embed_dim": "n_embd", "num_heads": "n_head", "vocab_size": "vocab_size",
             "mlp_ratio": "n_inner"},
}
ARGS = ("depth", "embed_dim", "num_heads", "mlp_ratio", "num_classes", "vocab_size", "seq_len")


def is_text_model(name: str) -> bool:
    return name in TEXT_MODELS


def available() -> bool:
    return importlib.util.find_spec("transformers") is not None


def _require() -> None:
    if not available():
        raise TextModelError(f"text models need Hugging Face transformers, which is not installed: {EXTRA}")


def model_config(name: str, kwargs: Mapping[str, Any]) -> tuple[Any, int]:
    """(config, seq_len) of text model `name` with the architecture arguments `kwargs` applied:
    the ``transformers`` config its model is built from (BertConfig, LlamaConfig, GPT2Config;
    its ``vocab_size``, ``eos_token_id``, ...) and the deployment's tokens per sequence, without
    building the model. TextModelError for an argument the family does not take, a value it
    cannot have, or a seq_len beyond its position embeddings."""
    _require()
    import transformers

    spec = TEXT_MODELS[name]
    names = _FIELDS[spec.family]
    fields: dict[str, Any] = {k: dict(v) if k == "rope_parameters" else v for k, v in spec.config}
    if spec.family == "bert":
        fields["num_labels"] = spec.num_labels
    unknown = [k for k in kwargs if k not in names and k != "seq_len"]
    if unknown:
        raise TextModelError(f"{name}: {', '.join(map(repr, unknown))} not an argument of a {spec.family} model "
                             f"(it takes: {', '.join(a for a in ARGS if a in names or a == 'seq_len')})")
    for k, v in kwargs.items():
        if k in names and k != "mlp_ratio":
            if not isinstance(v, int) or isinstance(v, bool):
                raise TextModelError(f"{name}: {k} must be one integer for a text model, got {v!r}")
            fields[names[k]] = v
    base = dict(spec.config)
    if "num_heads" in kwargs and "num_key_value_heads" in base:  # keep the grouped-query ratio
        group = base["num_attention_heads"] // base["num_key_value_heads"]
        heads = kwargs["num_heads"]
        fields["num_key_value_heads"] = heads // group if heads % group == 0 else heads
    if "embed_dim" in kwargs or "num_heads" in kwargs:
        fields.pop("head_dim", None)  # derived from the width again
    config_cls = getattr(transformers, _CLASSES[spec.family][0])
    defaults = config_cls()
    vocab = fields.get("vocab_size", defaults.vocab_size)
    for k in ("bos_token_id", "eos_token_id", "pad_token_id"):  # a shrunk vocabulary has no such token
        v = fields.get(k, getattr(defaults, k, None))
        if isinstance(v, int) and v >= vocab:
            fields[k] = None
    config = config_cls(**fields)
    if "mlp_ratio" in kwargs:
        setattr(config, names["mlp_ratio"], max(1, round(config.hidden_size * float(kwargs["mlp_ratio"]))))
    if config.hidden_size % config.num_attention_heads:
        raise TextModelError(f"{name}: embed_dim {config.hidden_size} is not a multiple of num_heads "
                             f"{config.num_attention_heads}")
    seq_len = kwargs.get("seq_len", DEFAULT_SEQ_LEN)
    if not 1 <= seq_len <= max_positions(config):
        raise TextModelError(f"{name}: seq_len {seq_len} outside 1..{max_positions(config)} "
                             "(its position embeddings)")
    return config, seq_len


def create_model(name: str, *, pretrained: bool = False, device: str | torch.device = "cpu",
                 **kwargs: Any) -> nn.Module:
    """The model of `name` (BertForSequenceClassification, LlamaForCausalLM, GPT2LMHeadModel),
    in eval mode, on `device` (meta: no memory)."""
    config, seq_len = model_config(name, kwargs)
    import transformers

    family = TEXT_MODELS[name].family
    cls: Any = getattr(transformers, _CLASSES[family][1])
    model: Any  # transformers' modules are dynamically typed (their attributes come from the config)
    try:
        if pretrained:
            model = cls.from_pretrained(TEXT_MODELS[name].hub_id, config=config)
            model = model.to(torch.device(device))
        else:
            with torch.device(device):
                model = cls(config)
    except Exception as e:  # offline hub, a cache without the model, a config the weights do not fit
        what = "pretrained weights for " if pretrained else ""
        raise TextModelError(f"cannot create {what}{name} with kwargs {dict(kwargs)}: {type(e).__name__}: {e}") from e
    _check_layout(model, name, family)
    # edgezmq's name and input length travel with the model (chain._model_name, input specs)
    model.pretrained_cfg = {"architecture": name, "seq_len": seq_len, "family": family}
    # computed buffers (BERT's positions 0..max-1 and zero token types, Llama's rotary
    # frequencies) are in no checkpoint: a shard built on meta rebuilds them
    # (chain._materialise_non_persistent)
    if family == "bert":
        emb = model.bert.embeddings
        emb.init_non_persistent_buffers = functools.partial(_init_embedding_buffers, emb)
    elif family in LLAMA_LIKE:
        rot = model.model.rotary_emb
        rot.init_non_persistent_buffers = functools.partial(_init_rotary_buffers, rot)
    return model.eval()


def _init_embedding_buffers(emb: Any) -> None:
    n = emb.position_ids.shape[-1]
    emb.position_ids.copy_(torch.arange(n).expand((1, -1)))
    emb.token_type_ids.zero_()


def _init_rotary_buffers(rot: Any) -> None:
    with torch.device("cpu"):
        fresh = type(rot)(rot.config)  # the model's own computation of its frequencies
    for k, b in fresh.named_buffers():
        getattr(rot, k).copy_(b)


def _check_layout(model: Any, name: str, family: str) -> None:
    cfg = model.config
    if family != "bert":
        if getattr(cfg, "add_cross_attention", False):
            raise TextModelError(f"{name}: decoders with cross-attention are not cut")
        return
    if cfg.is_decoder or cfg.add_cross_attention or cfg.chunk_size_feed_forward:
        raise TextModelError(f"{name}: only encoders without cross-attention or chunked feed-forward are cut "
                             "(is_decoder, add_cross_attention, chunk_size_feed_forward)")
    if model.bert.pooler is None:
        raise TextModelError(f"{name}: the classifier needs the pooler")


def family(model: Any) -> str:
    return str(model.pretrained_cfg["family"])


def is_decoder(name: str) -> bool:
    return is_text_model(name) and TEXT_MODELS[name].family in DECODER_FAMILIES


def is_text(model: nn.Module) -> bool:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return isinstance(cfg, dict) and is_text_model(str(cfg.get("architecture", "")))


def seq_len(model: Any) -> int:
    return int(model.pretrained_cfg["seq_len"])


def vocab_size(model: Any) -> int:
    return int(model.config.vocab_size)


def input_names(model: Any) -> tuple[str, ...]:
    """A classifier takes token ids, mask, token types; a decoder token ids and mask."""
    return INPUT_NAMES if family(model) == "bert" else INPUT_NAMES[:2]


def model_inputs(model: Any, arrays: list[Any]) -> tuple[Any, ...]:
    """Of the three arrays `random_inputs`, `token_inputs` and `encode_texts` give (ids, mask,
    types: `INPUT_NAMES`), those the model takes, in `input_names` order."""
    by_name = dict(zip(INPUT_NAMES, arrays, strict=True))
    return tuple(by_name[n] for n in input_names(model))


def input_specs(model: Any, microbatch: int) -> list[tuple[tuple[int, ...], str]]:
    """The int64 (B, S) tensors the model takes, in `input_names` order."""
    return [((microbatch, seq_len(model)), INPUT_DTYPE)] * len(input_names(model))


# ---------------------------------------------------------------- units


@dataclass(frozen=True)
class TextPiece:
    """One unit of a text chain: its kind, the layer it is in, the dotted names it owns."""

    name: str
    kind: str  # embed | layer | attn | ffn | context | attn_out | inter | out | head; decoders: dembed | dlayer | dattn | dffn | dhead
    owns: tuple[str, ...]
    layer: int = -1

    @property
    def arity_in(self) -> int:
        return _ARITY[self.kind]


# tensors entering each kind: activations, then the attention mask last
_ARITY = {"embed": 3, "layer": 2, "attn": 2, "ffn": 2, "context": 2, "attn_out": 3, "inter": 2, "out": 3, "head": 2,
          "dembed": 2, "dlayer": 2, "dattn": 2, "dffn": 2, "dhead": 2}
DECODER_GRANULARITIES = ("block", "half")
CACHE_KINDS = ("dlayer", "dattn")  # the decoder units that hold a KV cache layer
# a decoder's members: (embedding modules, layer list, final norm + head, what every layer reads)
_DECODER = {**{f: (("model.embed_tokens",), "model.layers", ("model.norm", "lm_head"), ("model.rotary_emb",))
               for f in LLAMA_LIKE},
            "gpt2": (("transformer.wte", "transformer.wpe", "transformer.drop"), "transformer.h",
                     ("transformer.ln_f", "lm_head"), ())}
# a decoder layer's halves (granularity "half"): (pre-norm, attention), (pre-norm, MLP); each adds its residual
_DECODER_HALVES = {**{f: (("input_layernorm", "self_attn"), ("post_attention_layernorm", "mlp")) for f in LLAMA_LIKE},
                   "gpt2": (("ln_1", "attn"), ("ln_2", "mlp"))}
_SPLITS = {"block": (("", "layer", ""),),
           "half": (("attn", "attn", "attention"), ("ffn", "ffn", "")),
           "sublayer": (("attn.self", "context", "attention.self"), ("attn.out", "attn_out", "attention.output"),
                        ("ffn.inter", "inter", "intermediate"), ("ffn.out", "out", "output"))}


def pieces(model: Any, granularity: str) -> list[TextPiece]:
    fam = family(model)
    if fam in DECODER_FAMILIES:
        if granularity not in DECODER_GRANULARITIES:
            raise TextModelError(f"{model.pretrained_cfg['architecture']}: a decoder is cut at granularity "
                                 f"'block' (one unit per layer) or 'half' (attention | MLP), not {granularity!r}")
        embed, layers, head, shared = _DECODER[fam]
        n = len(model.get_submodule(layers))
        units = [TextPiece(EMBED_UNIT, "dembed", embed)]
        for i in range(n):
            layer = f"{layers}.{i}"
            if granularity == "block":
                units.append(TextPiece(f"layer{i}", "dlayer", (layer, *shared), i))
                continue
            (n1, attn), (n2, mlp) = _DECODER_HALVES[fam]
            _check_halves(model.get_submodule(layer), layer, (n1, attn, n2, mlp))
            units += [TextPiece(f"layer{i}.attn", "dattn", (f"{layer}.{n1}", f"{layer}.{attn}", *shared), i),
                      TextPiece(f"layer{i}.ffn", "dffn", (f"{layer}.{n2}", f"{layer}.{mlp}"), i)]
        return [*units, TextPiece(HEAD_UNIT, "dhead", head)]
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


def _check_halves(layer: nn.Module, name: str, members: tuple[str, ...]) -> None:
    """A decoder layer cut in halves must hold nothing but the halves' members (every weight has
    an owner: a shard never runs a layer part it pruned)."""
    other = sorted({k.split(".")[0] for k, _ in layer.named_parameters()} - set(members))
    if other:
        raise TextModelError(f"{name} ({type(layer).__name__}) has {other} beside {list(members)}: "
                             "it is cut at granularity 'block' only")


def _positions(h: torch.Tensor) -> torch.Tensor:
    """Positions 0..S-1 (a whole sequence, no cache), as the model's forward makes them."""
    return torch.arange(h.shape[1], device=h.device).unsqueeze(0)


def sliding(config: Any, layer: int) -> bool:
    """Whether decoder layer `layer` attends within a sliding window, as the model's forward decides
    it: Qwen2's ``layer_types`` per layer, else Mistral's ``sliding_window`` for every layer."""
    types = getattr(config, "layer_types", None)
    if types is not None:
        return bool(types[layer] == "sliding_attention")
    return getattr(config, "sliding_window", None) is not None


def _causal_fn(config: Any, layer: int) -> Any:
    """The function the model's forward makes layer `layer`'s mask with: causal, or causal within
    the sliding window."""
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    return create_sliding_window_causal_mask if sliding(config, layer) else create_causal_mask


def _causal(model: Any, h: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
            layer: int) -> torch.Tensor | None:
    """The causal mask a decoder's forward gives layer `layer`, by its own function (none on meta)."""
    if h.is_meta:
        return None
    return _causal_fn(model.config, layer)(config=model.config, inputs_embeds=h, attention_mask=mask, cache=None,
                                           position_ids=positions)


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
        self.family = family(model)
        layers = (model.get_submodule(_DECODER[self.family][1]) if self.family in DECODER_FAMILIES
                  else model.bert.encoder.layer)
        self.layer = layers[piece.layer] if piece.layer >= 0 else None
        self.index = piece.layer  # the layer's index in the model (its cache layer), -1 outside layers

    def __call__(self, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        m, layer, kind = self.model, self.layer, self.kind
        if kind.startswith("d"):
            return self._decoder(*xs)
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

    def _decoder(self, h: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """A decoder's units over a whole sequence, as LlamaModel / GPT2Model's forward runs them."""
        m, kind = self.model, self.kind
        if self.family in LLAMA_LIKE:
            if kind == "dembed":
                return m.model.embed_tokens(h), mask
            if kind == "dhead":
                return (m.lm_head(m.model.norm(h)),)
        else:
            t = m.transformer
            if kind == "dembed":
                e = t.wte(h)
                return t.drop(e + t.wpe(_positions(e)).to(e.device)), mask
            if kind == "dhead":
                return (m.lm_head(t.ln_f(h)),)
        pos = _positions(h)
        causal = _causal(m, h, mask, pos, self.index) if kind != "dffn" else None
        return self._layer(h, causal, pos, None), mask

    def _layer(self, h: torch.Tensor, mask: Any, positions: torch.Tensor, cache: Any) -> torch.Tensor:
        """This unit's decoder layer (dlayer), or its half (dattn: pre-norm, attention, residual;
        dffn: pre-norm, MLP, residual), on hidden states `h` with the layer's causal `mask`,
        reading and extending `cache` (None: a whole sequence, no cache): the layer's own forward,
        or the same operations in the same order as it runs them (bit for bit its result)."""
        m, layer, kind = self.model, self.layer, self.kind
        assert layer is not None
        use = cache is not None
        if self.family in LLAMA_LIKE:
            if kind == "dffn":
                return h + layer.mlp(layer.post_attention_layernorm(h))
            kw = dict(attention_mask=mask, position_ids=positions, cache=cache, use_cache=use,
                      position_embeddings=m.model.rotary_emb(h, position_ids=positions))
            if kind == "dlayer":
                return layer(h, **kw)
            return h + layer.self_attn(hidden_states=layer.input_layernorm(h), **kw)[0]
        if kind == "dffn":
            return h + layer.mlp(layer.ln_2(h))
        if kind == "dlayer":
            return layer(h, cache, mask, None, use_cache=use, position_ids=positions)
        return layer.attn(layer.ln_1(h), cache=cache, attention_mask=mask, use_cache=use, position_ids=positions)[0] + h

    # ---- generation: one sequence, its new tokens, its KV cache (docs/generate.md) ----------
    def step(self, x: torch.Tensor, cache: Any, positions: torch.Tensor) -> torch.Tensor:
        """This decoder unit on one sequence's new tokens (batch 1: ids (1, T) at the embedding,
        else hidden states (1, T, D)) at `positions` (1, T), reading and extending `cache`
        (a DynamicCache of the whole model's layers: this unit's layer only is touched), as the
        model's forward runs them inside `generate`; the head gives the last token's logits (1, V)."""
        m, kind = self.model, self.kind
        if self.family in LLAMA_LIKE:
            if kind == "dembed":
                return m.model.embed_tokens(x)
            if kind == "dhead":  # the model normalises every position, then keeps the last one's logits
                return m.lm_head(m.model.norm(x)[:, -1:, :])[:, 0]
        else:
            t = m.transformer
            if kind == "dembed":
                e = t.wte(x)
                return t.drop(e + t.wpe(positions).to(e.device))
            if kind == "dhead":
                return m.lm_head(t.ln_f(x)[:, -1:, :])[:, 0]
        mask = _causal_cached(m, x, cache, positions, self.index) if kind != "dffn" else None
        return self._layer(x, mask, positions, cache)

    def step_batch(self, x: torch.Tensor, cache: Any, positions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """This unit on T new tokens of each of B sequences (ids (B, T), or hidden states (B, T, D))
        against `cache`, their caches stacked and left-padded (`stack_caches`): the model's own
        forward on that batch, `mask` (B, past + T) marking the padding, `positions` (B, T) each
        sequence's own. The head gives each row's last-token logits (B, V)."""
        kind = self.kind
        if kind in ("dembed", "dhead", "dffn"):
            return self.step(x, cache, positions)
        causal = _causal_fn(self.model.config, self.index)(config=self.model.config, inputs_embeds=x,
                                                           attention_mask=mask, cache=cache, position_ids=positions,
                                                           layer_idx=self.index)
        return self._layer(x, causal, positions, cache)


def stack_caches(model: Any, caches: list[Any], lengths: list[int], layers: list[int],
                 new: int = 1) -> tuple[Any, torch.Tensor]:
    """B sequences' caches as one batch cache of `layers` (left-padded to the longest; empty when
    none holds a token) and the attention mask (B, longest + new) that hides the padding and
    admits the `new` tokens of every row.

    A sliding-window layer's cache holds only its window's last W - 1 tokens (of a row's n:
    min(n, W - 1)); its batch layer holds them left-padded to min(longest, W - 1), counts the
    longest row's tokens (its mask's offset into the (B, longest + new) mask, as the model's
    own layer keeps it), and keeps the new tokens past its window until `unstack_caches` has
    taken them (``activate_past_recording``: what it attends to is unchanged)."""
    import torch.nn.functional as F

    longest = max(lengths)
    batch = new_cache(model)
    heads, size = kv_shape(model)

    def padded(layer: Any, n: int, which: str, width: int) -> torch.Tensor:
        kept = min(n, width)  # a sliding layer stores only its window's last tokens
        if not kept:  # a sequence starting now: all padding
            return torch.zeros((1, heads, width, size))
        t = getattr(layer, which)
        if t.shape[-2] != kept:
            raise TextModelError(f"a KV cache layer holds {t.shape[-2]} tokens, its sequence {n} ({kept} kept)")
        return F.pad(t, (0, 0, width - kept, 0))

    for i in layers:
        b = batch.layers[i]
        slides = getattr(b, "is_sliding", False)
        if slides:
            b.activate_past_recording()
        if not longest:
            continue
        width = min(longest, b.sliding_window - 1) if slides else longest
        b.update(torch.cat([padded(c.layers[i], n, "keys", width) for c, n in zip(caches, lengths)]),
                 torch.cat([padded(c.layers[i], n, "values", width) for c, n in zip(caches, lengths)]))
        if slides:
            b.cumulative_length = longest
    mask = torch.zeros(len(caches), longest + new, dtype=torch.long)
    for r, n in enumerate(lengths):
        mask[r, longest - n:] = 1
    return batch, mask


def unstack_caches(batch: Any, caches: list[Any], layers: list[int], new: int = 1) -> None:
    """Each sequence's new tokens' keys and values (the batch cache's last `new` positions)
    appended to its own cache."""
    for i in layers:
        k, v = batch.layers[i].keys[:, :, -new:, :], batch.layers[i].values[:, :, -new:, :]
        for r, c in enumerate(caches):
            c.layers[i].update(k[r:r + 1], v[r:r + 1])


def _causal_cached(model: Any, h: torch.Tensor, cache: Any, positions: torch.Tensor, layer_idx: int) -> Any:
    """The causal mask the model's forward makes for new tokens after a cache, as `generate` calls it
    (an all-ones attention mask over past and new tokens), sized against this layer's cache."""
    seen = int(positions[0, -1]) + 1
    return _causal_fn(model.config, layer_idx)(config=model.config, inputs_embeds=h,
                                               attention_mask=torch.ones(1, seen, dtype=torch.long), cache=cache,
                                               position_ids=positions, layer_idx=layer_idx)


def new_cache(model: Any) -> Any:
    """An empty KV cache for one sequence: the model's own DynamicCache (its layers fill lazily, so a
    shard's cache holds tensors of the shard's layers only)."""
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


def cache_bytes_per_token(model: Any, layers: int) -> int:
    """Bytes a KV cache of `layers` decoder layers holds per token (keys and values, float32)."""
    cfg = model.config
    if family(model) == "gpt2":
        width = cfg.n_embd
    else:
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        width = cfg.num_key_value_heads * head_dim
    return 2 * width * 4 * layers


def kv_shape(model: Any) -> tuple[int, int]:
    """(key-value heads, head size) of one layer's cache."""
    cfg = model.config
    if family(model) == "gpt2":
        return cfg.n_head, cfg.n_embd // cfg.n_head
    return cfg.num_key_value_heads, getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def max_positions(config: Any) -> int:
    """The most tokens a sequence of a model of `config` (``model_config``, a model's ``.config``)
    may hold: its position embeddings (GPT-2's ``n_positions``, which GPT2Config also answers to
    as ``max_position_embeddings``)."""
    return int(config.max_position_embeddings)


def forward(model: Any, *xs: torch.Tensor) -> torch.Tensor:
    """The model's own forward on its input tensors: its logits (the reference)."""
    if family(model) != "bert":
        ids, mask = xs
        return model(input_ids=ids, attention_mask=mask, use_cache=False).logits
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
