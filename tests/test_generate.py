"""Generation across a pipeline: stages keep each sequence's KV cache (keyed by the client's
session and the sequence id); greedy decoding gives the model's own `generate` tokens; resent
steps recompute; admission under the cache budget; release and idle expiry."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from helpers import free_port, run_cli_here  # noqa: E402

from edgezmq.client import Client  # noqa: E402
from edgezmq.generation import GenerateError, Generator, Sampling, decoder_limits  # noqa: E402
from edgezmq.model import chain as models  # noqa: E402
from edgezmq.node.kvcache import GenError, KVStore  # noqa: E402
from edgezmq.node.stage import BUFFERS_PER_DIRECTION  # noqa: E402
from edgezmq.ops.trace import idle, intervals  # noqa: E402
from edgezmq.orchestrate.address import NodeAddress  # noqa: E402
from edgezmq.orchestrate.deploy import deploy, unload  # noqa: E402
from edgezmq.orchestrate.planfile import DeployPlan, ModelSpec, StagePlan  # noqa: E402
from edgezmq.protocol import wire  # noqa: E402
from edgezmq.protocol.messages import LoadRequest  # noqa: E402
from edgezmq.transport.nodeclient import NodeClient  # noqa: E402

VOCAB = 300
MODELS = {
    "gpt2": {"depth": 4, "embed_dim": 64, "num_heads": 4, "vocab_size": VOCAB, "seq_len": 16},
    "tinyllama_1_1b": {"depth": 4, "embed_dim": 64, "num_heads": 8, "vocab_size": VOCAB, "seq_len": 16},
    "qwen2_5_0_5b": {"depth": 4, "embed_dim": 64, "num_heads": 4, "vocab_size": VOCAB, "seq_len": 16},
    "mistral_7b_v0_1": {"depth": 4, "embed_dim": 64, "num_heads": 8, "vocab_size": VOCAB, "seq_len": 16},
}


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(1, VOCAB, int(rng.integers(1, 24))).tolist() for _ in range(n)]


def _reference(name: str, kw: dict, path, prompt: list[int], new: int) -> tuple[list[int], list[torch.Tensor]]:
    """The model's own greedy `generate` (batch 1), its tokens and each step's logits."""
    from safetensors.torch import load_file

    m = models.create_model(name, **kw)
    m.load_state_dict(load_file(path), strict=False)
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        out = m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False,
                         eos_token_id=None, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    return out.sequences[0, len(prompt):].tolist(), [x[0] for x in out.logits]


@pytest.mark.parametrize("granularity", ["block", "half"])
@pytest.mark.parametrize("name", list(MODELS))
def test_shards_step_by_step_equal_generate(name, granularity, tmp_path):
    """At 'half' granularity the cuts fall between a layer's attention and its MLP too."""
    kw = MODELS[name]
    path = models.write_checkpoint(name, tmp_path / "m.safetensors", seed=0, **kw)
    n = models.num_units(name, granularity, **kw)
    cuts = [0, 2, 4, n]
    shards = [models.build_shard(name, a, b, granularity=granularity, checkpoint=path, **kw)
              for a, b in zip(cuts, cuts[1:])]
    assert all(s.is_decoder for s in shards)
    # prompts longer than one message (seq_len 16) go in chunks
    for prompt in _prompts(3, seed=1) + [list(range(1, 40))]:
        ref_tokens, ref_logits = _reference(name, kw, path, prompt, 12)
        caches = [s.new_cache() for s in shards]
        pos, todo, tokens = 0, list(prompt), []
        with torch.inference_mode():
            while len(tokens) < 12:
                chunk = todo[:16]
                todo = todo[16:]
                x = torch.tensor([chunk])
                for s, cache in zip(shards, caches):
                    x = s.step(x, cache, pos)
                pos += len(chunk)
                if todo:
                    continue
                if len(prompt) <= 16:  # a prompt in one message: bit for bit
                    assert torch.equal(x[0], ref_logits[len(tokens)])
                else:  # in chunks: the same sums in other shapes, rounded differently
                    torch.testing.assert_close(x[0], ref_logits[len(tokens)], rtol=0, atol=1e-5)
                tokens.append(int(x[0].argmax()))
                todo = [tokens[-1]]
        assert tokens == ref_tokens


@pytest.mark.parametrize("granularity", ["block", "half"])
@pytest.mark.parametrize("name", list(MODELS))
def test_a_batched_decode_step_is_the_models_own_batched_forward(name, granularity, tmp_path):
    """Decode rows of sequences of different lengths as one left-padded batch: bit for bit the
    model's own forward on that batch (its cache, mask and positions), and the tokens of
    `generate` (each sequence alone) to rounding."""
    from edgezmq.model import text

    kw = MODELS[name]
    path = models.write_checkpoint(name, tmp_path / "m.safetensors", seed=0, **kw)
    n = models.num_units(name, granularity, **kw)
    shards = [models.build_shard(name, a, b, granularity=granularity, checkpoint=path, **kw) for a, b in [(0, 3), (3, n)]]
    whole = models.build_shard(name, 0, n, granularity=granularity, checkpoint=path, **kw)
    prompts = _prompts(4, seed=3)
    refs = [_reference(name, kw, path, p, 6) for p in prompts]
    caches = [[s.new_cache() for s in shards] for _ in prompts]
    with torch.inference_mode():
        outs = []
        for p, cs in zip(prompts, caches):
            x = torch.tensor([p])
            for s, c in zip(shards, cs):
                x = s.step(x, c, 0)
            outs.append([int(x[0].argmax())])
        lengths = [len(p) for p in prompts]
        for step in range(5):
            ids = torch.tensor([[o[-1]] for o in outs])
            # the model's own forward on the same batch, from copies of the same caches
            m = whole._extra[0]
            layers = list(range(kw["depth"]))
            own = [text.new_cache(m) for _ in prompts]
            for o, cs in zip(own, caches):
                for i in layers:
                    c = next(c for c, s in zip(cs, shards) if i in s._layer_ids())
                    o.layers[i].update(c.layers[i].keys.clone(), c.layers[i].values.clone())
            batch, mask = text.stack_caches(m, own, lengths, layers)
            ref = m(input_ids=ids, attention_mask=mask, cache=batch, position_ids=torch.tensor(lengths).unsqueeze(1),
                    use_cache=True).logits[:, -1]
            x = ids
            for j, s in enumerate(shards):
                x = s.step_batch(x, [c[j] for c in caches], lengths)
            assert torch.equal(x, ref)
            for r, o in enumerate(outs):
                torch.testing.assert_close(x[r], refs[r][1][step + 1], rtol=0, atol=1e-5)
                o.append(int(x[r].argmax()))
            lengths = [k + 1 for k in lengths]
    assert outs == [r[0] for r in refs]
    assert all(c[1].layers[kw["depth"] - 1].keys.shape[-2] == k for c, k in zip(caches, lengths))


