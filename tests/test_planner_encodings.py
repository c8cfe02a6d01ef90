"""The planner's encoding decision (issue 13 item 3): the problem's encodings, their price in
the cost model, and the solve under an error budget against a brute force that enumerates
every plan and every encoding of its cuts, priced by ``evaluate`` (the reference)."""

from __future__ import annotations

import copy
import itertools
import json
import math
import random
import re

import pytest
from test_planner_exact import random_problem, with_nics

from edgezmq.planner import PlanError, Problem, evaluate, solve
from edgezmq.planner.encoded import without_encodings

RTOL = 1e-9
SEEDS = range(60)
LOSSY = {"f16": 0.5, "int8": 0.2513, "int4": 0.1263}


def base(**model) -> dict:
    """Two units on two devices of one type (1 s per unit), the first's output 1 MB, 4 Mbit/s
    links (2 s/MB), tiny input and output, no replication."""
    return {
        "model": {"name": "m", "microbatch": 1, "input_bytes": 1000,
                  "units": [{"name": "u0", "out_bytes": 1_000_000, "param_bytes": 10},
                            {"name": "u1", "out_bytes": 1000, "param_bytes": 10}], **model},
        "device_types": {"t": {"memory_bytes": 10**9, "unit_times_s": [1.0, 1.0],
                               "codec_ms_per_mb": {"int8": {"encode": 100, "decode": 50}}}},
        "devices": [{"name": "a", "type": "t"}, {"name": "b", "type": "t"}],
        "links": {"default": {"mbps": 4.0}},
        "options": {"replication": False},
    }


INT8 = {"int8": {"ratio": 0.25, "error": [0.01]}}


def test_without_encodings_parses_as_before() -> None:
    p = Problem.from_dict(base())
    assert p.encodings == {}
    assert p.devices[0].codecs["int8"].encode_s_per_byte == pytest.approx(100e-3 / 1e6)
    plan = evaluate(p, [((0, 1), ["a"]), ((1, 2), ["b"])])
    assert plan.error == 0.0 and not plan.encoded and "encoding" not in plan.to_dict()["stages"][0]


@pytest.mark.parametrize("patch, message", [
    ({"encodings": {"int8": {"ratio": 0, "error": [0.1]}}}, "model.encodings.int8.ratio: expected a number in (0, 1]"),
    ({"encodings": {"int8": {"ratio": 1.5, "error": [0.1]}}}, "model.encodings.int8.ratio"),
    ({"encodings": {"int8": {"ratio": 0.25, "error": [0.1, 0.2]}}}, "model.encodings.int8.error: expected 1 values"),
    ({"encodings": {"int8": {"ratio": 0.25, "error": [-1]}}}, "model.encodings.int8.error[0]"),
    ({"encodings": {"int8": {"ratio": 0.25, "error": ["nan"]}}}, "model.encodings.int8.error[0]"),
    ({"encodings": {"raw": {"ratio": 1, "error": [0]}}}, "model.encodings.raw: expected a lossy encoding"),
    ({"encodings": {"int9": {"ratio": 0.2, "error": [0]}}}, "model.encodings.int9: expected a lossy encoding"),
    ({"encodings": {"int8": {"ratio": 0.25, "error": [0], "bits": 8}}}, "model.encodings.int8: unknown field"),
    ({"encodings": {"int8": {"error": [0]}}}, "model.encodings.int8"),
])
def test_bad_encodings_name_the_field(patch: dict, message: str) -> None:
    with pytest.raises(PlanError) as e:
        Problem.from_dict(base(**patch))
    assert message in str(e.value)


