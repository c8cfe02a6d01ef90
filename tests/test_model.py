"""Tests for edgezmq.model.chain: unit chains equal timm's model, shards load only their own tensors."""

from __future__ import annotations

import json
import logging
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors import safe_open as real_safe_open
from safetensors.torch import load_file, save_file
from timm.layers import SwiGLU

from edgezmq.model import chain as M

THREADS = 2  # fixed: the same kernels, hence the same bits, on both sides of each comparison
TINY = "vit_tiny_patch16_224"
SMALL = {"img_size": 64, "depth": 2}  # 4x4 patches, two blocks: every unit kind, fast
CKPT_KW = {"img_size": 64, "depth": 4}
BATCH = 2
REPO = Path(__file__).resolve().parents[1]

# (model, kwargs): every supported variant the chain must reproduce bit for bit.
VARIANTS = {
    "cls-token": (TINY, SMALL),
    "deit-distilled": ("deit_tiny_distilled_patch16_224", SMALL),
    "avg-fcnorm-noembedclass-prenorm-layerscale-qknorm-reg": (TINY, {
        **SMALL, "class_token": False, "global_pool": "avg", "no_embed_class": True,
        "pre_norm": True, "init_values": 1e-5, "qk_norm": True, "reg_tokens": 2}),
    "reg-map-pool": (TINY, {**SMALL, "reg_tokens": 4, "global_pool": "map"}),
    "reg1-gap-named": ("vit_wee_patch16_reg1_gap_256", SMALL),
    "respostblock": ("vit_base_patch16_rpn_224", {"img_size": 32, "depth": 2}),
    "diff-attention": ("vit_dwee_patch16_reg1_gap_256", SMALL),
    "hybrid-embed": ("vit_tiny_r_s16_p8_224", SMALL),
    "swiglu": (TINY, {**SMALL, "mlp_layer": SwiGLU}),
    "glu-packed-dinov2": ("vit_giant_patch14_dinov2",
                          {"img_size": 28, "depth": 2, "embed_dim": 64, "num_heads": 2, "mlp_ratio": 4}),
    "vitamin-geglu": ("vitamin_small_224", SMALL),
}
# PipeEdge's published per-sample output floats of vit-base-patch16-224's four sublayers
# (plans/profiles/edge-board-profiles.json): (context, residual), x, (hidden, residual), x.
PIPEEDGE_SUBLAYER_OUT = (302592, 151296, 756480, 151296)


@pytest.fixture(autouse=True)
def _threads():
    before = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(before)