@pytest.mark.parametrize("name", list(MODELS))
def test_a_batched_prefill_is_the_models_own_batched_forward(name, tmp_path):
    """Prompts of one length, and a decode row beside a prompt chunk of the same length, as one
    batch: bit for bit the model's own forward on that batch; the caches then go on to the
    tokens of `generate`."""
    from edgezmq.model import text

    kw = MODELS[name]
    path = models.write_checkpoint(name, tmp_path / "m.safetensors", seed=0, **kw)
    n = models.num_units(name, **kw)
    shards = [models.build_shard(name, a, b, checkpoint=path, **kw) for a, b in [(0, 2), (2, n)]]
    m = models.build_shard(name, 0, n, checkpoint=path, **kw)._extra[0]
    rng = np.random.default_rng(7)
    prompts = [rng.integers(1, VOCAB, 5).tolist() for _ in range(3)]
    refs = [_reference(name, kw, path, p, 4) for p in prompts]
    caches = [[s.new_cache() for s in shards] for _ in prompts]
    ids = torch.tensor(prompts)
    with torch.inference_mode():
        ref = m(input_ids=ids, attention_mask=torch.ones_like(ids), cache=text.new_cache(m),
                position_ids=torch.arange(5).expand(3, 5), use_cache=True, logits_to_keep=1).logits[:, -1]
        x = ids
        for j, s in enumerate(shards):
            x = s.step_batch(x, [c[j] for c in caches], [0, 0, 0])
        assert torch.equal(x, ref)
        outs, lengths = [[int(r.argmax())] for r in x], [5, 5, 5]
        for _ in range(3):
            x = torch.tensor([[o[-1]] for o in outs])
            for j, s in enumerate(shards):
                x = s.step_batch(x, [c[j] for c in caches], lengths)
            lengths = [k + 1 for k in lengths]
            for o, r in zip(outs, x):
                o.append(int(r.argmax()))
        # a row that starts now beside one that goes on, one token each: one batch
        fresh = [s.new_cache() for s in shards]
        x = torch.tensor([[prompts[0][0]], [outs[1][-1]]])
        for j, s in enumerate(shards):
            x = s.step_batch(x, [fresh[j], caches[1][j]], [0, lengths[1]])
        alone = torch.tensor([[prompts[0][0]]])
        for s, c in zip(shards, [s.new_cache() for s in shards]):
            alone = s.step(alone, c, 0)
        torch.testing.assert_close(x[0], alone[0], rtol=0, atol=1e-5)
    assert outs == [r[0] for r in refs]


WINDOW = 20  # a sliding window shorter than the test's sequences


@pytest.fixture(params=["mistral_7b_v0_1", "qwen2_5_0_5b"])
def windowed(request, monkeypatch):
    """A decoder whose layers attend within WINDOW tokens: Mistral's every layer; Qwen2's from
    layer 1 on (layer 0 attends to all), as its max_window_layers sets them."""
    from dataclasses import replace

    from edgezmq.model import text

    name = request.param
    extra = (("sliding_window", WINDOW),) if name.startswith("mistral") else (
        ("use_sliding_window", True), ("sliding_window", WINDOW), ("max_window_layers", 1))
    spec = text.TEXT_MODELS[name]
    monkeypatch.setitem(text.TEXT_MODELS, name, replace(spec, config=(*spec.config, *extra)))
    return name


def test_sliding_window_layers_mask_whole_sequences_and_generate_past_the_window(windowed, tmp_path):
    """Over 32 tokens (beyond the window) the chain equals the model's forward, each layer masked
    by its own kind of mask; rows of different lengths, decoded in one stacked batch past the
    window (each sliding layer's cache then holds its last WINDOW - 1 tokens), give `generate`'s
    tokens."""
    from edgezmq.model import text

    name, kw = windowed, {**MODELS[windowed], "seq_len": 32}
    config, _ = text.model_config(name, kw)
    assert [text.sliding(config, i) for i in range(4)] == ([True] * 4 if name.startswith("mistral")
                                                             else [False, True, True, True])
    assert decoder_limits(name, kw)[1] == 32768
    path = models.write_checkpoint(name, tmp_path / "m.safetensors", seed=0, **kw)
    n = models.num_units(name, "half", **kw)
    shards = [models.build_shard(name, a, b, granularity="half", checkpoint=path, **kw) for a, b in [(0, 4), (4, n)]]
    ids = torch.from_numpy(np.random.default_rng(4).integers(1, VOCAB, (2, 32)))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    with torch.inference_mode():
        whole = models.build_shard(name, 0, n, granularity="half", checkpoint=path, **kw)._extra[0]
        ref = models.reference_forward(whole, ids, mask)
        (y,) = shards[1](*shards[0](ids, mask))
    assert torch.equal(y, ref)
    rng = np.random.default_rng(9)
    prompts = [rng.integers(1, VOCAB, k).tolist() for k in (3, 9, 14, 24, 24)]
    total = 32
    refs = [_reference(name, kw, path, p, total - len(p))[0] for p in prompts]
    caches = [[s.new_cache() for s in shards] for _ in prompts]
    with torch.inference_mode():
        outs = []
        for p, cs in zip(prompts[:3], caches):  # each alone
            x = torch.tensor([p])
            for s, c in zip(shards, cs):
                x = s.step(x, c, 0)
            outs.append([int(x[0].argmax())])
        x = torch.tensor(prompts[3:])  # one batch of 24 new tokens each: more than the window keeps
        for j, s in enumerate(shards):
            x = s.step_batch(x, [c[j] for c in caches[3:]], [0, 0])
        outs += [[int(r.argmax())] for r in x]
        while live := [r for r, (p, o) in enumerate(zip(prompts, outs)) if len(p) + len(o) < total]:
            x = torch.tensor([[outs[r][-1]] for r in live])
            lengths = [len(prompts[r]) + len(outs[r]) - 1 for r in live]
            for j, s in enumerate(shards):
                x = s.step_batch(x, [caches[r][j] for r in live], lengths)
            for r, row in zip(live, x):
                outs[r].append(int(row.argmax()))
    assert outs == refs
    # the last layer slides in both: it keeps WINDOW - 1 tokens, and counts them all
    assert {c[1].layers[3].keys.shape[-2] for c in caches} == {WINDOW - 1}
    assert [c[1].layers[3].get_seq_length() for c in caches] == [total - 1] * len(prompts)


