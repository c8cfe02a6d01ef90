"""Memory: a model larger than any device's memory cap runs when cut into shards.
ViT-Huge (2.5 GB of fp32 weights) on 4 emulated devices capped at 1.5 GB each
(plans/testbed-memory.yaml); every output compared with timm's monolithic forward (run on
the client, which has no cap); each node's peak RSS reported against its cap.

    python bench/memory.py [--model vit_huge_patch14_224] [--microbatch 1] [--json]

Needs root. Writes bench/results/memory.json and memory.png.
"""

from __future__ import annotations

import argparse
import sys

from common import RESULTS, ROOT, measure, pyplot, save, testbed

from edgezmq import argtypes as args_

TESTBED = ROOT / "plans" / "testbed-memory.yaml"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="vit_huge_patch14_224")
    ap.add_argument("--microbatch", type=args_.microbatch, default=1)
    ap.add_argument("--batches", type=args_.count, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from edgezmq.model import chain as models

    infos = models.unit_infos(args.model)
    model_bytes = sum(u.param_bytes for u in infos)
    with testbed(TESTBED, "mem") as tb:
        r = measure(tb, model=args.model, microbatch=args.microbatch, batches=args.batches, warmup=1,
                    no_replication=True, verify=True, timeout=7200)
        usage = {name: n["usage"] for name, n in tb.status()["nodes"].items()}
    nodes = []
    for name, st in r["node_stats"].items():
        cap = r["memory_limits"][name]
        # the cgroup's own accounting (what the kernel enforces the cap on); the process's
        # RSS also counts shared library pages charged elsewhere, so it can exceed the cap
        peak = usage.get(name, {}).get("memory_peak_bytes")
        nodes.append({"node": name, "cgroup_peak": peak, "peak_rss": st["peak_rss"], "cap": cap,
                      "cgroup_peak_over_cap": round(peak / cap, 3) if peak else None})
    result = {"bench": "memory", "model": args.model, "model_param_bytes": model_bytes,
              "microbatch": args.microbatch, "batches": args.batches, "stages": r["stages"],
              "max_abs_diff": r["max_abs_diff"], "samples_per_s": r["measured_samples_per_s"],
              "nodes": nodes, "largest_cap": max(n["cap"] for n in nodes)}
    save("memory", result, args.json)
    if not args.json:
        print(f"{args.model}: {model_bytes / 1e9:.2f} GB of parameters; largest device cap "
              f"{result['largest_cap'] / 1e9:.2f} GB")
        for n in nodes:
            print(f"  {n['node']}: cgroup peak {n['cgroup_peak'] / 1e9:.2f} GB of {n['cap'] / 1e9:.2f} GB cap "
                  f"(process RSS peak {n['peak_rss'] / 1e9:.2f} GB, shared libraries included)")
        print(f"max |pipeline - monolithic| = {r['max_abs_diff']:.3g}; "
              f"{r['measured_samples_per_s']:.3f} samples/s")
    plot(result)
    return 0 if r["max_abs_diff"] <= 1e-4 else 1


def plot(result: dict) -> None:
    plt = pyplot()
    if plt is None:
        return
    nodes = result["nodes"]
    fig, ax = plt.subplots(figsize=(6, 4))
    x = range(len(nodes))
    ax.bar(list(x), [(n["cgroup_peak"] or 0) / 1e9 for n in nodes], 0.5, label="peak memory (cgroup)")
    ax.plot(list(x), [n["cap"] / 1e9 for n in nodes], "r_", markersize=40, label="memory cap")
    ax.axhline(result["model_param_bytes"] / 1e9, color="k", linestyle=":", label="whole model (weights)")
    ax.set_xticks(list(x), [n["node"] for n in nodes])
    ax.set_ylabel("GB")
    ax.set_title(f"{result['model']} across capped devices")
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "memory.png", dpi=100)


if __name__ == "__main__":
    sys.exit(main())