@pytest.mark.parametrize("codec, message", [
    ({"int8": {"encode": -1, "decode": 1}}, "device_types.t.codec_ms_per_mb.int8.encode"),
    ({"int8": {"encode": 1, "decode": 1e12}}, "device_types.t.codec_ms_per_mb.int8.decode"),
    ({"int8": {"encode": 1}}, "device_types.t.codec_ms_per_mb.int8"),
    ({"int8": {"encode": 1, "decode": 1, "x": 2}}, "unknown field"),
    ({"zstd": {"encode": 1, "decode": 1}}, "device_types.t.codec_ms_per_mb.zstd: expected a lossy encoding"),
    ([1], "device_types.t.codec_ms_per_mb: expected a mapping"),
])
def test_bad_codec_costs_name_the_field(codec: object, message: str) -> None:
    d = base(encodings=INT8)
    d["device_types"]["t"]["codec_ms_per_mb"] = codec
    with pytest.raises(PlanError) as e:
        Problem.from_dict(d)
    assert message in str(e.value)


def test_evaluate_prices_an_encoded_cut() -> None:
    """int8 at cut 1: the link carries a quarter (0.5 s), a encodes 1 MB (0.1 s), b decodes (0.05 s)."""
    p = Problem.from_dict(base(encodings=INT8))
    raw = evaluate(p, [((0, 1), ["a"]), ((1, 2), ["b"])])
    enc = evaluate(p, [{"units": [0, 1], "devices": ["a"], "encoding": "int8"}, {"units": [1, 2], "devices": ["b"]}])
    assert raw.links[1].time_s == pytest.approx(2.0) and raw.links[1].bytes == 1_000_000
    assert enc.links[1].bytes == 250_000 and enc.links[1].time_s == pytest.approx(0.5)
    assert enc.links[1].encoding == "int8" and enc.links[0].encoding == enc.links[2].encoding == "raw"
    assert enc.stage_costs[0].compute_s == pytest.approx(1.1)
    assert enc.stage_costs[1].compute_s == pytest.approx(1.05)
    assert enc.error == pytest.approx(0.01)
    # memory counts the raw (decoded) tensors: unchanged
    assert [c.memory_bytes for c in enc.stage_costs] == [c.memory_bytes for c in raw.stage_costs]
    d = enc.to_dict()
    assert d["error"] == pytest.approx(0.01) and d["stages"][0]["encoding"] == "int8"
    assert [k["encoding"] for k in d["links"]] == ["raw", "int8", "raw"]
    assert "int8" in enc.table(p) and "error 0.01" in enc.table(p)


@pytest.mark.parametrize("stages, message", [
    ([{"units": [0, 1], "devices": ["a"], "encoding": "int4"}, {"units": [1, 2], "devices": ["b"]}],
     "stages[0].encoding: expected one of the problem's encodings (raw, int8), got 'int4'"),
    ([{"units": [0, 2], "devices": ["a"], "encoding": "int8"}], "stages[0].encoding: the last stage's output"),
])
def test_evaluate_rejects_bad_encodings(stages: list, message: str) -> None:
    p = Problem.from_dict(base(encodings=INT8))
    with pytest.raises(PlanError) as e:
        evaluate(p, stages)
    assert message in str(e.value)


def test_a_device_without_the_codec_cannot_use_it() -> None:
    d = base(encodings=INT8)
    d["devices"][1]["codec_ms_per_mb"] = {}     # b's own: none
    p = Problem.from_dict(d)
    with pytest.raises(PlanError) as e:
        evaluate(p, [{"units": [0, 1], "devices": ["a"], "encoding": "int8"}, {"units": [1, 2], "devices": ["b"]}])
    assert "device 'b' has no codec_ms_per_mb.int8 (cannot decode it)" in str(e.value)
    # and the solver does not choose it
    plan = solve(p, max_error=1.0)
    assert not plan.encoded and plan.optimal


def test_solve_chooses_the_encoding_under_the_budget() -> None:
    """One device takes 2 s, two with a raw link 2 s (the link), with int8 1.1 s (a's compute
    and encode): int8 wins when the budget allows its 0.01, else raw."""
    p = Problem.from_dict(base(encodings=INT8))
    exact = solve(p)
    assert not exact.encoded and exact.bottleneck_s == pytest.approx(2.0)
    tight = solve(p, max_error=0.009)
    assert not tight.encoded and tight.bottleneck_s == pytest.approx(2.0) and tight.optimal
    plan = solve(p, max_error=0.01)
    assert plan.optimal and plan.encoded and plan.error == pytest.approx(0.01)
    assert plan.bottleneck_s == pytest.approx(1.1) and plan.stages[0].encoding == "int8"