def test_kv_store_admission_resend_release_and_expiry():
    made = []
    store = KVStore(lambda: made.append(object()) or _FakeCache(), bytes_per_token=10, budget_bytes=1000,
                    max_positions=64, idle_s=5)
    g = {"ids": [1, 2], "pos": [0, 0], "lens": [3, 4], "max_len": [40, 40]}
    a, b = store.admit("s", g, 4)
    store.advanced(a, 3)
    store.advanced(b, 4)
    assert store.reserved_bytes == 800 and store.held_tokens == 7
    # a third sequence does not fit beside them: refused whole, nothing changed
    with pytest.raises(GenError, match="cache_full"):
        store.admit("s", {"ids": [3], "pos": [0], "lens": [1], "max_len": [30]}, 1)
    assert store.refused == 1 and len(store.seqs) == 2
    # another session's sequence 1 is another sequence: ids are per client session
    with pytest.raises(GenError, match="not cached here"):
        store.admit("other", {"ids": [1], "pos": [3], "lens": [1]}, 1)
    # a step continuing past what is cached (a lost step) is refused
    with pytest.raises(GenError, match="continues at token 5, the cache holds 3"):
        store.admit("s", {"ids": [1], "pos": [5], "lens": [1]}, 1)
    # past its reservation
    with pytest.raises(GenError, match="over its max_len 40"):
        store.admit("s", {"ids": [1], "pos": [3], "lens": [38]}, 38)
    # a resent step (pos below what is cached) cuts the cache back first
    (s,) = store.admit("s", {"ids": [2], "pos": [1], "lens": [3]}, 3)
    assert s.length == 1 and s.cache.cropped == [-3]
    # release: idempotent, frees the reservation
    assert store.drop("s", [1, 7]) == 1 and store.drop("s", [1]) == 0
    assert store.reserved_bytes == 400
    # idle counts from a step's end, not its start: a step admitted long ago that ended now is not idle
    (s,) = store.admit("s", {"ids": [2], "pos": [1], "lens": [1]}, 1)
    s.used -= 60  # admitted a minute ago (a long step, or the stage busy with others' steps)
    store.advanced(s, 1)
    assert store.expire(now=time.monotonic() + 4) == 0
    assert store.expire(now=time.monotonic() + 6) == 1 and store.reserved_bytes == 0 and store.expired == 1
    assert store.heard == {}  # a session with nothing left here is forgotten
    # a client's sequences waiting behind its own long step (others of its session) are not idle:
    # idle counts from the session's last step here; a session gone quiet loses them all
    a, b = store.admit("s", {"ids": [4, 5], "pos": [0, 0], "lens": [1, 1], "max_len": [8, 8]}, 1)
    (c,) = store.admit("t", {"ids": [4], "pos": [0], "lens": [1], "max_len": [8]}, 1)
    for s_ in (a, b, c):
        store.advanced(s_, 1)
        s_.used -= 60  # their last steps ended a minute ago
    store.heard = {k: t - 60 for k, t in store.heard.items()}
    (b,) = store.admit("s", {"ids": [5], "pos": [1], "lens": [1]}, 1)
    store.advanced(b, 1)  # session s heard from now (a step that took a minute, say)
    assert store.expire() == 1 and set(store.seqs) == {("s", 4), ("s", 5)}  # t's sequence went
    assert set(store.heard) == {"s"}
    assert store.expire(now=time.monotonic() + 6) == 2 and not store.seqs and store.heard == {}
    with pytest.raises(GenError, match=r"max_len 65 outside 1\.\.64"):
        store.admit("s", {"ids": [9], "pos": [0], "lens": [1], "max_len": [65]}, 1)
    # a shard without layers (the head alone) holds no cache: a budget of 0 admits everything
    head = KVStore(_FakeCache, bytes_per_token=0, budget_bytes=0, max_positions=64)
    assert len(head.admit("s", {"ids": [1, 2], "pos": [0, 0], "lens": [1, 1], "max_len": [64, 64]}, 1)) == 2


class _FakeCache:
    """Records crops; the store never reads anything else of a cache."""

    def __init__(self) -> None:
        self.cropped: list[int] = []

    def crop(self, n: int) -> None:
        self.cropped.append(n)


@pytest.mark.parametrize("gen", [
    {"op": "step"},
    {"op": "jump", "ids": [1]},
    {"op": "step", "ids": [1, 1], "pos": [0, 0], "lens": [1, 1], "max_len": [2, 2]},
    {"op": "step", "ids": [1], "pos": [0], "lens": [1]},  # starts without max_len
    {"op": "step", "ids": [1], "pos": [-1], "lens": [1], "max_len": [3]},
    {"op": "step", "ids": [1], "pos": [0], "lens": [0], "max_len": [3]},
    {"op": "step", "ids": [1], "pos": [0, 1], "lens": [1], "max_len": [3]},
    {"op": "step", "ids": [2**31], "pos": [0], "lens": [1], "max_len": [3]},
    {"op": "step", "ids": [True], "pos": [0], "lens": [1], "max_len": [3]},
    {"op": "release", "ids": [1], "pos": [0]},
    {"op": "step", "ids": [1], "pos": [0], "lens": [1], "max_len": [3], "path": "/etc"},
    {"op": "step", "ids": [1], "pos": [0], "lens": [1], "max_len": [3], "pick": "sample"},
    {"op": "step", "ids": [1], "pos": [0], "lens": [1], "max_len": [3], "pick": ["argmax"]},
    {"op": "release", "ids": [1], "pick": "argmax"},
    *({"op": "step", "ids": [1, 2], "pos": [3, 3], "lens": [1, 1], **d} for d in (
        {"pick": "sample", "temperature": 1.0, "top_k": 0},  # no draws
        {"pick": "sample", "u": [0.5], "temperature": 1.0, "top_k": 0},  # one draw for two rows
        {"pick": "sample", "u": [0.5, 1.0], "temperature": 1.0, "top_k": 0},  # a draw of 1: outside [0, 1)
        {"pick": "sample", "u": [0.5, float("nan")], "temperature": 1.0, "top_k": 0},
        {"pick": "sample", "u": [0.5, True], "temperature": 1.0, "top_k": 0},
        {"pick": "sample", "u": [0.5, 0.5], "top_k": 0},  # no temperature
        {"pick": "sample", "u": [0.5, 0.5], "temperature": 0.0, "top_k": 0},
        {"pick": "sample", "u": [0.5, 0.5], "temperature": float("nan"), "top_k": 0},
        {"pick": "sample", "u": [0.5, 0.5], "temperature": 101.0, "top_k": 0},
        {"pick": "sample", "u": [0.5, 0.5], "temperature": 1.0, "top_k": -1},
        {"pick": "sample", "u": [0.5, 0.5], "temperature": 1.0, "top_k": 2**24 + 1},
        {"pick": "sample", "u": [0.5, 0.5], "temperature": 1.0, "top_k": 1.5},
        {"pick": "argmax", "u": [0.5, 0.5]},  # draws without sampling
        {"u": [0.5, 0.5], "temperature": 1.0, "top_k": 0},
    )),
    [1, 2],
])
def test_hostile_gen_headers_are_refused(gen):
    m = wire.Message("act", "r", 1, -1, [np.zeros((1, 1), np.int64)], session="abc", gen=gen)
    with pytest.raises(wire.WireError) as e:
        wire.decode(wire.encode(m))
    assert e.value.code == "bad_field"
    # without a session (caches are keyed by it) even a good one is refused
    good = {"op": "release", "ids": [1]}
    with pytest.raises(wire.WireError, match="needs a session"):
        wire.decode(wire.encode(wire.Message("act", "r", 1, -1, [], gen=good)))


