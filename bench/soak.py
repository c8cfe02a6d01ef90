"""Soak: the pipeline under full load for N minutes on local node processes. Throughput per
interval, every node's RSS over time (flat within +-5% after warm-up?), and a count of
microbatches submitted vs answered (nothing lost).

    python bench/soak.py [--minutes 10] [--model vit_tiny_patch16_224] [--json]

Writes bench/results/soak.json and soak.png.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import RESULTS, pyplot, save  # noqa: E402

from edgezmq import argtypes as args_
from edgezmq.client import Client  # noqa: E402
from edgezmq.model import chain as models  # noqa: E402
from edgezmq.orchestrate.autodeploy import autodeploy  # noqa: E402
from edgezmq.orchestrate.deploy import unload  # noqa: E402
from edgezmq.orchestrate.inventory import Cluster, InventoryNode  # noqa: E402
from edgezmq.orchestrate.local import LocalCluster  # noqa: E402
from edgezmq.orchestrate.planfile import ModelSpec  # noqa: E402
from edgezmq.transport.rpc import ControlClient  # noqa: E402

SAMPLE_S = 10.0  # one throughput/RSS sample per interval
WARMUP_FRACTION = 0.2  # RSS drift is judged after this share of the run


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=args_.float_in(0, 7 * 24 * 60, lo_open=True), default=10.0)
    ap.add_argument("--model", default="vit_tiny_patch16_224")
    ap.add_argument("--nodes", type=args_.int_in(1, args_.MAX_LOCAL_NODES), default=2)
    ap.add_argument("--microbatch", type=args_.microbatch, default=8)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    ckpt = str(models.cached_checkpoint(args.model))
    spec = ModelSpec(name=args.model, microbatch=args.microbatch, checkpoint=ckpt)
    rng = np.random.default_rng(0)
    shape = models.input_shape(args.model, args.microbatch)
    pool = [rng.standard_normal(shape, dtype=np.float32) for _ in range(4)]
    samples: list[dict] = []
    answered = 0
    submitted = itertools.count()
    deadline = time.time() + args.minutes * 60

    def inputs():
        while time.time() < deadline:
            yield pool[next(submitted) % len(pool)]

    with LocalCluster(args.nodes, threads=1) as local, \
            Client([], "tcp://127.0.0.1:0", run="", window=2 * args.nodes + 2, microbatch=args.microbatch) as c:
        inv = Cluster(nodes=[InventoryNode(n.name, n.control) for n in local.nodes], probe_seconds=0.2)
        dep, plan, _, _, _ = autodeploy(inv, spec, results=c.results_endpoint, replication=False)
        c.attach(dep.entry, dep.run)
        stop = threading.Event()
        t0 = time.time()

        def sampler() -> None:
            last = 0
            while not stop.wait(SAMPLE_S):
                rss = {}
                for n in local.nodes:
                    with ControlClient(n.control, timeout=5) as cc:
                        rss[n.name] = cc.call("stats")["rss"]
                samples.append({"t": round(time.time() - t0, 1), "answered": answered,
                                "samples_per_s": (answered - last) * args.microbatch / SAMPLE_S, "rss": rss})
                last = answered

        th = threading.Thread(target=sampler, daemon=True)
        th.start()
        for _ in c.stream(inputs()):
            answered += 1
        stop.set()
        th.join(SAMPLE_S + 5)
        unload(plan)
    n_submitted = next(submitted)  # values 0..k-1 went out with the k batches
    steady = samples[int(len(samples) * WARMUP_FRACTION):] or samples
    drift = {}
    for name in steady[0]["rss"] if steady else []:
        vals = [s["rss"][name] for s in steady]
        drift[name] = round(max(vals) / min(vals) - 1, 4)
    rates = [s["samples_per_s"] for s in steady]
    result = {"bench": "soak", "model": args.model, "nodes": args.nodes, "minutes": args.minutes,
              "submitted": n_submitted, "answered": answered, "lost": n_submitted - answered,
              "samples_per_s_min": min(rates) if rates else None, "samples_per_s_max": max(rates) if rates else None,
              "samples_per_s_mean": float(np.mean(rates)) if rates else None,
              "rss_drift_after_warmup": drift, "samples": samples}
    save("soak", result, args.json)
    if not args.json:
        print(f"{answered}/{n_submitted} microbatches answered in {args.minutes:g} min; "
              f"throughput {result['samples_per_s_min']:.1f}..{result['samples_per_s_max']:.1f} samples/s "
              f"(mean {result['samples_per_s_mean']:.1f}); RSS drift after warm-up: "
              + ", ".join(f"{k} {v:+.1%}" for k, v in drift.items()))
    plot(result)
    return 0 if result["lost"] == 0 else 1


def plot(result: dict) -> None:
    plt = pyplot()
    if plt is None or not result["samples"]:
        return
    s = result["samples"]
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(6, 5), sharex=True)
    a1.plot([x["t"] for x in s], [x["samples_per_s"] for x in s], marker=".")
    a1.set_ylabel("samples/s")
    a1.set_title(f"Soak: {result['model']}, {result['nodes']} nodes, {result['minutes']:g} min")
    for name in s[0]["rss"]:
        a2.plot([x["t"] for x in s], [x["rss"][name] / 1e6 for x in s], label=name)
    a2.set_ylabel("node RSS (MB)")
    a2.set_xlabel("seconds")
    a2.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "soak.png", dpi=100)


if __name__ == "__main__":
    sys.exit(main())
