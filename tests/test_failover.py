"""failover.py: a node SIGKILLed mid-run, or whose stage stalls while it still answers, ->
re-plan over the survivors, redeploy, replay; every submitted batch answered exactly once
and equal to the monolithic model (also over CurveZMQ); a slow stage that progresses stays."""

from __future__ import annotations

import time

import numpy as np
import pytest
from helpers import (
    KWARGS,
    MICROBATCH,
    MODEL,
    PROBE_S,
    NodePool,
    batches,
    checkpoint,
    keys_section,
    make_keys,
    model_spec,
    monolithic,
    secured_node_args,
    slow_link_inventory,
    stage_stats,
)

from edgezmq.client import PipelineError
from edgezmq.orchestrate.failover import Heartbeat, Progress, ResilientPipeline, stall_limit
from edgezmq.orchestrate.inventory import Cluster, InventoryNode, parse_cluster
from edgezmq.orchestrate.local import LocalCluster
from edgezmq.orchestrate.planfile import ModelSpec
from edgezmq.transport.rpc import ControlClient

pytestmark = pytest.mark.slow
INTERVAL = 0.3  # fast heartbeats: a dead node is out in ~1 s
N_BATCHES = 10


def inventory(local: LocalCluster, keys: dict | None = None) -> Cluster:
    if keys is None:
        return Cluster(nodes=[InventoryNode(n.name, n.control) for n in local.nodes], probe_seconds=PROBE_S, pings=3)
    return parse_cluster({"nodes": [{"name": n.name, "control": n.control} for n in local.nodes],
                          "measure": {"seconds": PROBE_S, "pings": 3}, "keys": keys_section(keys)})