def test_sampling_inverts_the_distribution_at_the_draw():
    """The rule both ends apply (edgezmq.protocol.sampling): over n evenly spaced draws each
    token comes its probability's share of n, to within one (the inverse of the CDF), only
    the top_k most likely ever come, and top_k 1 is the argmax whatever the draw."""
    from edgezmq.protocol.sampling import sample

    logits = np.random.default_rng(3).normal(size=50).astype(np.float32)
    n = 10_000
    for temperature, top_k in ((1.0, 0), (0.7, 5), (2.0, 50), (1.0, 1)):
        z = logits.astype(np.float64) / temperature
        top = np.argsort(-z, kind="stable")[:top_k or z.size]
        p = np.zeros_like(z)
        p[top] = np.exp(z[top] - z.max())
        p /= p.sum()
        got = np.bincount([sample(logits, (i + 0.5) / n, temperature, top_k) for i in range(n)], minlength=z.size)
        assert np.abs(got - p * n).max() <= 1, (temperature, top_k)
        assert set(np.flatnonzero(got)) <= set(top.tolist())
    assert {sample(logits, u, 1.0, 1) for u in (0.0, 0.5, 0.999999)} == {int(np.argmax(logits))}
    assert sample(np.array([0.0, 0.0, -np.inf], np.float32), 0.999999, 1.0, 0) == 1  # never a token of p 0


def test_a_gen_step_of_the_most_rows_fits_a_header():
    """MAX_GEN_ROWS rows at their largest ids, positions and lengths, with every timestamp a
    message may carry: under the header limit, and decoded as sent."""
    n, big = wire.MAX_GEN_ROWS, wire.MAX_SEQUENCE_ID
    gen = {"op": "step", "ids": list(range(big - n + 1, big + 1)), "pos": [wire.MAX_POSITION - 1] * n,
           "lens": [1] * n, "max_len": [wire.MAX_POSITION] * n, "pick": "sample", "u": [1 / 3] * n,
           "temperature": 0.7, "top_k": 1 << 24}
    t = [[i, 1.7e9, 1.7e9, 1.7e9, 1.7e9] for i in range(wire.MAX_TIMESTAMPS)]
    m = wire.Message("act", "r" * 64, 2**62, -1, [np.zeros((n, 1), np.int64)], session="s" * wire.MAX_SESSION, gen=gen, t=t)
    frames = wire.encode(m)
    assert len(frames[0]) <= wire.MAX_HEADER_BYTES
    assert wire.decode(frames).gen == gen
    over = {"op": "release", "ids": list(range(n + 1))}  # one row more: refused
    with pytest.raises(wire.WireError):
        wire.decode(wire.encode(wire.Message("act", "r", 1, -1, [], session="abc", gen=over)))


def test_bad_prompts_are_refused_before_anything_is_sent():
    seq_len, positions, eos = decoder_limits("gpt2", MODELS["gpt2"])
    assert (seq_len, positions, eos) == (16, 1024, None)  # a shrunk vocabulary has no eos token
    assert decoder_limits("gpt2", {})[2] == 50256
    # positions by each family's config field: GPT-2's n_positions, Llama's max_position_embeddings
    assert [decoder_limits(n, {})[1] for n in ("gpt2_xl", "tinyllama_1_1b", "llama_3_2_1b")] == [1024, 2048, 131072]
    assert [decoder_limits(n, {})[1] for n in ("mistral_7b_v0_1", "qwen2_5_0_5b")] == [32768, 32768]
    with pytest.raises(GenerateError, match="not a decoder"):
        decoder_limits("bert_tiny", {})

    class _C:
        microbatch = 2

    g = Generator(_C(), chunk=16, max_positions=32, vocab_size=VOCAB)  # type: ignore[arg-type]
    for prompts, new, match in [([[1, 2]], 0, "max_new_tokens"), ([], 3, "no prompt"), ([[]], 3, "prompt 0 is empty"),
                                ([[1], [VOCAB]], 3, f"prompt 1: token id {VOCAB} outside"),
                                ([[1] * 30], 3, "over the model's 32 positions")]:
        with pytest.raises(GenerateError, match=match):
            list(g.stream(prompts, new))
    with pytest.raises(GenerateError, match="temperature"):
        Sampling(greedy=False, temperature=0)
    for bad in (0, -1, (1 << 24) + 1):
        with pytest.raises(GenerateError, match="step_tokens must be in"):
            g.step_tokens = bad
    for wait in (-1.0, float("nan"), float("inf"), 2e6):
        with pytest.raises(GenerateError, match="max_wait_s must be in"):
            g.max_wait_s = wait
    g.max_wait_s = 0  # started sequences always first: allowed
    assert g.max_wait_s == 0.0
    # a deployment's microbatch over what one gen message carries: steps of at most that many rows
    g.client.microbatch = wire.MAX_GEN_ROWS + 44
    assert g.microbatch == wire.MAX_GEN_ROWS
    # a replicated stage would get steps of sequences whose caches another replica holds
    spec = ModelSpec(name="gpt2", microbatch=2, checkpoint="x.safetensors", kwargs=MODELS["gpt2"])
    plan = DeployPlan(model=spec, stages=[StagePlan((0, 6), [NodeAddress("a", "tcp://127.0.0.1:1", 1),
                                                             NodeAddress("b", "tcp://127.0.0.1:2", 1)])])
    with pytest.raises(GenerateError, match=r"stage\(s\) \[0\] of the plan are replicated"):
        Generator.from_plan(plan)


