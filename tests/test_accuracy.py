"""Tests for edgezmq.model.accuracy: the identity transform at any cut is the model bit for
bit; a transform sees each tensor of a cut with its index; the error measures are right."""

from __future__ import annotations

import pytest
import torch

from edgezmq.model import accuracy as A
from edgezmq.model import chain, task
from edgezmq.terms import GRANULARITIES

THREADS = 2  # fixed: the same kernels, hence the same bits, on both sides of each comparison
TINY = "vit_tiny_patch16_224"
SMALL = {"img_size": 32, "patch_size": 8, "depth": 2, "num_classes": 10}
SAMPLES = 6
MICROBATCH = 4  # two microbatches, the last one short


@pytest.fixture(autouse=True)
def _threads():
    before = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return chain.create_model(TINY, **SMALL)


@pytest.fixture(scope="module")
def images():
    return torch.randn(SAMPLES, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def fake_int(bits: int):
    """Symmetric integer fake-quantizer with one max-abs scale per token (last dim)."""
    qmax = 2 ** (bits - 1) - 1

    def transform(t: torch.Tensor, index: int) -> torch.Tensor:
        scale = t.abs().amax(-1, keepdim=True).clamp_min(1e-12) / qmax
        return (t / scale).round().clamp(-qmax, qmax) * scale

    return transform


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_identity_at_every_cut_is_the_model_bit_for_bit(model, images, granularity):
    exact = A.model_logits(model, images, MICROBATCH)
    with torch.no_grad():
        assert torch.equal(exact[:MICROBATCH], model(images[:MICROBATCH]))  # the model's own forward
    n = len(chain.unit_names(model, granularity))
    sweep = A.CutSweep(model, granularity, images, MICROBATCH)
    assert sweep.num_units == n and sweep.chain_exact and torch.equal(sweep.reference, exact)
    for cut in range(n + 1):  # the image (0), every link between units, the logits (n)
        assert torch.equal(sweep.logits(cut), exact), cut
    for cut in (0, 1, n - 1, n):  # the one-off path runs the whole chain per cut: the ends suffice
        assert torch.equal(A.cut_logits(model, granularity, images, cut, A.identity, MICROBATCH), exact), cut
    s = A.score(sweep.logits(n // 2), exact)
    assert (s.rel_l2, s.rel_l2_max, s.agreement, s.n) == (0.0, 0.0, 100.0, SAMPLES)


def test_transform_sees_each_tensor_of_a_two_tensor_cut_with_its_index(model, images):
    names = chain.unit_names(model, "sublayer")
    cut = names.index("blocks.0.attn") + 1  # (context, residual) leave the attention's first half
    seen = []

    def record(t: torch.Tensor, index: int) -> torch.Tensor:
        seen.append((index, tuple(t.shape)))
        return t

    sweep = A.CutSweep(model, "sublayer", images, MICROBATCH)
    assert torch.equal(sweep.logits(cut, record), sweep.reference)
    tokens, dim = 16, 192  # 32 px in 8 px patches, no class token; ViT-Tiny's width
    assert seen == [(0, (4, tokens + 1, dim)), (1, (4, tokens + 1, dim)),
                    (0, (2, tokens + 1, dim)), (1, (2, tokens + 1, dim))]
    # each tensor matters on its own: zeroing only the residual, or only the context, changes the output
    for which in (0, 1):
        out = sweep.logits(cut, lambda t, i, w=which: torch.zeros_like(t) if i == w else t)
        assert not torch.equal(out, sweep.reference)


def test_fake_int8_on_an_untrained_model_stays_within_bounds_and_int4_is_worse(model, images):
    sweep = A.CutSweep(model, "block", images, MICROBATCH)
    for cut in range(1, sweep.num_units):
        s8 = A.score(sweep.logits(cut, fake_int(8)), sweep.reference)
        s4 = A.score(sweep.logits(cut, fake_int(4)), sweep.reference)
        assert 0 < s8.rel_l2 <= s8.rel_l2_max < 0.05, (cut, s8)
        assert s8.rel_l2 < s4.rel_l2, (cut, s8, s4)


def test_score_measures_on_known_logits():
    exact = torch.tensor([[1.0, 2.0, 0.0], [3.0, 0.0, 1.0], [0.0, 0.0, 5.0], [2.0, 1.0, 0.0]])
    labels = torch.tensor([1, 0, 0, 0])
    s = A.score(exact * 1.1, exact, labels)
    assert s.rel_l2 == pytest.approx(0.1) and s.rel_l2_max == pytest.approx(0.1)
    assert (s.agreement, s.top1, s.n) == (100.0, 75.0, 4)
    swapped = exact.clone()
    swapped[0] = torch.tensor([2.0, 1.0, 0.0])  # top-1 moves from class 1 to class 0
    s = A.score(swapped, exact, labels)
    assert (s.agreement, s.top1) == (75.0, 50.0)
    assert s.rel_l2_max == pytest.approx((2 ** 0.5) / (5 ** 0.5))
    assert A.rel_l2(torch.zeros(2, 3), torch.zeros(2, 3)) == 0.0
    assert A.rel_l2(torch.ones(2, 3), torch.zeros(2, 3)) == float("inf")
    with pytest.raises(ValueError, match=r"expected two \(N, C\) arrays of one shape"):
        A.score(exact[:3], exact)
    with pytest.raises(ValueError, match=r"labels: expected shape \(4,\)"):
        A.score(exact, exact, labels[:3])


def test_bad_cuts_and_transforms_are_refused(model, images):
    n = len(chain.unit_names(model, "block"))
    with pytest.raises(chain.ModelError, match=rf"cut {n + 1}: expected 0..{n} at block granularity"):
        A.cut_logits(model, "block", images, n + 1)
    with pytest.raises(chain.ModelError, match="cut -1"):
        A.CutSweep(model, "block", images, MICROBATCH).logits(-1)
    with pytest.raises(chain.ModelError, match="unknown granularity"):
        A.cut_logits(model, "layer", images, 1)
    with pytest.raises(ValueError, match=r"transform at cut 2, tensor 0: expected a tensor of shape \(4, 17, 192\), got \(4, 17\)"):
        A.cut_logits(model, "block", images, 2, lambda t, i: t[..., 0], MICROBATCH)
    with pytest.raises(ValueError, match="microbatch: expected >= 1, got 0"):
        A.model_logits(model, images, 0)


@pytest.mark.slow
def test_fake_int8_keeps_agreement_high_on_a_trained_model():
    # a short recipe (4 epochs, ~25 s of CPU once; cached under the tests' cache root after)
    path = task.cached_task_checkpoint(task.TrainConfig(epochs=4))
    model = task.load_task_model(path)
    split = task.digits_split()
    sweep = A.CutSweep(model, "block", split.x_test, 64)
    fp32 = A.score(sweep.reference, sweep.reference, split.y_test).top1
    assert fp32 is not None and fp32 > 25.0  # well above chance (10 %) after four epochs
    for cut in range(1, sweep.num_units):
        s = A.score(sweep.logits(cut, fake_int(8)), sweep.reference, split.y_test)
        assert s.agreement >= 99.0 and s.rel_l2 < 0.01, (cut, s)
        assert s.top1 is not None and abs(s.top1 - fp32) <= 1.0, (cut, s, fp32)


def _bench_module():
    """bench/compression_accuracy.py, imported as the bench runs it (its folder on sys.path)."""
    import importlib.util
    import sys
    from pathlib import Path

    bench = Path(__file__).resolve().parents[1] / "bench"
    sys.path.insert(0, str(bench))
    try:
        spec = importlib.util.spec_from_file_location("compression_accuracy", bench / "compression_accuracy.py")
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod  # dataclasses look their module up there
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(bench))
    return mod


def _activation() -> torch.Tensor:
    x = torch.randn(2, 17, 64, generator=torch.Generator().manual_seed(2))
    x[0, 3, 5] = 40.0  # an outlier channel value, as ViT residual streams have
    x[1, 2] = 0.0  # an all-zero token
    return x


def test_reference_fake_quantizers_bounds():
    ref = _bench_module().REFERENCE
    x = _activation()
    assert torch.equal(ref["f16"].roundtrip(x), x.half().float())
    assert torch.equal(ref["bf16"].roundtrip(x), x.bfloat16().float())
    for bits, name in ((8, "int8"), (4, "int4")):
        qmax = 2 ** (bits - 1) - 1
        y = ref[name].roundtrip(x)
        step = x.abs().amax(-1, keepdim=True) / qmax
        assert ((y - x).abs() <= step / 2 + 1e-6).all()  # max-abs scale: never clipped
        assert torch.equal(y[1, 2], torch.zeros(64))  # a zero token stays zero
        levels = (y / torch.where(step > 0, step, 1)).round()
        assert levels.abs().max() <= qmax and torch.allclose(levels * step, y, atol=1e-5)
        clipped = ref[f"{name}-aciq"].roundtrip(x)
        assert clipped[0, 3, 5] < 40.0 and y[0, 3, 5] == pytest.approx(40.0)  # ACIQ clips the outlier
        assert ref[name].bits((8, 17, 64)) == bits + 32 / 64
        assert ref[f"{name}-ch"].bits((8, 17, 64)) == bits + 32 / (8 * 17)


def test_reference_fake_quantizers_match_the_wire_codecs():
    codecs = pytest.importorskip("edgezmq.protocol.codecs", reason="the wire codecs are on another branch")
    ref = _bench_module().REFERENCE
    x = _activation()
    for name in ref:
        wire = torch.from_numpy(codecs.roundtrip(name, x.numpy()))
        step = x.abs().amax() / (7 if "int4" in name else 127)
        # the same math in torch and numpy: equal up to a rounding tie or a last-bit scale difference
        assert torch.allclose(ref[name].roundtrip(x), wire, rtol=1e-5, atol=float(step) * 1.01), name
        assert ref[name].bits(tuple(x.shape)) == pytest.approx(8 * codecs.encoded_nbytes(name, x.shape) / x.numel()), name
