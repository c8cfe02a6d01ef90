"""edgezmq.orchestrate.compress: the encodings autodeploy measures for the planner (ratios,
per-cut errors and disagreements on a calibration batch, codec costs scaled per device type)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import KWARGS, MICROBATCH, MODEL, N_UNITS, checkpoint

from edgezmq.orchestrate import compress
from edgezmq.planner import Problem
from edgezmq.protocol import codecs


@pytest.fixture(scope="module")
def model():
    return compress.load_model(MODEL, checkpoint=checkpoint(), kwargs=KWARGS)


def test_measure_gives_what_the_problem_reads(model):
    x, source = compress.calibration_batch(MODEL, MICROBATCH, None, KWARGS, n=7)
    assert source == "seeded" and x.shape[0] == 8           # rounded up to whole microbatches of 2
    again, _ = compress.calibration_batch(MODEL, MICROBATCH, None, KWARGS, n=7)
    assert torch.equal(x, again)                             # seeded
    got = compress.measure(model, "block", x, MICROBATCH, ["int8", "f16", "int8"], threads=[1])
    assert list(got.encodings) == ["int8", "f16"]            # duplicates dropped, order kept
    shape = (MICROBATCH, 17, 192)                            # every block cut of the test model
    assert got.encodings["int8"]["ratio"] == pytest.approx(codecs.ratio("int8", shape), abs=1e-6)
    for e, d in got.encodings.items():
        assert len(d["error"]) == len(d["disagreement"]) == N_UNITS - 1
        assert all(0 < x < 0.05 for x in d["error"])
        assert d["disagreement"] == [100 * (k + 1) / 8 for k in got.flips[e]]
    assert got.encodings["f16"]["error"][2] < got.encodings["int8"]["error"][2]
    # the client's input encoded so: the image's own ratio, an error, the same one-sample margin
    image = (MICROBATCH, 3, 64, 64)
    for e, d in got.encodings.items():
        assert d["input"]["ratio"] == pytest.approx(codecs.ratio(e, image), abs=1e-6)
        assert 0 < d["input"]["error"] < 0.05
        assert d["input"]["disagreement"] == 100 * (got.input_flips[e] + 1) / 8
    assert got.encodings["int8"]["input"]["ratio"] != got.encodings["int8"]["ratio"]
    assert got.codec_shape == shape and all(a > 0 and b > 0 for a, b in got.codec_s_per_mb.values())
    assert got.client_chain_s[1] > 0


def test_add_encodings_fills_a_problem_the_planner_accepts(model):
    units = [{"name": f"u{i}", "out_bytes": 26112, "param_bytes": 10} for i in range(N_UNITS)]
    d = {"model": {"name": MODEL, "microbatch": MICROBATCH, "granularity": "block", "input_bytes": 10,
                   "units": units},
         "device_types": {"slow": {"memory_bytes": 10**9, "unit_times_s": [1.0] * N_UNITS},
                          "fast": {"memory_bytes": 10**9, "unit_times_s": [0.1] * N_UNITS}},
         "devices": [{"name": "a", "type": "slow"}, {"name": "b", "type": "fast"}],
         "links": {"default": {"mbps": 10}}}
    x, _ = compress.calibration_batch(MODEL, MICROBATCH, None, KWARGS, n=4)
    got = compress.add_encodings(d, model, x, threads={"slow": 1, "fast": 1}, encodings=["int8"])
    slow, fast = (d["device_types"][t]["codec_ms_per_mb"]["int8"] for t in ("slow", "fast"))
    # the codec costs scale as the types' unit times do: 10x
    assert slow["encode"] == pytest.approx(10 * fast["encode"], rel=1e-3) and slow["decode"] > fast["decode"] > 0
    here = got.codec_s_per_mb["int8"][0] * 1e3
    assert fast["encode"] == pytest.approx(here * 0.1 * N_UNITS / got.client_chain_s[1], rel=1e-3)
    p = Problem.from_dict(d)
    assert p.encodings["int8"].disagreement is not None and p.cut_disagreement("int8", 1) >= 25.0
    assert p.input_encodings == ("int8",) and p.cut_disagreement("int8", 0) >= 25.0


@pytest.mark.parametrize("samples, message", [
    (np.zeros((4, 3, 32, 32), np.float32), "calibration samples: expected an (N, 3, 64, 64) float array"),
    (np.zeros((3, 64, 64), np.float32), "calibration samples: expected an (N, 3, 64, 64)"),
    (np.full((2, 3, 64, 64), np.nan, np.float32), "calibration samples: expected finite values"),
])
def test_bad_calibration_samples_are_refused(samples, message):
    with pytest.raises(compress.CompressionError, match=message.replace("(", r"\(").replace(")", r"\)")):
        compress.calibration_batch(MODEL, MICROBATCH, samples, KWARGS)


def test_bad_arguments_are_refused(model):
    x, _ = compress.calibration_batch(MODEL, MICROBATCH, None, KWARGS, n=2)
    for encs, message in ((["raw"], "encodings: expected lossy encodings"), (["zstd"], "got 'zstd'"),
                          ([], "at least one")):
        with pytest.raises(compress.CompressionError, match=message):
            compress.measure(model, "block", x, MICROBATCH, encs)
    with pytest.raises(compress.CompressionError, match="calibration samples: expected 1..100000, got 0"):
        compress.calibration_batch(MODEL, MICROBATCH, None, KWARGS, n=0)
    with pytest.raises(compress.CompressionError, match="needs the model's weights here"):
        compress.load_model(MODEL, kwargs=KWARGS)
    with pytest.raises(compress.CompressionError, match="cannot load it here"):
        compress.load_model(MODEL, checkpoint="/nonexistent.safetensors", kwargs=KWARGS)