# --- against brute force ---------------------------------------------------------------------

def encoded_problem(seed: int, *, nics: bool = False) -> dict:
    """A small random problem (test_planner_exact's; its links often slowed) with 1-3 lossy encodings, random errors
    per cut and codec costs per type (some types lack some codecs; a device may override)."""
    d = random_problem(seed, max_devices=4, max_units=5)
    if nics:
        d = with_nics(d, seed)
    rng = random.Random(20_000 + seed)
    if rng.random() < 0.7:      # slower links and a small image and logits: where encodings pay
        d["links"]["default"]["mbps"] /= 4
        for o in d["links"]["overrides"]:
            o["mbps"] /= 4
        d["model"]["input_bytes"] = d["model"]["units"][-1]["out_bytes"] = 1000
        for t in d["device_types"].values():
            t["unit_times_s"] = [x / 4 for x in t["unit_times_s"]]
    n = len(d["model"]["units"])
    names = rng.sample(sorted(LOSSY), rng.randint(1, 3))
    d["model"]["encodings"] = {e: {"ratio": LOSSY[e], "error": [round(rng.uniform(0, 0.05), 4) for _ in range(n - 1)]}
                               for e in names}
    for holder in [*d["device_types"].values(), *(x for x in d["devices"] if rng.random() < 0.2)]:
        holder["codec_ms_per_mb"] = {e: {"encode": rng.choice([0, 100, 2000, 20_000]),
                                         "decode": rng.choice([0, 100, 2000])}
                                     for e in names if rng.random() < 0.85}
    return d


def _assignments(devices: list[str], k: int, replication: bool):
    """Every sequence of k disjoint non-empty device sets (singletons without replication)."""
    if k == 0:
        yield ()
        return
    sizes = range(1, len(devices) + 1) if replication else (1,)
    for size in sizes:
        for first in itertools.combinations(devices, size):
            rest = [x for x in devices if x not in first]
            for tail in _assignments(rest, k - 1, replication):
                yield (first, *tail)


def brute(problem: Problem, max_error: float | None, min_agreement: float | None = None) -> float:
    """Least bottleneck over every plan and every encoding of its cuts within the budgets."""
    max_error = math.inf if max_error is None else max_error
    max_dis = math.inf if min_agreement is None else 100 - min_agreement
    L, names = problem.num_units, [d.name for d in problem.devices]
    encs = ["raw", *problem.encodings]
    # an input encoding is a candidate when every device can decode it (the planner's definition)
    inputs = ["raw", *(e for e in problem.input_encodings
                       if all(not math.isinf(d.codec_s_per_byte(e, False)) for d in problem.devices))]
    best = math.inf
    for k in range(1, min(L, len(names)) + 1):
        for cuts in itertools.combinations(range(1, L), k - 1):
            bounds = [0, *cuts, L]
            for devs in _assignments(names, k, problem.options.replication):
                for first, *chosen in itertools.product(inputs, *[encs] * (k - 1)):
                    stages = [{"units": [bounds[i], bounds[i + 1]], "devices": list(devs[i]),
                               "encoding": (*chosen, "raw")[i]} for i in range(k)]
                    stages[0]["input_encoding"] = first
                    try:
                        plan = evaluate(problem, stages)
                    except PlanError:
                        continue        # a device that cannot encode or decode that encoding
                    if plan.feasible and plan.error <= max_error and (
                            min_agreement is None or plan.disagreement <= max_dis):
                        best = min(best, plan.bottleneck_s)
    return best


def budget(rng: random.Random) -> float:
    return rng.choice([0.0, 0.01, 0.03, 0.06, 10.0])