def test_a_started_sequence_waiting_long_goes_before_new_prompts():
    """Prompts wait since the start, so the queue serves every prompt before a started
    sequence's next step: with prompt steps capped (`step_tokens`) on a slow device, the first
    sequences idled past a stage's `cache_idle_s` and lost their caches (found by
    bench/generate.py: one device, 512 prompts, steps of 128 tokens). A started sequence whose
    last step ended `max_wait_s` ago puts the started ones first; until then the order stands."""
    from collections import deque

    from edgezmq.generation import _Seq

    class _C:
        microbatch = 2

    g = Generator(_C(), chunk=4, max_positions=64, vocab_size=VOCAB)  # type: ignore[arg-type]
    assert g.max_wait_s == 150.0  # half a stage's default idle limit
    sent: list[tuple[list[int], list[int]]] = []
    g._send = lambda gen, xs, rows, lens, pending, release=False: sent.append((gen["ids"], gen["pos"]))  # type: ignore[method-assign]
    now = time.time()
    # 0-2 started (prompt of 4 cached, one token generated: a decode step next), 1 s ago; 3-5 new prompts
    seqs = {i: _Seq(i, i, [7] * 4 + ([9] if i < 3 else []), 4, 10, None, pos=4 if i < 3 else 0, stepped=now - 1)
            for i in range(6)}
    cases = [([3, 4, 5, 0, 1], ([3, 4], [0, 0])),  # in time: the prompts first, in order
             ([0, 5], ([0], [4])),  # a started one first in the queue goes first
             ([2], ([2], [4]))]
    for ready, step in cases:
        sent.clear()
        q = deque(ready)
        g._send_step(q, seqs, {})
        assert sent == [step], ready
        assert sorted([*q, *step[0]]) == sorted(ready)  # taken off the queue, the rest kept
    seqs[1].stepped = now - 151  # waited past max_wait_s: the started ones go first
    for ready, step in [([3, 4, 5, 0, 1], ([0, 1], [4, 4])), ([3, 1, 4], ([1], [4]))]:
        sent.clear()
        g._send_step(deque(ready), seqs, {})
        assert sent == [step], ready


def test_generator_takes_results_through_the_clients_filter():
    """A step's answer is taken only if the client's own filter admits it (its session, its
    run, a step in flight; counted as the client counts them), and then only logits of the
    step's rows; an error answer goes to the caller (cache_full waits, others raise)."""
    import zmq

    from edgezmq.generation import _Pending, _Seq
    from edgezmq.transport import sockets

    with Client([], "tcp://127.0.0.1:0", run="r", microbatch=2, timeout=30) as c:
        g = Generator(c, chunk=16, max_positions=32, vocab_size=VOCAB)
        g.pick_on_stage = False  # logits first; tokens below
        rows = [_Seq(i, i, [1], 1, 4, None) for i in range(2)]
        pending = {7: _Pending([], rows, [1, 1], time.time())}
        push = sockets.make_socket(c.ctx, zmq.PUSH, sockets.DATA)
        push.connect(c.results_endpoint)
        try:
            def answer(frames):
                push.send_multipart(frames)
                got = sockets.recv_frames(c.pull, 30_000)
                assert got is not None
                return g._accept(got, pending)

            logits = np.zeros((2, VOCAB), dtype=np.float32)

            def result(**kw):
                return wire.encode(wire.Message(**{"kind": "result", "run": "r", "seq": 7, "stage": 1,
                                                   "tensors": [logits], "session": c.session, **kw}))

            assert answer([b"not a header"]) is None and (c.ignored, c.foreign) == (1, 0)
            assert answer(result(session="another")) is None and (c.ignored, c.foreign) == (1, 1)
            assert answer(result(run="old")) is None and c.ignored == 2
            assert answer(result(seq=8)) is None and c.ignored == 3
            assert answer(result(tensors=[logits[:1]])) is None and c.ignored == 4  # not this step's rows
            err = answer(result(kind="error", tensors=[], error={"code": "cache_full", "message": "m"}))
            assert err is not None and err.kind == "error" and c.ignored == 4
            ok = answer(result())
            assert ok is not None and ok.seq == 7 and ok.tensors[0].shape == (2, VOCAB)
            assert (c.ignored, c.foreign) == (4, 1)
            # picked on the last stage (gen.pick, the default): each row's token id, int64, in the vocabulary
            g.pick_on_stage = True
            assert answer(result()) is None and c.ignored == 5  # logits where tokens were asked
            for bad in (np.array([1, VOCAB]), np.array([1, -1]), np.array([1.0, 2.0]), np.array([1])):
                assert answer(result(tensors=[bad])) is None
            assert c.ignored == 9
            tokens = answer(result(tensors=[np.array([0, VOCAB - 1])]))
            assert tokens is not None and tokens.tensors[0].tolist() == [0, VOCAB - 1]
        finally:
            push.close(linger=0)


def _deploy(cluster, name, cuts, path, microbatch=2, granularity="block"):
    spec = ModelSpec(name=name, microbatch=microbatch, checkpoint=str(path), kwargs=MODELS[name],
                     granularity=granularity)
    return DeployPlan(model=spec, results="tcp://127.0.0.1:0", stages=[
        StagePlan(units=r, nodes=[NodeAddress(nd.name, nd.control, 1)])
        for r, nd in zip(zip(cuts, cuts[1:]), cluster.nodes)])


@pytest.mark.slow
@pytest.mark.parametrize("name,exact,granularity", [("gpt2", False, "block"), ("tinyllama_1_1b", True, "block"),
                                                    ("tinyllama_1_1b", False, "half"), ("qwen2_5_0_5b", False, "half"),
                                                    ("mistral_7b_v0_1", False, "block")])
