"""Heterogeneous devices: our plan vs the even, PipeEdge-style and PipeDream-style plans,
each deployed and measured on the same emulated testbed (fast and slow CPUs, a few slow
links) in the same run; ratios reported.

    python bench/hetero.py [--model vit_small_patch16_224] [--granularity half] [--json]

Needs root. Writes bench/results/hetero.json and hetero.png.
"""

from __future__ import annotations

import argparse
import sys

from common import RESULTS, ROOT, bars, measure, save, testbed

from edgezmq import argtypes as args_

METHODS = ("ours", "even", "pipeedge", "pipedream")
TESTBED = ROOT / "plans" / "testbed-hetero.yaml"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="vit_small_patch16_224")
    ap.add_argument("--granularity", default="half")
    ap.add_argument("--microbatch", type=args_.microbatch, default=8)
    ap.add_argument("--batches", type=args_.count, default=30,
                    help="timed microbatches: many more than the client window (2 per device + 2), so that"
                         " the timing is not the drain of queues filled before it")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    rows = []
    with testbed(TESTBED, "hetero") as tb:
        for method in METHODS:
            r = measure(tb, model=args.model, granularity=args.granularity, microbatch=args.microbatch,
                        batches=args.batches, method=method)
            rows.append({"method": method, "stages": r["stages"], "bottleneck_at": r["bottleneck_at"],
                         "predicted_samples_per_s": round(r["predicted_samples_per_s"], 3),
                         "measured_samples_per_s": round(r["measured_samples_per_s"], 3)})
            if not args.json:
                print(f"{method:<10} measured {rows[-1]['measured_samples_per_s']:7.3f} samples/s, "
                      f"predicted {rows[-1]['predicted_samples_per_s']:7.3f}  "
                      f"{[(s['units'], s['devices']) for s in r['stages']]}", flush=True)
    ours = rows[0]["measured_samples_per_s"]
    ratios = {r["method"]: round(ours / r["measured_samples_per_s"], 3) for r in rows[1:]}
    result = {"bench": "hetero", "model": args.model, "granularity": args.granularity,
              "microbatch": args.microbatch, "testbed": str(TESTBED.relative_to(ROOT)), "rows": rows,
              "ours_over": ratios}
    save("hetero", result, args.json)
    if not args.json:
        print("ours / baseline (measured): " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))
    plot(result)
    return 0


def plot(result: dict) -> None:
    rows = result["rows"]
    bars([r["method"] for r in rows], [r["predicted_samples_per_s"] for r in rows],
         [r["measured_samples_per_s"] for r in rows], f"{result['model']} on a mixed testbed", RESULTS / "hetero.png")


if __name__ == "__main__":
    sys.exit(main())
