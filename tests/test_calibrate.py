"""edgezmq.orchestrate.calibrate: a deployment's serving speed vs the planner's, the corrected problem, and
a re-plan + redeploy on real nodes when a profile was wrong."""

from __future__ import annotations

import copy
from dataclasses import replace

import numpy as np
import pytest
from helpers import KWARGS, MICROBATCH, MODEL, PROBE_S, batches, model_spec, monolithic, stage_stats
from test_planner import small

from edgezmq.client import Client
from edgezmq.orchestrate import calibrate as C
from edgezmq.orchestrate.autodeploy import device_type_of, gather, plan_problem, to_deploy_plan
from edgezmq.orchestrate.deploy import deploy, unload
from edgezmq.orchestrate.inventory import parse_cluster
from edgezmq.planner import Problem, Stage, evaluate


def _snap(processed, uptime, compute, compute_cpu, cpu):
    return stage_stats(processed=processed, uptime_s=uptime, compute_s=compute, compute_cpu_s=compute_cpu,
                       cpu_s=cpu)


@pytest.mark.parametrize("device, threads, want", [
    ({"cpu_quota": 0.5, "cores": 2}, 1, 0.15 / 0.5),           # CPU per microbatch / the quota
    ({"cpu_quota": None, "cores": 2}, 1, 0.1),                # a spare core: the forwards' wall time
    ({"cpu_quota": None, "cores": 2}, 2, 0.1 + 0.03 / 2),     # threads use the cores: + the rest / cores
    ({"cpu_quota": None, "cores": 4}, None, 0.1 + 0.03 / 4),  # torch's default: a thread per core
])
def test_serving_time(device, threads, want):
    before = _snap(5, 10.0, 0.5, 0.4, 0.6)
    after = _snap(15, 12.0, 1.5, 1.6, 2.1)  # 10 microbatches: 0.1 s, 0.12 + 0.03 s CPU each, in 2 s
    got, busy = C.serving_time_s(before, after, device, threads)
    assert got == pytest.approx(want)
    assert busy == pytest.approx(0.5)  # 1 s of forwards in 2 s


def test_serving_time_without_work_is_none():
    s = _snap(5, 10.0, 0.5, 0.4, 0.6)
    assert C.serving_time_s(s, replace(s, uptime_s=11.0), {"cores": 2}, 1) is None
    assert C.serving_time_s(None, _snap(0, 1.0, 0, 0, 0), {"cores": 2}, 1) is None
    assert C.serving_time_s(s, None, {"cores": 2}, 1) is None  # nothing loaded any more


def test_factors_count_saturated_stages_only():
    p = Problem.from_dict(small())
    planned = evaluate(p, [Stage((0, 2), ("a",)), Stage((2, 3), ("c",))])
    types = {"a": "fast", "b": "fast", "c": "slow"}
    a_pred, c_pred = (planned.stage_costs[0].unreplicated_s, planned.stage_costs[1].unreplicated_s)
    # a: saturated, 20% slower than planned; c: idle half the time and faster: not counted
    f, devs = C.factors(p, planned, {"a": (1.2 * a_pred, 0.95), "c": (0.8 * c_pred, 0.5)}, types)
    assert f == {"fast": pytest.approx(1.2)}
    assert devs["a"]["counted"] and not devs["c"]["counted"]
    assert devs["c"]["ratio"] == pytest.approx(0.8) and devs["a"]["predicted_s"] == pytest.approx(a_pred)
    # nor when it says slower: a stage that idled was timed off its saturated pace either way
    f, devs = C.factors(p, planned, {"a": (1.2 * a_pred, 0.95), "c": (1.5 * c_pred, 0.5)}, types)
    assert f == {"fast": pytest.approx(1.2)} and not devs["c"]["counted"]
    f, _ = C.factors(p, planned, {"c": (0.8 * c_pred, 0.9)}, types)  # saturated: counted either way
    assert f == {"slow": pytest.approx(0.8)}


