"""Planner speed and quality: solve time, certificate and baselines vs cluster size.

For each model (ViT-Base/Large/Huge) and granularity (block, half-block) profile in
plans/edgepipe-*.problem.yaml, a cluster of N devices (N = 8, 16, 32, 64, 256) is built:
half RCC-VE, half MinnowBoard (the testbed's two board types), the testbed's type-level
links (RCC-VE <-> RCC-VE 30 Mbps, else 10 Mbps, client <-> RCC-VE 30 Mbps), plus N/8
seeded random slow pairs (5 Mbps, 2 ms) that split their ends into classes of their own.
Each is solved with the time limit (default 60 s) and a target gap of 0 (prove
optimality); we report the solve time, whether optimality was proven, the lower bound
and the gap, and the bottleneck of the three baselines under the same model.

    python bench/planner.py [--sizes 8 16 32 64 256] [--models vit-base vit-large vit-huge]
                            [--granularity block half] [--time-limit 60] [--no-baselines]
                            [--json] [--out bench/results/planner.json]
    python bench/planner.py --examples [--json]     # the README's example problems
    python bench/planner.py --only-distinct [--distinct 16 32 64 256] [--effort N] --out bench/results/planner-distinct.json

``--examples`` solves the example problems in plans/ (the EdgePipe testbed with ViT-Large
and ViT-Huge, the slow-pair variant, the home cluster) and compares with the baselines.

``--distinct N ...`` adds clusters where every device is different (issue 14), next to the
class-structured rows: ViT-Large at PipeEdge's sublayer granularity (98 units: embed, the
96 profiled sublayers, head; plans/make_problems.py), microbatch 8, N devices, each its
own device type: device i is an RCC-VE board (odd i) or a MinnowBoard (even i), with the
board's profile divided by a speed factor, its memory (8 / 2 GiB, 300 MB reserved) and its
NIC (30 / 10 Mbit/s, the testbed's limits) multiplied by factors, each factor 2^U(-1, 1)
from random.Random(SEED * 1000 + N) (so 0.5x to 2x, log-uniform); links 1000 Mbit/s 0.5 ms
(the boards' Ethernet; the NICs bind), N/8 seeded slow pairs (5 Mbit/s, 2 ms) and a
100 Mbit/s client NIC. Each is solved with replication on and off, with the effort
limit (``--effort``); rows report CPU and wall time, when the first plan came, B, the
bound, the gap, what stopped the search, the nodes spent and the process's peak RSS.

Goals (issue 3): optimal in <= 1 s at 16 devices x ViT-Huge half-blocks; at 256 devices
<= 60 s with a proven lower bound within 5 %. Issue 14: 16 distinct devices proven
optimal in <= 2 s, 32 within 1 % and 64 within 5 % in <= 60 s, a first plan in <= 0.5 s.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# one BLAS thread unless told otherwise, before numpy loads (edgezmq.blas says why)
from edgezmq.blas import BLAS_THREADS_ENV, pin_blas_threads  # noqa: E402

pin_blas_threads()

import yaml  # noqa: E402

from edgezmq import argtypes as args_  # noqa: E402
from edgezmq.planner import Problem, solve  # noqa: E402
from edgezmq.planner.baselines import BASELINES, baseline  # noqa: E402
from edgezmq.planner.solver import DEFAULT_EFFORT  # noqa: E402
from edgezmq.terms import MAX_SEARCH_NODES  # noqa: E402

sys.path.insert(0, str(ROOT / "plans"))
import make_problems  # noqa: E402

SIZES = (8, 16, 32, 64, 256)
MODELS = ("vit-base", "vit-large", "vit-huge")
GRANULARITIES = ("block", "half")
SLOW_PAIR_EVERY = 8             # one slow pair per this many devices
SLOW_MBPS, SLOW_LATENCY_MS = 5, 2
SEED = 3
GOAL_GAP = 0.05
DISTINCT_SIZES = (16, 32, 64, 256)
SPREAD = 1.0                    # distinct devices: factors 2^U(-SPREAD, SPREAD)
FAST_MBPS, FAST_LATENCY_MS = 1000, 0.5
CLIENT_NIC_MBPS = 100


def cluster(profile: dict[str, Any], n: int, seed: int = SEED) -> dict[str, Any]:
    """The profile problem's model and board types on n devices (module doc)."""
    rng = random.Random(seed * 1000 + n)
    half = n // 2
    devices = [{"name": f"rcc-{i}", "type": "rcc-ve"} for i in range(1, n - half + 1)]
    devices += [{"name": f"mb-{i}", "type": "minnowboard"} for i in range(1, half + 1)]
    names = [d["name"] for d in devices]
    overrides = [o for o in profile["links"]["overrides"] if o["a"] in ("client", "rcc-ve", "minnowboard")
                 and o["b"] in ("rcc-ve", "minnowboard")]
    pairs: set[frozenset[str]] = set()
    while len(pairs) < max(1, n // SLOW_PAIR_EVERY):
        pairs.add(frozenset(rng.sample(names, 2)))
    for a, b in sorted(tuple(sorted(p)) for p in pairs):
        overrides.append({"a": a, "b": b, "mbps": SLOW_MBPS, "latency_ms": SLOW_LATENCY_MS})
    return {**profile, "devices": devices, "links": {"default": profile["links"]["default"],
                                                      "overrides": overrides}}


def distinct_cluster(n: int, seed: int = SEED, *, replication: bool = True) -> dict[str, Any]:
    """n devices, every one different (module doc): ViT-Large sublayers on scaled board profiles."""
    data = json.loads(make_problems.DEFAULT_PROFILES.read_text())
    model, times = make_problems.model_section(data, "vit-large", "sublayer")
    rng = random.Random(seed * 1000 + n)
    types, devices = {}, []
    for i in range(1, n + 1):
        board = make_problems.RCC if i % 2 else make_problems.MINNOW
        speed, memory, nic = (2 ** rng.uniform(-SPREAD, SPREAD) for _ in range(3))
        name = f"{'rcc' if board == make_problems.RCC else 'mb'}-{i}"
        base = 8 * make_problems.GIB if board == make_problems.RCC else 2 * make_problems.GIB
        types[name] = {"memory_bytes": int(base * memory), "reserved_bytes": make_problems.RESERVED,
                       "unit_times_s": [round(t / speed, 6) for t in times[board]],
                       "nic_mbps": round(make_problems.NIC_MBPS[board] * nic, 3)}
        devices.append({"name": name, "type": name})
    names = [d["name"] for d in devices]
    pairs: set[frozenset[str]] = set()
    while len(pairs) < max(1, n // SLOW_PAIR_EVERY):
        pairs.add(frozenset(rng.sample(names, 2)))
    overrides = [{"a": a, "b": b, "mbps": SLOW_MBPS, "latency_ms": SLOW_LATENCY_MS}
                 for a, b in sorted(tuple(sorted(p)) for p in pairs)]
    return {"model": model, "device_types": types, "devices": devices,
            "links": {"default": {"mbps": FAST_MBPS, "latency_ms": FAST_LATENCY_MS}, "overrides": overrides},
            "client": {"nic_mbps": CLIENT_NIC_MBPS},
            "options": {"replication": replication, "buffers": 2}}


def _when(history: list, gap: float) -> float | None:
    """Seconds until the plan was first proven within ``gap`` (None: never)."""
    return next((t for t, ub, lb, *_ in history if ub and (ub - lb) / ub <= gap), None)


def run_distinct(n: int, replication: bool, time_limit: float, effort: int) -> dict[str, Any]:
    problem = Problem.from_dict(distinct_cluster(n, replication=replication))
    t0, c0 = time.perf_counter(), time.process_time()
    plan = solve(problem, time_limit_s=time_limit, effort=effort)
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    history = plan.stats.get("history", [])
    return {"kind": "distinct", "model": "vit-large", "granularity": "sublayer", "units": problem.num_units,
            "devices": n, "replication": replication, "solve_s": round(dt, 3), "cpu_s": round(cpu, 3),
            "first_plan_s": next((t for t, ub, *_ in history if ub), None),
            "to_1pct_s": _when(history, 0.01), "to_5pct_s": _when(history, GOAL_GAP),
            "bottleneck_s": plan.bottleneck_s, "lower_bound_s": plan.lower_bound_s, "gap": plan.gap,
            "optimal": plan.optimal, "stopped_by": plan.stats.get("stopped_by"),
            "effort": plan.stats.get("effort"), "engine": plan.stats.get("engine"),
            "latency_s": plan.latency_s, "stages": len(plan.stages), "used_devices": plan.num_devices,
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def distinct_table(rows: list[dict[str, Any]]) -> str:
    head = ["devices", "units", "replication", "cpu s", "wall s", "first plan s", "to 1% s", "to 5% s",
            "B s", "LB s", "gap", "optimal", "stopped by", "nodes", "stages", "used", "peak RSS MB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        def s(x: float | None) -> str:
            return "-" if x is None else f"{x:.2f}"
        cells = [r["devices"], r["units"], "on" if r["replication"] else "off", s(r["cpu_s"]), s(r["solve_s"]),
                 s(r["first_plan_s"]), s(r["to_1pct_s"]), s(r["to_5pct_s"]), f"{r['bottleneck_s']:.4g}",
                 f"{r['lower_bound_s']:.4g}", f"{r['gap']:.2%}", "yes" if r["optimal"] else "no",
                 r["stopped_by"], r["effort"], r["stages"], r["used_devices"], r["peak_rss_mb"]]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def run(model: str, gran: str, n: int, time_limit: float, baselines: bool) -> dict[str, Any]:
    profile = yaml.safe_load((ROOT / "plans" / f"edgepipe-{model}-{gran}.problem.yaml").read_text())
    problem = Problem.from_dict(cluster(profile, n))
    t0 = time.perf_counter()
    plan = solve(problem, time_limit_s=time_limit)
    dt = time.perf_counter() - t0
    history = plan.stats.get("history", [])
    within5 = _when(history, GOAL_GAP)
    row = {"model": model, "granularity": gran, "units": problem.num_units, "devices": n,
           "classes": plan.stats.get("classes"), "solve_s": round(dt, 3), "to_5pct_s": within5,
           "bottleneck_s": plan.bottleneck_s, "lower_bound_s": plan.lower_bound_s, "gap": plan.gap,
           "optimal": plan.optimal, "latency_optimal": plan.latency_optimal,
           "latency_s": plan.latency_s, "stages": len(plan.stages), "used_devices": plan.num_devices}
    if baselines:
        for name in BASELINES:
            t0 = time.perf_counter()
            b = baseline(problem, name, time_limit_s=time_limit)
            row[name] = {"bottleneck_s": b.bottleneck_s, "feasible": b.feasible,
                         "solve_s": round(time.perf_counter() - t0, 3)}
    return row


EXAMPLES = (   # (problem in plans/, replication allowed)
    ("edgepipe-vit-large-half", True),
    ("edgepipe-vit-huge-half", True),
    ("edgepipe-slowpairs-vit-large-half", True),
    ("edgepipe-slowpairs-vit-large-half", False),
    ("home-vit-large-half", True),
)


def examples(time_limit: float) -> list[dict[str, Any]]:
    """Ours vs the baselines on the example problems."""
    import dataclasses

    from edgezmq.planner import Options, load_problem

    rows = []
    for name, replication in EXAMPLES:
        problem = load_problem(ROOT / "plans" / f"{name}.problem.yaml")
        if not replication:
            problem = dataclasses.replace(problem, options=Options(False, problem.options.buffers))
        t0 = time.perf_counter()
        plan = solve(problem, time_limit_s=time_limit)
        row = {"problem": name, "replication": replication, "devices": len(problem.devices),
               "units": problem.num_units, "solve_s": round(time.perf_counter() - t0, 3),
               "optimal": plan.optimal, "bottleneck_s": plan.bottleneck_s,
               "throughput_per_s": plan.throughput_per_s, "latency_s": plan.latency_s,
               "stages": len(plan.stages), "used_devices": plan.num_devices}
        for b in BASELINES:
            bp = baseline(problem, b, time_limit_s=time_limit)
            row[b] = {"bottleneck_s": bp.bottleneck_s, "feasible": bp.feasible,
                      "throughput_per_s": bp.throughput_per_s}
        rows.append(row)
    return rows


def examples_table(rows: list[dict[str, Any]]) -> str:
    head = ["problem", "devices", "units", "ours B s", "ours /s", "proven", "solve s",
            *(f"{b} B s (ours x)" for b in BASELINES)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        name = r["problem"] + ("" if r["replication"] else " (--no-replication)")
        cells = [name, r["devices"], r["units"], f"{r['bottleneck_s']:.4g}",
                 f"{r['throughput_per_s']:.4g}", "yes" if r["optimal"] else "no", f"{r['solve_s']:.2f}"]
        for b in BASELINES:
            x = r[b]
            speedup = x["bottleneck_s"] / r["bottleneck_s"]
            cells.append(f"{x['bottleneck_s']:.4g} ({speedup:.2f}x)" + ("" if x["feasible"] else " OOM"))
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def table(rows: list[dict[str, Any]]) -> str:
    head = ["model", "gran", "units", "devices", "classes", "solve s", "to 5% s", "optimal", "gap", "B s",
            "LB s", "stages", "used", *(f"{b} B s" for b in BASELINES)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["model"], r["granularity"], r["units"], r["devices"], r["classes"], f"{r['solve_s']:.2f}",
                 "-" if r["to_5pct_s"] is None else f"{r['to_5pct_s']:.2f}",
                 "yes" if r["optimal"] else "no", f"{r['gap']:.2%}" if r["gap"] is not None else "-",
                 f"{r['bottleneck_s']:.4g}", f"{r['lower_bound_s']:.4g}", r["stages"], r["used_devices"]]
        for b in BASELINES:
            if b in r:
                cells.append(f"{r[b]['bottleneck_s']:.4g}" + ("" if r[b]["feasible"] else " (OOM)"))
            else:
                cells.append("-")
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=args_.int_in(1, 4096), nargs="+", default=list(SIZES))
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    ap.add_argument("--granularity", nargs="+", default=list(GRANULARITIES), choices=GRANULARITIES)
    ap.add_argument("--time-limit", type=args_.seconds, default=60.0)
    ap.add_argument("--no-baselines", action="store_true")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    ap.add_argument("--out", type=Path, help="also write the JSON here")
    ap.add_argument("--examples", action="store_true", help="the example problems vs the baselines")
    ap.add_argument("--distinct", type=args_.int_in(1, 4096), nargs="*", metavar="N",
                    help=f"also clusters of N all-different devices (default sizes with no N: "
                         f"{' '.join(map(str, DISTINCT_SIZES))})")
    ap.add_argument("--only-distinct", action="store_true", help="skip the class-structured rows")
    ap.add_argument("--effort", type=args_.int_in(1, MAX_SEARCH_NODES), default=DEFAULT_EFFORT,
                    help=f"search nodes per solve (default {DEFAULT_EFFORT})")
    args = ap.parse_args(argv)
    if args.examples:
        rows = examples(args.time_limit)
        result = {"bench": "planner-examples", "python": platform.python_version(),
                  "time_limit_s": args.time_limit, "rows": rows}
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=1) + "\n")
        print(json.dumps(result) if args.json else examples_table(rows))
        return 0
    rows = []
    for model in ([] if args.only_distinct else args.models):
        for gran in args.granularity:
            for n in args.sizes:
                rows.append(run(model, gran, n, args.time_limit, not args.no_baselines))
                if not args.json:
                    print(table(rows[-1:]).splitlines()[-1], flush=True)
    distinct_rows = []
    for n in (args.distinct or DISTINCT_SIZES) if args.distinct is not None or args.only_distinct else ():
        for replication in (False, True):
            distinct_rows.append(run_distinct(n, replication, args.time_limit, args.effort))
            if not args.json:
                print(distinct_table(distinct_rows[-1:]).splitlines()[-1], flush=True)
    with open("/proc/loadavg") as f:
        load = float(f.read().split()[0])
    result = {"bench": "planner", "python": platform.python_version(), "machine": platform.machine(),
              "time_limit_s": args.time_limit, "effort": args.effort, "load_avg_1min_at_end": load,
              "blas_threads": os.environ.get(BLAS_THREADS_ENV),
              "rows": rows, "distinct_rows": distinct_rows}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    if args.json:
        print(json.dumps(result))
    else:
        if rows:
            print()
            print(table(rows))
        if distinct_rows:
            print()
            print(distinct_table(distinct_rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
