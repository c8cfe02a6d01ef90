"""cluster.py: inventory parsing; autodeploy: info -> profile -> netprobe -> plan -> deploy on real nodes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import yaml
from helpers import (
    KWARGS,
    MICROBATCH,
    MODEL,
    N_UNITS,
    SAMPLE_INVENTORY,
    batches,
    checkpoint,
    inventory_dict,
    model_spec,
    monolithic,
    run_cli,
    run_cli_here,
    slow_link_inventory,
)

from edgezmq.client import Client
from edgezmq.orchestrate.autodeploy import autodeploy, gather, io_costs
from edgezmq.orchestrate.deploy import unload
from edgezmq.orchestrate.inventory import ClusterError, parse_cluster
from edgezmq.orchestrate.planfile import load_plan

GOOD = SAMPLE_INVENTORY


def test_parse_good_inventory():
    c = parse_cluster(GOOD)
    assert [n.name for n in c.nodes] == ["a", "b"]
    assert c.node("a").memory_bytes == 2_000_000_000 and c.node("b").threads == 2
    assert c.results == "tcp://127.0.0.1:5999"
    assert c.known_link("client", "a").mbps == 5 and c.known_link("a", "b").mbps == 100
    assert c.probe_seconds == 0.1


@pytest.mark.parametrize(
    "mutate, text",
    [
        (lambda d: d.update(nodes=[]), "nodes: expected a non-empty list"),
        (lambda d: d["nodes"][1].update(name="a"), "nodes[1].name: duplicate"),
        (lambda d: d["nodes"][0].update(name="client"), "nodes[0].name"),
        (lambda d: d["nodes"][0].update(control="10.0.0.1:5"), "nodes[0].control: expected a tcp://HOST:PORT address"),
        (lambda d: d["nodes"][0].update(memory_bytes="lots"), "nodes[0].memory_bytes"),
        (lambda d: d["nodes"][1].update(threads=0), "nodes[1].threads: expected an integer in [1, 256], got 0"),
        (lambda d: d["nodes"][0].update(colour="red"), "nodes[0]: unknown field"),
        (lambda d: d["links"]["overrides"][0].update(b="ghost"), "links.overrides[0].b: unknown node 'ghost'"),
        (lambda d: d["links"]["default"].pop("mbps"), "links.default.mbps: missing"),
        (lambda d: d["links"]["default"].update(mbps=-1), "links.default.mbps: expected a number in (0, 10000000], got -1"),
        # non-finite figures fail here, not as a probe that never ends or a plan of NaNs
        (lambda d: d.update(measure={"seconds": float("inf")}), "measure.seconds: expected a number in (0, 60], "
                                                                 "got inf (not a finite number)"),
        (lambda d: d["links"]["default"].update(latency_ms=float("nan")), "links.default.latency_ms: expected a number"),
        (lambda d: d["nodes"][0].update(memory_bytes=".inf"), "nodes[0].memory_bytes: expected bytes"),
        (lambda d: d.update(measure={"pings": 2.5}), "measure.pings: expected an integer, got float 2.5"),
        (lambda d: d["nodes"][0].update(nic_mbps=0), "nodes[0].nic_mbps: expected a number in (0, 10000000], got 0"),
        (lambda d: d["nodes"][1].update(nic_mbps={"up": 10, "down": -1}),
         "nodes[1].nic_mbps.down: expected a number in (0, 10000000], got -1"),
        (lambda d: d["nodes"][1].update(nic_mbps={"up": 10, "dn": 5}), "nodes[1].nic_mbps: unknown field(s) ['dn']"),
        (lambda d: d["client"].update(nic_mbps=[30]), "client.nic_mbps: expected a number or a mapping {up, down}"),
    ],
)
def test_bad_inventories_name_the_field(mutate, text):
    d = json.loads(json.dumps(GOOD))
    mutate(d)
    with pytest.raises(ClusterError, match=None) as ei:
        parse_cluster(d)
    assert text in str(ei.value)


def test_nics_are_payload_rates_and_reach_the_planner_problem():
    # a testbed's cluster.yaml: configured NIC rates per node and for the client, TCP payload
    # getting a fraction of them, as for its links
    from edgezmq.orchestrate.autodeploy import build_problem
    from edgezmq.planner import Problem

    d = json.loads(json.dumps(GOOD))
    d["nodes"][0]["nic_mbps"] = {"up": 30, "down": 10}
    d["nodes"][1].update(nic_mbps=20, cpu=0.1, namespace="ez-b", address="10.0.0.3")
    d["client"].update(nic_mbps={"up": 100}, namespace="ez-client", cpu=0.2)
    d["testbed"] = {"tcp_payload_factor": 0.5}
    c = parse_cluster(d)
    assert (c.node("a").nic.up_mbps, c.node("a").nic.down_mbps) == (15, 5)
    assert (c.node("b").nic.up_mbps, c.node("b").nic.down_mbps) == (10, 10)
    assert (c.client_nic.up_mbps, c.client_nic.down_mbps) == (50, float("inf"))
    assert parse_cluster(GOOD).client_nic is None and parse_cluster(GOOD).node("a").nic is None

    profile = {"input_bytes": 1000, "units": [{"name": "u0", "out_bytes": 500, "param_bytes": 10, "work_bytes": 0,
                                               "time_s": 0.1}]}
    info = {"device": {"rss": 1000, "memory_available": 10**9}}
    problem = build_problem(c, {"a": info, "b": info}, {"rpi": profile, "b": profile}, {},
                            model="m", microbatch=1, granularity="block", kwargs={})
    assert [x.get("nic_mbps") for x in problem["devices"]] == [{"up": 15, "down": 5}, {"up": 10, "down": 10}]
    assert problem["client"] == {"nic_mbps": {"up": 50}}    # an unlimited direction is left out
    p = Problem.from_dict(problem)
    assert p.device("a").nic == c.node("a").nic and p.client_nic == c.client_nic
    assert "client" not in build_problem(parse_cluster(GOOD), {"a": info, "b": info}, {"rpi": profile, "b": profile},
                                         {}, model="m", microbatch=1, granularity="block", kwargs={})


@pytest.fixture(scope="module")
def nodes(node_pool):
    with node_pool.take(3) as c:
        yield c


@pytest.mark.slow
def test_gather_builds_a_valid_problem(nodes):
    from edgezmq.planner import Problem

    cluster = parse_cluster(inventory_dict(nodes))
    g = gather(cluster, model=MODEL, microbatch=MICROBATCH, kwargs=KWARGS)
    p = g.problem
    assert [u["name"] for u in p["model"]["units"]] == ["embed", "blocks.0", "blocks.1", "blocks.2", "blocks.3", "head"]
    assert len(p["devices"]) == 3 and set(p["device_types"]) == {n.name for n in nodes.nodes}
    # every pair of nodes measured, plus the client's link to each node
    assert len(g.links) == 3 + 3 and all(r["bandwidth_mbps"] > 0 for r in g.links.values())
    # what receiving and sending cost, measured on every type with activation-sized messages
    act = p["model"]["units"][1]["out_bytes"]
    for typ, fig in g.io.items():
        assert fig["bytes_per_msg"] == act
        assert fig["recv_cpu_s_per_byte"] > 0 and fig["send_cpu_s_per_byte"] > 0
        assert {k: p["device_types"][typ][k] for k in ("recv_ms_per_mb", "send_ms_per_mb")} == \
            io_costs(g.infos[next(iter(g.infos))], fig["recv_cpu_s_per_byte"], fig["send_cpu_s_per_byte"])
    assert set(g.io) == set(p["device_types"])
    # unit times as a stage sees them: each unit's own time x the profile's chain factor
    for typ, prof in g.profiles.items():
        factor = prof["chain"]["factor"]
        assert p["device_types"][typ]["unit_times_s"] == pytest.approx([u["time_s"] * factor for u in prof["units"]])
    Problem.from_dict(p)  # the planner accepts it
    # typed nodes share one profile, and configured links are not measured again
    typed = inventory_dict(nodes, links={"default": {"mbps": 1000, "latency_ms": 0.2}})
    for n in typed["nodes"]:
        n["type"] = "same"
    g2 = gather(parse_cluster(typed), model=MODEL, microbatch=MICROBATCH, kwargs=KWARGS)
    assert list(g2.profiles) == ["same"] and g2.links == {}


@pytest.mark.parametrize("quota, cores, threads, scale", [
    (0.5, 2, 1, 2.0),     # half a core: every CPU second of I/O is two seconds of the stage's time
    (1.5, 2, 2, 1 / 1.5),  # threads use the whole quota
    (None, 2, 2, 0.5),    # as many threads as cores
    (None, 2, 1, 0.0),    # a spare core: I/O overlaps compute
    (None, 4, None, 0.25),  # torch's default: a thread per core
])
def test_io_costs_scale_by_the_cpus_left(quota, cores, threads, scale):
    info = {"threads": threads, "device": {"cpu_quota": quota, "cores": cores}}
    got = io_costs(info, 2e-9, 1e-9)   # 2 and 1 ms of CPU per MB
    assert got == {"recv_ms_per_mb": pytest.approx(2 * scale), "send_ms_per_mb": pytest.approx(1 * scale)}


@pytest.mark.slow
def test_autodeploy_runs_and_equals_monolithic(nodes):
    from edgezmq.orchestrate.address import NodeAddress
    from edgezmq.orchestrate.deploy import deploy
    from edgezmq.orchestrate.planfile import DeployPlan, StagePlan

    cluster = parse_cluster(inventory_dict(nodes))
    spec = model_spec()
    # two nodes still serve a run whose client is gone: the new deployment takes them over
    stale = DeployPlan(model=spec, results="tcp://127.0.0.1:1", stages=[
        StagePlan((0, 3), [NodeAddress(nodes.nodes[0].name, nodes.nodes[0].control, 1)]),
        StagePlan((3, 6), [NodeAddress(nodes.nodes[1].name, nodes.nodes[1].control, 1)])])
    deploy(stale, load_timeout=120)
    said: list[str] = []
    with Client([], "tcp://127.0.0.1:0", run="", window=4, microbatch=MICROBATCH, timeout=60) as c:
        dep, plan, problem, planned, g = autodeploy(cluster, spec, results=c.results_endpoint, replication=False,
                                                    client=c, say=said.append)
        try:
            assert sum("taking it over" in m for m in said) == 2, said
            assert planned.throughput_per_s > 0 and plan.stages[0].units[0] == 0
            # the planner's window goes with the plan (its latency term included), as a file's predicted.window
            assert plan.window == dep.plan.window == plan.in_flight == planned.window
            # calibrated: every deployed node measured serving, and the plan in service is the final one
            cal = g.calibration
            assert cal is not None and 8 <= cal.microbatches <= 32
            assert set(cal.devices) == {d for s in planned.stages for d in s.devices}
            assert all(d["serving_s"] > 0 and d["predicted_s"] > 0 for d in cal.devices.values())
            assert cal.predicted_after == planned.throughput_per_s and cal.burst_samples_per_s > 0
            assert [(tuple(s.units), [n.name for n in s.nodes]) for s in dep.plan.stages] == \
                [(tuple(s.units), list(s.devices)) for s in planned.stages]
            c.attach(dep.entry, dep.run)
            xs = batches(4, seed=11)
            outs = list(c.stream(xs))
        finally:
            unload(plan)
    for a, b in zip(outs, monolithic(xs)):
        assert float(np.max(np.abs(a - b))) <= 1e-5


@pytest.mark.slow
def test_cli_deploy_cluster_dry_run_writes_a_deployable_plan(nodes, tmp_path):
    inv = tmp_path / "cluster.yaml"
    inv.write_text(yaml.safe_dump(inventory_dict(nodes)))
    out = tmp_path / "plan.yaml"
    env = dict(os.environ)
    r = subprocess.run([sys.executable, "-m", "edgezmq", "deploy", str(inv), "--model", MODEL,
                        "--kwargs", json.dumps(KWARGS), "--microbatch", str(MICROBATCH),
                        "--checkpoint", checkpoint(), "--dry-run", "--plan-out", str(out), "--reprofile"],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    assert "predicted:" in r.stdout and "profiled unit" in r.stderr and "link node0 <-> node1" in r.stderr
    plan = load_plan(out)  # the written plan is a deployable plan file
    assert plan.stages[0].units[0] == 0 and plan.stages[-1].units[1] == 6
    d = yaml.safe_load(out.read_text())
    assert d["predicted"]["throughput_per_s"] > 0 and "device_types" in d["problem"]
    for n in nodes.nodes:  # dry run: nothing loaded
        from edgezmq.transport.rpc import ControlClient

        with ControlClient(n.control, timeout=5) as cc:
            assert cc.call("ping")["state"] == "idle"


@pytest.mark.slow
def test_cli_deploy_cluster_needs_a_model(tmp_path):
    inv = tmp_path / "cluster.yaml"
    inv.write_text(yaml.safe_dump({"nodes": [{"name": "x", "control": "tcp://127.0.0.1:1"}]}))
    r = subprocess.run([sys.executable, "-m", "edgezmq", "deploy", str(inv)], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "give --model" in r.stderr


@pytest.mark.slow
def test_cli_profile_a_node_and_netprobe(nodes, capsys):
    a, b = nodes.nodes[0].control, nodes.nodes[1].control
    # profile in this process (run_cli_here: it imports torch), netprobe as `python -m edgezmq`
    r = run_cli_here(capsys, "profile", "--node", a, "--model", MODEL, "--kwargs", json.dumps(KWARGS),
                     "--microbatch", str(MICROBATCH), "--reps", "1", "--reprofile", "--json")
    assert r.returncode == 0, r.stderr
    prof = json.loads(r.stdout)
    assert len(prof["units"]) == 6 and prof["threads"] == 1
    assert r.stderr.count("unit ") >= 1  # per-unit progress lines
    r = run_cli("netprobe", "--from", a, "--to", b, "--seconds", "0.2", "--bytes", str(1 << 20), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["bandwidth_mbps"] > 0
    r = run_cli("netprobe", "--to", b, "--seconds", "0.2", "--bytes", str(1 << 20))
    assert r.returncode == 0 and "Mbit/s" in r.stdout


@pytest.mark.slow
def test_cli_netprobe_several_links_at_once(nodes):
    """From here to two nodes at once (this host's uplink), and from two nodes to a third at
    once (its downlink: both jobs run together, one per node)."""
    a, b, c = (n.control for n in nodes.nodes)
    flags = ("--seconds", "0.3", "--bytes", str(1 << 16), "--pings", "2", "--json")
    for argv, links in ((["--to", b, "--to", c], [("here", b), ("here", c)]),
                        (["--from", a, "--from", b, "--to", c], [(a, c), (b, c)])):
        r = run_cli("netprobe", *argv, *flags)
        assert r.returncode == 0, r.stderr
        out = json.loads(r.stdout)
        assert [(f["from"], f["to"]) for f in out["flows"]] == links
        assert all(f["bandwidth_mbps"] > 0 and f["seconds"] >= 0.3 for f in out["flows"])
        together = out["together"]
        assert together["flows"] == 2 and together["bytes"] == sum(f["bytes"] for f in out["flows"])
        assert together["overlap"] > 0, together  # they ran at the same time, not one after the other
    r = run_cli("netprobe", "--to", b, "--to", c, "--seconds", "0.2", "--bytes", str(1 << 16))
    assert r.returncode == 0 and "together (2 at once, this host's uplink)" in r.stdout, r.stdout


@pytest.mark.slow
def test_calibration_is_skipped_when_the_results_address_is_taken(nodes):
    """`deploy` run away from the inventory's client (here: its results port already bound by
    someone else) cannot receive results: it deploys without calibrating, and says so."""
    import zmq

    ctx = zmq.Context()
    holder = ctx.socket(zmq.PULL)
    port = holder.bind_to_random_port("tcp://127.0.0.1")
    said: list[str] = []
    try:
        cluster = parse_cluster(inventory_dict(nodes, client={"address": "127.0.0.1", "results_port": port}))
        dep, plan, _, planned, g = autodeploy(cluster, model_spec(), replication=False, say=said.append)
        try:
            assert g.calibration is None and dep.plan.results == f"tcp://127.0.0.1:{port}"
            assert any(m.startswith("calibration skipped: cannot receive results at") for m in said), said
        finally:
            unload(plan)
    finally:
        holder.close(0)
        ctx.term()


@pytest.mark.slow
def test_undeploy_an_inventory_unloads_whatever_its_nodes_serve(nodes, tmp_path):
    """A run nobody drives any more (its client killed) is unloaded by `undeploy CLUSTER.yaml`."""
    from edgezmq.cli.main import main as cli_main
    from edgezmq.orchestrate.address import NodeAddress
    from edgezmq.orchestrate.deploy import deploy
    from edgezmq.orchestrate.planfile import DeployPlan, StagePlan
    from edgezmq.transport.rpc import ControlClient

    plan = DeployPlan(model=model_spec(), results="tcp://127.0.0.1:1",  # a client that is gone
                      stages=[StagePlan((0, 3), [NodeAddress(nodes.nodes[0].name, nodes.nodes[0].control, 1)]),
                              StagePlan((3, 6), [NodeAddress(nodes.nodes[1].name, nodes.nodes[1].control, 1)])])
    deploy(plan, load_timeout=120)
    inv = tmp_path / "cluster.yaml"
    inv.write_text(yaml.safe_dump(inventory_dict(nodes)))
    assert cli_main(["undeploy", str(inv)]) == 0
    for n in nodes.nodes:
        with ControlClient(n.control, timeout=5) as cc:
            assert cc.call("ping")["state"] == "idle"


def test_replicas_connect_to_the_next_stage_staggered():
    """Replica j of k starts its round-robin at downstream j*n/k: a wave of activations from
    replicas that finish together spreads over every downstream replica."""
    from edgezmq.orchestrate.deploy import staggered

    down = ["a", "b", "c", "d", "e", "f", "g", "h"]
    firsts = [staggered(down, j, 8)[0] for j in range(8)]
    assert sorted(firsts) == down  # 8 senders -> 8 receivers: one each
    assert [staggered(down, j, 4)[0] for j in range(4)] == ["a", "c", "e", "g"]
    assert [staggered(["x", "y"], j, 4)[0] for j in range(4)] == ["x", "x", "y", "y"]
    assert all(sorted(staggered(down, j, 3)) == down for j in range(3))  # a rotation: every one kept
    assert staggered(["r"], 0, 1) == ["r"]


@pytest.mark.slow
def test_autodeploy_with_a_budget_encodes_a_slow_link_and_stays_within_it(nodes):
    """--max-error: the library measures the encodings (ratios, per-cut errors, codec costs),
    the planner puts one on the slow link between two stages, the deployed ladder stays within
    the budget, every stage has its link's rate, and the outputs on the calibration batch are
    within the budget of the monolithic model's. Without a budget: raw, bit for bit."""
    import torch

    from edgezmq.model.accuracy import rel_l2
    from edgezmq.orchestrate import compress
    from edgezmq.orchestrate.autodeploy import Budget

    # raw: 1.6 x the fastest node's whole-model time per activation (a second stage never pays), int8 ~0.4 x
    cluster = parse_cluster(slow_link_inventory(nodes, 1.6))
    spec = model_spec()
    budget = Budget(max_error=0.01)
    xs, _ = compress.calibration_batch(MODEL, MICROBATCH, None, KWARGS)
    batches_ = [b.numpy() for b in torch.split(xs, MICROBATCH)]
    with Client([], "tcp://127.0.0.1:0", run="", window=4, microbatch=MICROBATCH, timeout=60) as c:
        dep, plan, problem, planned, g = autodeploy(cluster, spec, results=c.results_endpoint, replication=False,
                                                    client=c, calibrate=0, budget=budget, spot_check=False)
        try:
            enc = g.problem["model"]["encodings"]
            assert set(enc) == set(compress.DEFAULT_ENCODINGS) and g.encodings.source == "seeded"
            assert all(len(e["error"]) == N_UNITS - 1 and len(e["disagreement"]) == N_UNITS - 1 for e in enc.values())
            assert enc["f16"]["ratio"] == 0.5 and enc["int8"]["error"][0] < 0.01 < enc["int4"]["error"][0]
            # flips per cut plus one sample of margin, in percent of the 16 samples
            for e, d in enc.items():
                assert d["disagreement"] == [100 * (k + 1) / 16 for k in g.encodings.flips[e]]
            for t in g.problem["device_types"].values():
                assert set(t["codec_ms_per_mb"]) == set(enc)
                assert all(v["encode"] > 0 and v["decode"] > 0 for v in t["codec_ms_per_mb"].values())
            assert planned.encoded and 0 < planned.error <= 0.01, planned.to_dict()
            assert [s.encodings is not None for s in plan.stages] == [s.encoding != "raw" for s in planned.stages]
            first = next(s for s in plan.stages if s.encodings)
            assert first.encodings[0] == [planned.stages[plan.stages.index(first)].encoding]
            assert all(s.link_mbps is not None and s.link_mbps > 0 for s in plan.stages)
            assert plan.stages[0].link_mbps == pytest.approx(cluster.default_link.mbps)
            assert plan.stages[-1].link_mbps == 1000
            c.attach(dep.entry, dep.run)
            outs = list(c.stream(batches_))
        finally:
            unload(plan)
    err = rel_l2(torch.from_numpy(np.concatenate(outs)), torch.from_numpy(np.concatenate(monolithic(batches_))))
    assert 0 < err <= 0.01, err

    with Client([], "tcp://127.0.0.1:0", run="", window=4, microbatch=MICROBATCH, timeout=60) as c:
        dep, plan, problem, planned, g = autodeploy(cluster, spec, results=c.results_endpoint, replication=False,
                                                    client=c, calibrate=0, spot_check=False)
        try:
            assert g.encodings is None and "encodings" not in g.problem["model"]
            assert not planned.encoded and all(s.encodings is None for s in plan.stages)
            c.attach(dep.entry, dep.run)
            outs = list(c.stream(batches_))
        finally:
            unload(plan)
    for a, b in zip(outs, monolithic(batches_)):
        assert np.array_equal(a, b)


