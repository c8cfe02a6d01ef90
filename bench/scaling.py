"""Scaling: a ViT on 1, 2, 4, 8 identical emulated devices (0.2 CPU each, gigabit links),
pipeline only (no replication), measured in one run; plus the planner's predicted scaling
for 16, 32 and 64 such devices (pipeline only, and with replication).

    python bench/scaling.py [--model vit_small_patch16_224] [--granularity half] [--json]

Needs root. Writes bench/results/scaling.json and scaling.png.
"""

from __future__ import annotations

import argparse
import copy
import sys

from common import RESULTS, measure, pyplot, save, testbed

sys.path.insert(0, str(RESULTS.parents[1]))
from edgezmq import argtypes as args_
from edgezmq.planner import Problem, solve  # noqa: E402

DEVICES = [1, 2, 4, 8]
PREDICTED = [16, 32, 64]
CPU = 0.2
TESTBED = {
    "name": "scale",
    "devices": [{"name": "dev", "count": max(DEVICES), "cpu": CPU, "threads": 1, "memory": "2GB",
                 "type": f"edge-{CPU}"}],
    "links": {"default": {"mbps": 1000, "latency_ms": 0.2}},
}


def predicted(problem: dict, n: int, replication: bool) -> float:
    """The planner's throughput for n devices of the measured type."""
    p = copy.deepcopy(problem)
    proto = p["devices"][0]
    p["devices"] = [{**proto, "name": f"dev-{i}"} for i in range(n)]
    names = {d["name"] for d in p["devices"]} | {"client"}
    p["links"]["overrides"] = [o for o in p["links"]["overrides"] if {o["a"], o["b"]} <= names]
    p["options"]["replication"] = replication
    return solve(Problem.from_dict(p), time_limit_s=30).throughput_per_s


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="vit_small_patch16_224")
    ap.add_argument("--granularity", default="half")
    ap.add_argument("--microbatch", type=args_.microbatch, default=8)
    ap.add_argument("--batches", type=args_.count, default=6)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    rows, problem = [], None
    with testbed(TESTBED, "scale") as tb:
        for n in DEVICES:
            r = measure(tb, model=args.model, granularity=args.granularity, microbatch=args.microbatch,
                        batches=args.batches if n > 1 else max(3, args.batches // 2),
                        nodes=",".join(f"dev-{i}" for i in range(n)), no_replication=True)
            problem = r["problem"]
            rows.append({"devices": n, "samples_per_s": round(r["measured_samples_per_s"], 3),
                         "predicted_samples_per_s": round(r["predicted_samples_per_s"], 3),
                         "stages": r["stages"]})
            if not args.json:
                print(f"{n} device(s): {rows[-1]['samples_per_s']:.3f} samples/s "
                      f"(predicted {rows[-1]['predicted_samples_per_s']:.3f})", flush=True)
    base = rows[0]["samples_per_s"]
    for r in rows:
        r["speedup"] = round(r["samples_per_s"] / base, 3)
        r["efficiency"] = round(r["speedup"] / r["devices"], 3)
    pbase = predicted(problem, 1, False)
    pred = [{"devices": n, "pipeline_speedup": round(predicted(problem, n, False) / pbase, 3),
             "replicated_speedup": round(predicted(problem, n, True) / pbase, 3)}
            for n in [*DEVICES, *PREDICTED]]
    result = {"bench": "scaling", "model": args.model, "granularity": args.granularity,
              "microbatch": args.microbatch, "cpu_per_device": CPU, "rows": rows, "predicted": pred}
    save("scaling", result, args.json)
    if not args.json:
        for r in rows:
            print(f"{r['devices']} devices: speedup {r['speedup']:.2f}x (efficiency {r['efficiency']:.0%})")
        for p in pred:
            print(f"planner, {p['devices']} devices: pipeline {p['pipeline_speedup']:.2f}x, "
                  f"with replication {p['replicated_speedup']:.2f}x")
    plot(result)
    return 0


def plot(result: dict) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    n = [p["devices"] for p in result["predicted"]]
    ax.plot(n, n, "k:", label="ideal")
    ax.plot(n, [p["pipeline_speedup"] for p in result["predicted"]], "--", marker=".", label="planner: pipeline")
    ax.plot(n, [p["replicated_speedup"] for p in result["predicted"]], "--", marker=".",
            label="planner: with replication")
    ax.plot([r["devices"] for r in result["rows"]], [r["speedup"] for r in result["rows"]], "o-",
            color="C3", label="measured (pipeline)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xlabel("devices")
    ax.set_ylabel("speedup over one device")
    ax.set_title(f"{result['model']} ({result['granularity']} units), {result['cpu_per_device']} CPU per device")
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "scaling.png", dpi=100)


if __name__ == "__main__":
    sys.exit(main())
