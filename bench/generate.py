"""Generation across emulated edge devices: tokens/s for 1, 4, 16, 64 concurrent sequences
on 1 device vs a pipeline of 2, 4, 8, for a decoder that does not fit one edge device.

    sudo python bench/generate.py [--json] [--new-tokens 16] [--prompt-len 8] [--cpu 0.2]
        [--devices 1,2,4,8] [--sequences 1,4,16,64] [--step-tokens 0] [--granularity block]
        [--cut bytes] [--no-twice] [--out generate]

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
rows of its tokens, counted 0), or with --cut time the units' work in this run (`unit_work_us`:
a prompt step and --new-tokens - 1 decode steps per microbatch, timed on the client, 1
thread; the head reads 3 layers' bytes but takes 1 row per prompt), at --granularity (block:
a unit per layer; half: its attention and its MLP), at the largest microbatch its runs use
(ceil(max S / window)). (--granularity half --cut time did worse than the default at 8
devices: the client's profile underprices the head's stage; README, "Enough sequences".) A
node's load check sizes its message buffers from that microbatch and from `seq_len` (8 = the prompts'
length: a prompt is one message); deployed `generation_only`, the head's buffers hold each
row's next-token logits, not every position's. Each stage reserves its units' KV caches for
every sequence of the largest run at its longest (--prompt-len + --new-tokens tokens: the
plan's `cache_bytes`, as autodeploy sets it), so that no step waits for cache room (the
default, half of what the shard leaves, is short of that at 4,096 sequences). Each run then
generates --new-tokens greedily for S random prompts of --prompt-len tokens with at most
N + --queued microbatches in flight (one per stage, and one more by default to cover the
client's turnaround) of ceil(S / (N + queued)) sequences each: the generator's continuous
batching (edgezmq.generation). Why not more in flight: a row of a decode step costs less the
more rows its microbatch has (`bench/decode_rows.py`: on 4 layers, 1 thread, 8.0 ms per row at
8 rows, 3.6 at 32, 2.6 at 64 and up; at 1 row the step is bound by reading the weights, from 8
rows on by matrix products that this CPU runs at low efficiency for few rows). N stages need N
microbatches in flight to be busy, so their rows are S / (N + 1) against one device's S / 2:
the compute bound on the speedup is N x per_row(S / 2) / per_row(S / (N + 1)), printed by
decode_rows.py. Every microbatch more in flight lowers it while the microbatches are small:
keep the window near N for the default tables (up to 64 sequences). From ~100 rows on a row
costs the same at any size, and more in flight is free: at 4,096 sequences on 8 devices
`--queued 8` (window 16, 256-row steps) let the stages (the light head's stage aside) wait
4-12 % of the run mid-run, against 21-25 % at window 9 (README, "Enough sequences"). The one
device takes at most one queued.

--step-tokens caps the prompt tokens of a prefill step (Generator.step_tokens; 0: a whole
microbatch of prompts, the default); each value is a run of every pipeline (the one device
runs whole prompt steps: with one stage there is no fill to shorten). A microbatch of 8-token prompts
costs up to 8 decode steps, and the last of N stages waits for the first one to pass the
N - 1 before it: smaller prompt steps fill the pipeline sooner (docs/generate.md).
Each row also records, from the stages' `stats` before and after the run, each stage's
share of the run spent computing (wall clock) and the CPU seconds of its computing, and the
machine's busy share (/proc/stat): the speedup over one device is N x (one device's CPU
seconds / the stages' sum: the cost of smaller microbatches) x (mean stage CPU / the
busiest's: balance) x (the busiest stage's computing share: the pipeline's idle time), as
long as each computing stage gets its CPU share (CPU seconds / computing seconds = --cpu).
`stage_time` splits each stage's run, from the steps' wire timestamps (edgezmq.ops.trace.idle:
one host, one clock), into computing and its idle time: `fill` (before its first step: the
steps ahead of it), `drain` (after its last: the steps behind it), `gaps` (waiting mid-run).

tokens_per_s = generated tokens / wall time of the run (prefill included); ms_per_token = the run's wall time / --new-tokens (what one sequence waits per
token). Before timing, one short untimed generation warms the deployment. `exact_greedy`:
the largest deployment's greedy tokens for 4 prompts equal the model's own `generate`
(batch 1, same weights) on the client. A deployment refused (e.g. a microbatch whose message
buffers do not fit beside the shard) is recorded under `deployments` and skipped.

`twice` (unless --no-twice): the same layers, 72 of them (3.43 GB, 2.02x an edge device's
1.7 GB cap), refused by one edge device, generating on the 8 edge devices for 1 and 64
sequences, its greedy tokens checked against its own `generate` the same way.

Writes bench/results/OUT.json and .png (OUT: --out, default generate); `--json` prints one object (last line).
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

from common import RESULTS, ROOT, need_root, pyplot, result_name, save, testbed

from edgezmq import argtypes as args_
from edgezmq.model.text import DECODER_GRANULARITIES
from edgezmq.protocol import wire

NAME = "generate"
TESTBED = "genbench"
MODEL = "tinyllama_1_1b"
KWARGS = {"depth": 28, "embed_dim": 1024, "num_heads": 16, "mlp_ratio": 2.75, "seq_len": 8}
DEVICES = [1, 2, 4, 8]
SEQUENCES = [1, 4, 16, 64]
# "a model twice one device's memory runs": the same layers, 72 of them (3.43 GB of float32
# weights, 2.02x an edge device's 1.7 GB cap), on the 8 edge devices
TWICE_KWARGS = {**KWARGS, "depth": 72}
TWICE_SEQUENCES = [1, 64]
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


def window(devices: int, queued: int) -> int:
    """Microbatches in flight: one per stage, and `queued` more (the client's turnaround, and the
    pipeline's slack: steps of unequal work leave a stage waiting unless one is queued at it).
    One device takes at most one queued: there nothing waits on another stage, and each step
    more in flight only makes its steps smaller (dearer per row: bench/decode_rows.py)."""
    return devices + (min(queued, 1) if devices == 1 else queued)


def microbatch(sequences: int, devices: int, queued: int) -> int:
    """Rows per microbatch: the sequences spread over the microbatches in flight, at most what
    one gen message carries (the generator's cap: the rest wait their turn)."""
    return max(1, min(math.ceil(sequences / window(devices, queued)), wire.MAX_GEN_ROWS))


# ---------------------------------------------------------------- the client side (inner)
def inner(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np

    from edgezmq.model import chain as models
    from edgezmq.orchestrate.inventory import load_cluster

    cluster = load_cluster(args.cluster)
    vocab = int(models.create_model(MODEL, device="meta", **KWARGS).config.vocab_size)
    rng = np.random.default_rng(args.seed)
    prompts = [rng.integers(1, vocab, args.prompt_len).tolist() for _ in range(max([*args.sequences, *TWICE_SEQUENCES]))]
    out: dict[str, Any] = {"rows": [], "deployments": []}
    if args.devices:
        run = _scaling(args, cluster, KWARGS, args.devices, args.sequences, prompts)
        out.update(rows=run["rows"], deployments=run["deployments"], one_edge_device=run["one_edge_device"],
                   exact_greedy=run["exact_greedy"], generate_reference=run["generate_reference"],
                   pipeline_greedy=run["pipeline_greedy"], granularity=run["granularity"], cut=run["cut"],
                   unit_time_us=run["unit_time_us"])
    if args.twice:
        edge_cap = next(n.memory_bytes for n in cluster.nodes if n.name == "edge-0")
        assert edge_cap is not None
        run = _scaling(args, cluster, TWICE_KWARGS, [8], TWICE_SEQUENCES, prompts)
        param = sum(u.param_bytes for u in models.unit_infos(MODEL, **TWICE_KWARGS))
        out["twice"] = {"kwargs": TWICE_KWARGS, "param_bytes": param, "edge_memory_bytes": edge_cap,
                        "times_edge_memory": round(param / edge_cap, 3), **run}
    return out


def _scaling(args: argparse.Namespace, cluster: Any, kwargs: dict[str, Any], devices: list[int],
             sequences: list[int], prompts: list[list[int]]) -> dict[str, Any]:
    """The model of `kwargs` deployed on each device count in turn (1: the big device; n > 1:
    n edge devices), generating for each number of sequences; then the model's own greedy
    generate on the first 4 prompts, against the largest deployment's tokens."""
    import torch
    from safetensors.torch import load_file

    from edgezmq.client import Client
    from edgezmq.generation import Generator, decoder_limits
    from edgezmq.model import chain as models
    from edgezmq.model import text
    from edgezmq.ops import trace
    from edgezmq.ops.status import poll
    from edgezmq.orchestrate.address import NodeAddress
    from edgezmq.orchestrate.deploy import DeployError, deploy, unload
    from edgezmq.orchestrate.planfile import DeployPlan, ModelSpec, StagePlan

    by_name = {n.name: n for n in cluster.nodes}
    path = str(models.cached_checkpoint(MODEL, seed=0, **kwargs))
    infos = models.unit_infos(MODEL, args.granularity, **kwargs)
    sizes = [u.param_bytes for u in infos]
    step_bytes = [0 if u.name == "embed" else b for u, b in zip(infos, sizes)]  # what a decode step reads
    meta = models.create_model(MODEL, device="meta", **kwargs)
    per_token = text.cache_bytes_per_token(meta, 1)  # one layer's keys and values
    # what each unit's caches hold with every sequence of the largest run at its longest
    cache = [per_token * max(sequences) * (args.prompt_len + args.new_tokens) if p.kind in text.CACHE_KINDS else 0
             for p in text.pieces(meta, args.granularity)]
    out_cut: dict[str, Any] = {"granularity": args.granularity, "cut": args.cut, "unit_time_us": {}}
    chunk, positions, _ = decoder_limits(MODEL, kwargs)
    vocab = int(meta.config.vocab_size)
    out: dict[str, Any] = {"rows": [], "deployments": [], **out_cut}
    checked = prompts[:min(4, max(sequences))]

    def cost(n: int) -> list[int]:
        """What each unit costs a stage of n devices: the bytes its decode step reads, or (--cut
        time) its share of this run's work (`unit_work_us`) at n devices' microbatch."""
        if args.cut == "bytes" or n == 1:
            return step_bytes
        mb = microbatch(max(sequences), n, args.queued)
        if mb not in out["unit_time_us"]:
            out["unit_time_us"][mb] = unit_work_us(path, kwargs, args, mb)
            print(f"unit work at microbatch {mb} (us): {out['unit_time_us'][mb]}", file=sys.stderr, flush=True)
        return out["unit_time_us"][mb]

    def plan_for(nodes: list[str], results: str) -> DeployPlan:
        spec = ModelSpec(name=MODEL, microbatch=microbatch(max(sequences), len(nodes), args.queued), checkpoint=path,
                         kwargs=kwargs, generation_only=True, granularity=args.granularity)
        cuts = balanced_cuts(cost(len(nodes)), len(nodes))
        return DeployPlan(model=spec, results=results, stages=[
            StagePlan(units=(a, b), nodes=[NodeAddress(n, by_name[n].control, 1)], cache_bytes=sum(cache[a:b]))
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

    for n in sorted(devices, reverse=True):  # the pipelines first: the one device takes longest
        nodes = ["big"] if n == 1 else [f"edge-{i}" for i in range(n)]
        with Client([], f"tcp://{cluster.client_address}:0", run="",
                    microbatch=microbatch(max(sequences), n, args.queued), timeout=3600) as c:  # one device's prompt step of 512 x 8 tokens: ~5 min at 0.2 of a core
            plan = plan_for(nodes, c.results_endpoint)
            t0 = time.time()
            try:
                dep = deploy(plan, load_timeout=1200)
            except DeployError as e:  # e.g. the microbatch's buffers do not fit beside the shard
                out["deployments"].append({"devices": n, "nodes": nodes, "refused": str(e)[:600]})
                print(f"{n} device(s): refused: {str(e)[:300]}", file=sys.stderr, flush=True)
                continue
            out["deployments"].append({"devices": n, "nodes": nodes, "stages": [list(s.units) for s in plan.stages],
                                       "stage_param_mb": [round(sum(sizes[a:b]) / 1e6, 1) for a, b in
                                                          (s.units for s in plan.stages)],
                                       "deploy_s": round(time.time() - t0, 1)})
            stage_nodes = [st.nodes[0] for st in plan.stages]
            try:
                c.attach(dep.entry, dep.run)
                g = Generator(c, chunk=chunk, max_positions=positions, vocab_size=vocab)
                c.window, c.microbatch = window(n, args.queued), 1
                g.generate(prompts[:1], 2)  # warm: first calls, caches' allocations
                # one stage has no fill to shorten: a cap there only costs CPU (0.93x, generate-steps.json)
                for s, k in ((s, k) for s in sequences for k in (args.step_tokens if n > 1 else [0])):
                    c.microbatch = microbatch(s, n, args.queued)
                    c.window = window(n, args.queued)
                    g.step_tokens = k or None
                    before = poll(stage_nodes)
                    machine = MachineUse()
                    first = c.next_seq
                    t = time.time()
                    toks = g.generate(prompts[:s], args.new_tokens, stop_at_eos=False)
                    dt = time.time() - t
                    st = g.stats
                    row = {"devices": n, "sequences": s, "step_tokens": k, "tokens_per_s": round(st.tokens / dt, 3),
                           "ms_per_token": round(1e3 * dt / args.new_tokens, 1), "tokens": st.tokens,
                           "seconds": round(dt, 2), "microbatch": c.microbatch, "window": c.window,
                           "steps": st.steps, "prefill_rows": st.prefill_rows, "cache_full_waits": st.cache_full,
                           "first_token_s_median": round(sorted(st.first_token_s)[len(st.first_token_s) // 2], 3),
                           **stage_use(before, poll(stage_nodes), dt), "machine_busy": machine.busy(),
                           "stage_time": trace.idle(trace.intervals(
                               {q: c.timestamps[q] for q in range(first, c.next_seq) if q in c.timestamps}), n)}
                    out["rows"].append(row)
                    print(f"{n} device(s), {s} sequence(s), step_tokens {k}: {row['tokens_per_s']} tokens/s, "
                          f"{row['ms_per_token']} ms/token, stages computing {row['stage_compute_share']}, "
                          f"CPU {row['stage_cpu_s']} s, machine busy {row['machine_busy']}",
                          file=sys.stderr, flush=True)
                    if n == max(devices) and "pipeline_greedy" not in out and s >= len(checked):
                        out["pipeline_greedy"] = {"prompts": checked, "tokens": toks[:len(checked)]}
            finally:
                unload(plan)

    # the model's own greedy generate, one prompt at a time, on the same weights
    m = models.create_model(MODEL, **kwargs)
    m.load_state_dict(load_file(path), strict=False)
    ref = []
    with torch.inference_mode():
        for p in out["pipeline_greedy"]["prompts"]:
            ids = torch.tensor([p])
            r = m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new_tokens, do_sample=False,
                           eos_token_id=None, pad_token_id=0)
            ref.append(r[0, len(p):].tolist())
    del m
    out["exact_greedy"] = ref == out["pipeline_greedy"]["tokens"]
    out["generate_reference"] = ref
    return out


def unit_work_us(path: str, kwargs: dict[str, Any], args: argparse.Namespace, mb: int) -> list[int]:
    """Each unit's work for one microbatch of this run, timed here unit by unit (1 thread, as the
    devices run; at the client's CPU share, so only the ratios between units count), in
    microseconds: its prompt step (mb rows of --prompt-len tokens from empty caches) and
    --new-tokens - 1 decode steps (at the context halfway). Why not the decode step alone: with
    short generations the prompt is half a layer's work, and the head (next-token logits of the
    last position only) takes 1 row per sequence there, not --prompt-len."""
    import statistics

    import torch

    from edgezmq.model import chain as models
    from edgezmq.model.profiling import decode_step

    gen = torch.Generator().manual_seed(0)
    out = []

    def median_s(fn: Any, reps: int = 3) -> float:
        fn()  # warm
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return statistics.median(times)

    with models.torch_threads(1), torch.inference_mode():
        for i in range(models.num_units(MODEL, args.granularity, **kwargs)):
            shard = models.build_shard(MODEL, i, i + 1, granularity=args.granularity, checkpoint=path, **kwargs)
            prompt_s = median_s(prompt_step(shard, mb, args.prompt_len, gen))
            decode_s = median_s(decode_step(shard, mb, args.prompt_len + args.new_tokens // 2, gen))
            out.append(max(1, round(1e6 * (prompt_s + (args.new_tokens - 1) * decode_s))))
    return out


def prompt_step(shard: Any, mb: int, tokens: int, gen: Any) -> Any:
    """A prompt step of `shard`, repeatable: mb sequences' first `tokens` tokens, fresh caches."""
    x = shard.decode_inputs(mb, 0, gen)[0].repeat_interleave(tokens, dim=1)
    return lambda: shard.step_batch(x, [shard.new_cache() for _ in range(mb)], [0] * mb)


def stage_use(before: list[Any], after: list[Any], seconds: float) -> dict[str, list[float | None]]:
    """From each stage's `stats` before and after a run of `seconds`: its share of the run spent
    computing (wall clock), and the CPU seconds its computing took (None: a node that did not
    answer). Wall time over CPU time above 1 / --cpu means the stage got less than its share."""
    ok = [not isinstance(a, str) and not isinstance(b, str) and a.stage and b.stage for b, a in zip(before, after)]
    return {"stage_compute_share": [round((a.stage.compute_s - b.stage.compute_s) / seconds, 3) if k else None
                                    for b, a, k in zip(before, after, ok)],
            "stage_cpu_s": [round(a.stage.compute_cpu_s - b.stage.compute_cpu_s, 2) if k else None
                            for b, a, k in zip(before, after, ok)]}


class MachineUse:
    """The whole machine's CPU use from now to `busy()` (/proc/stat: not per namespace)."""

    def __init__(self) -> None:
        self.start = self._read()

    @staticmethod
    def _read() -> tuple[int, int]:
        with open("/proc/stat") as f:
            cpu = [int(v) for v in f.readline().split()[1:]]
        return sum(cpu), cpu[3] + cpu[4]  # all, idle + iowait

    def busy(self) -> float:
        total, idle = self._read()
        return round(1 - (idle - self.start[1]) / max(1, total - self.start[0]), 3)


# ---------------------------------------------------------------- outer
def analyse(r: dict[str, Any]) -> dict[str, Any]:
    # the one-device baseline of each number of sequences: its best run (step_tokens changes
    # nothing on one stage but the noise)
    one: dict[int, float] = {}
    for x in r["rows"]:
        if x["devices"] == 1:
            one[x["sequences"]] = max(one.get(x["sequences"], 0.0), x["tokens_per_s"])
    rows = [x for x in r["rows"] if x["sequences"] in one]  # the rows with a one-device baseline
    for x in rows:
        x["speedup"] = round(x["tokens_per_s"] / one[x["sequences"]], 3)
        x["efficiency"] = round(x["speedup"] / x["devices"], 3)
    r["target"] = {f"{n}_devices_{s}_sequences" + (f"_step_tokens_{k}" if k else ""):
                   {"speedup": x["speedup"], "needed": TARGET * n, "met": x["speedup"] >= TARGET * n}
                   for x in rows for n, s, k in [(x["devices"], x["sequences"], x.get("step_tokens", 0))]
                   if n > 1 and s >= n}
    return r


def plot(r: dict[str, Any]) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, (a0, a1) = plt.subplots(1, 2, figsize=(12, 4.4))
    sequences = sorted({x["sequences"] for x in r["rows"]})
    devices = sorted({x["devices"] for x in r["rows"]})
    if not sequences:
        return
    for s, k in sorted({(x["sequences"], x.get("step_tokens", 0)) for x in r["rows"]}):
        runs = [x for x in r["rows"] if x["sequences"] == s and x.get("step_tokens", 0) == k]
        label = f"{s} sequence(s)" + (f", step_tokens {k}" if k else "")
        a0.plot([x["devices"] for x in runs], [x["tokens_per_s"] for x in runs], "o-", label=label)
        a1.plot([x["devices"] for x in runs], [x["ms_per_token"] for x in runs], "o-", label=label)
    base = {x["sequences"]: x["tokens_per_s"] for x in r["rows"] if x["devices"] == 1}
    if max(sequences) in base:
        a0.plot(devices, [TARGET * n * base[max(sequences)] for n in devices], "k:",
                label=f"{TARGET:g} N x 1 device ({max(sequences)})")
    for a in (a0, a1):
        a.set_xscale("log", base=2)
        a.set_xticks(devices, [str(n) for n in devices])
        a.set_xlabel("devices (1: the big device; 2+: edge devices, pipelined)")
        a.legend(fontsize=7)
    a0.set_ylabel("tokens/s")
    a1.set_ylabel("ms per token (one sequence's wait)")
    a0.set_title(f"Llama 28 x 1024, vocab 32k, greedy, {r['new_tokens']} new tokens")
    a1.set_title("per-token latency")
    fig.tight_layout()
    fig.savefig(RESULTS / f"{r['out']}.png", dpi=100)


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
    ap.add_argument("--queued", type=args_.int_in(0, 64), default=1,
                    help="microbatches in flight beyond one per stage (window = devices + this; one device: at most 1)")
    ap.add_argument("--devices", type=args_.int_list(1, 8), default=DEVICES,
                    help="device counts, comma-separated (1: the big device; n > 1: n edge devices; '': none)")
    ap.add_argument("--sequences", type=args_.int_list(1, 4096), default=SEQUENCES,
                    help="concurrent sequences of each run, comma-separated")
    ap.add_argument("--step-tokens", type=args_.int_list(0, 1 << 16), default=[0],
                    help="the most prompt tokens a prefill step carries (Generator.step_tokens), comma-separated: "
                         "each gives a run of each pipeline (0: a whole microbatch of prompts; one device: always 0)")
    ap.add_argument("--granularity", choices=DECODER_GRANULARITIES, default="block",
                    help="the decoder's units: a layer each, or its attention and its MLP (finer cuts)")
    ap.add_argument("--cut", choices=("bytes", "time"), default="bytes",
                    help="balance the stages' decode-step bytes read, or their units' work in the run "
                         "(a prompt step and the decode steps, timed on the client at the run's microbatch)")
    ap.add_argument("--twice", action=argparse.BooleanOptionalAction, default=True,
                    help="also run a model twice an edge device's memory cap on the 8 edge devices")
    ap.add_argument("--out", type=result_name, default=NAME, help="results name: bench/results/OUT.json and .png")
    ap.add_argument("--plot-only", action="store_true", help="redraw the PNG from the saved JSON")
    ap.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--cluster", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.plot_only:
        plot({"out": args.out, **json.loads((RESULTS / f"{args.out}.json").read_text())})
        return 0
    if args.inner:
        print(json.dumps(inner(args)))
        return 0
    need_root()
    t0 = time.monotonic()
    if args.twice:  # written here, at full speed, before the devices' CPU shares apply (3.5 GB)
        from edgezmq.model import chain as models

        models.cached_checkpoint(MODEL, seed=0, **TWICE_KWARGS)
    cfg = testbed_config(args.cpu, args.edge_memory, args.big_memory)
    with testbed(cfg, TESTBED) as tb:
        argv = [sys.executable, str(Path(__file__).resolve()), "--inner", "--cluster", str(tb.cluster_path),
                "--queued", str(args.queued), "--devices", ",".join(map(str, args.devices)),
                "--sequences", ",".join(map(str, args.sequences)),
                "--step-tokens", ",".join(map(str, args.step_tokens)), "--twice" if args.twice else "--no-twice",
                "--granularity", args.granularity, "--cut", args.cut,
                "--new-tokens", str(args.new_tokens), "--prompt-len", str(args.prompt_len), "--seed", str(args.seed)]
        r = tb.exec_in_client(argv, stdout=subprocess.PIPE, text=True, timeout=3 * 3600,
                              env=dict(os.environ, PYTHONPATH=str(ROOT)))
    if r.returncode != 0:
        raise SystemExit(f"the client side failed (exit {r.returncode})")
    result = analyse(json.loads(r.stdout.strip().splitlines()[-1]))
    result.update(bench=NAME, out=args.out, model=MODEL, kwargs=KWARGS, testbed=cfg, new_tokens=args.new_tokens, queued=args.queued,
                  prompt_len=args.prompt_len, wall_s=round(time.monotonic() - t0, 1))
    save(args.out, result, args.json)
    plot(result)
    if not args.json:
        for x in result["rows"]:
            vs = f"{x['speedup']:.2f}x one device" if "speedup" in x else "no one-device row"
            print(f"{x['devices']} device(s) x {x['sequences']:>2} sequences: {x['tokens_per_s']:8.3f} tokens/s "
                  f"({vs}), {x['ms_per_token']:.0f} ms/token")
        if "one_edge_device" in result:
            print(f"one edge device alone: {result['one_edge_device'][:160]}")
        if "exact_greedy" in result:
            print(f"exact greedy ({max(args.devices)} devices vs the model's generate): {result['exact_greedy']}")
        if "twice" in result:
            t = result["twice"]
            print(f"a model {t['times_edge_memory']}x an edge device's memory cap on 8 edge devices: " + ", ".join(
                f"{x['sequences']} sequence(s) {x['tokens_per_s']} tokens/s" for x in t["rows"])
                  + f"; exact greedy {t['exact_greedy']}; one edge device alone: {t['one_edge_device'][:100]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