def _run_and_kill(which: tuple[str, ...], tmp_path, node_pool: NodePool | None, keys: dict | None = None,
                  n_batches: int = N_BATCHES) -> None:
    """SIGKILL one node per deployment, in turn: the node of stage `which[0]` of the first plan
    three results in, then that of stage `which[1]` of the re-plan once it streams, ..."""
    names = [f"node{i}" for i in range(4)]
    if keys:
        nodes = LocalCluster(4, threads=1, names=names, node_args=secured_node_args(keys, names), log_dir=tmp_path)
    else:
        assert node_pool is not None
        nodes = node_pool.take(4)
    with nodes as local:
        procs = {n.name: n.proc for n in local.nodes}
        xs = batches(n_batches, seed=21)
        with ResilientPipeline(inventory(local, keys), model_spec(), window=4, timeout=60, interval=INTERVAL,
                               replication=False) as rp:
            assert len(rp.plan.stages) >= 2, "the test needs a pipeline of several stages"
            killed: list[str] = []
            replayed: list[int] = []  # the client's replay count when each victim was killed

            def kill_one_per_deployment(seq: int, _y: np.ndarray) -> None:
                # results 0..2 are in and more are in flight; a later victim: the re-plan streams
                if len(killed) < len(which) and seq >= 2 and rp.failovers == len(killed):
                    stages = rp.plan.stages
                    stage = {"first": stages[0], "last": stages[-1], "middle": stages[len(stages) // 2]}
                    victim = stage[which[len(killed)]].nodes[0].name
                    replayed.append(rp.client.replayed)
                    procs[victim].kill()
                    killed.append(victim)

            outs = list(rp.stream(xs, on_result=kill_one_per_deployment))
            assert len(killed) == len(which) and set(killed) <= rp.dead and rp.failovers >= len(which)
            for victim in killed:
                assert rp.causes[victim].startswith("missed")
                assert victim not in {ref.name for _, ref in rp.plan.all_nodes}  # re-planned without it
            # each failover replayed what its victim held
            assert all(b > a for a, b in zip(replayed, [*replayed[1:], rp.client.replayed])), replayed
    assert len(outs) == n_batches  # every batch exactly once, in order
    for a, b in zip(outs, monolithic(xs)):
        assert float(np.max(np.abs(a - b))) <= 1e-5


# The first stage's node killed, then the last stage's of the re-plan: one deployment (and one
# pool refresh) for both, and a second failover after the first. More batches: the second
# victim must die with work still to come. A killed middle node: over CurveZMQ below, which
# covers the plaintext run of the same scenario too (the failover does not depend on the
# transport; the same assertions, plus security).
def test_a_killed_node_loses_nothing(tmp_path, node_pool):
    _run_and_kill(("first", "last"), tmp_path, node_pool, n_batches=16)


def test_a_killed_node_loses_nothing_over_curve(tmp_path):
    _run_and_kill(("middle",), tmp_path, None, keys=make_keys(tmp_path / "keys", [f"node{i}" for i in range(4)]))


def test_no_survivor_means_a_clear_error_not_a_hang(node_pool):
    with node_pool.take(1) as local:
        xs = batches(6, seed=4)
        # not a hang: the failure is raised by the failover (the node is dead), not by the
        # client's 600 s timeout, which would raise ResultTimeout instead
        with ResilientPipeline(inventory(local), model_spec(), window=2, timeout=600, interval=INTERVAL) as rp:

            def kill(seq: int, _y: np.ndarray) -> None:
                if seq == 0:
                    local.nodes[0].proc.kill()

            with pytest.raises(PipelineError) as ei:
                list(rp.stream(xs, on_result=kill))
        assert ei.value.code == "failover_failed" and "no node left alive" in str(ei.value)
        assert "unanswered microbatches" in str(ei.value)


def test_heartbeat_declares_a_silent_node_dead_by_name(node_pool):
    with node_pool.take(2) as local:
        dead: list[str] = []
        nodes = {n.name: n.control for n in local.nodes}
        # idle nodes do not run a stage: for a deployment they are as good as dead
        hb = Heartbeat(nodes, lambda name, why: dead.append((name, why)), interval=0.2, liveness=2).start()
        deadline = time.time() + 120  # generous: a busy machine delays the heartbeats
        while len(dead) < 2 and time.time() < deadline:
            time.sleep(0.05)
        hb.stop()
        assert sorted(name for name, _ in dead) == sorted(nodes)
        assert all(why == "is idle, not running its stage (2 heartbeats in a row)" for _, why in dead)


def run_argv(local: LocalCluster, tmp_path, n_random: int) -> list[str]:
    """`edgezmq run` on an inventory of `local`'s nodes, with `n_random` random inputs."""
    import json
    import sys

    import yaml

    inv = tmp_path / "cluster.yaml"
    inv.write_text(yaml.safe_dump({"nodes": [{"name": n.name, "control": n.control} for n in local.nodes],
                                   "measure": {"seconds": PROBE_S, "pings": 3}}))
    return [sys.executable, "-m", "edgezmq", "run", str(inv), "--model", MODEL, "--kwargs", json.dumps(KWARGS),
            "--microbatch", str(MICROBATCH), "--checkpoint", checkpoint(), "--random", str(n_random),
            "--out", str(tmp_path / "y.npy")]


def test_cli_run_on_an_inventory(tmp_path, node_pool):
    import subprocess

    with node_pool.take(2) as local:
        r = subprocess.run(run_argv(local, tmp_path, 5) + ["-q"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert np.load(tmp_path / "y.npy").shape == (5, 1000) and "deployed run" in r.stderr


def test_a_node_that_comes_back_rejoins(node_pool):
    import subprocess
    import sys

    with node_pool.take(3) as local:
        xs = batches(12, seed=8)
        with ResilientPipeline(inventory(local), model_spec(), window=2, timeout=60, interval=INTERVAL,
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


# ---- stalls: a node that answers but whose stage stops producing ----------------------------
def test_progress_counts_only_time_holding_work_without_finishing_any():
    p = Progress()
    assert p.stalled_for(stage_stats(received=3), 0.0) == 0.0  # no work
    assert p.stalled_for(stage_stats(received=4, in_flight=1), 1.0) == 0.0  # work arrived: the clock starts
    assert p.stalled_for(stage_stats(received=5, in_flight=2), 3.0) == 2.0  # more came, none finished
    assert p.stalled_for(stage_stats(received=5, in_flight=1), 4.0) == 0.0  # one finished: progress
    assert p.stalled_for(stage_stats(received=5, in_flight=1), 6.5) == 2.5
    assert p.stalled_for(stage_stats(received=5, in_flight=1, backpressured=True), 7.0) == 0.0  # downstream's fault
    assert p.stalled_for(stage_stats(received=5, in_flight=1), 8.0) == 0.0
    assert p.stalled_for(stage_stats(received=5, in_flight=1), 9.0) == 1.0
    assert p.stalled_for(stage_stats(run="r2", received=5, in_flight=1), 10.0) == 0.0  # another deployment
    assert p.stalled_for(None, 11.0) == 0.0  # no stage any more


def test_stall_limit_scales_with_the_predicted_stage_time():
    assert stall_limit(0.01, floor=5.0, factor=10.0) == 5.0
    assert stall_limit(2.0, floor=5.0, factor=10.0) == 20.0  # a slow board
    assert stall_limit(None, floor=5.0) == 5.0
    with pytest.raises(ValueError, match="stall_floor: expected seconds > 0"):
        ResilientPipeline(Cluster(nodes=[]), model_spec(), stall_floor=0)


STALL_FLOOR = 0.5  # the tiny model's stages take milliseconds: their limit is this floor


def test_a_stage_that_stops_producing_is_declared_dead_and_failed_over(caplog, node_pool):
    """`pause` holds the middle stage's compute thread while its control socket keeps answering."""
    with node_pool.take(3) as local:
        xs = batches(N_BATCHES, seed=33)
        with ResilientPipeline(inventory(local), model_spec(), window=4, timeout=60, interval=INTERVAL,
                               replication=False, stall_floor=STALL_FLOOR) as rp:
            stages = rp.plan.stages
            assert len(stages) >= 3, "the test needs a middle stage"
            victim = stages[1].nodes[0]
            paused: list[dict] = []

            def pause_after_three(seq: int, _y: np.ndarray) -> None:
                if seq == 2 and not paused:
                    with ControlClient(victim.control, timeout=5, retries=0) as c:
                        paused.append(c.call("pause"))

            with caplog.at_level("WARNING", logger="edgezmq.orchestrate.failover"):
                outs = list(rp.stream(xs, on_result=pause_after_three))
            assert paused and rp.dead == {victim.name} and rp.failovers >= 1
            assert rp.causes[victim.name].startswith("stalled: finished no microbatch")
            assert victim.name not in {ref.name for _, ref in rp.plan.all_nodes}
            assert rp.client.replayed >= 1
            with ControlClient(victim.control, timeout=5, retries=0) as c:  # alive all along, still paused
                st = c.call("stats")
            assert st["state"] == "running" and st["stage"]["paused"] and st["stage"]["in_flight"] >= 1
    assert any(f"node {victim.name} stalled:" in r.getMessage() and "declared dead" in r.getMessage()
               for r in caplog.records)
    assert len(outs) == N_BATCHES
    for a, b in zip(outs, monolithic(xs)):
        assert float(np.max(np.abs(a - b))) <= 1e-5


# A stage of several tenths of a second per microbatch: far above a 0.05 s floor, so only the
# limit scaled to its predicted time keeps it alive.
SLOW_MODEL, SLOW_KWARGS, SLOW_MICROBATCH = "vit_small_patch16_224", {"depth": 4}, 8
SLOW_FLOOR = 0.05


def test_a_slow_stage_that_progresses_is_not_declared_dead(node_pool):
    from edgezmq.model import chain as models

    ckpt = str(models.cached_checkpoint(SLOW_MODEL, seed=0, **SLOW_KWARGS))
    slow = ModelSpec(name=SLOW_MODEL, microbatch=SLOW_MICROBATCH, checkpoint=ckpt, kwargs=SLOW_KWARGS)
    rng = np.random.default_rng(3)
    xs = [rng.standard_normal(models.input_shape(SLOW_MODEL, SLOW_MICROBATCH, **SLOW_KWARGS), dtype=np.float32)
          for _ in range(6)]
    with node_pool.take(1) as local:
        with ResilientPipeline(inventory(local), slow, window=3, timeout=60, interval=0.05,
                               stall_floor=SLOW_FLOOR) as rp:
            outs = list(rp.stream(xs))
            with ControlClient(local.nodes[0].control, timeout=5, retries=0) as c:
                st = c.call("stats")["stage"]
            assert rp.failovers == 0 and not rp.dead, rp.causes
        cal = rp.calibration  # the first deployment ran its calibration through the stage too
    assert len(outs) == len(xs) and st["processed"] == len(xs) + cal.warmup + cal.microbatches + cal.cooldown
    assert st["compute_s"] / st["processed"] > 2 * SLOW_FLOOR  # the floor alone would have declared it dead


def test_a_node_killed_during_the_first_calibration_is_failed_over(node_pool):
    """Liveness covers the calibration burst too: the dead node is named and planned out,
    instead of the client waiting out its timeout for a result that never comes."""
    with node_pool.take(4) as local:
        procs = {n.name: n.proc for n in local.nodes}
        ready: list[str] = []
        killed: list[str] = []
        said: list[str] = []

        def say(msg: str) -> None:
            said.append(msg)
            if msg.endswith(": ready"):
                ready.append(msg.split(":")[0])
            elif msg.startswith("started") and not killed:  # deployed: calibration streams next
                victim = ready[len(ready) // 2]
                procs[victim].kill()
                killed.append(victim)

        xs = batches(N_BATCHES, seed=5)
        with ResilientPipeline(inventory(local), model_spec(), window=4, timeout=600, interval=INTERVAL,
                               replication=False, say=say) as rp:
            assert killed and killed[0] in rp.dead, said
            assert rp.causes[killed[0]].startswith("missed"), rp.causes
            assert any(m.startswith(f"node {killed[0]} lost while calibrating") for m in said), said
            assert killed[0] not in {ref.name for _, ref in rp.plan.all_nodes}
            outs = list(rp.stream(xs))
    assert len(outs) == N_BATCHES
    for a, b in zip(outs, monolithic(xs)):
        assert float(np.max(np.abs(a - b))) <= 1e-5


def test_a_failover_keeps_the_accuracy_budget(node_pool):
    """ResilientPipeline(budget=...): the first deployment measures the encodings and plans the
    slow link between stages encoded within the budget; a stage's node is SIGKILLed mid-stream;
    the recovery plans over the survivors within the same budget from the same measurement (the
    model is not run on the client again), and every batch comes back once, within the budget of
    the monolithic model's output on the calibration batch (where the budget was measured)."""
    import torch

    from edgezmq.model.accuracy import rel_l2
    from edgezmq.orchestrate import compress
    from edgezmq.orchestrate.autodeploy import Budget

    with node_pool.take(3) as local:
        # raw: 1.6 x the fastest node's whole-model time per activation, int8 ~0.4 x: only an
        # encoded link makes a second stage pay, before and after the failover
        cluster = parse_cluster(slow_link_inventory(local, 1.6))
        procs = {n.name: n.proc for n in local.nodes}
        said: list[str] = []
        xs_all, _ = compress.calibration_batch(MODEL, MICROBATCH, None, KWARGS)
        xs = [b.numpy() for b in torch.split(xs_all, MICROBATCH)]
        with ResilientPipeline(cluster, model_spec(), window=2, timeout=60, interval=INTERVAL, replication=False,
                               budget=Budget(max_error=0.01), say=said.append) as rp:
            assert rp.planned.encoded and 0 < rp.planned.error <= 0.01, rp.planned.to_dict()
            first = rp.measured
            assert first is not None and first.source == "seeded"
            victim = rp.plan.stages[-1].nodes[0].name
            killed: list[str] = []

            def kill_after_two(seq: int, _y: np.ndarray) -> None:
                if seq == 1 and not killed:
                    procs[victim].kill()
                    killed.append(victim)

            outs = list(rp.stream(xs, on_result=kill_after_two))
            assert killed and victim in rp.dead and rp.failovers >= 1
            assert victim not in {ref.name for _, ref in rp.plan.all_nodes}
            assert rp.planned.encoded and 0 < rp.planned.error <= 0.01, rp.planned.to_dict()
            assert rp.measured is first
            assert sum(m.startswith("measuring encodings") for m in said) == 1, said
            assert any(m.startswith("encodings ") and "as measured before" in m for m in said), said
    assert len(outs) == len(xs)
    err = rel_l2(torch.from_numpy(np.concatenate(outs)), torch.from_numpy(np.concatenate(monolithic(xs))))
    assert 0 < err <= 0.01, err


def test_sigterm_to_run_unloads_its_nodes(tmp_path, node_pool):
    """A `run` stopped by SIGTERM (systemd, `timeout`) cleans up as after Ctrl-C: no node is left
    running a run nobody drives."""
    import signal
    import subprocess


    with node_pool.take(2) as local:
        # 10,000 samples still stream for tens of seconds after the nodes run (SIGTERM comes within
        # a poll); `run` makes its inputs up front: 100,000 took 23 CPU s and 4.9 GB before deploying
        run = subprocess.Popen(run_argv(local, tmp_path, 10_000), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
        try:
            clients = [ControlClient(n.control, timeout=5, name=n.name) for n in local.nodes]
            deadline = time.monotonic() + 300
            while not all(c.call("ping")["state"] == "running" for c in clients):  # deployed, streaming
                assert run.poll() is None, run.stderr.read() if run.stderr else ""
                assert time.monotonic() < deadline, "run never deployed"
                time.sleep(0.2)
            run.send_signal(signal.SIGTERM)
            _, err = run.communicate(timeout=120)
            assert run.returncode == 128 + signal.SIGTERM, err
            assert "terminated" in err and "Traceback" not in err
            assert [c.call("ping")["state"] for c in clients] == ["idle", "idle"]
        finally:
            if run.poll() is None:
                run.kill()
                run.wait()
            for c in clients:
                c.close()