@pytest.mark.slow
def test_autodeploy_with_a_budget_encodes_a_slow_client_link(nodes):
    """The client's link as slow for a raw input as 3 x the fastest node's whole-model time,
    the nodes' links fast: within --max-error the planner encodes the input (measured on the
    calibration batch like every cut), the deploy plan says so, the client sends it so, and
    the outputs are within the budget of the monolithic model's."""
    import torch

    from edgezmq.model.accuracy import rel_l2
    from edgezmq.orchestrate import compress
    from edgezmq.orchestrate.autodeploy import Budget

    inv = slow_link_inventory(nodes, 0.001, client_factor=3.0)
    cluster = parse_cluster(inv)
    xs, _ = compress.calibration_batch(MODEL, MICROBATCH, None, KWARGS)
    batches_ = [b.numpy() for b in torch.split(xs, MICROBATCH)]
    with Client([], "tcp://127.0.0.1:0", run="", window=4, microbatch=MICROBATCH, timeout=60) as c:
        dep, plan, problem, planned, g = autodeploy(cluster, model_spec(), results=c.results_endpoint, client=c,
                                                    calibrate=0, budget=Budget(max_error=0.01), spot_check=False)
        try:
            assert all("input" in e for e in g.problem["model"]["encodings"].values())
            assert planned.stages[0].input_encoding != "raw", planned.to_dict()
            assert plan.input_encoding == planned.stages[0].input_encoding and 0 < planned.error <= 0.01
            assert planned.links[0].encoding == plan.input_encoding
            c.attach(dep.entry, dep.run)
            c.input_encoding = plan.input_encoding
            outs = list(c.stream(batches_))
        finally:
            unload(plan)
    err = rel_l2(torch.from_numpy(np.concatenate(outs)), torch.from_numpy(np.concatenate(monolithic(batches_))))
    assert 0 < err <= 0.01, err


