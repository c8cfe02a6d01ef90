"""One measured run on a cluster: gather -> plan (ours or a baseline) -> deploy -> stream -> stats.

Run on the client side of the cluster (on a testbed: inside its client namespace, e.g.
``testbed.exec_in_client([python, "bench/measure.py", ...])``); prints one JSON object.
The benches (fidelity, scaling, hetero, memory) are built on it.

    python bench/measure.py --cluster CLUSTER.yaml --model vit_small_patch16_224 \
        --microbatch 8 --batches 8 [--method ours|even|pipeedge|pipedream] [--verify]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgezmq import argtypes as args_
from edgezmq.client import Client  # noqa: E402
from edgezmq.model import chain as models  # noqa: E402
from edgezmq.orchestrate.autodeploy import device_type_of, gather, to_deploy_plan  # noqa: E402
from edgezmq.orchestrate.calibrate import CALIBRATION_MICROBATCHES, calibrate, snapshot  # noqa: E402
from edgezmq.orchestrate.deploy import deploy, unload  # noqa: E402
from edgezmq.orchestrate.inventory import load_cluster  # noqa: E402
from edgezmq.orchestrate.planfile import ModelSpec  # noqa: E402
from edgezmq.transport.rpc import ControlClient  # noqa: E402

METHODS = ("ours", "even", "pipeedge", "pipedream")


def plan_with(problem, method: str, time_limit_s: float):
    from edgezmq.planner import baseline, solve

    if method == "ours":
        return solve(problem, time_limit_s=time_limit_s)
    return baseline(problem, method)


def reference(name: str, checkpoint: str, xs: list[np.ndarray], kwargs: dict) -> list[np.ndarray]:
    """timm's own forward of the whole model (run where memory allows: the client side)."""
    import torch
    from safetensors.torch import load_file

    m = models.create_model(name, **kwargs)
    m.load_state_dict(load_file(checkpoint))
    with torch.inference_mode():
        return [m(torch.from_numpy(x)).numpy() for x in xs]


def _per_mb(stats: dict | None) -> float | None:
    st = (stats or {}).get("stage") or {}
    return st["compute_s"] / st["processed"] if st.get("processed") else None


def _cpu_per_mb(stats: dict | None) -> list[float] | None:
    st = (stats or {}).get("stage") or {}
    if not st.get("processed") or st.get("cpu_s") is None:
        return None
    n = st["processed"]
    return [st["compute_cpu_s"] / n, (st["cpu_s"] - st["compute_cpu_s"]) / n]


def arrival_slope(times: list[float]) -> float:
    """Seconds per result: the least-squares slope of arrival time over result index (the
    steady rate, robust to results that arrive in waves of replicas)."""
    n = len(times)
    if n < 2:
        raise ValueError("a rate needs at least two arrivals")
    xs = np.arange(n, dtype=float)
    ts = np.asarray(times, dtype=float)
    return float(np.sum((xs - xs.mean()) * (ts - ts.mean())) / np.sum((xs - xs.mean()) ** 2))