def images(name: str, kwargs: dict, batch: int = BATCH, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(M.input_shape(name, batch, **kwargs), generator=g)


def seeded_model(name: str, kwargs: dict, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return M.create_model(name, **kwargs)


def assert_same(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape and a.dtype == b.dtype
    assert torch.equal(a, b), f"max abs diff {(a - b).abs().max().item()}"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return M.write_checkpoint(TINY, tmp_path_factory.mktemp("ckpt") / "tiny.safetensors", seed=3, **CKPT_KW)


@pytest.fixture(scope="module")
def reference(ckpt) -> torch.nn.Module:
    model = M.create_model(TINY, **CKPT_KW)
    model.load_state_dict(load_file(ckpt))
    return model


# ---------------------------------------------------------------- the chain equals timm


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_units_compose_to_timm_model_exactly(variant):
    # Exact equality, not a tolerance: every unit calls the same timm modules on the same
    # shapes in the same order, so the kernels and the bits are the same as model(x).
    name, kwargs = VARIANTS[variant]
    model = seeded_model(name, kwargs)
    x = images(name, kwargs)
    with torch.inference_mode():
        ref = model(x)
        for g in M.GRANULARITIES:
            out = M.run_units(model, g, x)
            assert len(out) == 1, g
            assert_same(out[0], ref)


def test_unit_names_and_counts_per_granularity():
    depth = SMALL["depth"]
    names = {g: [u.name for u in M.unit_infos(TINY, g, **SMALL)] for g in M.HAND_GRANULARITIES}
    assert names["block"] == ["embed", "blocks.0", "blocks.1", "head"]
    assert names["half"] == ["embed", "blocks.0.attn", "blocks.0.mlp", "blocks.1.attn", "blocks.1.mlp", "head"]
    assert names["sublayer"][:5] == ["embed", "blocks.0.attn", "blocks.0.attn.proj", "blocks.0.mlp", "blocks.0.mlp.fc2"]
    assert [len(names[g]) for g in M.HAND_GRANULARITIES] == [2 + depth, 2 + 2 * depth, 2 + 4 * depth]
    assert M.num_units(TINY, "sublayer", **SMALL) == 2 + 4 * depth
    assert [u.index for u in M.unit_infos(TINY, "sublayer", **SMALL)] == list(range(2 + 4 * depth))


@pytest.mark.parametrize("granularity", M.GRANULARITIES)
def test_units_partition_the_state_dict(granularity):
    model = M.create_model(TINY, device="meta", **SMALL)
    sd = model.state_dict()
    infos = M.unit_infos(TINY, granularity, **SMALL)
    owned = [k for u in infos for k in u.param_names]
    assert sorted(owned) == sorted(sd)  # every tensor owned by exactly one unit
    for u in infos:
        assert u.param_bytes == sum(sd[k].numel() * sd[k].element_size() for k in u.param_names)
        # a traced (`fine`) chain has parameter-free units: activations, adds, pooling
        assert u.param_bytes > 0 or granularity not in M.HAND_GRANULARITIES, u.name


def test_sublayer_ownership_follows_the_cut():
    infos = {u.name: set(u.param_names) for u in M.unit_infos(TINY, "sublayer", **SMALL)}
    assert infos["blocks.0.attn"] == {"blocks.0.norm1.weight", "blocks.0.norm1.bias",
                                      "blocks.0.attn.qkv.weight", "blocks.0.attn.qkv.bias"}
    assert infos["blocks.0.attn.proj"] == {"blocks.0.attn.proj.weight", "blocks.0.attn.proj.bias"}
    assert infos["blocks.0.mlp.fc2"] == {"blocks.0.mlp.fc2.weight", "blocks.0.mlp.fc2.bias"}
    assert {"cls_token", "pos_embed", "patch_embed.proj.weight"} <= infos["embed"]
    assert infos["head"] == {"norm.weight", "norm.bias", "head.weight", "head.bias"}


def test_unit_infos_of_a_huge_model_allocate_nothing():
    infos = M.unit_infos("vit_huge_patch14_224", "sublayer")  # built on meta: no 2.5 GB of weights
    assert len(infos) == 2 + 4 * 32
    assert sum(u.param_bytes for u in infos) == 4 * sum(
        p.numel() for p in M.create_model("vit_huge_patch14_224", device="meta").parameters())


def test_unit_info_validates():
    assert M.UnitInfo(0, "embed", ["a"], 4).param_names == ("a",)
    with pytest.raises(M.ModelError, match="index"):
        M.UnitInfo(-1, "embed", (), 0)
    with pytest.raises(M.ModelError, match="param_bytes"):
        M.UnitInfo(0, "embed", (), -4)


# ---------------------------------------------------------------- boundaries


@pytest.mark.parametrize("variant", ["cls-token", "deit-distilled", "reg-map-pool", "hybrid-embed"])
def test_boundary_specs_match_what_units_produce(variant):
    name, kwargs = VARIANTS[variant]
    model = seeded_model(name, kwargs)
    for g in M.GRANULARITIES:
        specs = M.boundary_specs(name, g, BATCH, **kwargs)
        assert len(specs) == M.num_units(name, g, **kwargs) + 1
        xs = (images(name, kwargs),)
        assert specs[0] == [(M.input_shape(name, BATCH, **kwargs), "float32")]
        with torch.inference_mode():
            for i in range(len(specs) - 1):
                # shapes crossing a traced (`fine`) cut go as int64 tensors
                assert specs[i] == [(tuple(x.shape), str(x.dtype).removeprefix("torch.")) for x in xs], (g, i)
                xs = M.run_units(model, g, *xs, start=i, end=i + 1)
        assert specs[-1] == [(tuple(x.shape), "float32") for x in xs]


def test_sublayer_cuts_carry_two_tensors_like_pipeedge():
    specs = M.boundary_specs("vit_base_patch16_224", "sublayer", 1)
    per_sample = [sum(math.prod(shape) for shape, _ in entry) for entry in specs]
    assert per_sample[0] == 3 * 224 * 224
    assert tuple(per_sample[2:6]) == PIPEEDGE_SUBLAYER_OUT  # leaving the 4 sublayers of block 0
    assert [len(e) for e in specs[1:6]] == [1, 2, 1, 2, 1]
    assert specs[-1] == [((1, 1000), "float32")]
    assert M.boundary_specs(TINY, "block", 1, dtype=torch.bfloat16, **SMALL)[1] == [((1, 17, 192), "bfloat16")]


def test_input_shape_follows_config():
    assert M.input_shape(TINY, 8) == (8, 3, 224, 224)
    assert M.input_shape(TINY, 1, img_size=96, in_chans=1) == (1, 1, 96, 96)
    with pytest.raises(M.ModelError, match="microbatch"):
        M.input_shape(TINY, 0)


# ---------------------------------------------------------------- shards


def _cuts(n: int, granularity: str) -> list[tuple[int, int]]:
    # For 'sublayer', a = 2 and b = 12 fall inside blocks: two tensors cross both cuts.
    a, b = (2, 12) if granularity == "sublayer" else (max(1, n // 3), max(2, 2 * n // 3))
    return [(0, a), (a, b), (b, n)]


@pytest.mark.parametrize("granularity", M.GRANULARITIES)
def test_chained_shards_from_checkpoint_equal_monolithic(ckpt, reference, granularity):
    n = M.num_units(TINY, granularity, **CKPT_KW)
    x = images(TINY, CKPT_KW)
    specs = M.boundary_specs(TINY, granularity, BATCH, **CKPT_KW)
    xs: tuple[torch.Tensor, ...] = (x,)
    with torch.inference_mode():
        for a, b in _cuts(n, granularity):
            shard = M.build_shard(TINY, a, b, granularity=granularity, checkpoint=ckpt, **CKPT_KW)
            assert (shard.start, shard.end, len(shard.units)) == (a, b, b - a)
            xs = shard(*xs)
            assert isinstance(xs, tuple)
            assert [(tuple(t.shape), str(t.dtype).removeprefix("torch.")) for t in xs] == specs[b]
        assert_same(xs[0], reference(x))
    if granularity == "sublayer":
        assert [len(specs[a]) for a, _ in _cuts(n, granularity)[1:]] == [2, 2]


def test_mmap_shard_is_zero_copy_and_equal(ckpt):
    x = torch.randn(BATCH, 17, 192)
    owned = M.build_shard(TINY, 1, 4, checkpoint=ckpt, **CKPT_KW)
    mapped = M.build_shard(TINY, 1, 4, checkpoint=ckpt, mmap=True, **CKPT_KW)
    with torch.inference_mode():
        assert_same(mapped(x)[0], owned(x)[0])
    if Path("/proc/self/maps").exists():  # Linux: see which memory each tensor lives in
        key = "blocks.0.attn.qkv.weight"
        assert file_mapping_of(mapped.state_dict()[key]) == str(ckpt)
        assert file_mapping_of(owned.state_dict()[key]) != str(ckpt)


def file_mapping_of(t: torch.Tensor) -> str:
    """The file a tensor's memory maps ('' for anonymous memory)."""
    ptr = t.data_ptr()
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        lo, hi = (int(v, 16) for v in fields[0].split("-"))
        if lo <= ptr < hi:
            return fields[5].strip() if len(fields) == 6 else ""
    return ""


class SpyOpen:
    """safe_open that records every tensor a shard reads."""

    def __init__(self):
        self.read: list[str] = []

    def __call__(self, *args, **kwargs):
        spy = self

        class Handle:
            def __enter__(self):
                self.f = real_safe_open(*args, **kwargs).__enter__()
                return self

            def __exit__(self, *exc):
                return self.f.__exit__(*exc)

            def keys(self):
                return self.f.keys()

            def get_tensor(self, key):
                spy.read.append(key)
                return self.f.get_tensor(key)

        return Handle()


@pytest.mark.parametrize(("granularity", "start", "end"), [
    ("block", 0, 1), ("block", 2, 4), ("block", 5, 6), ("half", 3, 7), ("sublayer", 2, 5), ("sublayer", 17, 18)])
def test_shard_reads_only_its_own_tensors(ckpt, monkeypatch, granularity, start, end):
    spy = SpyOpen()
    monkeypatch.setattr(M, "safe_open", spy)
    shard = M.build_shard(TINY, start, end, granularity=granularity, checkpoint=ckpt, **CKPT_KW)
    own = [k for u in M.unit_infos(TINY, granularity, **CKPT_KW)[start:end] for k in u.param_names]
    assert sorted(spy.read) == sorted(own)  # each once, nothing else
    assert sorted(shard.state_dict()) == sorted(own)
    with safe_open_all(ckpt) as f:
        for k, t in shard.state_dict().items():
            assert torch.equal(t, f.get_tensor(k)), k


def safe_open_all(path):
    return real_safe_open(str(path), framework="pt", device="cpu")


def test_shard_param_bytes_follow_units_and_grow_with_range():
    # two blocks have every unit kind; each prefix builds a shard, so the cost is quadratic in depth
    for g in M.GRANULARITIES:
        infos = M.unit_infos(TINY, g, **SMALL)
        sizes = []
        for end in range(1, len(infos) + 1):
            shard = M.build_shard(TINY, 0, end, granularity=g, **SMALL)  # placeholder weights
            assert shard.param_bytes() == sum(u.param_bytes for u in infos[:end])
            sizes.append(shard.param_bytes())
        if g in M.HAND_GRANULARITIES:
            assert sizes == sorted(set(sizes)), g  # strictly increasing
        else:  # parameter-free units add nothing
            assert sizes == sorted(sizes) and sizes[-1] > sizes[0], g
    half = M.build_shard(TINY, 1, 3, dtype=torch.bfloat16, **SMALL)
    assert half.param_bytes() * 2 == sum(u.param_bytes for u in M.unit_infos(TINY, **SMALL)[1:3])
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in half.parameters())


def test_shard_without_weights_is_a_deterministic_placeholder():
    a = M.build_shard(TINY, 1, 2, granularity="sublayer", **SMALL)
    b = M.build_shard(TINY, 1, 2, granularity="sublayer", **SMALL)
    assert a.state_dict().keys() == b.state_dict().keys()
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    (ctx, res) = a(torch.randn(1, 17, 192))
    assert ctx.shape == res.shape == (1, 17, 192) and torch.isfinite(ctx).all()


def test_shard_checks_its_input_arity_and_stays_in_eval():
    shard = M.build_shard(TINY, 2, 3, granularity="sublayer", **SMALL)  # the attn.proj unit: (ctx, x)
    with pytest.raises(M.ModelError, match="takes 2 tensor"):
        shard(torch.zeros(1, 17, 192))
    assert not shard.training
    shard.train()
    assert all(m.training for m in shard._extra)
    shard.eval()
    assert not any(m.training for m in shard._extra)


RSS_SCRIPT = """
import json, sys
import torch
from edgezmq.model import chain as M

def status(field):  # bytes, from /proc/self/status
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024

name, ckpt, a, b = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(1)
M.build_shard(name, 0, 1, checkpoint=ckpt)  # warm-up: first-use allocations and code paths
try:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) so it measures this build alone
except OSError as e:
    print(json.dumps({"skip": f"cannot reset peak RSS: {e}"}))
    sys.exit(0)
before = status("VmRSS")
shard = M.build_shard(name, a, b, checkpoint=ckpt)
print(json.dumps({"peak": status("VmHWM") - before, "held": status("VmRSS") - before,
                  "bytes": shard.param_bytes()}))
"""
MID = "vit_small_patch16_224"  # 88 MB, 12 blocks of 7 MB: big enough to see, quick to write
RSS_SLACK = 16 * 2**20  # allocator and interpreter noise


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_peak_memory_grows_with_the_shard_not_the_model():
    ckpt = M.cached_checkpoint(MID)
    total = sum(u.param_bytes for u in M.unit_infos(MID))

    def start(a: int, b: int) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-c", RSS_SCRIPT, MID, str(ckpt), str(a), str(b)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)

    def result(p: subprocess.Popen) -> dict:
        try:
            out, err = p.communicate(timeout=120)
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
        assert p.returncode == 0, err
        res = json.loads(out.strip().splitlines()[-1])
        if "skip" in res:
            pytest.skip(res["skip"])
        return res

    # both at once (each process measures only its own memory): their imports overlap
    procs = start(1, 2), start(1, 11)  # one block vs ten blocks
    small, large = (result(p) for p in procs)
    assert large["bytes"] > 9 * small["bytes"]
    # Held memory is the shard; the peak adds the file pages mapped while reading (~2x).
    for r in (small, large):
        assert r["held"] < 1.5 * r["bytes"] + RSS_SLACK, r
        assert r["peak"] < 3 * r["bytes"] + RSS_SLACK, r
    assert large["held"] > 0.5 * large["bytes"], large
    extra_bytes = large["bytes"] - small["bytes"]
    assert 0.5 * extra_bytes < large["peak"] - small["peak"] < 3 * extra_bytes, (small, large)
    assert small["peak"] < 0.5 * total, (small, total)  # one block never costs the whole model


# ---------------------------------------------------------------- weights


def test_pretrained_path_slices_timm_weights(monkeypatch):
    real = timm.create_model
    calls = []

    def fake(name, pretrained=False, **kwargs):
        calls.append(pretrained)
        if pretrained:
            torch.manual_seed(7)
        return real(name, pretrained=False, **kwargs)

    monkeypatch.setattr(timm, "create_model", fake)
    shard = M.build_shard(TINY, 1, 3, pretrained=True, **SMALL)
    assert True in calls
    model = seeded_model(TINY, SMALL, seed=7)
    x = torch.randn(1, 17, 192)
    with torch.inference_mode():
        assert_same(shard(x)[0], M.run_units(model, "block", x, start=1, end=3)[0])


def test_pretrained_offline_is_a_clear_error(monkeypatch):
    real = timm.create_model

    def offline(name, pretrained=False, **kwargs):
        if pretrained:
            raise OSError("could not reach huggingface.co")
        return real(name, pretrained=False, **kwargs)

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(M.ModelError, match="pretrained weights for vit_tiny.*could not reach"):
        M.build_shard(TINY, 0, 1, pretrained=True, **SMALL)
    with pytest.raises(M.ModelError, match="not both"):
        M.build_shard(TINY, 0, 1, pretrained=True, checkpoint="x.safetensors", **SMALL)


def test_write_checkpoint_is_seeded_atomic_and_leaves_global_rng(tmp_path):
    state = torch.random.get_rng_state()
    a = M.write_checkpoint(TINY, tmp_path / "a.safetensors", seed=1, **SMALL)
    assert torch.equal(state, torch.random.get_rng_state())
    b = M.write_checkpoint(TINY, tmp_path / "b.safetensors", seed=1, **SMALL)
    c = M.write_checkpoint(TINY, tmp_path / "c.safetensors", seed=2, **SMALL)
    ta, tb, tc = load_file(a), load_file(b), load_file(c)
    assert ta.keys() == seeded_model(TINY, SMALL).state_dict().keys()
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
    assert not torch.equal(ta["blocks.0.attn.qkv.weight"], tc["blocks.0.attn.qkv.weight"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "b.safetensors", "c.safetensors"]
    assert a.stat().st_mode & 0o777 == M.CHECKPOINT_MODE
    with real_safe_open(str(a), framework="pt") as f:
        assert f.metadata()["model"] == TINY and f.metadata()["seed"] == "1"


def test_cached_checkpoint_is_written_once_per_kwargs_and_seed(tmp_path, monkeypatch):
    p = M.cached_checkpoint(TINY, seed=0, cache_dir=tmp_path, **SMALL)
    assert p.parent == tmp_path / "checkpoints"
    assert re.fullmatch(rf"{TINY}-[0-9a-f]{{{M.KWARGS_HASH_CHARS}}}-seed0\.safetensors", p.name)
    q = M.cached_checkpoint(TINY, seed=1, cache_dir=tmp_path, **SMALL)
    r = M.cached_checkpoint(TINY, seed=0, cache_dir=tmp_path, **{**SMALL, "depth": 1})
    assert len({p, q, r}) == 3
    monkeypatch.setattr(M, "write_checkpoint", lambda *a, **k: pytest.fail("rewritten"))
    assert M.cached_checkpoint(TINY, seed=0, cache_dir=tmp_path, **SMALL) == p
    monkeypatch.setenv(M.CACHE_ENV, str(tmp_path))
    assert M.cached_checkpoint(TINY, seed=0, **SMALL) == p  # the env var names the same root


# ---------------------------------------------------------------- errors


def test_unknown_model_suggests_names():
    with pytest.raises(M.ModelError, match=r"unknown model 'vit_tinyy'.*vit_tiny_patch16_224"):
        M.unit_infos("vit_tinyy")


@pytest.mark.parametrize("name", ["resnet50", "eva02_tiny_patch14_224"])
@pytest.mark.parametrize("granularity", ["half", "sublayer"])
def test_vit_granularities_are_refused_for_other_layouts(name, granularity):
    match = rf"\({type(M.create_model(name, device='meta')).__name__}\) is cut from its traced graph: granularity '{granularity}' needs a timm VisionTransformer layout"
    with pytest.raises(M.ModelError, match=match):
        M.unit_infos(name, granularity)
    with pytest.raises(M.ModelError, match=match):
        M.build_shard(name, 0, 1, granularity=granularity)


@pytest.mark.parametrize("name", ["vit_small_patch16_18x2_224", "vit_pwee_patch16_reg1_gap_256"])
def test_parallel_blocks_split_only_at_block_granularity(name):
    kwargs = {"img_size": 32, "depth": 1}
    for g in ("half", "sublayer"):
        with pytest.raises(M.ModelError, match=r"blocks\.0 is a Parallel\w+Block.*use 'block'"):
            M.unit_infos(name, g, **kwargs)
    model = seeded_model(name, kwargs)
    x = images(name, kwargs)
    with torch.inference_mode():
        assert_same(M.run_units(model, "block", x)[0], model(x))


@pytest.mark.parametrize(("start", "end", "match"), [
    (3, 40, r"unit range \[3, 40\) out of bounds for vit_tiny_patch16_224 at block granularity \(6 units\)"),
    (4, 4, r"unit range \[4, 4\) empty .*\(6 units\)"),
    (4, 2, r"unit range \[4, 2\) empty"),
    (-1, 2, r"unit range \[-1, 2\) out of bounds"),
    (0, 7, r"out of bounds .*expected 0 <= start < end <= 6"),
])
def test_bad_unit_ranges(start, end, match):
    with pytest.raises(M.ModelError, match=match):
        M.build_shard(TINY, start, end, **CKPT_KW)


def test_unknown_granularity():
    with pytest.raises(M.ModelError, match=r"unknown granularity 'layer'.*'block', 'half', 'sublayer'"):
        M.unit_infos(TINY, "layer")


def test_checkpoint_file_missing(tmp_path):
    with pytest.raises(M.ModelError, match=r"checkpoint file '.*nope\.safetensors' not found"):
        M.build_shard(TINY, 0, 1, checkpoint=tmp_path / "nope.safetensors", **CKPT_KW)
    bad = tmp_path / "garbage.safetensors"
    bad.write_bytes(b"not a safetensors file at all")
    with pytest.raises(M.ModelError, match="not a readable safetensors file"):
        M.build_shard(TINY, 0, 1, checkpoint=bad, **CKPT_KW)


def test_checkpoint_missing_a_tensor(ckpt, tmp_path):
    tensors = load_file(ckpt)
    del tensors["blocks.1.mlp.fc1.weight"]
    path = tmp_path / "partial.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(M.ModelError, match=r"lacks 1 tensor\(s\) this shard of vit_tiny\w+ needs: blocks\.1\.mlp\.fc1\.weight"):
        M.build_shard(TINY, 1, 3, checkpoint=path, **CKPT_KW)
    M.build_shard(TINY, 3, 6, checkpoint=path, **CKPT_KW)  # a shard that does not need it loads


def test_checkpoint_wrong_shaped_tensor(ckpt, tmp_path):
    tensors = load_file(ckpt)
    tensors["blocks.0.attn.proj.weight"] = torch.zeros(192, 191)
    path = tmp_path / "reshaped.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(M.ModelError, match=r"'blocks\.0\.attn\.proj\.weight' has shape \(192, 191\), expected \(192, 192\)"):
        M.build_shard(TINY, 2, 3, granularity="sublayer", checkpoint=path, **CKPT_KW)


def test_checkpoint_of_another_config_is_refused(ckpt):
    with pytest.raises(M.ModelError, match=r"'pos_embed' has shape \(1, 17, 192\), expected \(1, 197, 192\)"):
        M.build_shard(TINY, 0, 1, checkpoint=ckpt)  # 224 px model, 64 px checkpoint


def test_non_persistent_buffers_are_rebuilt():
    class Rope(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("freq", torch.empty(4), persistent=False)

        def init_non_persistent_buffers(self):
            self.freq.copy_(torch.arange(4.0))

    class Bare(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("table", torch.empty(3), persistent=False)

    with torch.device("meta"):
        rope, bare = Rope(), Bare()
    M._materialise_non_persistent(rope, "toy")
    assert torch.equal(rope.freq, torch.arange(4.0))
    with pytest.raises(M.ModelError, match=r"computed buffers \['table'\] and no init_non_persistent_buffers"):
        M._materialise_non_persistent(bare, "toy")


def test_timm_vit_family_has_no_non_persistent_buffers_today():
    # Shards rely on this (or on init_non_persistent_buffers): re-check on timm upgrades.
    for name in (TINY, "deit_tiny_distilled_patch16_224", "vit_wee_patch16_reg1_gap_256"):
        model = M.create_model(name, device="meta", **SMALL)
        assert {k for k, _ in model.named_buffers()} <= set(model.state_dict()), name


@pytest.mark.parametrize("damage", ["truncate", "other_model"])
def test_cached_checkpoint_that_is_damaged_is_written_again(tmp_path, damage, caplog):
    from safetensors.torch import load_file

    p = M.cached_checkpoint(TINY, seed=0, cache_dir=tmp_path, **SMALL)
    weights = {k: t.clone() for k, t in load_file(p).items()}  # not views of a file we damage
    if damage == "truncate":
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    else:  # a checkpoint of other kwargs under this name (a renamed file)
        p.write_bytes(M.cached_checkpoint(TINY, seed=0, cache_dir=tmp_path, **{**SMALL, "depth": 1}).read_bytes())
    with caplog.at_level(logging.WARNING, logger="edgezmq.model.chain"):
        assert M.cached_checkpoint(TINY, seed=0, cache_dir=tmp_path, **SMALL) == p
    assert "writing it again" in caplog.text
    again = {k: t.clone() for k, t in load_file(p).items()}  # seeded: the same weights again
    assert again.keys() == weights.keys() and all(torch.equal(again[k], weights[k]) for k in weights)
