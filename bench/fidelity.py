"""Does the planner's prediction come true?  Predicted vs measured steady-state throughput
on an emulated cluster of devices of different speeds (cgroup CPU shares), several models
and cluster shapes, all in one run.

    python bench/fidelity.py [--json] [--batches 20] [--quick] [--cached] [--cpu 0.45,0.3,0.25,0.2 --name fidelity-light]

Each row deploys as ``edgezmq deploy`` does: fresh profiles (``--cached``: the nodes' caches,
spot-checked), plan, deploy, calibration (``edgezmq.orchestrate.calibrate``); it records the prediction
from the profiles alone and the calibrated one, and measures a separate, longer stream.
Needs root (network namespaces, cgroups). Writes bench/results/fidelity.json and .png.
"""

from __future__ import annotations

import argparse
import sys

from common import RESULTS, bars, measure, save, testbed

from edgezmq import argtypes as args_

# shares add up to 1.7 of the machine's 2 cores: every device gets its share
TESTBED = {
    "name": "fid",
    "devices": [
        {"name": "d0", "cpu": 0.6, "threads": 1, "memory": "3GB"},
        {"name": "d1", "cpu": 0.45, "threads": 1, "memory": "3GB"},
        {"name": "d2", "cpu": 0.35, "threads": 1, "memory": "3GB"},
        {"name": "d3", "cpu": 0.3, "threads": 1, "memory": "3GB"},
    ],
    "links": {"default": {"mbps": 1000, "latency_ms": 0.2}},
}
ROWS = [  # (model, granularity, nodes)
    ("vit_tiny_patch16_224", "block", ["d0", "d3"]),
    ("vit_tiny_patch16_224", "half", ["d0", "d1", "d2", "d3"]),
    ("vit_small_patch16_224", "block", ["d1", "d2", "d3"]),
    ("vit_small_patch16_224", "half", ["d0", "d1", "d2", "d3"]),
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--batches", type=args_.count, default=20, help="timed microbatches per row")
    ap.add_argument("--quick", action="store_true", help="only the vit_tiny rows")
    ap.add_argument("--cpu", help="the four devices' CPU shares, comma-separated (default "
                    + ",".join(str(d["cpu"]) for d in TESTBED["devices"]) + ")")
    ap.add_argument("--name", default="fidelity", help="results file stem in bench/results/")
    ap.add_argument("--cached", action="store_true",
                    help="let nodes reuse cached profiles (default: profile afresh, so that every row "
                         "predicts from what the devices measure now; on a VM whose speed drifts, an "
                         "hour-old profile carries that drift)")
    args = ap.parse_args()
    if args.cpu:
        shares = [float(x) for x in args.cpu.split(",")]
        if len(shares) != len(TESTBED["devices"]) or min(shares) <= 0:
            ap.error(f"--cpu: expected {len(TESTBED['devices'])} positive shares, got {args.cpu!r}")
        for d, c in zip(TESTBED["devices"], shares):
            d["cpu"] = c
    rows = []
    with testbed(TESTBED, "fid") as tb:
        for model, gran, nodes in ROWS:
            if args.quick and "tiny" not in model:
                continue
            r = measure(tb, model=model, granularity=gran, microbatch=8, batches=args.batches,
                        nodes=",".join(nodes), reprofile=not args.cached)
            row = {"model": model, "granularity": gran, "nodes": nodes,
                   "cpu": [next(d["cpu"] for d in TESTBED["devices"] if d["name"] == n) for n in nodes],
                   "stages": r["stages"], "bottleneck_at": r["bottleneck_at"],
                   "io": r.get("io", {}),
                   "predicted_samples_per_s": round(r["predicted_samples_per_s"], 3),
                   "measured_samples_per_s": round(r["measured_samples_per_s"], 3),
                   # the first plan's prediction, from the profiles alone, and what calibration did
                   "predicted_uncalibrated_samples_per_s": round(r["predicted_uncalibrated_samples_per_s"], 3),
                   "calibration": r.get("calibration")}
            row["error"] = round(row["measured_samples_per_s"] / row["predicted_samples_per_s"] - 1, 4)
            rows.append(row)
            if not args.json:
                print(f"{model:<24} {gran:<6} {len(nodes)} nodes  predicted {row['predicted_samples_per_s']:7.2f}"
                      f"  measured {row['measured_samples_per_s']:7.2f} samples/s  ({row['error']:+.1%})",
                      flush=True)
                cal = r.get("calibration")
                if cal:
                    print(f"    profiles alone predicted {row['predicted_uncalibrated_samples_per_s']:.2f}; calibration"
                          f" factors {', '.join(f'{t} x{f:.2f}' for t, f in cal['factors'].items()) or 'none'}"
                          f"{', redeployed' if cal['redeployed'] else ''}; the first plan served"
                          f" {cal['burst_samples_per_s']:.2f} samples/s in its burst", flush=True)
                for i, st in enumerate(r["stages"]):
                    got = ", ".join(f"{d} {t * 1e3:.0f}" for d, t in st["measured_compute_s"].items() if t)
                    cpu = ", ".join(f"{d} {c[0] * 1e3:.0f} + {c[1] * 1e3:.1f}"
                                    for d, c in st["measured_cpu_s"].items() if c)
                    print(f"    stage {i} units {st['units']}: predicted {st['predicted_compute_s'] * 1e3:.0f} ms,"
                          f" nodes' compute {got} ms per microbatch (CPU ms, forwards + the rest: {cpu})",
                          flush=True)
    result = {"bench": "fidelity", "testbed": TESTBED, "rows": rows, "reprofiled": not args.cached,
              "max_abs_error": max(abs(r["error"]) for r in rows)}
    save(args.name, result, args.json)
    plot(rows, args.name)
    return 0


def plot(rows: list[dict], name: str) -> None:
    labels = [f"{r['model'].split('_')[1]} {r['granularity']}\n{len(r['nodes'])} nodes" for r in rows]
    bars(labels, [r["predicted_samples_per_s"] for r in rows], [r["measured_samples_per_s"] for r in rows],
         "Planner prediction vs measurement (emulated devices)", RESULTS / f"{name}.png")


if __name__ == "__main__":
    sys.exit(main())
