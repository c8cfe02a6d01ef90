"""End to end with real node processes on loopback: deploy, infer, compare with timm's own forward."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import yaml
import zmq
from helpers import (
    KWARGS,
    MICROBATCH,
    MODEL,
    N_UNITS,
    batches,
    checkpoint,
    model_spec,
    monolithic,
    run_cli,
    run_cli_here,
)

from edgezmq.client import Client
from edgezmq.model import chain as models
from edgezmq.orchestrate.address import NodeAddress
from edgezmq.orchestrate.deploy import DeployError, deploy, unload
from edgezmq.orchestrate.local import LocalCluster
from edgezmq.orchestrate.planfile import DeployPlan, ModelSpec, PlanFileError, StagePlan
from edgezmq.paths import checkpoints_dir
from edgezmq.transport import sockets
from edgezmq.transport.rpc import ControlClient

pytestmark = pytest.mark.slow
TOL = 1e-5  # separate processes, same kernels and thread count: expect 0, allow float noise


@pytest.fixture(scope="module")
def cluster(node_pool):
    with node_pool.take(4) as c:
        yield c


def make_plan(cluster, ranges, replicas=None, granularity="block", results="tcp://127.0.0.1:0"):
    nodes = iter(cluster.nodes)
    stages = []
    for i, r in enumerate(ranges):
        k = (replicas or {}).get(i, 1)
        stages.append(StagePlan(units=r, nodes=[NodeAddress(n.name, n.control, 1) for n in [next(nodes) for _ in range(k)]]))
    return DeployPlan(model=ModelSpec(name=MODEL, microbatch=MICROBATCH, granularity=granularity,
                                checkpoint=checkpoint(), kwargs=KWARGS), stages=stages, results=results)


def run_plan(plan, xs, window=4):
    with Client([], "tcp://127.0.0.1:0", run="", window=window, microbatch=MICROBATCH, timeout=60) as c:
        plan.results = c.results_endpoint
        dep = deploy(plan, load_timeout=120)
        try:
            c.attach(dep.entry, dep.run)
            return list(c.stream(xs)), c
        finally:
            unload(plan)


def assert_close(outs, ref):
    assert len(outs) == len(ref)
    for a, b in zip(outs, ref):
        assert a.shape == b.shape
        assert float(np.max(np.abs(a - b))) <= TOL


def test_three_stage_pipeline_equals_monolithic(cluster):
    xs = batches(8)
    plan = make_plan(cluster, [(0, 2), (2, 4), (4, N_UNITS)])
    outs, client = run_plan(plan, xs)
    assert_close(outs, monolithic(xs))
    # every microbatch carries a timestamp entry per stage, in order
    assert all([e[0] for e in t[1:-1]] == [0, 1, 2] for t in client.timestamps.values())


def test_a_client_keeps_the_timestamps_of_its_latest_results_only(cluster):
    xs = batches(5, seed=4)
    plan = make_plan(cluster, [(0, N_UNITS)])
    with Client([], "tcp://127.0.0.1:0", run="", window=2, microbatch=MICROBATCH, timeout=60,
                keep_timestamps=3) as c:
        plan.results = c.results_endpoint
        dep = deploy(plan, load_timeout=120)
        try:
            c.attach(dep.entry, dep.run)
            first = c.next_seq
            assert_close(list(c.stream(xs)), monolithic(xs))
        finally:
            unload(plan)
    assert len(c.timestamps) == 3 and max(c.timestamps) == first + 4  # bounded, the latest kept


def test_replicated_stage_keeps_order(cluster):
    xs = batches(10, seed=3)
    plan = make_plan(cluster, [(0, 1), (1, 5), (5, N_UNITS)], replicas={1: 2})
    outs, _ = run_plan(plan, xs, window=5)
    assert_close(outs, monolithic(xs))


@pytest.mark.parametrize("granularity", ["half", "sublayer"])
def test_finer_units_across_processes(cluster, granularity):
    n = models.num_units(MODEL, granularity, **KWARGS)
    # cut inside blocks: for sublayers, cuts at 2 and 4 mod 4 carry two tensors over the wire
    cuts = [0, 2, 5, n] if granularity == "sublayer" else [0, 2, 5, n]
    plan = make_plan(cluster, list(zip(cuts, cuts[1:])), granularity=granularity)
    xs = batches(3, seed=5)
    outs, _ = run_plan(plan, xs)
    assert_close(outs, monolithic(xs))


def test_deploy_to_dead_node_fails_clearly_and_unloads_the_others(cluster):
    with zmq.Context() as ctx:  # a port that is bound by nobody
        s = ctx.socket(zmq.REP)
        port = s.bind_to_random_port("tcp://127.0.0.1")
        s.close(linger=0)
    plan = make_plan(cluster, [(0, 3), (3, N_UNITS)])
    plan.stages[1].nodes = [NodeAddress("ghost", f"tcp://127.0.0.1:{port}")]
    t0 = time.time()
    with pytest.raises(DeployError) as ei:
        deploy(plan, ping_timeout=1.0)
    assert time.time() - t0 < 30
    assert "ghost" in str(ei.value) and "did not answer" in str(ei.value)
    assert set(ei.value.errors) == {"ghost"}
    with ControlClient(cluster.nodes[0].control, timeout=5) as c:
        assert c.call("ping")["state"] == "idle"


def test_deploy_failure_on_one_node_unloads_the_loaded_ones(cluster, tmp_path):
    from safetensors import safe_open
    from safetensors.numpy import save_file

    from edgezmq.model import chain as models

    # the first shard's tensors and nothing the last shard needs: node0 loads, node1 fails
    owner = models._owners(models._pieces(models.create_model(MODEL, **KWARGS), "block"))
    with safe_open(checkpoint(), "np") as f:
        first = {k: f.get_tensor(k) for k in f.keys() if min(owner(k), default=0) < 3}
    bad = checkpoints_dir() / f"partial-{tmp_path.name}.safetensors"
    save_file(first, str(bad))
    plan = make_plan(cluster, [(0, 3), (3, N_UNITS)])
    plan.model.checkpoint = str(bad)
    try:
        with pytest.raises(DeployError) as ei:
            deploy(plan, load_timeout=60)
    finally:
        bad.unlink()
    assert set(ei.value.errors) == {cluster.nodes[1].name}  # node0 loaded its shard ...
    for n in cluster.nodes[:2]:  # ... and was unloaded with the rest
        with ControlClient(n.control, timeout=5) as c:
            assert c.call("ping")["state"] == "idle"


def test_bad_unit_ranges_are_refused_before_any_node_is_touched(cluster):
    plan = make_plan(cluster, [(0, 3), (3, N_UNITS - 1)])
    with pytest.raises(PlanFileError, match="6 units"):
        deploy(plan)
    plan = make_plan(cluster, [(0, N_UNITS)])
    plan.model.name = "no_such_vit"
    with pytest.raises(PlanFileError, match="no_such_vit"):
        deploy(plan)


def test_client_times_out_when_no_result_comes(socks):
    sink = socks(zmq.PULL)  # swallows microbatches, never answers
    ep = sockets.bind(sink, "tcp://127.0.0.1:0")
    with Client([ep], "tcp://127.0.0.1:0", run="r", timeout=0.5, retries=1) as c:
        t0 = time.time()
        with pytest.raises(TimeoutError, match="microbatch 0"):
            c.infer(batches(1)[0])
        assert time.time() - t0 < 10
        assert c.resubmitted == 1
    got = [sockets.recv_frames(sink, 5000) for _ in range(2)]
    assert all(f is not None for f in got)  # first attempt + one resubmission


def test_client_refuses_bad_batches():
    with Client([], "tcp://127.0.0.1:0", run="r", microbatch=2) as c:
        with pytest.raises(ValueError, match="outside 1..2"):
            c.infer(np.zeros((3, 3, 64, 64), np.float32))
        with pytest.raises(ValueError, match="C, H, W"):
            c.infer(np.zeros((3, 64, 64), np.float32))
        with pytest.raises(TypeError):
            c.infer([1, 2])


def test_cli_deploy_submit_status_undeploy(cluster, tmp_path, capsys):
    from PIL import Image

    port_ctx = zmq.Context()
    s = port_ctx.socket(zmq.PULL)
    port = s.bind_to_random_port("tcp://127.0.0.1")
    s.close(linger=0)
    port_ctx.term()
    plan = {
        "model": {"name": MODEL, "checkpoint": checkpoint(), "microbatch": MICROBATCH, "kwargs": KWARGS},
        "nodes": {n.name: n.control for n in cluster.nodes[:2]},
        "stages": [{"units": [0, 3], "nodes": [cluster.nodes[0].name]},
                   {"units": [3, N_UNITS], "nodes": [cluster.nodes[1].name]}],
        "results": f"tcp://127.0.0.1:{port}",
    }
    pf = tmp_path / "plan.yaml"
    pf.write_text(yaml.safe_dump(plan))
    r = run_cli("deploy", str(pf))
    assert r.returncode == 0, r.stderr
    assert "blocks.1" in r.stdout and cluster.nodes[1].name in r.stdout  # the stage table

    x = np.stack(batches(3, seed=9)).reshape(-1, 3, 64, 64)[:5]  # 5 samples: 2 + 2 + 1
    np.save(tmp_path / "in.npy", x)
    # the submits in this process (run_cli_here: they import torch), the rest as `python -m edgezmq`
    r = run_cli_here(capsys, "submit", str(pf), "--npy", str(tmp_path / "in.npy"), "--out", str(tmp_path / "out.npy"), "-q")
    assert r.returncode == 0, r.stderr
    out = np.load(tmp_path / "out.npy")
    ref = np.concatenate(monolithic([x[0:2], x[2:4], x[4:5]]))
    assert out.shape == (5, 1000) and float(np.max(np.abs(out - ref))) <= TOL
    assert "sample 0:" in r.stdout

    img_dir = tmp_path / "imgs"
    img_dir.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (80, 90, 3), dtype=np.uint8)).save(img_dir / f"im{i}.png")
    r = run_cli_here(capsys, "submit", str(pf), "--images", str(img_dir), "--out", str(tmp_path / "img.npy"))
    assert r.returncode == 0, r.stderr
    assert np.load(tmp_path / "img.npy").shape == (3, 1000) and "im2.png:" in r.stdout

    r = run_cli("status", str(pf), "--json")
    assert r.returncode == 0, r.stderr
    st = json.loads(r.stdout)["nodes"]
    assert [s["state"] for s in st] == ["running", "running"]
    assert st[0]["processed"] == 3 + 2  # 3 npy microbatches + 2 image microbatches

    r = run_cli("undeploy", str(pf))
    assert r.returncode == 0 and "unloaded" in r.stdout


def test_cli_errors_are_clear(tmp_path):
    pf = tmp_path / "bad.yaml"
    pf.write_text("model: {name: x}\nstages: [1, 2]\n")
    r = run_cli("deploy", str(pf))
    assert r.returncode == 2 and "model.checkpoint: missing" in r.stderr and "Traceback" not in r.stderr
    pf.write_text(":\n- [unbalanced")
    r = run_cli("deploy", str(pf))
    assert r.returncode == 2 and "not valid YAML" in r.stderr
    r = run_cli("deploy", str(tmp_path / "missing.yaml"))
    assert r.returncode == 2 and "cannot read" in r.stderr


def test_sigterm_drains_and_exits_zero(tmp_path):
    c = LocalCluster(1, threads=1).start()
    node = c.nodes[0]
    plan = DeployPlan(model=model_spec(),
                stages=[StagePlan(units=(0, N_UNITS), nodes=[NodeAddress(node.name, node.control, 1)])])
    with Client([], "tcp://127.0.0.1:0", run="", window=4, timeout=60) as client:
        plan.results = client.results_endpoint
        dep = deploy(plan)
        client.attach(dep.entry, dep.run)
        xs = batches(4, seed=2)
        gen = client.stream(xs)
        first = next(gen)  # the rest are in flight when SIGTERM arrives
        codes = c.stop()
        rest = list(gen)
    assert codes == {node.name: 0}
    assert_close([first, *rest], monolithic(xs))  # drained: nothing in flight was lost


# timm's own tiny test ViT (6 blocks of width 64, 160 px): the demo's steps (checkpoint, nodes,
# profile, plan, calibration, monolithic check) are the same as for a full-size model, at a
# fraction of the compute (vit_tiny_patch16_224 took ~17 CPU s more for the planner split)
DEMO_MODEL, DEMO_UNITS = "test_vit", 8  # embed + 6 blocks + head


def test_demo_json(tmp_path):
    r = run_cli("demo", "--model", DEMO_MODEL, "--nodes", "2", "--batches", "2",
             "--microbatch", "2", "--json", timeout=600)
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    for key in ("model", "nodes", "microbatch", "batches", "pipeline_samples_per_s",
                "monolithic_samples_per_s", "speedup", "max_abs_diff", "stages"):
        assert key in d
    assert d["max_abs_diff"] <= 1e-4 and d["nodes"] == 2
    assert d["split"] == "planner" and d["predicted_samples_per_s"] > 0
    assert d["window"] >= 2 * 2 + 2  # the planner's (Plan.window): 2 per device, 2 for the client, the depth
    units = [s["units"] for s in d["stages"]]
    assert units[0][0] == 0 and units[-1][1] == DEMO_UNITS  # the planner's cut covers the model
    assert all(a[1] == b[0] for a, b in zip(units, units[1:]))


def test_demo_even_split_json(capsys):
    # in this process (run_cli_here), as the CNN's and BERT's demos: test_demo_json runs `python -m edgezmq demo`
    r = run_cli_here(capsys, "demo", "--model", DEMO_MODEL, "--nodes", "2", "--batches", "2",
                     "--microbatch", "2", "--split", "even", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert [s["units"] for s in d["stages"]] == [[0, 4], [4, DEMO_UNITS]] and d["max_abs_diff"] <= 1e-4
    assert d["window"] == 2 * 2 + 2  # no planner: a plan's default (DeployPlan.in_flight)


def test_a_client_never_takes_results_of_a_client_that_gave_up(cluster):
    """A client that gives up leaves microbatches in the pipeline; the next client on the same
    results address, whose seq restarts at 0, must drop them (and count them), not return them."""
    from edgezmq.transport.nodeclient import NodeClient

    plan = make_plan(cluster, [(0, 3), (3, N_UNITS)])
    last = plan.stages[-1].nodes[0]
    abandoned, mine = batches(3, seed=11), batches(3, seed=12)
    first = Client([], "tcp://127.0.0.1:0", run="", window=4, microbatch=MICROBATCH, timeout=60)
    plan.results = first.results_endpoint
    try:
        dep = deploy(plan, load_timeout=120)
        first.attach(dep.entry, dep.run)
        with NodeClient(last.control, name=last.name) as nc:
            nc.pause()  # hold the first client's microbatches until it is gone
            for i, x in enumerate(abandoned):  # submitted, never collected: the client gives up
                first._send(i, first._check(x), time.time() + 60)
            first.close()
            with Client(dep.entry, plan.results, dep.run, window=4, microbatch=MICROBATCH, timeout=60) as second:
                nc.resume()  # the abandoned results now reach the new client first, as seq 0..2
                outs = list(second.stream(mine))
                # the paused stage holds at least the one it took; others may be lost with the first
                # client's connection: what arrives is dropped, never returned
                assert 1 <= second.foreign <= len(abandoned)
    finally:
        first.close()
        unload(plan)
    assert_close(outs, monolithic(mine))


# ---------------------------------------------------------------- traced models (any timm model)

CNN, CNN_KW = "resnet50", {"layers": (1, 1, 1, 1)}


def test_a_cnn_cut_inside_residual_blocks_crosses_processes_exactly(cluster):
    # `fine` cuts where a bottleneck's shortcut and main path are both live: two tensors per message
    import torch
    from safetensors.torch import load_file

    path = str(models.cached_checkpoint(CNN, seed=0, **CNN_KW))
    specs = models.boundary_specs(CNN, "fine", 2, **CNN_KW)
    two = [i for i, s in enumerate(specs) if len(s) == 2]
    n = len(specs) - 1
    cuts = [0, two[0], two[len(two) // 2], n]
    spec = ModelSpec(name=CNN, microbatch=2, granularity="fine", checkpoint=path, kwargs=CNN_KW)
    nodes = iter(cluster.nodes)
    plan = DeployPlan(model=spec, results="tcp://127.0.0.1:0", stages=[
        StagePlan(units=r, nodes=[NodeAddress(nd.name, nd.control, 1)]) for r, nd in zip(zip(cuts, cuts[1:]), nodes)])
    rng = np.random.default_rng(3)
    xs = [rng.standard_normal(models.input_shape(CNN, 2, **CNN_KW), dtype=np.float32) for _ in range(3)]
    with Client([], "tcp://127.0.0.1:0", run="", window=4, microbatch=2, timeout=60) as c:
        plan.results = c.results_endpoint
        dep = deploy(plan, load_timeout=120)
        try:
            c.attach(dep.entry, dep.run)
            outs = list(c.stream(xs))
        finally:
            unload(plan)
    m = models.create_model(CNN, **CNN_KW)
    m.load_state_dict(load_file(path))
    torch.set_num_threads(1)
    with torch.inference_mode():
        ref = [m(torch.from_numpy(x)).numpy() for x in xs]
    assert len(specs[cuts[1]]) == len(specs[cuts[2]]) == 2
    assert_close(outs, ref)


def test_demo_of_a_cnn_profiles_plans_and_equals_the_model(capsys):
    r = run_cli_here(capsys, "demo", "--model", "mobilenetv3_small_050", "--nodes", "2", "--batches", "2",
                     "--microbatch", "2", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["max_abs_diff"] == 0.0 and d["split"] == "planner" and d["predicted_samples_per_s"] > 0
    units = [s["units"] for s in d["stages"]]
    assert units[0][0] == 0 and units[-1][1] == models.num_units("mobilenetv3_small_050", "block")