def test_pipelined_generation_equals_generate(node_pool, tmp_path, name, exact, granularity):
    """Greedy tokens through 3 stages equal `generate`'s: decode rows batched (the default) or
    each row on its own (`exact_generation`); at 'half' granularity a stage boundary falls
    between a layer's attention (and its cache) and its MLP."""
    kw = MODELS[name]
    path = models.cached_checkpoint(name, seed=0, **kw)
    n = models.num_units(name, granularity, **kw)
    chunk, positions, _ = decoder_limits(name, kw)
    prompts = _prompts(7, seed=2)
    with node_pool.take(3) as cluster:
        plan = _deploy(cluster, name, [0, 2, 4, n], path, granularity=granularity)
        plan.model.exact_generation = exact
        with Client([], "tcp://127.0.0.1:0", run="", window=4, microbatch=2, timeout=60) as c:
            plan.results = c.results_endpoint
            dep = deploy(plan, load_timeout=120)
            try:
                c.attach(dep.entry, dep.run)
                g = Generator(c, chunk=chunk, max_positions=positions, vocab_size=VOCAB, eos_token_id=None)
                first = c.next_seq
                outs = g.generate(prompts, max_new_tokens=10)
                st = g.stats
                # every step's result keeps its wire timestamps: one entry per stage, in order
                stamps = {q: c.timestamps[q] for q in range(first, c.next_seq) if q in c.timestamps}
                sampled = g.generate(prompts[:3], 6, Sampling(greedy=False, temperature=0.8, top_k=20, seed=5))
                # the same draws, the token chosen on the client from the logits: the same tokens
                g.pick_on_stage = False
                again = g.generate(prompts[:3], 6, Sampling(greedy=False, temperature=0.8, top_k=20, seed=5))
                on_client = g.generate(prompts[:2], 10)
                stats = [NodeClientStats.of(nd) for nd in cluster.nodes]
            finally:
                unload(plan)
    assert st.tokens == 70 and st.decode_rows == 63 and st.sequences == 7
    assert len(stamps) == st.steps and all([e[0] for e in t[1:-1]] == [0, 1, 2] for t in stamps.values())
    shares = idle(intervals(stamps), 3)
    assert all(x is not None and 0 < x["compute"] < 1 and sum(x.values()) == pytest.approx(1, abs=2e-3)
               for x in shares), shares
    for p, out in zip(prompts, outs):
        assert out == _reference(name, kw, path, p, 10)[0]
    assert sampled == again and sampled != [o[:6] for o in outs[:3]] and on_client == outs[:2]
    # every cache was released at the end; nothing expired
    for s in stats:
        assert s["sequences"] == 0 and s["cache_released"] >= 7 and s["cache_expired"] == 0


class NodeClientStats:
    @staticmethod
    def of(nd):
        from edgezmq.transport.nodeclient import NodeClient

        with NodeClient(nd.control, timeout=10) as nc:
            return nc.stats().stage.cache




def _ask(c: Client, gen, xs, session=None, timeout=60.0) -> wire.Message:
    """One raw gen message through the deployment; its answer (a result or an error)."""
    seq = c._seq
    c._seq += 1
    frames = wire.encode(wire.Message("act", c.run, seq, -1, xs, session=session or c.session, gen=gen))
    c.send_frames(seq, frames, time.time() + timeout)
    return _answer(c, seq, timeout)


def _answer(c: Client, seq: int, timeout: float = 60.0) -> wire.Message:
    """The deployment's answer to message `seq` (a result or an error)."""
    import zmq

    deadline = time.time() + timeout
    while time.time() < deadline:
        if c.pull.poll(200, zmq.POLLIN):
            msg = wire.decode(c.pull.recv_multipart())
            if msg.seq == seq:
                return msg
    raise AssertionError(f"no answer to message {seq}")


@pytest.mark.slow
def test_a_decoder_stage_refuses_what_does_not_continue_its_sequences(node_pool, tmp_path, capsys):
    name, kw = "gpt2", MODELS["gpt2"]
    path = models.cached_checkpoint(name, seed=0, **kw)
    n = models.num_units(name, **kw)
    per_token = 2 * 64 * 4 * 4  # keys and values of 4 layers, 64 wide, float32
    ids = np.array([[5, 6, 7]], np.int64)
    start = {"op": "step", "ids": [1], "pos": [0], "lens": [3], "max_len": [32]}
    with node_pool.take(1) as cluster:
        plan = _deploy(cluster, name, [0, n], path)
        plan.stages[0].cache_bytes = 48 * per_token  # one sequence of 32 tokens fits, two do not
        with Client([], "tcp://127.0.0.1:0", run="", window=4, microbatch=2, timeout=60) as c:
            plan.results = c.results_endpoint
            dep = deploy(plan, load_timeout=120)
            try:
                c.attach(dep.entry, dep.run)
                first = _ask(c, start, [ids])
                assert first.kind == "result" and first.tensors[0].shape == (1, VOCAB)
                # sent again (a lost answer): recomputed from pos 0, the same logits
                again = _ask(c, start, [ids])
                assert np.array_equal(again.tensors[0], first.tensors[0])
                nxt = {"op": "step", "ids": [1], "pos": [3], "lens": [1]}
                y1 = _ask(c, nxt, [np.array([[9]], np.int64)])
                y1b = _ask(c, nxt, [np.array([[9]], np.int64)])  # resent decode step: same answer
                assert y1.kind == "result" and np.array_equal(y1.tensors[0], y1b.tensors[0])
                # the same step picked on the stage (gen.pick argmax, greedy): each row's token
                # id, the first of equal maxima of those logits, 8 bytes instead of 4 x vocab
                picked = _ask(c, {**nxt, "pick": "argmax"}, [np.array([[9]], np.int64)])
                assert picked.kind == "result" and picked.tensors[0].dtype == np.int64
                assert picked.tensors[0].tolist() == [int(np.argmax(y1.tensors[0][0]))]
                refused = {
                    "gen_state": ({"op": "step", "ids": [1], "pos": [7], "lens": [1]}, [np.array([[9]], np.int64)], None),
                    "cache_full": ({"op": "step", "ids": [2], "pos": [0], "lens": [1], "max_len": [32]},
                                   [np.array([[9]], np.int64)], None),
                    "bad_dtype": (start, [ids.astype(np.float32)], None),
                    "bad_shape": ({**start, "lens": [17]}, [np.ones((1, 17), np.int64)], None),
                }
                for code, (gen, xs, session) in refused.items():
                    r = _ask(c, gen, xs, session)
                    assert r.kind == "error" and r.error["code"] == code, (code, r.error)
                # another client's session cannot continue (nor read) this client's sequence 1
                other = _ask(c, nxt, [np.array([[9]], np.int64)], session="f" * 16)
                assert other.kind == "error" and other.error["code"] == "gen_state" and other.session == "f" * 16
                # released (twice: idempotent), the budget takes the second sequence
                for _ in range(2):
                    assert _ask(c, {"op": "release", "ids": [1]}, []).kind == "result"
                assert _ask(c, refused["cache_full"][0], refused["cache_full"][1]).kind == "result"
                # whole sequences (no gen field) still run on the same stage
                whole = c.infer(tuple(models.random_inputs(name, 2, 0, **kw)))
                assert whole.shape == (2, 16, VOCAB)
            finally:
                unload(plan)

        # the command line, on a plan file (in this process: run_cli_here)
        pf = tmp_path / "plan.yaml"
        import yaml

        pf.write_text(yaml.safe_dump({
            "model": {"name": name, "checkpoint": str(path), "microbatch": 2, "kwargs": kw},
            "nodes": {nd.name: nd.control for nd in cluster.nodes},
            "stages": [{"units": [0, n], "nodes": [cluster.nodes[0].name]}],
            "results": f"tcp://127.0.0.1:{free_port()}"}))
        r = run_cli_here(capsys, "deploy", str(pf))
        assert r.returncode == 0, r.stderr
        try:
            prompts = tmp_path / "p.txt"
            prompts.write_text("5 6 7\n\n11 12\n")
            r = run_cli_here(capsys, "generate", str(pf), "--tokens", str(prompts), "--max-new-tokens", "5", "--json",
                             "--step-tokens", "3")
            assert r.returncode == 0, r.stderr
            out = json.loads(r.stdout.strip().splitlines()[-1])
            assert out["sequences"] == 2 and out["tokens"] == 10
            assert out["prefill_steps"] == 2  # 3 + 2 prompt tokens: over --step-tokens 3 in one step
            for row in out["outputs"]:
                assert row["tokens"] == _reference(name, kw, path, row["prompt"], 5)[0]
            prompts.write_text(f"5 {VOCAB}\n")
            r = run_cli_here(capsys, "generate", str(pf), "--tokens", str(prompts))
            assert r.returncode == 2 and f"token id {VOCAB} outside the vocabulary" in r.stderr
            assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
            r = run_cli_here(capsys, "generate", str(pf), "--tokens", str(prompts), "--step-tokens", "0")
            assert r.returncode == 2 and "--step-tokens" in r.stderr and "Traceback" not in r.stderr
        finally:
            run_cli_here(capsys, "undeploy", str(pf))