def test_corrected_scales_only_the_given_types():
    d = small()
    d["device_types"]["fast"].update(recv_ms_per_mb=2.0, send_ms_per_mb=1.0,
                                     codec_ms_per_mb={"int8": {"encode": 4.0, "decode": 2.0}})
    before = copy.deepcopy(d)
    out = C.corrected(d, {"fast": 1.5})
    assert d == before  # not modified in place
    assert out["device_types"]["fast"]["codec_ms_per_mb"] == {"int8": {"encode": 6.0, "decode": 3.0}}
    assert out["device_types"]["fast"]["unit_times_s"] == [1.5, 3.0, 4.5]
    assert out["device_types"]["fast"]["recv_ms_per_mb"] == 3.0 and out["device_types"]["fast"]["send_ms_per_mb"] == 1.5
    assert out["device_types"]["slow"] == d["device_types"]["slow"]
    assert {k: v for k, v in out.items() if k != "device_types"} == {k: v for k, v in d.items() if k != "device_types"}


@pytest.fixture(scope="module")
def nodes(node_pool):
    with node_pool.take(2) as c:
        yield c


@pytest.mark.slow
def test_a_wrong_profile_is_corrected_replanned_and_redeployed(nodes):
    """The problem says node0 is 30x faster than it is: the plan piles units on it; calibration
    sees node0 serve ~30x slower than planned, re-plans and redeploys; outputs stay exact."""
    cluster = parse_cluster({"nodes": [{"name": n.name, "control": n.control} for n in nodes.nodes],
                             "measure": {"seconds": PROBE_S, "pings": 3, "bytes_per_msg": 1 << 20}})
    spec = model_spec()
    g = gather(cluster, model=MODEL, microbatch=MICROBATCH, kwargs=KWARGS, spot_check=False)
    wrong = copy.deepcopy(g.problem)
    t0 = wrong["device_types"]["node0"]
    t0["unit_times_s"] = [t / 30 for t in t0["unit_times_s"]]
    problem, planned = plan_problem(wrong)
    first = [(tuple(s.units), tuple(s.devices)) for s in planned.stages]
    with Client([], "tcp://127.0.0.1:0", run="", window=6, microbatch=MICROBATCH, timeout=60) as c:
        dep = deploy(to_deploy_plan(cluster, planned, model=spec, results=c.results_endpoint))
        try:
            dep, problem2, planned2, cal = C.calibrate(
                dep, wrong, problem, planned, client=c, infos=g.infos,
                types={n.name: device_type_of(n) for n in cluster.nodes}, replan=plan_problem,
                to_plan=lambda p: to_deploy_plan(cluster, p, model=spec, results=c.results_endpoint), n=4)
            assert cal.devices["node0"]["ratio"] > 5  # 30x, measured: a wide margin
            first_round = cal.rounds[0]
            assert first_round["factors"]["node0"] == pytest.approx(
                np.mean([d["ratio"] for n_, d in cal.devices.items() if n_ == "node0"]))
            # the redeployed plan was calibrated in turn; the factors compose over the rounds
            assert first_round["redeployed"] and len(cal.rounds) >= 2
            assert cal.measured == (not cal.rounds[-1]["redeployed"])
            assert cal.replanned and cal.factors["node0"] == pytest.approx(
                np.prod([r["factors"].get("node0", 1.0) for r in cal.rounds]))
            assert cal.problem["device_types"]["node0"]["unit_times_s"] == pytest.approx(
                [t * cal.factors["node0"] for t in t0["unit_times_s"]])
            now = [(tuple(s.units), tuple(s.devices)) for s in planned2.stages]
            assert now != first and cal.redeployed  # node0's share moved to node1
            assert cal.predicted_after == planned2.throughput_per_s < cal.predicted_before
            assert [(tuple(s.units), tuple(n.name for n in s.nodes)) for s in dep.plan.stages] == now
            c.attach(dep.entry, dep.run)
            xs = batches(3, seed=5)
            outs = list(c.stream(xs))
        finally:
            unload(dep.plan)
    for a, b in zip(outs, monolithic(xs), strict=True):
        assert float(np.max(np.abs(a - b))) <= 1e-5
