"""failover.py: a node SIGKILLed mid-run -> re-plan over the survivors, redeploy, replay;
every submitted batch answered exactly once and equal to the monolithic model."""

from __future__ import annotations

import time

import numpy as np
import pytest
from helpers import KWARGS, MICROBATCH, MODEL, batches, checkpoint, monolithic

from edgezmq.bootstrap import ModelSpec
from edgezmq.client import PipelineError
from edgezmq.cluster import Cluster, NodeEntry
from edgezmq.failover import Heartbeat, ResilientPipeline
from edgezmq.local import LocalCluster

pytestmark = pytest.mark.slow
INTERVAL = 0.3  # fast heartbeats: a dead node is out in ~1 s
N_BATCHES = 10


def spec() -> ModelSpec:
    return ModelSpec(name=MODEL, microbatch=MICROBATCH, checkpoint=checkpoint(), kwargs=KWARGS)


def inventory(local: LocalCluster) -> Cluster:
    return Cluster(nodes=[NodeEntry(n.name, n.control) for n in local.nodes], probe_seconds=0.1, pings=3)


def _run_and_kill(which: str, tmp_path) -> None:
    with LocalCluster(4, threads=1, log_dir=tmp_path) as local:
        procs = {n.name: n.proc for n in local.nodes}
        xs = batches(N_BATCHES, seed=21)
        with ResilientPipeline(inventory(local), spec(), window=4, timeout=60, interval=INTERVAL,
                               replication=False) as rp:
            stages = rp.plan.stages
            assert len(stages) >= 2, "the test needs a pipeline of several stages"
            victim = {"first": stages[0], "last": stages[-1], "middle": stages[len(stages) // 2]}[which].nodes[0].name
            killed = []

            def kill_after_three(seq: int, _y: np.ndarray) -> None:
                if seq == 2 and not killed:  # results 0..2 are in; more are in flight
                    procs[victim].kill()
                    killed.append(time.time())

            outs = list(rp.stream(xs, on_result=kill_after_three))
            assert killed and victim in rp.dead and rp.failovers >= 1
            assert victim not in {ref.name for _, ref in rp.plan.all_nodes}  # re-planned without it
            assert rp.client.replayed >= 1
    assert len(outs) == N_BATCHES  # every batch exactly once, in order
    for a, b in zip(outs, monolithic(xs)):
        assert float(np.max(np.abs(a - b))) <= 1e-5


@pytest.mark.parametrize("which", ["first", "last", "middle"])
def test_a_killed_node_loses_nothing(which, tmp_path):
    _run_and_kill(which, tmp_path)


def test_no_survivor_means_a_clear_error_not_a_hang(tmp_path):
    with LocalCluster(1, threads=1, log_dir=tmp_path) as local:
        xs = batches(6, seed=4)
        t0 = time.time()
        with ResilientPipeline(inventory(local), spec(), window=2, timeout=60, interval=INTERVAL) as rp:

            def kill(seq: int, _y: np.ndarray) -> None:
                if seq == 0:
                    local.nodes[0].proc.kill()

            with pytest.raises(PipelineError) as ei:
                list(rp.stream(xs, on_result=kill))
        assert ei.value.code == "failover_failed" and "no node left alive" in str(ei.value)
        assert "unanswered microbatches" in str(ei.value)
        assert time.time() - t0 < 60


def test_heartbeat_declares_a_silent_node_dead_by_name(tmp_path):
    with LocalCluster(2, threads=1, log_dir=tmp_path) as local:
        dead: list[str] = []
        nodes = {n.name: n.control for n in local.nodes}
        # idle nodes do not run a stage: for a deployment they are as good as dead
        hb = Heartbeat(nodes, dead.append, interval=0.2, liveness=2).start()
        deadline = time.time() + 10
        while len(dead) < 2 and time.time() < deadline:
            time.sleep(0.05)
        hb.stop()
        assert sorted(dead) == sorted(nodes)


def test_cli_run_on_an_inventory(tmp_path):
    import json
    import subprocess
    import sys

    import yaml

    with LocalCluster(2, threads=1, log_dir=tmp_path) as local:
        inv = tmp_path / "cluster.yaml"
        inv.write_text(yaml.safe_dump({"nodes": [{"name": n.name, "control": n.control} for n in local.nodes],
                                       "measure": {"seconds": 0.1, "pings": 3}}))
        r = subprocess.run([sys.executable, "-m", "edgezmq", "run", str(inv), "--model", MODEL,
                            "--kwargs", json.dumps(KWARGS), "--microbatch", str(MICROBATCH),
                            "--checkpoint", checkpoint(), "--random", "5", "--out", str(tmp_path / "y.npy"), "-q"],
                           capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert np.load(tmp_path / "y.npy").shape == (5, 1000) and "deployed run" in r.stderr


def test_a_node_that_comes_back_rejoins(tmp_path):
    import subprocess
    import sys

    with LocalCluster(3, threads=1, log_dir=tmp_path) as local:
        xs = batches(12, seed=8)
        with ResilientPipeline(inventory(local), spec(), window=2, timeout=60, interval=INTERVAL,
                               replication=False) as rp:
            victim = rp.plan.stages[0].nodes[0].name
            node = next(n for n in local.nodes if n.name == victim)
            restarted: list[subprocess.Popen] = []

            def inputs():
                for i, x in enumerate(xs):
                    if i == 6:  # let the failover finish, then bring the node back at its address
                        deadline = time.time() + 60
                        while rp.failovers < 1 and time.time() < deadline:
                            time.sleep(0.05)
                        restarted.append(subprocess.Popen(
                            [sys.executable, "-m", "edgezmq", "node", "--control", node.control,
                             "--name", victim, "--threads", "1"], stdout=subprocess.DEVNULL))
                        while not rp.rejoined and time.time() < deadline + 60:
                            time.sleep(0.05)
                    yield x

            def kill(seq: int, _y: np.ndarray) -> None:
                if seq == 1 and node.proc.poll() is None:
                    node.proc.kill()

            try:
                outs = list(rp.stream(inputs(), on_result=kill))
                assert rp.rejoined == [victim] and victim not in rp.dead
                assert victim in {ref.name for _, ref in rp.plan.all_nodes}  # planned back in
            finally:
                for p in restarted:
                    p.terminate()
                    p.wait(30)
    assert len(outs) == len(xs)
    for a, b in zip(outs, monolithic(xs)):
        assert float(np.max(np.abs(a - b))) <= 1e-5