def check(d: dict, seed: int) -> None:
    p = Problem.from_dict(d)
    max_error = budget(random.Random(seed))
    want = brute(p, max_error)
    if math.isinf(want):
        with pytest.raises(PlanError):
            solve(p, max_error=max_error)
        return
    got = solve(p, max_error=max_error)
    assert got.optimal, got.stats
    assert got.feasible and got.error <= max_error + 1e-12
    assert got.bottleneck_s == pytest.approx(want, rel=RTOL), (seed, max_error, got.to_dict()["stages"])
    again = evaluate(p, got.stages)
    assert again.bottleneck_s == got.bottleneck_s and again.error == got.error


@pytest.mark.parametrize("seed", SEEDS)
def test_encoded_solve_matches_brute_force(seed: int) -> None:
    check(encoded_problem(seed), seed)


@pytest.mark.parametrize("seed", range(0, 60, 3))
def test_encoded_solve_matches_brute_force_with_nics(seed: int) -> None:
    check(encoded_problem(seed, nics=True), seed)


def test_brute_force_enumerates_encodings() -> None:
    """The brute force itself finds the encoded optimum of the hand example (1.1 s, int8)."""
    p = Problem.from_dict(base(encodings=INT8))
    assert brute(p, 0.0) == pytest.approx(2.0) and brute(p, 0.01) == pytest.approx(1.1)


@pytest.mark.parametrize("seed", range(10))
def test_no_budget_or_no_encodings_is_the_raw_solve(seed: int) -> None:
    """Without --max-error nothing is compressed; a problem without encodings ignores it."""
    d = encoded_problem(seed)
    p = Problem.from_dict(d)
    raw = solve(without_encodings(p))
    for plan in (solve(p), solve(without_encodings(p), max_error=1.0)):
        assert not plan.encoded and plan.error == 0.0
        assert plan.bottleneck_s == raw.bottleneck_s and plan.stages == raw.stages
    plain = copy.deepcopy(d)
    del plain["model"]["encodings"]
    assert solve(Problem.from_dict(plain)).stages == raw.stages


# --- the client's input encoded (cut 0) -------------------------------------------------------

def with_input(d: dict, seed: int) -> dict:
    """Some encodings measured on the input too (ratio, error, disagreement as a sweep gives
    them), and half the time an input as large as the largest activation: where encoding the
    client's link pays."""
    rng = random.Random(50_000 + seed)
    for e, f in d["model"]["encodings"].items():
        if rng.random() < 0.8:
            f["input"] = {"ratio": LOSSY[e], "error": round(rng.uniform(0, 0.03), 4),
                          "disagreement": rng.choice([0.0, 1.5625, 3.125, 6.25])}
    if rng.random() < 0.5:
        d["model"]["input_bytes"] = max(u["out_bytes"] for u in d["model"]["units"])
    return d


