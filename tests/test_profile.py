"""Tests for edgezmq.model.profiling: per-unit times and memory, measured one unit at a time."""

from __future__ import annotations

import json
import math
import statistics
import weakref

import msgpack
import pytest
import torch

from edgezmq.model import chain as M
from edgezmq.model import profiling as P

TINY = "vit_tiny_patch16_224"
SMALL = {"img_size": 64, "depth": 2}  # every unit kind in milliseconds
MEMORY_KW = {"depth": 1}  # 224 px: activations of megabytes, well above malloc's granularity
MEMORY_BATCH = 8
FAST = {"warmup": 0, "reps": 2}
MiB = 1024 * 1024


def _nbytes(specs):
    return sum(math.prod(shape) * getattr(torch, dt).itemsize for shape, dt in specs)


@pytest.fixture(scope="module")
def small_block():
    return P.profile_units(TINY, microbatch=2, threads=1, kwargs=SMALL, **FAST)


@pytest.fixture(scope="module")
def big_block():
    """One 224 px block at microbatch 8: large enough for memory assertions."""
    return P.profile_units(TINY, microbatch=MEMORY_BATCH, threads=1, warmup=1, reps=1, kwargs=MEMORY_KW)


def test_output_shape_and_sanity(small_block):
    prof = small_block
    infos = M.unit_infos(TINY, "block", **SMALL)
    specs = M.boundary_specs(TINY, "block", 2, **SMALL)
    assert prof["model"] == TINY and prof["granularity"] == "block" and prof["microbatch"] == 2
    assert prof["threads"] == 1 and prof["dtype"] == "float32" and prof["kwargs"] == SMALL
    assert prof["device"] == P.device_identity()
    assert [u["name"] for u in prof["units"]] == [i.name for i in infos] == ["embed", "blocks.0", "blocks.1", "head"]
    for i, (u, info) in enumerate(zip(prof["units"], infos, strict=True)):
        assert u["index"] == i
        assert len(u["times_s"]) == FAST["reps"] and all(t > 0 for t in u["times_s"])
        assert u["time_s"] == statistics.median(u["times_s"])
        assert u["in_bytes"] == _nbytes(specs[i])
        assert u["out_bytes"] == _nbytes(specs[i + 1])
        assert u["param_bytes"] == info.param_bytes
        assert u["work_bytes"] >= 0 and u["build_s"] > 0
    assert prof["input_bytes"] == _nbytes(specs[0]) == 2 * 3 * 64 * 64 * 4
    assert prof["units"][-1]["out_bytes"] == 2 * 1000 * 4  # the logits
    assert prof["total_time_s"] == pytest.approx(sum(u["time_s"] for u in prof["units"]))
    assert prof["work_method"] in ("vmhwm", "sampled")


def test_profile_is_plain_data(small_block):
    assert json.loads(json.dumps(small_block)) == small_block
    assert msgpack.unpackb(msgpack.packb(small_block), strict_map_key=False) == small_block


def test_two_input_units_at_sublayer_granularity():
    prof = P.profile_units(TINY, granularity="sublayer", microbatch=1, threads=1,
                           kwargs={"img_size": 32, "depth": 1}, warmup=0, reps=1)
    specs = M.boundary_specs(TINY, "sublayer", 1, img_size=32, depth=1)
    assert [u["name"] for u in prof["units"]] == [
        "embed", "blocks.0.attn", "blocks.0.attn.proj", "blocks.0.mlp", "blocks.0.mlp.fc2", "head"]
    assert [u["in_bytes"] for u in prof["units"]] == [_nbytes(s) for s in specs[:-1]]
    assert prof["units"][2]["in_bytes"] == 2 * prof["units"][1]["in_bytes"]  # context + residual


def test_work_memory_is_measured(big_block):
    embed, block, head = big_block["units"]
    batch, tokens, dim = MEMORY_BATCH, 197, 192
    mlp_hidden = batch * tokens * 4 * dim * 4  # fc1's output must exist at some point in a block
    if big_block["work_method"] != "vmhwm":
        pytest.skip("exact memory needs /proc/self/clear_refs; the sampled meter may miss peaks")
    assert block["work_bytes"] >= mlp_hidden
    assert block["work_bytes"] >= block["out_bytes"]
    assert block["work_bytes"] > head["work_bytes"]
    assert embed["work_bytes"] >= embed["out_bytes"]


