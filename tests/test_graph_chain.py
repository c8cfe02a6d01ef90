"""Tests for traced unit chains (edgezmq.model.graph via edgezmq.model.chain): any timm model,
cut from its graph, equals the model's own forward bit for bit; shards load only their tensors."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from edgezmq.model import chain as M
from edgezmq.model import graph as G
from edgezmq.terms import MAX_TENSORS

BATCH = 2
# The fixed set, shrunk where the claim does not depend on size (fewer or narrower
# blocks, smaller images); each keeps its family's block types and skip connections.
MODELS = {
    "resnet50": {"layers": (1, 1, 1, 1)},
    "convnext_tiny": {"depths": (1, 1, 2, 1), "dims": (16, 32, 64, 128)},
    "efficientnet_b0": {},
    "mobilenetv3_large_100": {},
    "regnety_016": {},
    "swin_tiny_patch4_window7_224": {"depths": (1, 1, 2, 1), "embed_dim": 32, "num_heads": (1, 2, 4, 8),
                                     "img_size": 112},
    "deit_base_distilled_patch16_224": {"depth": 2, "embed_dim": 64, "num_heads": 2, "img_size": 64},
    "mobilevit_xxs": {},  # hybrid: MobileNet blocks and transformer blocks
    "beit_base_patch16_224": {"depth": 2, "embed_dim": 64, "num_heads": 2, "img_size": 64},  # relative position bias
}


@pytest.fixture(scope="module", autouse=True)
def _threads():
    old = torch.get_num_threads()
    torch.set_num_threads(2)  # the same kernels, hence the same bits, on both sides
    yield
    torch.set_num_threads(old)


def seeded(name: str, kwargs: dict) -> tuple[torch.nn.Module, str]:
    path = M.cached_checkpoint(name, seed=0, **kwargs)
    model = M.create_model(name, **kwargs)
    model.load_state_dict(load_file(str(path)))
    return model, str(path)


def images(name: str, kwargs: dict) -> torch.Tensor:
    return torch.randn(M.input_shape(name, BATCH, **kwargs), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", list(MODELS))
def test_block_shards_from_checkpoint_equal_the_model(name):
    kwargs = MODELS[name]
    model, path = seeded(name, kwargs)
    infos = M.unit_infos(name, "block", **kwargs)
    n = len(infos)
    assert n >= 4
    specs = M.boundary_specs(name, "block", BATCH, **kwargs)
    x = images(name, kwargs)
    cuts = [0, max(1, n // 3), max(2, 2 * n // 3), n]
    xs: tuple[torch.Tensor, ...] = (x,)
    with torch.inference_mode():
        ref = model(x)
        for a, b in zip(cuts, cuts[1:]):
            shard = M.build_shard(name, a, b, granularity="block", checkpoint=path, **kwargs)
            # only its own tensors, under timm's names
            assert set(shard.state_dict()) == {k for u in infos[a:b] for k in u.param_names}
            assert shard.param_bytes() == sum(u.param_bytes for u in infos[a:b])
            xs = shard(*xs)
            assert [(tuple(t.shape), str(t.dtype).removeprefix("torch.")) for t in xs] == specs[b]
    assert torch.equal(xs[0], ref)
    # the units read every tensor the forward reads, each in exactly one unit (no tied weights here)
    owned = [k for u in infos for k in u.param_names]
    assert len(owned) == len(set(owned))


# fine: one model per kind of graph (the coverage bench, bench/model_coverage.py, runs them all)
@pytest.mark.parametrize("name", ["resnet50", "convnext_tiny", "swin_tiny_patch4_window7_224",
                                  "deit_base_distilled_patch16_224", "mobilevit_xxs", "beit_base_patch16_224"])
def test_fine_units_compose_to_the_model_exactly(name):
    kwargs = MODELS[name]
    model, _ = seeded(name, kwargs)
    x = images(name, kwargs)
    names = M.unit_names(model, "fine")
    assert len(names) > len(M.unit_names(model, "block"))
    widths = []
    with torch.inference_mode():
        ref = model(x)
        xs: tuple[torch.Tensor, ...] = (x,)
        for u in range(len(names)):
            xs = M.run_units(model, "fine", *xs, start=u, end=u + 1)
            widths.append(len(xs))
    assert torch.equal(xs[0], ref)
    assert max(widths) <= MAX_TENSORS and widths[-1] == 1


def test_fine_cut_inside_a_residual_block_carries_both_paths_across_shards():
    name, kwargs = "resnet50", MODELS["resnet50"]
    model, path = seeded(name, kwargs)
    specs = M.boundary_specs(name, "fine", BATCH, **kwargs)
    # the first cut where the shortcut and the main path are both live
    cut = next(i for i, s in enumerate(specs) if len(s) == 2)
    n = len(specs) - 1
    x = images(name, kwargs)
    with torch.inference_mode():
        mid = M.build_shard(name, 0, cut, granularity="fine", checkpoint=path, **kwargs)(x)
        assert len(mid) == 2
        out = M.build_shard(name, cut, n, granularity="fine", checkpoint=path, **kwargs)(*mid)
        assert torch.equal(out[0], model(x))


def test_block_units_follow_timm_layer_groups():
    names = [u.name for u in M.unit_infos("resnet50", "block", **MODELS["resnet50"])]
    assert names == ["stem", "layer1.0", "layer2.0", "layer3.0", "layer4.0", "head"]
    full = [u.name for u in M.unit_infos("resnet50", "block")]
    assert len(full) == 2 + 3 + 4 + 6 + 3
    swin = [u.name for u in M.unit_infos("swin_tiny_patch4_window7_224", "block")]
    assert swin[0] == "stem" and swin[-1] == "head" and "layers.2.blocks.5" in swin


def test_a_vit_keeps_its_hand_written_chain_and_has_a_traced_fine_one():
    kw = {"img_size": 32, "depth": 2}
    assert [u.name for u in M.unit_infos("vit_tiny_patch16_224", "block", **kw)] == ["embed", "blocks.0", "blocks.1", "head"]
    fine = M.unit_infos("vit_tiny_patch16_224", "fine", **kw)
    assert len(fine) > 2 + 4 * 2
    assert sum(u.param_bytes for u in fine) == sum(u.param_bytes for u in M.unit_infos("vit_tiny_patch16_224", "block", **kw))


def test_unit_infos_are_computed_on_meta():
    infos = M.unit_infos("convnext_large", "block")  # 198 M parameters: no weights allocated
    assert len(infos) >= 20
    assert sum(u.param_bytes for u in infos) == 4 * sum(p.numel() for p in M.create_model("convnext_large", device="meta").parameters())


def test_trace_errors_are_model_errors_naming_the_model():
    class Branchy(torch.nn.Module):
        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: fx cannot trace it
                return x
            return -x
    with pytest.raises(G.GraphError, match=r"branchy: torch.fx cannot trace its forward"):
        G.trace(Branchy(), (torch.zeros(1, device="meta"),), "branchy")

    class TwoInputs(torch.nn.Module):
        def forward(self, x, y):
            return x + y
    with pytest.raises(G.GraphError, match=r"two: its forward takes more than one required input \(x, y\)"):
        G.trace(TwoInputs(), (torch.zeros(1, device="meta"),), "two")


def test_unknown_graph_granularity_is_refused():
    with pytest.raises(M.ModelError, match=r"granularity 'sublayer' needs a timm VisionTransformer layout"):
        M.unit_infos("resnet50", "sublayer")


# ---------------------------------------------------------------- shapes crossing cuts

VIT, VIT_KW = "vit_tiny_patch16_224", {"img_size": 32, "depth": 2}


@pytest.mark.parametrize(("value", "kind"), [
    (7, "int"), (-3, "int"), (0.125, "float"), (True, "bool"), (torch.Size([2, 3]), "size"),
    ((4, 5, 6), "tuple"), ([1, 2], "list"), (None, "none")])
def test_python_values_cross_as_tensors_and_come_back_equal(value, kind):
    assert G._kind(value).kind == kind
    back = G.unpack(G.pack(value, kind), kind)
    assert back == value and type(back) is type(value)


def test_a_none_that_becomes_a_value_is_refused_not_passed_on():
    with pytest.raises(G.GraphError, match="was None when the model was traced is a Tensor"):
        G.pack(torch.ones(1), "none")


def test_values_that_cannot_cross_make_no_cut():
    assert G._kind("text").kind == G._kind((1, "a")).kind == G._kind(()).kind == G._kind([0.5]).kind == "other"


def test_shapes_live_across_a_cut_travel_with_it_and_shards_stay_exact():
    # timm's Attention takes B, N, C = x.shape before its qkv projection and reshapes with them
    # after it: a `fine` cut at qkv carries them, as int64 scalars beside the activations
    model, path = seeded(VIT, VIT_KW)
    specs = M.boundary_specs(VIT, "fine", BATCH, **VIT_KW)
    values = M.boundary_values(VIT, "fine", BATCH, **VIT_KW)
    names = [u.name for u in M.unit_infos(VIT, "fine", **VIT_KW)]
    cut = names.index("blocks.0.attn.qkv")
    assert set(values[cut]) == {j for j, (shape, dt) in enumerate(specs[cut]) if dt == "int64"}
    assert sorted(int(t) for t in values[cut].values()) == [BATCH, 5]  # B, N (4 patches + cls)
    x = images(VIT, VIT_KW)
    with torch.inference_mode():
        mid = M.build_shard(VIT, 0, cut, granularity="fine", checkpoint=path, **VIT_KW)(x)
        assert [int(mid[j]) for j in sorted(values[cut])] == [int(values[cut][j]) for j in sorted(values[cut])]
        out = M.build_shard(VIT, cut, len(specs) - 1, granularity="fine", checkpoint=path, **VIT_KW)(*mid)
        assert torch.equal(out[0], model(x))


def test_a_unit_entered_by_shapes_is_profiled_with_their_values(monkeypatch):
    from edgezmq.model import profiling
    from edgezmq.model.profiling import profile_units

    # the point is that every unit runs on the values that cross its cut, not how well it is
    # timed: rounds of 0.01 s instead of 0.2 (58 fine units: 13 s of rounds down to under 2)
    monkeypatch.setattr(profiling, "MIN_ROUND_S", 0.01)
    prof = profile_units(VIT, granularity="fine", microbatch=1, threads=1, reps=1, warmup=0, kwargs=VIT_KW)
    specs = M.boundary_specs(VIT, "fine", 1, **VIT_KW)
    entered = [i for i, s in enumerate(specs[:-1]) if any(dt == "int64" for _, dt in s)]
    assert entered and all(prof["units"][i]["time_s"] > 0 for i in entered)
