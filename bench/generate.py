"""Generation across emulated edge devices: tokens/s for 1, 4, 16, 64 concurrent sequences
on 1 device vs a pipeline of 2, 4, 8, for a decoder that does not fit one edge device.

    sudo python bench/generate.py [--json] [--new-tokens 16] [--prompt-len 8] [--cpu 0.2]

The testbed: 8 `edge` devices (CPU share --cpu each, 1 thread, memory --edge-memory) and one
`big` device of the same CPU share with room for the whole model (the one-device baseline:
"where one device can hold the model at all"); gigabit links (a decode step moves a few kB:
compute and the pipeline's fill set the pace). The model: the Llama architecture at a
quarter of TinyLlama's width (1024, 16 heads / 2 key-value heads, MLP 2.75x), TinyLlama's
32,000-token vocabulary, 28 layers: 1.49 GB of float32 weights, seeded. An edge device
cannot load it (its `load` is refused: the node's memory check), so it runs on 2+.
Why 28 layers and not TinyLlama's 22: the head (norm + LM head, 131 MB) is one unit worth 3
layers; at 22 layers 8 stages cannot be balanced (the best cut's slowest stage holds a layer
and the head: 175 of 1,099 MB per step, a bound of 6.3x at 8 devices, under the 0.8 N = 6.4
asked); at 28 the head alone is one stage and the bound is 7.7x. The bench measures the
pipeline, not that granularity.

Each device count gets one deployment: stages cut contiguously to balance the bytes a decode
step reads (each layer's and the head's weights once per microbatch; the embedding only the
rows of its tokens, counted 0), at the largest microbatch its runs use (ceil(64 / 2N)): a
node's load check sizes its message buffers from it and from `seq_len` (8 = the prompts'
length: a prompt is one message), and whole-sequence logits at a larger microbatch would
not fit an edge device beside its share of the weights. Each run then
generates --new-tokens greedily for S random prompts of --prompt-len tokens with at most
ceil(S / (2 N)) sequences per microbatch and 2 N microbatches in flight (every stage busy,
one more microbatch at each stage queued): the generator's continuous batching
(edgezmq.generation). tokens_per_s = generated tokens / wall time of the run (prefill
included); ms_per_token = the run's wall time / --new-tokens (what one sequence waits per
token). Before timing, one short untimed generation warms the deployment. `exact_greedy`:
the 8-device pipeline's greedy tokens for 4 prompts equal the model's own `generate`
(batch 1, same weights) on the client.

Writes bench/results/generate.json and .png; `--json` prints one object (last line).
The client side runs inside the testbed's client namespace (``--inner``, started by the outer).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import RESULTS, ROOT, need_root, pyplot, save, testbed

from edgezmq import argtypes as args_

NAME = "generate"
TESTBED = "genbench"
MODEL = "tinyllama_1_1b"
KWARGS = {"depth": 28, "embed_dim": 1024, "num_heads": 16, "mlp_ratio": 2.75, "seq_len": 8}
DEVICES = [1, 2, 4, 8]
SEQUENCES = [1, 4, 16, 64]
TARGET = 0.8  # N devices with >= N sequences: >= 0.8 N x one device's tokens/s (the issue's)


def testbed_config(cpu: float, edge_memory: str, big_memory: str) -> dict[str, Any]:
    return {"client": {"cpu": round(max(0.2, 2.0 - 8 * cpu), 3)},
            "devices": [{"name": "big", "cpu": cpu, "threads": 1, "memory": big_memory, "type": "big"},
                        {"name": "edge", "count": 8, "cpu": cpu, "threads": 1, "memory": edge_memory, "type": "edge"}],
            "links": {"default": {"mbps": 1000, "latency_ms": 0.2}}}


def balanced_cuts(sizes: list[int], parts: int) -> list[int]:
    """Contiguous cuts of `sizes` into `parts` non-empty ranges minimising the largest sum
    (exact: a binary search over the answer with a greedy check)."""
    def fits(cap: int) -> list[int] | None:
        cuts, total = [0], 0
        for i, s in enumerate(sizes):
            if s > cap:
                return None
            if total + s > cap:
                cuts.append(i)
                total = 0
            total += s
        cuts.append(len(sizes))
        return cuts if len(cuts) - 1 <= parts else None

    lo, hi = max(sizes), sum(sizes)
    while lo < hi:
        mid = (lo + hi) // 2
        if fits(mid) is None:
            lo = mid + 1
        else:
            hi = mid
    cuts = fits(lo)
    assert cuts is not None
    while len(cuts) - 1 < parts:  # split the widest range that can be split (more stages, same bottleneck)
        k = max((j for j in range(len(cuts) - 1) if cuts[j + 1] - cuts[j] > 1),
                key=lambda j: sum(sizes[cuts[j]:cuts[j + 1]]))
        cuts.insert(k + 1, (cuts[k] + cuts[k + 1]) // 2)
    return cuts


def microbatch(sequences: int, devices: int) -> int:
    """Rows per microbatch: 2 per device in flight keep every stage busy with one queued."""
    return max(1, math.ceil(sequences / (2 * devices)))


# ---------------------------------------------------------------- the client side (inner)
def inner(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np
    import torch
    from safetensors.torch import load_file

    from edgezmq.client import Client
    from edgezmq.generation import Generator, decoder_limits
    from edgezmq.model import chain as models
    from edgezmq.orchestrate.address import NodeAddress
    from edgezmq.orchestrate.deploy import DeployError, deploy, unload
    from edgezmq.orchestrate.inventory import load_cluster
    from edgezmq.orchestrate.planfile import DeployPlan, ModelSpec, StagePlan

    cluster = load_cluster(args.cluster)
    by_name = {n.name: n for n in cluster.nodes}
    path = str(models.cached_checkpoint(MODEL, seed=0, **KWARGS))
    infos = models.unit_infos(MODEL, **KWARGS)
    sizes = [u.param_bytes for u in infos]
    step_bytes = [0 if u.name == "embed" else b for u, b in zip(infos, sizes)]  # what a decode step reads
    chunk, positions, _ = decoder_limits(MODEL, KWARGS)
    vocab = int(models.create_model(MODEL, device="meta", **KWARGS).config.vocab_size)
    rng = np.random.default_rng(args.seed)
    prompts = [rng.integers(1, vocab, args.prompt_len).tolist() for _ in range(max(SEQUENCES))]
    out: dict[str, Any] = {"rows": [], "deployments": []}

    def plan_for(nodes: list[str], results: str) -> DeployPlan:
        spec = ModelSpec(name=MODEL, microbatch=microbatch(max(SEQUENCES), len(nodes)), checkpoint=path, kwargs=KWARGS)
        cuts = balanced_cuts(step_bytes, len(nodes))
        return DeployPlan(model=spec, results=results, stages=[
            StagePlan(units=(a, b), nodes=[NodeAddress(n, by_name[n].control, 1)])
            for (a, b), n in zip(zip(cuts, cuts[1:]), nodes)])

    # an edge device alone cannot hold the model: its load is refused (the node's memory check)
    with Client([], f"tcp://{cluster.client_address}:0", run="", microbatch=1) as c:
        plan = plan_for(["edge-0"], c.results_endpoint)
        try:
            deploy(plan, load_timeout=600)
            out["one_edge_device"] = "loaded"
            unload(plan)
        except DeployError as e:
            out["one_edge_device"] = f"refused: {e}"[:600]
    print(f"one edge device: {out['one_edge_device'][:200]}", file=sys.stderr, flush=True)

    for n in DEVICES:
        nodes = ["big"] if n == 1 else [f"edge-{i}" for i in range(n)]
        with Client([], f"tcp://{cluster.client_address}:0", run="", microbatch=microbatch(max(SEQUENCES), n),
                    timeout=600) as c:
            plan = plan_for(nodes, c.results_endpoint)
            t0 = time.time()
            dep = deploy(plan, load_timeout=1200)
            out["deployments"].append({"devices": n, "nodes": nodes, "stages": [list(s.units) for s in plan.stages],
                                       "stage_param_mb": [round(sum(sizes[a:b]) / 1e6, 1) for a, b in
                                                          (s.units for s in plan.stages)],
                                       "deploy_s": round(time.time() - t0, 1)})
            try:
                c.attach(dep.entry, dep.run)
                g = Generator(c, chunk=chunk, max_positions=positions, vocab_size=vocab)
                c.window, c.microbatch = 2 * n, 1
                g.generate(prompts[:1], 2)  # warm: first calls, caches' allocations
                for s in SEQUENCES:
                    c.microbatch = microbatch(s, n)
                    c.window = 2 * n
                    t = time.time()
                    toks = g.generate(prompts[:s], args.new_tokens, stop_at_eos=False)
                    dt = time.time() - t
                    st = g.stats
                    row = {"devices": n, "sequences": s, "tokens_per_s": round(st.tokens / dt, 3),
                           "ms_per_token": round(1e3 * dt / args.new_tokens, 1), "tokens": st.tokens,
                           "seconds": round(dt, 2), "microbatch": c.microbatch, "window": c.window,
                           "first_token_s_median": round(sorted(st.first_token_s)[len(st.first_token_s) // 2], 3)}
                    out["rows"].append(row)
                    print(f"{n} device(s), {s} sequence(s): {row['tokens_per_s']} tokens/s, "
                          f"{row['ms_per_token']} ms/token", file=sys.stderr, flush=True)
                    if n == max(DEVICES) and s == 4:
                        out["pipeline_greedy"] = {"prompts": prompts[:4], "tokens": toks}
            finally:
                unload(plan)

    # the model's own greedy generate, one prompt at a time, on the same weights
    m = models.create_model(MODEL, **KWARGS)
    m.load_state_dict(load_file(path), strict=False)
    ref = []
    with torch.inference_mode():
        for p in out["pipeline_greedy"]["prompts"]:
            ids = torch.tensor([p])
            r = m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new_tokens, do_sample=False,
                           eos_token_id=None, pad_token_id=0)
            ref.append(r[0, len(p):].tolist())
    out["exact_greedy"] = ref == out["pipeline_greedy"]["tokens"]
    out["generate_reference"] = ref
    return out


# ---------------------------------------------------------------- outer
def analyse(r: dict[str, Any]) -> dict[str, Any]:
    one = {x["sequences"]: x["tokens_per_s"] for x in r["rows"] if x["devices"] == 1}
    for x in r["rows"]:
        x["speedup"] = round(x["tokens_per_s"] / one[x["sequences"]], 3)
        x["efficiency"] = round(x["speedup"] / x["devices"], 3)
    r["target"] = {f"{n}_devices_{s}_sequences": {"speedup": x["speedup"], "needed": TARGET * n,
                                                  "met": x["speedup"] >= TARGET * n}
                   for x in r["rows"] for n, s in [(x["devices"], x["sequences"])] if n > 1 and s >= n}
    return r


def plot(r: dict[str, Any]) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, (a0, a1) = plt.subplots(1, 2, figsize=(12, 4.4))
    for s in SEQUENCES:
        pts = [(x["devices"], x["tokens_per_s"]) for x in r["rows"] if x["sequences"] == s]
        a0.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=f"{s} sequence(s)")
        lat = [(x["devices"], x["ms_per_token"]) for x in r["rows"] if x["sequences"] == s]
        a1.plot([p[0] for p in lat], [p[1] for p in lat], "o-", label=f"{s} sequence(s)")
    base = {x["sequences"]: x["tokens_per_s"] for x in r["rows"] if x["devices"] == 1}
    a0.plot(DEVICES, [TARGET * n * base[max(SEQUENCES)] for n in DEVICES], "k:", label=f"{TARGET:g} N x 1 device (64)")
    for a in (a0, a1):
        a.set_xscale("log", base=2)
        a.set_xticks(DEVICES, [str(n) for n in DEVICES])
        a.set_xlabel("devices (1: the big device; 2+: edge devices, pipelined)")
        a.legend(fontsize=7)
    a0.set_ylabel("tokens/s")
    a1.set_ylabel("ms per token (one sequence's wait)")
    a0.set_title(f"Llama 28 x 1024, vocab 32k, greedy, {r['new_tokens']} new tokens")
    a1.set_title("per-token latency")
    fig.tight_layout()
    fig.savefig(RESULTS / f"{NAME}.png", dpi=100)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true", help="print the result as one JSON object (last line)")
    ap.add_argument("--new-tokens", type=args_.int_in(2, 4096), default=16, help="tokens generated per sequence")
    ap.add_argument("--prompt-len", type=args_.int_in(1, 1000), default=8,
                    help="tokens of each random prompt (longer than seq_len 8: sent in chunks)")
    ap.add_argument("--cpu", type=args_.float_in(0.05, 0.25), default=0.2, help="CPU share of each device")
    ap.add_argument("--edge-memory", default="1.7GB", help="an edge device's memory cap")
    ap.add_argument("--big-memory", default="3GB", help="the one-device baseline's memory cap")
    ap.add_argument("--seed", type=args_.seed, default=0, help="of the prompts")
    ap.add_argument("--plot-only", action="store_true", help="redraw the PNG from the saved JSON")
    ap.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--cluster", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.plot_only:
        plot(json.loads((RESULTS / f"{NAME}.json").read_text()))
        return 0
    if args.inner:
        print(json.dumps(inner(args)))
        return 0
    need_root()
    t0 = time.monotonic()
    cfg = testbed_config(args.cpu, args.edge_memory, args.big_memory)
    with testbed(cfg, TESTBED) as tb:
        argv = [sys.executable, str(Path(__file__).resolve()), "--inner", "--cluster", str(tb.cluster_path),
                "--new-tokens", str(args.new_tokens), "--prompt-len", str(args.prompt_len), "--seed", str(args.seed)]
        r = tb.exec_in_client(argv, stdout=subprocess.PIPE, text=True, timeout=3 * 3600,
                              env=dict(os.environ, PYTHONPATH=str(ROOT)))
    if r.returncode != 0:
        raise SystemExit(f"the client side failed (exit {r.returncode})")
    result = analyse(json.loads(r.stdout.strip().splitlines()[-1]))
    result.update(bench=NAME, model=MODEL, kwargs=KWARGS, testbed=cfg, new_tokens=args.new_tokens,
                  prompt_len=args.prompt_len, wall_s=round(time.monotonic() - t0, 1))
    save(NAME, result, args.json)
    plot(result)
    if not args.json:
        for x in result["rows"]:
            print(f"{x['devices']} device(s) x {x['sequences']:>2} sequences: {x['tokens_per_s']:8.3f} tokens/s "
                  f"({x['speedup']:.2f}x one device), {x['ms_per_token']:.0f} ms/token")
        print(f"one edge device alone: {result['one_edge_device'][:160]}")
        print(f"exact greedy (8 devices vs the model's generate): {result['exact_greedy']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