@pytest.mark.parametrize("method", ["vmhwm", "sampled"])
def test_peak_meter(method, monkeypatch):
    meter = P._PeakMeter()
    if method == "sampled":
        meter.method = "sampled"
    elif meter.method != "vmhwm":
        pytest.skip("/proc/self/clear_refs not writable here")
    size = 64 * MiB

    def kept():
        return torch.ones(size // 4)  # alive when the meter reads

    out, grew = meter(kept)
    assert grew >= 0.9 * size
    del out
    if method == "vmhwm":  # a transient peak, freed before the callable returns: only VmHWM sees it
        _, grew = meter(lambda: float(torch.ones(size // 4).sum()))
        assert grew >= 0.9 * size


def test_progress_called_per_unit_and_threads_restored():
    calls = []
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        prof = P.profile_units(TINY, microbatch=1, threads=1, kwargs=SMALL, warmup=0, reps=1,
                               progress=lambda *a: calls.append((*a, torch.get_num_threads())))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    n = len(prof["units"])
    assert [(i, k, name, t) for i, k, name, t, _ in calls] == [
        (u["index"], n, u["name"], u["time_s"]) for u in prof["units"]]
    assert {c[-1] for c in calls} == {1}  # profiled on the requested threads


def test_threads_restored_when_profiling_fails():
    before = torch.get_num_threads()

    def stop(i, n, name, t):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        P.profile_units(TINY, microbatch=1, threads=before + 1, kwargs=SMALL, warmup=0, reps=1, progress=stop)
    assert torch.get_num_threads() == before


def test_default_threads_are_the_current_ones():
    prof = P.profile_units(TINY, microbatch=1, kwargs=SMALL, warmup=0, reps=1)
    assert prof["threads"] == torch.get_num_threads()


def test_one_unit_in_memory_at_a_time_then_the_chain(monkeypatch):
    real = M.build_shard
    built: list[tuple[int, int, weakref.ref]] = []

    def spy(name, start, end, **kw):
        assert all(ref() is None for _, _, ref in built), "previous unit still alive"
        shard = real(name, start, end, **kw)
        built.append((start, end, weakref.ref(shard)))
        return shard

    monkeypatch.setattr(M, "build_shard", spy)
    prof = P.profile_units(TINY, microbatch=1, threads=1, kwargs=SMALL, warmup=0, reps=1)
    # every unit alone, then the middle units (embedding and head left out) back to back
    assert [(a, b) for a, b, _ in built] == [(0, 1), (1, 2), (2, 3), (3, 4), (1, 3)]
    chain = prof["chain"]
    assert chain["units"] == [1, 3] and chain["time_s"] > 0
    assert chain["units_time_s"] == pytest.approx(sum(u["time_s"] for u in prof["units"][1:3]))
    assert chain["factor"] == pytest.approx(chain["time_s"] / chain["units_time_s"])


@pytest.mark.parametrize("budget, max_units, window", [
    (10**9, 8, (1, 5)),      # 6 units: the 4 middle ones
    (10**9, 2, (1, 3)),      # at most 2
    (250, 8, (1, 3)),        # 2 x 100 B params + 50 B work fit, 3 do not
    (200, 8, None),          # not even two
])
def test_chain_window(budget, max_units, window):
    units = [{"param_bytes": 100, "work_bytes": 50} for _ in range(6)]
    assert P.chain_window(units, budget, max_units) == window
    assert P.chain_window(units[:3], 10**9) == (0, 3)  # a short chain: all of it


def test_checkpoint_weights_time_the_same_units():
    ckpt = M.cached_checkpoint(TINY, **SMALL)
    prof = P.profile_units(TINY, microbatch=1, threads=1, kwargs=SMALL, checkpoint=ckpt, warmup=0, reps=1)
    assert prof["checkpoint"] == str(ckpt)
    assert [u["param_bytes"] for u in prof["units"]] == [i.param_bytes for i in M.unit_infos(TINY, **SMALL)]


@pytest.mark.parametrize("bad, match", [
    ({"reps": 0}, "reps"), ({"threads": 0}, "threads"), ({"warmup": -1}, "warmup"),
    ({"microbatch": 0}, "microbatch"), ({"granularity": "layer"}, "granularity"),
])
def test_bad_arguments_are_refused(bad, match):
    args = {"microbatch": 1, "kwargs": SMALL, **bad}
    with pytest.raises(ValueError, match=match):
        P.profile_units(TINY, **args)


def test_device_identity_is_stable_and_plain():
    ident = P.device_identity()
    assert ident == P.device_identity()
    assert {"hostname", "cpu", "cores", "cpu_quota", "memory_limit", "machine"} <= set(ident)
    assert ident["cores"] >= 1
    json.dumps(ident)


def test_format_profile(small_block):
    text = P.format_profile(small_block)
    assert "blocks.1" in text and "total" in text and TINY in text


def test_rounds_span_cfs_periods_under_a_quota():
    # unlimited: the floor; a quota's period stretches rounds to PERIODS_PER_ROUND periods
    assert P.round_seconds(0) == P.MIN_ROUND_S
    assert P.round_seconds(0.001) == P.MIN_ROUND_S
    assert P.round_seconds(0.0667) == pytest.approx(P.PERIODS_PER_ROUND * 0.0667)


def test_profile_records_its_round_length(small_block):
    assert small_block["round_s"] == P.round_seconds()
    dev = small_block["device"]  # the period is part of the device's identity (cache key)
    assert (dev["cpu_period_s"] is None) == (dev["cpu_quota"] is None)


def _doctored(prof, factor):
    """`prof` as if the device had been `factor` times slower when it was profiled."""
    import copy

    out = copy.deepcopy(prof)
    for u in out["units"]:
        u["time_s"] *= factor
        u["times_s"] = [t * factor for t in u["times_s"]]
    out["total_time_s"] *= factor
    if out.get("chain"):
        for k in ("time_s", "units_time_s"):
            out["chain"][k] *= factor
        out["chain"]["times_s"] = [t * factor for t in out["chain"]["times_s"]]
    return out


def test_spot_check_times_the_chain_window_again_and_rescale_follows_it(small_block):
    assert small_block["chain"] is not None
    slow = _doctored(small_block, 20.0)  # "profiled" 20x slower than this device runs
    check = P.spot_check(slow, kwargs=SMALL, **FAST)
    assert check["units"] == small_block["chain"]["units"]
    assert check["cached_time_s"] == slow["chain"]["time_s"]
    assert check["ratio"] == check["time_s"] / check["cached_time_s"]
    assert check["ratio"] < 0.5  # the 20x drift is seen (time, not a bound: a factor 10 margin)
    out = P.rescale(slow, check)
    assert out["spot_check"]["rescaled"] is True and out["rescaled_by"] == check["ratio"]
    r = check["ratio"]
    for u, v in zip(out["units"], slow["units"], strict=True):
        assert u["time_s"] == pytest.approx(v["time_s"] * r)
        assert u["times_s"] == pytest.approx([t * r for t in v["times_s"]])
        assert {k: u[k] for k in u if "time" not in k} == {k: v[k] for k in v if "time" not in k}
    assert out["total_time_s"] == pytest.approx(sum(u["time_s"] for u in out["units"]))
    assert out["chain"]["factor"] == slow["chain"]["factor"]  # a ratio of two rescaled times
    assert out["chain"]["time_s"] == pytest.approx(slow["chain"]["time_s"] * r)
    assert slow["units"][0]["time_s"] == small_block["units"][0]["time_s"] * 20.0  # input untouched
    again = P.rescale(out, {**check, "ratio": 0.5})
    assert again["rescaled_by"] == pytest.approx(r * 0.5)  # cumulative


@pytest.mark.parametrize("ratio, rescaled", [
    (1.0, False), (1.0 + 0.8 * P.DRIFT_TOLERANCE, False), (1.0 - 0.8 * P.DRIFT_TOLERANCE, False), (1.06, True),
    (0.9, True), (float("nan"), False), (0.0, False), (float("inf"), False),
])
def test_rescale_only_beyond_the_tolerance(small_block, ratio, rescaled):
    check = {"units": [1, 3], "time_s": 1.0, "cached_time_s": 1.0, "ratio": ratio}
    out = P.rescale(small_block, check)
    assert out["spot_check"]["rescaled"] is rescaled
    assert ("rescaled_by" in out) is rescaled
    if not rescaled:
        assert out["units"] == small_block["units"] and out["chain"] == small_block["chain"]


def test_spot_check_without_a_chain_times_the_slowest_unit(small_block):
    prof = {**small_block, "chain": None}
    check = P.spot_check(prof, kwargs=SMALL, **FAST)
    slowest = max(range(len(prof["units"])), key=lambda i: prof["units"][i]["time_s"])
    assert check["units"] == [slowest, slowest + 1]
    assert check["cached_time_s"] == prof["units"][slowest]["time_s"] and check["time_s"] > 0