def _timed(before: dict | None, after: dict | None) -> dict | None:
    """Per node, its stage's counters between two snapshots (calibrate.snapshot)."""
    if not before or not after:
        return None
    out = {}
    for name, a in after.items():
        b = before.get(name)
        if a is None or b is None:
            continue
        d = {k: getattr(a, k) - getattr(b, k) for k in ("processed", "uptime_s", "compute_s", "wait_s", "send_s")}
        d["busy"] = d["compute_s"] / d["uptime_s"] if d["uptime_s"] > 0 else None
        out[name] = {k: round(v, 4) if isinstance(v, float) else v for k, v in d.items()}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cluster", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--microbatch", type=args_.microbatch, default=8)
    ap.add_argument("--granularity", default="block")
    ap.add_argument("--kwargs", default="{}")
    ap.add_argument("--checkpoint")
    ap.add_argument("--batches", type=args_.count, default=8,
                    help="timed microbatches (rounded up to a multiple of the last stage's replicas)")
    ap.add_argument("--warmup", type=args_.count_or_zero, default=None,
                    help="untimed microbatches first, same stream (default: one per device of the plan, so "
                         "every replica is busy when the timing starts)")
    ap.add_argument("--cooldown", type=args_.count_or_zero, default=None,
                    help="untimed microbatches after the timed ones, same stream (default: as --warmup), so "
                         "the pipeline is still full when the last timed result arrives")
    ap.add_argument("--window", type=args_.window, default=None,
                    help="microbatches in flight (default: the plan's, edgezmq.planner.Plan.window)")
    ap.add_argument("--method", default="ours", choices=METHODS)
    ap.add_argument("--no-replication", action="store_true")
    ap.add_argument("--nodes", help="comma-separated subset of the cluster's nodes to use")
    ap.add_argument("--time-limit", type=args_.seconds, default=20.0)
    ap.add_argument("--reprofile", action="store_true", help="profile afresh (ignore the nodes' caches)")
    ap.add_argument("--no-spot-check", action="store_true",
                    help="take cached profiles as they are (no re-timing of their reference; calibration still corrects)")
    ap.add_argument("--calibrate", type=args_.count_or_zero, default=CALIBRATION_MICROBATCHES,
                    help="microbatches of the deploy's calibration (edgezmq.orchestrate.calibrate; 0: none)")
    ap.add_argument("--verify", action="store_true", help="compare every output with timm's forward")
    args = ap.parse_args()

    from edgezmq.planner import Problem

    kwargs = json.loads(args.kwargs)
    cluster = load_cluster(args.cluster)
    if args.nodes:
        keep = args.nodes.split(",")
        cluster.nodes = [n for n in cluster.nodes if n.name in keep]
    ckpt = args.checkpoint or str(models.cached_checkpoint(args.model, **kwargs))
    t0 = time.time()
    g = gather(cluster, model=args.model, microbatch=args.microbatch, granularity=args.granularity,
               kwargs=kwargs, replication=not args.no_replication, reprofile=args.reprofile,
               spot_check=not args.no_spot_check, say=lambda m: print(m, file=sys.stderr))
    problem = Problem.from_dict(g.problem)
    planned = plan_with(problem, args.method, args.time_limit)
    print(planned.table(problem), file=sys.stderr)
    if not planned.feasible:  # e.g. PipeDream's plan, made for copies of the first device
        print(json.dumps({"model": args.model, "microbatch": args.microbatch, "method": args.method,
                          "violations": list(planned.violations),
                          "predicted_samples_per_s": planned.throughput_per_s,
                          "stages": [{"units": list(s.units), "devices": list(s.devices)} for s in planned.stages],
                          "measured_samples_per_s": None, "total_seconds": time.time() - t0}))
        return 0
    spec = ModelSpec(name=args.model, microbatch=args.microbatch, granularity=args.granularity,
                     checkpoint=ckpt, kwargs=kwargs)
    shape = models.input_shape(args.model, args.microbatch, **kwargs)
    window = args.window or planned.window  # set again below for the plan calibration keeps
    predicted_first = planned.throughput_per_s
    cal = None
    # a microbatch waits for the window ahead of it: time it out only well past that
    timeout = max(600.0, 3 * window * planned.bottleneck_s)
    with Client([], f"tcp://{cluster.client_address}:0", run="", window=window,
                microbatch=args.microbatch, timeout=timeout) as client:
        plan = to_deploy_plan(cluster, planned, model=spec, results=client.results_endpoint)
        t_deploy = time.time()
        dep = deploy(plan, load_timeout=900)
        deploy_s = time.time() - t_deploy
        try:
            if args.calibrate:
                def replan(d: dict):
                    p = Problem.from_dict(d)
                    return p, plan_with(p, args.method, args.time_limit)

                dep, problem, planned, cal = calibrate(
                    dep, g.problem, problem, planned, client=client, infos=g.infos,
                    types={n.name: device_type_of(n) for n in cluster.nodes}, replan=replan,
                    to_plan=lambda p: to_deploy_plan(cluster, p, model=spec, results=client.results_endpoint),
                    n=args.calibrate, load_timeout=900, say=lambda m: print(m, file=sys.stderr))
                plan = dep.plan
                print(planned.table(problem), file=sys.stderr)
            client.window = args.window or max(client.window, planned.window)
            client.timeout = max(client.timeout, 3 * client.window * planned.bottleneck_s)
            client.attach(dep.entry, dep.run)
            client.input_encoding = dep.plan.input_encoding
            # one continuous stream: warm-up, timed, cool-down; steady state is timed from the
            # last warm-up result to the last timed result, while the pipeline is still full
            # (fill and drain excluded: with replicas, results come in waves, and a drain would
            # time a half-empty pipeline)
            devices = sum(len(s.devices) for s in planned.stages)
            warmup = devices if args.warmup is None else args.warmup
            cooldown = warmup if args.cooldown is None else args.cooldown
            wave = len(planned.stages[-1].devices)  # results per wave: the last stage's replicas
            batches = -(-args.batches // wave) * wave
            rng = np.random.default_rng(0)
            xs = [rng.standard_normal(shape, dtype=np.float32) for _ in range(warmup + batches + cooldown)]
            first_seq = client.next_seq
            snaps: list = [None, None]  # every node's counters at the timing's start and end

            def on_result(i: int, _: np.ndarray) -> None:
                if i in (warmup - 1, warmup + batches - 1):
                    snaps[i != warmup - 1] = snapshot(plan)

            t1 = time.time()
            outs = list(client.stream(xs, on_result=on_result))
            arrivals = client.arrivals(first_seq, len(xs))  # receive times, in arrival order
            start = arrivals[warmup - 1] if warmup else t1
            dt = arrivals[warmup + batches - 1] - start
            # the warm-up's last result (the timing's start) and every timed one
            timed_arrivals = [start] + arrivals[warmup:warmup + batches]
            timed_xs = xs[warmup:warmup + batches]
            outs = outs[warmup:warmup + batches]
            # per microbatch, its timestamps at each hop (docs/wire.md `t`): where the time went
            stamps = [client.timestamps.get(first_seq + i) for i in range(len(xs))]
            stats = {}
            for _, ref in plan.all_nodes:
                with ControlClient(ref.control, timeout=10) as c:
                    stats[ref.name] = c.call("stats")
        finally:
            unload(plan)
    result = {
        "model": args.model, "microbatch": args.microbatch, "granularity": args.granularity,
        "method": args.method, "nodes": [n.name for n in cluster.nodes],
        # per stage: the planner's time per microbatch vs the nodes' own compute time per
        # microbatch (node `stats`): where a prediction error comes from
        "stages": [{"units": list(s.units), "devices": list(s.devices),
                    "predicted_compute_s": c.unreplicated_s,
                    "measured_compute_s": {d: _per_mb(stats.get(d)) for d in s.devices},
                    # CPU seconds per microbatch: (in the forwards, everything else: I/O)
                    "measured_cpu_s": {d: _cpu_per_mb(stats.get(d)) for d in s.devices}}
                   for s, c in zip(planned.stages, planned.stage_costs)],
        "predicted_samples_per_s": planned.throughput_per_s,
        # the plan first deployed, from the profiles alone (before calibration)
        "predicted_uncalibrated_samples_per_s": predicted_first,
        "calibration": cal.to_dict() if cal is not None else None,
        "predicted_bottleneck_s": planned.bottleneck_s,
        "bottleneck_at": planned.bottleneck_at,
        "optimal": planned.optimal,
        # from the warm-up's last result to arrive to the last timed one: with replicas, results
        # come in waves (one per replica of the last stage), so the timed count is a whole
        # number of waves and both ends fall at the same phase of a wave
        "measured_samples_per_s": batches * args.microbatch / dt,
        # cross-check: the least-squares slope of the arrival times (biased low by waves)
        "measured_slope_samples_per_s": args.microbatch / arrival_slope(timed_arrivals),
        "measured_seconds": dt,
        "arrivals_s": [round(a - timed_arrivals[0], 4) for a in timed_arrivals],
        "warmup": warmup, "cooldown": cooldown, "batches": batches, "window": client.window,
        "deploy_seconds": deploy_s,
        "gather_seconds": g.seconds,
        "io": g.io,
        "total_seconds": time.time() - t0,
        "node_stats": {k: {"peak_rss": v.get("peak_rss"), "rss": v.get("rss"),
                           "compute_s": v.get("stage", {}).get("compute_s"),
                           "compute_cpu_s": v.get("stage", {}).get("compute_cpu_s"),
                           "cpu_s": v.get("stage", {}).get("cpu_s"),
                           "wait_s": v.get("stage", {}).get("wait_s"),
                           "send_s": v.get("stage", {}).get("send_s"),
                           "processed": v.get("stage", {}).get("processed")} for k, v in stats.items()},
        # the timed interval only (the totals above include the calibration): each node's
        # microbatches, seconds computing, waiting for input and in send, and its busy share
        "timed_node_stats": _timed(snaps[0], snaps[1]),
        "timestamps": [[[round(x - t1, 4) if j else x for j, x in enumerate(hop)] for hop in st] if st else None
                       for st in stamps],
        "memory_limits": {d["name"]: d["memory_bytes"] for d in g.problem["devices"]},
        "problem": g.problem,
    }
    if args.verify:
        ref = reference(args.model, ckpt, timed_xs, kwargs)
        result["max_abs_diff"] = max(float(np.max(np.abs(a - b))) for a, b in zip(outs, ref))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