def test_evaluate_prices_an_encoded_input() -> None:
    """int8 on the client's input: the client's link carries a quarter (1 MB input: 0.5 s),
    stage 0 decodes it (1 MB at 50 ms/MB), the plan's error and disagreement count it,
    memory still holds the decoded input."""
    d = base(encodings={"int8": {"ratio": 0.25, "error": [0.01], "disagreement": [1.0],
                                 "input": {"ratio": 0.25, "error": 0.002, "disagreement": 0.5}}})
    d["model"]["input_bytes"] = 1_000_000
    p = Problem.from_dict(d)
    assert p.input_encodings == ("int8",)
    raw = evaluate(p, [((0, 1), ["a"]), ((1, 2), ["b"])])
    enc = evaluate(p, [{"units": [0, 1], "devices": ["a"], "input_encoding": "int8"},
                       {"units": [1, 2], "devices": ["b"]}])
    assert raw.links[0].bytes == 1_000_000 and raw.links[0].time_s == pytest.approx(2.0)
    assert enc.links[0].bytes == 250_000 and enc.links[0].time_s == pytest.approx(0.5)
    assert enc.links[0].encoding == "int8" and enc.links[1].encoding == "raw"
    assert enc.stage_costs[0].compute_s == pytest.approx(1.05)
    assert enc.error == pytest.approx(0.002) and enc.disagreement == pytest.approx(0.5)
    assert [c.memory_bytes for c in enc.stage_costs] == [c.memory_bytes for c in raw.stage_costs]
    assert enc.encoded and enc.to_dict()["stages"][0]["input_encoding"] == "int8"
    assert "int8" in enc.table(p)
    both = evaluate(p, [{"units": [0, 1], "devices": ["a"], "input_encoding": "int8", "encoding": "int8"},
                        {"units": [1, 2], "devices": ["b"]}])
    assert both.error == pytest.approx(0.012) and both.disagreement == pytest.approx(1.5)
    # what the solver sees for that choice prices the same stages the same
    from edgezmq.planner.encoded import with_input_encoding
    seen = evaluate(with_input_encoding(p, "int8"), [((0, 1), ["a"]), ((1, 2), ["b"])])
    assert seen.bottleneck_s == pytest.approx(enc.bottleneck_s)
    assert [c.memory_bytes for c in seen.stage_costs] == [c.memory_bytes for c in enc.stage_costs]
    assert [c.compute_s for c in seen.stage_costs] == pytest.approx([c.compute_s for c in enc.stage_costs])


@pytest.mark.parametrize("stages, message", [
    ([{"units": [0, 1], "devices": ["a"]}, {"units": [1, 2], "devices": ["b"], "input_encoding": "int8"}],
     "stages[1].input_encoding: only the first stage takes the client's input"),
    ([{"units": [0, 2], "devices": ["a"], "input_encoding": "f16"}],
     "stages[0].input_encoding: expected one the problem measured on the input (raw, int8), got 'f16'"),
])
def test_evaluate_rejects_bad_input_encodings(stages: list, message: str) -> None:
    p = Problem.from_dict(base(encodings={"int8": {"ratio": 0.25, "error": [0.01],
                                                   "input": {"ratio": 0.25, "error": 0.0}}}))
    with pytest.raises(PlanError, match=re.escape(message)):
        evaluate(p, stages)


@pytest.mark.parametrize("inp, message", [
    ({"ratio": 0, "error": 0.1}, "model.encodings.int8.input.ratio"),
    ({"ratio": 0.25}, "model.encodings.int8.input"),
    ({"ratio": 0.25, "error": -1}, "model.encodings.int8.input.error"),
    ({"ratio": 0.25, "error": 0.1, "disagreement": 101}, "model.encodings.int8.input.disagreement"),
    ({"ratio": 0.25, "error": 0.1, "bogus": 1}, "model.encodings.int8.input"),
    ([1, 2], "model.encodings.int8.input"),
])
def test_bad_input_figures_name_the_field(inp: object, message: str) -> None:
    with pytest.raises(PlanError, match=re.escape(message)):
        Problem.from_dict(base(encodings={"int8": {"ratio": 0.25, "error": [0.01], "input": inp}}))


@pytest.mark.parametrize("seed", range(0, 60, 3))
def test_input_encoded_solve_matches_brute_force(seed: int) -> None:
    """The input's encoding as a decision, with the cuts': exact against the brute force."""
    check(with_input(encoded_problem(seed), seed), seed)


@pytest.mark.parametrize("seed", range(3, 60, 8))
def test_input_encoded_agreement_solve_matches_brute_force(seed: int) -> None:
    check_agreement(with_input(with_disagreement(encoded_problem(seed, nics=seed % 2 == 1), seed), seed), seed)