@pytest.mark.slow
def test_a_budget_that_holds_part_of_a_microbatch_admits_that_part(node_pool):
    """A KV budget of 3 sequences and steps of 4: the first step (4 starts) is refused whole;
    the generator sends it again as steps starting fewer, the rest wait for releases, and every
    sequence's tokens are `generate`'s. The generator follows the client's microbatch as it is
    changed (1: one row per step)."""
    name, kw = "gpt2", MODELS["gpt2"]
    path = models.cached_checkpoint(name, seed=0, **kw)
    n = models.num_units(name, **kw)
    chunk, positions, _ = decoder_limits(name, kw)
    rng = np.random.default_rng(5)
    prompts = [rng.integers(1, VOCAB, 5).tolist() for _ in range(6)]
    new = 4
    per_sequence = (5 + new) * 2 * 64 * 4 * 4  # max_len x keys and values of 4 layers, 64 wide, float32
    with node_pool.take(1) as cluster:
        plan = _deploy(cluster, name, [0, n], path, microbatch=4)
        plan.stages[0].cache_bytes = 3 * per_sequence
        with Client([], "tcp://127.0.0.1:0", run="", window=2, microbatch=4, timeout=60) as c:
            plan.results = c.results_endpoint
            dep = deploy(plan, load_timeout=120)
            try:
                c.attach(dep.entry, dep.run)
                g = Generator(c, chunk=chunk, max_positions=positions, vocab_size=VOCAB)
                got = g.generate(prompts, new, stop_at_eos=False)
                assert g.stats.cache_full >= 2  # the 4 starts, then at least one smaller step
                assert got == [_reference(name, kw, path, p, new)[0] for p in prompts]
                c.microbatch = 1
                again = g.generate(prompts[:2], new, stop_at_eos=False)
                st = g.stats
                assert again == got[:2] and st.cache_full == 0
                assert st.steps == st.prefill_rows + st.decode_rows == 2 * new  # one row per step
                # prompt chunks up to step_tokens a step (here 2 prompts of 5), at least one a step
                c.microbatch = 4
                for step_tokens, steps in [(10, 2), (4, 3), (None, 1)]:
                    g.step_tokens = step_tokens
                    assert g.generate(prompts[:3], new, stop_at_eos=False) == got[:3]
                    assert (g.stats.prefill_steps, g.stats.prefill_rows) == (steps, 3), step_tokens
            finally:
                unload(plan)


@pytest.mark.slow
def test_a_generation_only_stage_buffers_next_token_logits_and_refuses_whole_sequences(node_pool):
    """`generation_only`: the last stage counts (B, V) logits per outgoing buffer, not (B, T, V)
    (what the planner prices from decode-step profiles), and refuses whole-sequence messages;
    gen steps go through. A model that is not a decoder is refused it."""
    name, kw = "gpt2", MODELS["gpt2"]
    path = models.cached_checkpoint(name, seed=0, **kw)
    n, mb, seq = models.num_units(name, **kw), 4, kw["seq_len"]
    with node_pool.take(2) as cluster:
        node = cluster.nodes[0]
        load = dict(run="r-gen-only", model=name, units=(2, n), stage=1, last=True, microbatch=mb,
                    checkpoint=str(path), kwargs=kw)
        with NodeClient(node.control, timeout=60.0, name=node.name) as nc:
            counted = {}
            for only in (False, True):
                counted[only] = nc.load(LoadRequest(**load, generation_only=only)).buffer_bytes
                nc.unload()
            specs = models.boundary_specs(name, "block", mb, **kw)
            assert specs[n] == [((mb, seq, VOCAB), "float32")]  # whole-sequence logits
            ins = sum(int(np.prod(shape)) * np.dtype(dt).itemsize for shape, dt in specs[2])
            assert counted[False] == BUFFERS_PER_DIRECTION * (ins + mb * seq * VOCAB * 4)
            assert counted[True] == BUFFERS_PER_DIRECTION * (ins + mb * VOCAB * 4)
            with pytest.raises(Exception, match="generation_only is for a decoder"):
                nc.load(LoadRequest(**{**load, "model": "vit_tiny_patch16_224", "units": (0, 2), "kwargs": {},
                                       "checkpoint": str(models.cached_checkpoint("vit_tiny_patch16_224", seed=0))},
                                    generation_only=True))
        plan = _deploy(cluster, name, [0, 2, n], path, microbatch=mb)
        plan.model.generation_only = True
        with Client([], "tcp://127.0.0.1:0", run="", window=4, microbatch=mb, timeout=60) as c:
            plan.results = c.results_endpoint
            dep = deploy(plan, load_timeout=120)
            try:
                c.attach(dep.entry, dep.run)
                r = _ask(c, {"op": "step", "ids": [1], "pos": [0], "lens": [3], "max_len": [8]},
                         [np.array([[5, 6, 7]], np.int64)])
                assert r.kind == "result" and r.tensors[0].shape == (1, VOCAB)
                whole = wire.Message("act", c.run, c._seq, -1, list(models.random_inputs(name, 2, 0, **kw)),
                                     session=c.session)
                c._seq += 1
                c.send_frames(whole.seq, wire.encode(whole), time.time() + 60)
                got = _answer(c, whole.seq)
                assert got.kind == "error" and got.error["code"] == "gen_state", got.error
                assert "generation_only" in got.error["message"]
            finally:
                unload(plan)


