"""Text encoders (BERT): unit chains equal the model's own forward; shards hold their own
tensors; inputs from token ids and text; a pipeline across processes; the demo."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

pytest.importorskip("transformers")

from helpers import free_port, run_cli_here  # noqa: E402

from edgezmq.client import Client, PipelineError, split  # noqa: E402
from edgezmq.model import chain as models  # noqa: E402
from edgezmq.model import text  # noqa: E402
from edgezmq.orchestrate.address import NodeAddress  # noqa: E402
from edgezmq.orchestrate.deploy import deploy, unload  # noqa: E402
from edgezmq.orchestrate.planfile import DeployPlan, ModelSpec, StagePlan  # noqa: E402
from edgezmq.protocol.model_kwargs import ModelKwargsError, check_model_kwargs  # noqa: E402

NAME = "bert_base_uncased"
# 2 layers of width 64 over a 1,000-token vocabulary: the architecture of BERT-base, shrunk
KW = {"depth": 2, "embed_dim": 64, "num_heads": 4, "mlp_ratio": 2.0, "seq_len": 16, "num_classes": 3,
      "vocab_size": 1000}
UNITS = {"block": 4, "half": 6, "sublayer": 10}


def _model():
    torch.manual_seed(0)
    return models.create_model(NAME, **KW)


def _inputs(n: int, seed: int = 0) -> list[torch.Tensor]:
    return [torch.from_numpy(a) for a in models.random_inputs(NAME, n, seed, **KW)]


def _reference(xs: list[torch.Tensor], path) -> torch.Tensor:
    from safetensors.torch import load_file

    m = models.create_model(NAME, **KW)
    m.load_state_dict(load_file(path))
    with torch.inference_mode():
        return models.reference_forward(m, *xs)


@pytest.mark.parametrize("granularity", list(UNITS))
def test_the_chain_equals_the_model_bit_for_bit(granularity):
    m = _model()
    xs = _inputs(4)
    assert int(xs[1].sum()) < xs[1].numel()  # some sequences are padded: the mask matters
    with torch.inference_mode():
        ref = models.reference_forward(m, *xs)
        (y,) = models.run_units(m, granularity, *xs)
        # a mask that differs changes the logits: the chain does use the one it carries
        (other,) = models.run_units(m, granularity, xs[0], torch.ones_like(xs[1]), xs[2])
    assert models.num_units(NAME, granularity, **KW) == UNITS[granularity]
    assert torch.equal(y, ref)
    assert not torch.equal(other, ref)


def test_units_own_every_tensor_once_and_cuts_carry_the_mask():
    infos = models.unit_infos(NAME, "sublayer", **KW)
    assert [u.name for u in infos[:5]] == ["embed", "layer0.attn.self", "layer0.attn.out", "layer0.ffn.inter",
                                           "layer0.ffn.out"]
    owned = [k for u in infos for k in u.param_names]
    assert len(owned) == len(set(owned)) == len(_model().state_dict())
    assert all(k.startswith("bert.embeddings.") for k in infos[0].param_names)
    assert set(infos[-1].param_names) == {"bert.pooler.dense.weight", "bert.pooler.dense.bias",
                                          "classifier.weight", "classifier.bias"}
    specs = models.boundary_specs(NAME, "sublayer", 2, **KW)
    assert specs[0] == [((2, 16), "int64")] * 3  # token ids, attention mask, token types
    for s in specs[1:-1]:
        assert s[-1] == ((2, 16), "int64")  # the mask crosses every cut
        assert 2 <= len(s) <= 3  # sublayers carry the residual beside the activation
    assert specs[2][:2] == [((2, 16, 64), "float32")] * 2
    assert specs[-1] == [((2, 3), "float32")]


def test_shards_hold_only_their_tensors_and_chain_exactly(tmp_path):
    path = models.write_checkpoint(NAME, tmp_path / "bert.safetensors", seed=1, **KW)
    xs = _inputs(2, seed=5)
    ref = _reference(xs, path)
    n = UNITS["half"]
    cuts = [0, 1, 4, n]
    shards = [models.build_shard(NAME, a, b, granularity="half", checkpoint=path, **KW) for a, b in zip(cuts, cuts[1:])]
    keys = [set(s.state_dict()) for s in shards]
    assert all(k.startswith("bert.embeddings.") for k in keys[0])
    assert all(k.startswith(("bert.encoder.layer.0.", "bert.encoder.layer.1.attention.")) for k in keys[1])
    assert not keys[0] & keys[1] and not keys[1] & keys[2]
    assert shards[0].arity_in == 3 and shards[1].arity_in == 2
    with torch.inference_mode():
        out = tuple(xs)
        for s in shards:
            out = s(*out)
    assert torch.equal(out[0], ref)


def test_architecture_arguments_are_checked_with_the_field_named():
    with pytest.raises(models.ModelError, match="seq_len 600 outside 1..512"):
        models.unit_infos(NAME, "block", seq_len=600)
    with pytest.raises(models.ModelError, match="'img_size' not an argument of a bert model"):
        models.unit_infos(NAME, "block", img_size=64)
    with pytest.raises(models.ModelError, match="embed_dim must be one integer"):
        models.unit_infos(NAME, "block", embed_dim=[64, 128])
    with pytest.raises(models.ModelError, match="not a multiple of num_heads"):
        models.unit_infos(NAME, "block", embed_dim=64, num_heads=5)
    with pytest.raises(models.ModelError, match="granularity 'fine'"):
        models.unit_infos(NAME, "fine", **KW)
    with pytest.raises(ModelKwargsError, match=r"kwargs.seq_len: 0 outside 1..8192"):
        check_model_kwargs({"seq_len": 0})
    with pytest.raises(ModelKwargsError, match=r"kwargs.vocab_size"):
        check_model_kwargs({"vocab_size": 10**9})
    assert check_model_kwargs(KW) == KW
    with pytest.raises(models.ModelError, match="did you mean bert_base_uncased"):
        models.create_model("bert_base_uncase")
    with pytest.raises(models.ModelError, match="takes 3 tensors"):
        models.input_shape(NAME, 2, **KW)


def test_token_ids_become_padded_inputs_and_bad_ids_are_refused():
    ids, mask, types = text.token_inputs(np.array([[101, 7, 102], [101, 102, 0]]), 5, 1000, "t.npy")
    assert ids.tolist() == [[101, 7, 102, 0, 0], [101, 102, 0, 0, 0]]
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0]]
    assert types.tolist() == [[0] * 5] * 2 and ids.dtype == mask.dtype == np.int64
    for bad, why in [(np.array([[1, 1000]]), "outside the vocabulary 0..999"),
                     (np.array([[-1, 3]]), "outside the vocabulary"),
                     (np.array([[1.0, 2.0]]), "expected integer token ids"),
                     (np.zeros((2, 6), np.int64), "6 tokens, the model takes at most 5"),
                     (np.zeros((2, 2, 2), np.int64), "shape")]:
        with pytest.raises(text.TextModelError, match=why) as e:
            text.token_inputs(bad, 5, 1000, "t.npy")
        assert str(e.value).startswith("t.npy: ")


VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "edge", "pipeline", "is", "fast", "slow", "##s"]


def test_text_is_tokenized_with_a_local_vocabulary(tmp_path):
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(VOCAB) + "\n")
    tok = text.load_tokenizer(NAME, str(vocab))
    ids, mask, types = text.encode_texts(["the edge pipeline is fast", "Edges"], tok, 8, 1000, "in.txt")
    assert ids.tolist()[0] == [2, 5, 6, 7, 8, 9, 3, 0]  # [CLS] the edge pipeline is fast [SEP] [PAD]
    assert ids.tolist()[1][:4] == [2, 6, 11, 3]  # lower-cased, WordPiece "edge ##s"
    assert mask.tolist()[1] == [1, 1, 1, 1, 0, 0, 0, 0] and not types.any()
    with pytest.raises(text.TextModelError, match="beyond the model's vocabulary of 5"):
        text.encode_texts(["fast"], tok, 8, 5, "in.txt")
    with pytest.raises(text.TextModelError, match="no tokenizer for bert_base_uncased in"):
        text.load_tokenizer(NAME, str(tmp_path / "no-such-dir"))




@pytest.mark.slow
def test_a_bert_pipeline_on_three_nodes_equals_the_model(node_pool, tmp_path, capsys):
    # sublayer cuts: three tensors (activation, residual, mask) cross between processes
    path = str(models.cached_checkpoint(NAME, seed=0, **KW))
    spec = ModelSpec(name=NAME, microbatch=2, granularity="sublayer", checkpoint=path, kwargs=KW)
    specs = models.boundary_specs(NAME, "sublayer", 2, **KW)
    cuts = [0, 2, 6, UNITS["sublayer"]]
    assert len(specs[2]) == 3 and len(specs[6]) == 3
    xs = split(models.random_inputs(NAME, 7, 4, **KW), 2)  # 2 + 2 + 2 + 1
    with node_pool.take(3) as cluster:
        plan = DeployPlan(model=spec, results="tcp://127.0.0.1:0", stages=[
            StagePlan(units=r, nodes=[NodeAddress(nd.name, nd.control, 1)])
            for r, nd in zip(zip(cuts, cuts[1:]), cluster.nodes)])
        with Client([], "tcp://127.0.0.1:0", run="", window=4, microbatch=2, timeout=60) as c:
            plan.results = c.results_endpoint
            dep = deploy(plan, load_timeout=120)
            try:
                c.attach(dep.entry, dep.run)
                outs = list(c.stream(xs))
                # a peer's token id beyond the vocabulary: an error for that microbatch, and
                # the stage serves the next one
                bad = (np.full((2, 16), 1000, np.int64), np.ones((2, 16), np.int64), np.zeros((2, 16), np.int64))
                with pytest.raises(PipelineError, match="compute_failed") as e:
                    c.infer(bad)
                assert e.value.stage == 0
                again = c.infer(xs[0])

                # the CLI (in this process: run_cli_here): token ids and text, with the same deployment
                pf = tmp_path / "plan.yaml"
                plan_dict = {"model": {"name": NAME, "checkpoint": path, "microbatch": 2, "granularity": "sublayer",
                                       "kwargs": KW},
                             "nodes": {nd.name: nd.control for nd in cluster.nodes},
                             "stages": [{"units": list(r), "nodes": [nd.name]}
                                        for r, nd in zip(zip(cuts, cuts[1:]), cluster.nodes)],
                             "results": f"tcp://127.0.0.1:{free_port()}"}
                pf.write_text(yaml.safe_dump(plan_dict))
                c.close()  # the CLI's client binds its own results endpoint: redeploy for it
                unload(plan)
                r = run_cli_here(capsys, "deploy", str(pf))
                assert r.returncode == 0, r.stderr
                ids = np.array([[101, 2000, 3000, 102], [101, 999, 102, 0], [101, 5, 6, 102]])
                np.save(tmp_path / "ids.npy", ids)
                r = run_cli_here(capsys, "submit", str(pf), "--tokens", str(tmp_path / "ids.npy"), "--out", str(tmp_path / "o.npy"), "-q")
                assert r.returncode == 2 and "--tokens" in r.stderr and "outside the vocabulary 0..999" in r.stderr
                assert "Traceback" not in r.stderr
                np.save(tmp_path / "ids.npy", ids % 1000)
                r = run_cli_here(capsys, "submit", str(pf), "--tokens", str(tmp_path / "ids.npy"), "--out", str(tmp_path / "o.npy"), "-q")
                assert r.returncode == 0, r.stderr
                vocab = tmp_path / "vocab.txt"
                vocab.write_text("\n".join(VOCAB) + "\n")
                lines = tmp_path / "in.txt"
                lines.write_text("the edge pipeline is fast\n\nthe pipeline is slow\n")
                r = run_cli_here(capsys, "submit", str(pf), "--text", str(lines), "--tokenizer", str(vocab),
                                 "--out", str(tmp_path / "t.npy"), "-q")
                assert r.returncode == 0, r.stderr
                assert "the pipeline is slow:" in r.stdout
                r = run_cli_here(capsys, "submit", str(pf), "--npy", str(tmp_path / "ids.npy"), "--out", str(tmp_path / "x.npy"))
                assert r.returncode != 0 and "is a text model" in r.stderr
            finally:
                run_cli_here(capsys, "undeploy", str(pf)) if (tmp_path / "plan.yaml").exists() else None
                unload(plan)
    ref = [_reference([torch.from_numpy(a) for a in x], path).numpy() for x in xs]
    assert len(outs) == 4 and all(np.array_equal(a, b) for a, b in zip(outs, ref))
    assert np.array_equal(again, ref[0])
    # per microbatch of 2, as the pipeline ran them (a batch's size changes the kernels' rounding)
    tok_ref = np.concatenate([_reference([torch.from_numpy(a) for a in mb], path).numpy()
                              for mb in split(tuple(text.token_inputs(ids % 1000, 16, 1000, "")), 2)])
    assert np.array_equal(np.load(tmp_path / "o.npy"), tok_ref)
    tok = text.load_tokenizer(NAME, str(vocab))
    enc = text.encode_texts(["the edge pipeline is fast", "the pipeline is slow"], tok, 16, 1000, "")
    assert np.array_equal(np.load(tmp_path / "t.npy"), _reference([torch.from_numpy(a) for a in enc], path).numpy())


@pytest.mark.slow
def test_the_demo_of_bert_profiles_plans_and_equals_the_model(capsys):
    # in this process (run_cli_here): tests/test_pipeline.py::test_demo_json runs `python -m edgezmq demo`
    r = run_cli_here(capsys, "demo", "--model", "bert_tiny", "--nodes", "2", "--batches", "2", "--microbatch", "2",
                     "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["max_abs_diff"] == 0.0 and d["split"] == "planner" and d["predicted_samples_per_s"] > 0
    assert d["stages"][0]["units"][0] == 0 and d["stages"][-1]["units"][1] == models.num_units("bert_tiny")


# ---------------------------------------------------------------- decoder-only language models

DECODERS = {"gpt2": {"depth": 2, "embed_dim": 64, "num_heads": 4, "seq_len": 12, "vocab_size": 300},
            "tinyllama_1_1b": {"depth": 2, "embed_dim": 64, "num_heads": 8, "mlp_ratio": 2.0, "seq_len": 12,
                               "vocab_size": 300},
            "llama_3_2_1b": {"depth": 3, "embed_dim": 64, "num_heads": 4, "seq_len": 12, "vocab_size": 300},
            "qwen2_5_0_5b": {"depth": 2, "embed_dim": 64, "num_heads": 4, "seq_len": 12, "vocab_size": 300},
            "mistral_7b_v0_1": {"depth": 2, "embed_dim": 64, "num_heads": 8, "seq_len": 12, "vocab_size": 300}}


@pytest.mark.parametrize("granularity", ["block", "half"])
@pytest.mark.parametrize("name", list(DECODERS))
def test_a_decoder_chain_equals_the_model_over_whole_sequences(name, granularity, tmp_path):
    """At 'half' granularity each layer is two units (attention, MLP), a cut can fall between them."""
    kw = DECODERS[name]
    torch.manual_seed(0)
    m = models.create_model(name, **kw)
    xs = [torch.from_numpy(a) for a in models.random_inputs(name, 3, 1, **kw)]
    assert len(xs) == 2 and int(xs[1].sum()) < xs[1].numel()
    with torch.inference_mode():
        ref = models.reference_forward(m, *xs)
        (y,) = models.run_units(m, granularity, *xs)
    assert ref.shape == (3, 12, 300) and torch.equal(y, ref)
    infos = models.unit_infos(name, granularity, **kw)
    layers = [[f"layer{i}"] if granularity == "block" else [f"layer{i}.attn", f"layer{i}.ffn"] for i in range(kw["depth"])]
    assert [u.name for u in infos] == ["embed", *(u for x in layers for u in x), "head"]
    # shards from a checkpoint (a tied head is written under both names) chain to the same logits
    path = models.write_checkpoint(name, tmp_path / "m.safetensors", seed=0, **kw)
    shards = [models.build_shard(name, a, b, granularity=granularity, checkpoint=path, **kw)
              for a, b in [(0, 2), (2, len(infos))]]
    assert not set(shards[0].state_dict()) & set(shards[1].state_dict())
    with torch.inference_mode():
        (z,) = shards[1](*shards[0](*xs))
    assert torch.equal(z, ref)
    if granularity == "half":  # shard 0: the embedding and layer 0's attention, not its MLP
        keys = list(shards[0].state_dict())
        assert any("attn" in k for k in keys) and not any("mlp" in k for k in keys)
    with pytest.raises(models.ModelError, match="granularity 'block'.*or 'half'"):
        models.unit_infos(name, "sublayer", **kw)