def test_the_input_encoding_pays_where_the_client_link_is_the_bottleneck() -> None:
    """A 1 MB input over 4 Mbit/s (2 s) before two 1 s units: raw, the client's link is the
    bottleneck; int8 within the budget makes it 0.5 s, and the two stages' 1 s (+ decoding)
    set the pace. Over the budget, raw it stays."""
    d = base(encodings={"int8": {"ratio": 0.25, "error": [0.5], "input": {"ratio": 0.25, "error": 0.005}}})
    d["model"]["input_bytes"] = 1_000_000
    d["model"]["units"][0]["out_bytes"] = 1000
    p = Problem.from_dict(d)
    assert solve(p).bottleneck_s == pytest.approx(2.0) and not solve(p).encoded
    got = solve(p, max_error=0.01)
    assert got.stages[0].input_encoding == "int8" and got.error == pytest.approx(0.005)
    assert got.bottleneck_s == pytest.approx(1.05) and got.optimal
    assert got.stats["input_encodings"]["raw"] == pytest.approx(2.0)
    assert solve(p, max_error=0.004).stages[0].input_encoding == "raw"


# --- the top-1 agreement budget ----------------------------------------------------------------

def with_disagreement(d: dict, seed: int) -> dict:
    """Each encoding's per-cut disagreement (percent; multiples of one sample in 16 or 64, and
    zeros, as a sweep measures them), from a generator of its own (the problems stay the same)."""
    rng = random.Random(30_000 + seed)
    n = len(d["model"]["units"])
    for e in d["model"]["encodings"].values():
        e["disagreement"] = [rng.choice([0.0, 1.5625, 3.125, 6.25, 12.5]) for _ in range(n - 1)]
    return d


def check_agreement(d: dict, seed: int) -> None:
    p = Problem.from_dict(d)
    rng = random.Random(40_000 + seed)
    max_error = rng.choice([None, None, None, 0.03, 10.0])
    min_agreement = rng.choice([100.0, 99.0, 97.0, 93.75, 90.0, 0.0])
    want = brute(p, max_error, min_agreement)
    if math.isinf(want):
        with pytest.raises(PlanError):
            solve(p, max_error=max_error, min_agreement=min_agreement)
        return
    got = solve(p, max_error=max_error, min_agreement=min_agreement)
    assert got.optimal, got.stats
    assert got.feasible and got.disagreement <= 100 - min_agreement + 1e-9
    assert max_error is None or got.error <= max_error + 1e-12
    assert got.bottleneck_s == pytest.approx(want, rel=RTOL), (seed, max_error, min_agreement,
                                                               got.to_dict()["stages"])
    again = evaluate(p, got.stages)
    assert again.bottleneck_s == got.bottleneck_s and again.disagreement == got.disagreement


@pytest.mark.parametrize("seed", SEEDS)
def test_agreement_solve_matches_brute_force(seed: int) -> None:
    """--min-agreement alone or with --max-error: exact against the brute force over encodings."""
    check_agreement(with_disagreement(encoded_problem(seed), seed), seed)


@pytest.mark.parametrize("seed", range(1, 60, 5))
def test_agreement_solve_matches_brute_force_with_nics(seed: int) -> None:
    check_agreement(with_disagreement(encoded_problem(seed, nics=True), seed), seed)


def test_agreement_budget_trades_against_the_error_budget() -> None:
    """Two cuts: int8 has the small error but flips samples, f16 the reverse. The error budget
    alone takes int8 where it pays; with 99 % agreement it must take f16 there."""
    d = three_encodings()
    d["model"]["encodings"]["int8"]["disagreement"] = [2.0]
    d["model"]["encodings"]["f16"]["disagreement"] = [0.0]
    d["model"]["encodings"]["int4"]["disagreement"] = [40.0]
    d["device_types"]["t"]["codec_ms_per_mb"]["f16"] = {"encode": 300, "decode": 50}  # f16 slower than int8 now
    p = Problem.from_dict(d)
    assert solve(p, max_error=0.01).stages[0].encoding == "int8"
    plan = solve(p, max_error=0.01, min_agreement=99)
    assert plan.stages[0].encoding == "f16" and plan.disagreement == 0.0
    assert solve(p, min_agreement=98).stages[0].encoding == "int8"
    assert not solve(p, min_agreement=100).encoded or solve(p, min_agreement=100).stages[0].encoding == "f16"
    from edgezmq.planner.encoded import ladders
    assert ladders(p, plan, 0.3, 99) == [["f16"], []]            # int8 would flip 2 % of samples
    assert ladders(p, plan, 0.3, 97) == [["f16", "int8"], []]
    assert ladders(p, plan, 0.3, 50) == [["f16", "int8", "int4"], []]
    assert "top-1 agreement >= 100 %" in plan.table(p)