def test_a_decode_profile_times_each_unit_on_one_token_per_sequence():
    from edgezmq.model.profiling import profile_units, spot_check

    kw = MODELS["tinyllama_1_1b"]
    p = profile_units("tinyllama_1_1b", microbatch=3, context=20, threads=1, reps=1, kwargs=kw)
    names = [u["name"] for u in p["units"]]
    assert names == ["embed", *(f"layer{i}" for i in range(kw["depth"])), "head"]
    assert p["phase"] == "decode" and p["context"] == 20 and p["chain"] is None
    width = 64 * 4
    assert [u["in_bytes"] for u in p["units"]] == [3 * 8] + [3 * width] * (kw["depth"] + 1)
    assert [u["out_bytes"] for u in p["units"]] == [3 * width] * (kw["depth"] + 1) + [3 * VOCAB * 4]
    # keys and values of 1 key-value head of 8 (8 heads / 8 = 1 group) x 8 wide, float32, per layer token
    assert [u["cache_bytes_per_token"] for u in p["units"]] == [0] + [2 * 1 * 8 * 4] * kw["depth"] + [0]
    assert all(u["time_s"] > 0 for u in p["units"])
    # at 'half' granularity the attention halves hold the caches, the MLP halves none
    h = profile_units("tinyllama_1_1b", granularity="half", microbatch=3, context=20, threads=1, reps=1, kwargs=kw)
    assert [u["name"] for u in h["units"]] == ["embed", *(f"layer{i}.{x}" for i in range(kw["depth"])
                                                          for x in ("attn", "ffn")), "head"]
    assert [u["cache_bytes_per_token"] for u in h["units"]] == [0] + [2 * 1 * 8 * 4, 0] * kw["depth"] + [0]
    assert sum(u["param_bytes"] for u in h["units"]) == sum(u["param_bytes"] for u in p["units"])
    # a spot check times the half profile's own slowest unit again (not the block chain's unit of that index)
    i = max(range(len(h["units"])), key=lambda j: h["units"][j]["time_s"])
    assert spot_check(h, kwargs=kw, reps=1)["units"] == [i, i + 1]
    with pytest.raises(models.ModelError, match="not a decoder"):
        profile_units("bert_tiny", microbatch=1, context=4)


@pytest.mark.slow
def test_autodeploy_plans_a_decoder_for_generation(node_pool):
    from edgezmq.orchestrate.autodeploy import Generation, autodeploy
    from edgezmq.orchestrate.inventory import parse_cluster

    name, kw = "gpt2", MODELS["gpt2"]
    path = models.cached_checkpoint(name, seed=0, **kw)
    spec = ModelSpec(name=name, microbatch=2, checkpoint=str(path), kwargs=kw)
    with node_pool.take(2) as local:
        cluster = parse_cluster({"nodes": [{"name": n.name, "control": n.control} for n in local.nodes],
                                 "links": {"default": {"mbps": 1000, "latency_ms": 0.2}}})
        said: list[str] = []
        with Client([], "tcp://127.0.0.1:0", run="", window=4, microbatch=2, timeout=60) as c:
            dep, plan, problem, planned, g = autodeploy(
                cluster, spec, results=c.results_endpoint, client=c, say=said.append,
                generation=Generation(context=40, sequences=6), reprofile=True)
            try:
                assert all(p["phase"] == "decode" and p["context"] == 40 for p in g.profiles.values())
                per_token = 2 * 64 * 4  # one GPT-2 layer's keys and values, 64 wide, float32
                assert [u.cache_bytes for u in problem.units] == [0] + [6 * 40 * per_token] * kw["depth"] + [0]
                # greedy (the default): the last link carries a token per row, not the logits (profiled)
                assert problem.units[-1].out_bytes == 2 * 8 and g.profiles and all(
                    p["units"][-1]["out_bytes"] == 2 * VOCAB * 4 for p in g.profiles.values())
                assert not problem.options.replication and all(len(s.devices) == 1 for s in planned.stages)
                assert [s.cache_bytes for s in plan.stages] == [
                    sum(u.cache_bytes for u in problem.units[s.units[0]:s.units[1]]) for s in plan.stages]
                assert any("calibration skipped" in m for m in said)
                c.attach(dep.entry, dep.run)
                chunk, positions, _ = decoder_limits(name, kw)
                gen = Generator(c, chunk=chunk, max_positions=positions, vocab_size=VOCAB)
                prompts = _prompts(3, seed=4)
                outs = gen.generate(prompts, 6)
            finally:
                unload(plan)
    for p, out in zip(prompts, outs):
        assert out == _reference(name, kw, path, p, 6)[0]


@pytest.mark.slow
def test_a_node_killed_mid_generation_loses_no_token(node_pool):
    """SIGKILL a stage's node while sequences are being generated: the pipeline is re-planned
    on the survivors, every live sequence is prefilled again with its tokens so far, and each
    sequence's stream has exactly the tokens of the model's own greedy generate."""
    from edgezmq.orchestrate.autodeploy import Generation
    from edgezmq.orchestrate.failover import ResilientPipeline
    from edgezmq.orchestrate.inventory import parse_cluster

    name, kw = "gpt2", MODELS["gpt2"]
    path = models.cached_checkpoint(name, seed=0, **kw)
    spec = ModelSpec(name=name, microbatch=2, checkpoint=str(path), kwargs=kw)
    prompts, new = _prompts(5, seed=6), 12
    with node_pool.take(3) as local:
        procs = {n.name: n.proc for n in local.nodes}
        cluster = parse_cluster({"nodes": [{"name": n.name, "control": n.control} for n in local.nodes],
                                 "links": {"default": {"mbps": 1000, "latency_ms": 0.2}}})
        with ResilientPipeline(cluster, spec, window=4, timeout=60, interval=0.3,
                               generation=Generation(context=40, sequences=5)) as rp:
            stages = rp.plan.stages
            assert len(stages) >= 2, "the test needs a pipeline of several stages"
            victim = stages[-1].nodes[0].name
            g = rp.generator()
            got: list[list[int]] = [[] for _ in prompts]
            for k, (i, tok) in enumerate(g.stream(prompts, new)):
                got[i].append(tok)
                if k == 12:  # some sequences are part way: kill the last stage's node
                    procs[victim].kill()
            assert victim in rp.dead and rp.failovers >= 1 and g.stats.restarted >= 1
            assert victim not in {ref.name for _, ref in rp.plan.all_nodes}
    for p, out in zip(prompts, got):
        assert out == _reference(name, kw, path, p, new)[0]