@pytest.mark.slow
def test_cli_deploy_with_budgets_dry_run(nodes, tmp_path, capsys):
    """`deploy --max-error --min-agreement --dry-run --plan-out`: the written problem carries the
    measured encodings, the plan the chosen ones; bad flag values are one-line usage errors."""
    inv = tmp_path / "cluster.yaml"
    inv.write_text(yaml.safe_dump(slow_link_inventory(nodes, 1.6)))
    out = tmp_path / "plan.yaml"
    base = ["deploy", str(inv), "--model", MODEL, "--kwargs", json.dumps(KWARGS), "--microbatch", str(MICROBATCH),
            "--checkpoint", checkpoint(), "--dry-run", "--no-replication", "--no-spot-check"]
    r = run_cli_here(capsys, *base, "--max-error", "0.01", "--min-agreement", "90", "--encodings", "f16,int8",
                     "--plan-out", str(out), "--json")
    assert r.returncode == 0, r.stderr
    assert "measuring encodings f16, int8 on" in r.stderr
    d = yaml.safe_load(out.read_text())
    assert set(d["problem"]["model"]["encodings"]) == {"f16", "int8"}
    assert any(s.get("encoding") for s in d["stages"]) and all(s["link_mbps"] > 0 for s in d["stages"]), r.stderr + r.stdout
    got = json.loads(r.stdout)["predicted"]
    assert got["error"] <= 0.01 and got["disagreement"] <= 10 and set(got["encodings"]) <= {"raw", "f16", "int8"}
    # 16 samples: each encoded cut counts at least one (6.25 %), so 90 % allows one encoded cut at most
    assert sum(e != "raw" for e in got["encodings"]) == 1
    for flags, word in ((["--max-error", "-1"], "--max-error"), (["--max-error", "nan"], "--max-error"),
                        (["--min-agreement", "101"], "--min-agreement"), (["--encodings", "int9"], "--encodings"),
                        (["--encodings", "raw"], "--encodings"), (["--encodings", "f16"], "--encodings"),
                        (["--max-error", "0.1", "--calibration-samples", "0"], "--calibration-samples"),
                        (["--max-error", "0.1", "--calibration-npy", str(tmp_path / "none.npy")], "--calibration-npy")):
        r = run_cli_here(capsys, *base, *flags)
        assert r.returncode != 0 and word in r.stderr, (flags, r.stderr)