@pytest.mark.parametrize("value, message", [
    ([-1], "model.encodings.int8.disagreement[0]: expected a number"),
    ([101], "model.encodings.int8.disagreement[0]"),
    (["nan"], "model.encodings.int8.disagreement[0]"),
    ([1, 2], "model.encodings.int8.disagreement: expected 1 values"),
    ("5", "model.encodings.int8.disagreement: expected a list"),
])
def test_bad_disagreement_names_the_field(value: object, message: str) -> None:
    with pytest.raises(PlanError) as e:
        Problem.from_dict(base(encodings={"int8": {"ratio": 0.25, "error": [0.01], "disagreement": value}}))
    assert message in str(e.value)


def test_an_agreement_budget_needs_measured_disagreement(tmp_path, capsys) -> None:
    import yaml

    from edgezmq.cli.main import main
    p = Problem.from_dict(base(encodings=INT8))
    assert solve(p, max_error=0.01).disagreement is None        # not measured: unknown, not 0
    with pytest.raises(PlanError, match=r"model.encodings.int8.disagreement: needed by a top-1 agreement budget"):
        solve(p, min_agreement=99)
    problem = tmp_path / "p.yaml"
    problem.write_text(yaml.safe_dump(base(encodings=INT8)))
    assert main(["plan", str(problem), "--min-agreement", "99"]) == 2
    assert "model.encodings.int8.disagreement" in capsys.readouterr().err
    for bad in ("101", "-0.5", "nan", "inf"):
        with pytest.raises(SystemExit):
            main(["plan", str(problem), "--min-agreement", bad])
        assert "--min-agreement" in capsys.readouterr().err


# --- output: the plan command and the deployable plan ------------------------------------------

def three_encodings() -> dict:
    d = base(encodings={"f16": {"ratio": 0.5, "error": [0.001]}, "int8": {"ratio": 0.25, "error": [0.01]},
                        "int4": {"ratio": 0.125, "error": [0.2]}})
    d["device_types"]["t"]["codec_ms_per_mb"] = {e: {"encode": 100, "decode": 50} for e in ("f16", "int8", "int4")}
    return d


@pytest.mark.parametrize("max_error, ladder", [
    (None, None), (0.0, None), (0.001, ["f16"]), (0.01, ["f16", "int8"]), (0.25, ["f16", "int8", "int4"]),
])
def test_deployable_writes_the_chosen_encoding_and_what_the_budget_allows(max_error, ladder) -> None:
    """f16 and int8 both give 1.1 s (a's compute and encode binds): the least error, f16, is
    chosen, then what the budget leaves room for."""
    from edgezmq.planner import deployable
    p = Problem.from_dict(three_encodings())
    plan = solve(p, max_error=max_error)
    doc = deployable(p, plan, max_error=max_error)
    assert doc["stages"][0].get("encoding") == ladder
    assert "encoding" not in doc["stages"][-1]


def test_ladder_keeps_every_link_at_its_worst_rung_within_the_budget() -> None:
    """f16 chosen (error 0.001), budget 0.02: int8 (0.01) fits below it, int4 (0.2) does not."""
    from edgezmq.planner.encoded import ladders
    p = Problem.from_dict(three_encodings())
    plan = evaluate(p, [{"units": [0, 1], "devices": ["a"], "encoding": "f16"}, {"units": [1, 2], "devices": ["b"]}])
    assert ladders(p, plan, 0.02) == [["f16", "int8"], []]
    assert ladders(p, plan, 0.001) == [["f16"], []]
    assert ladders(p, plan, None) == [["f16"], []]
    raw = evaluate(p, [((0, 1), ["a"]), ((1, 2), ["b"])])
    assert ladders(p, raw, 0.3) == [["raw", "f16", "int8", "int4"], []]
    assert ladders(p, raw, None) == [[], []]


def test_plan_command_shows_and_writes_encodings(tmp_path, capsys) -> None:
    import yaml

    from edgezmq.cli.main import main
    from edgezmq.orchestrate.planfile import load_plan
    problem = tmp_path / "p.yaml"
    problem.write_text(yaml.safe_dump(three_encodings()))
    out = tmp_path / "plan.yaml"
    assert main(["plan", str(problem), "--max-error", "0.01", "-o", str(out), "--checkpoint", "m.safetensors"]) == 0
    text = capsys.readouterr().out
    assert "encoding in" in text and "f16" in text and "error 0.001" in text
    doc = yaml.safe_load(out.read_text())
    assert doc["stages"][0]["encoding"] == ["f16", "int8"]
    nodes = {"a": "tcp://127.0.0.1:5001", "b": "tcp://127.0.0.1:5002"}
    for s in doc["stages"]:
        s["nodes"] = [nodes[n] for n in s["nodes"]]
    out.write_text(yaml.safe_dump(doc))
    assert load_plan(out).stages[0].encodings == [["f16"], ["int8"]]
    assert main(["plan", str(problem), "--max-error", "0.01", "--json"]) == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [k["encoding"] for k in got["links"]] == ["raw", "f16", "raw"] and got["error"] == pytest.approx(0.001)
    assert main(["plan", str(problem), "--json"]) == 0
    assert {k["encoding"] for k in json.loads(capsys.readouterr().out)["links"]} == {"raw"}
    with pytest.raises(SystemExit):
        main(["plan", str(problem), "--max-error", "-1"])
    assert "--max-error" in capsys.readouterr().err


@pytest.mark.parametrize("seed", range(0, 60, 4))
def test_effort_limit_keeps_a_valid_plan_and_bound(seed: int) -> None:
    """Stopped by effort: a plan within the budget, and a lower bound the optimum respects."""
    p = Problem.from_dict(encoded_problem(seed))
    max_error = budget(random.Random(seed))
    want = brute(p, max_error)
    if math.isinf(want):
        return
    plan = solve(p, max_error=max_error, effort=60)
    assert plan.feasible and plan.error <= max_error + 1e-12
    assert plan.lower_bound_s <= want * (1 + RTOL) <= plan.bottleneck_s * (1 + 2 * RTOL)
    assert plan.optimal or plan.stats["stopped_by"] == "effort"


def test_too_many_device_classes_returns_the_raw_plan_unproven() -> None:
    """16 devices all different, with replication: 2^16 stage compositions, not searched."""
    d = base(encodings=INT8)
    d["devices"] = [{"name": f"d{i}", "type": "t", "speed": 1 + i / 100} for i in range(16)]
    d["options"] = {"replication": True}
    p = Problem.from_dict(d)
    plan = solve(p, max_error=0.01)
    assert not plan.optimal and plan.stats["stopped_by"] == "size" and plan.lower_bound_s == 0.0
    assert plan.bottleneck_s == solve(without_encodings(p)).bottleneck_s and not plan.encoded


def test_baselines_stay_raw_under_a_budget(tmp_path, capsys) -> None:
    import yaml

    from edgezmq.cli.main import main
    problem = tmp_path / "p.yaml"
    problem.write_text(yaml.safe_dump(three_encodings()))
    out = tmp_path / "plan.yaml"
    assert main(["plan", str(problem), "--baseline", "even", "--max-error", "0.3", "-o", str(out),
                 "--checkpoint", "m.safetensors", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert {k["encoding"] for k in got["links"]} == {"raw"} and got["error"] == 0.0
    assert all("encoding" not in s for s in yaml.safe_load(out.read_text())["stages"])
