"""The last link of a generation pipeline at the EdgePipe testbed's rates: greedy decoding
with the last stage choosing each row's token (`gen.pick` argmax: 8 bytes a row) against the
same tokens chosen on the client from each row's logits (`Generator.pick_on_stage = False`:
4 x vocab bytes a row), with the last device's link to the client at 10 / 30 / 100 / 1000
Mbit/s.

    sudo python bench/gen_link.py [--json] [--mbps 10,30,100,1000] [--sequences 64]
        [--new-tokens 16] [--out gen-link]

The testbed: two devices, `a` and `b` (CPU share --cpu each, 1 thread, 1 GB), and the
client (0.5 of a core); gigabit links but for b <-> client, set to each rate in turn
(`Testbed.set_link`, htb, while the nodes keep running). The model: the Llama architecture
(TinyLlama's 32,000-token vocabulary) at 4 layers of width 256, seeded, cut in two after
the second layer, deployed `generation_only`; a step carries 8 sequences (--sequences
prompts of --prompt-len random tokens, --new-tokens each, 4 steps in flight: two stages
and two more). At each rate, one run of each kind on the same prompts; tokens_per_s =
generated tokens / the run's wall time (prefill included); `client_mb`: what the last stage
sent (its `bytes_out`, headers included). `same_tokens`: both kinds gave the same tokens;
`exact_greedy`: the first 4 prompts' tokens equal the model's own greedy `generate`
(batch 1, same weights) on the client.

Writes bench/results/OUT.json and .png (OUT: --out, default gen-link); `--json` prints one
object (last line). The client side runs inside the testbed's client namespace (``--inner``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import RESULTS, ROOT, need_root, pyplot, result_name, save, testbed

from edgezmq import argtypes as args_

NAME = "gen-link"
TESTBED = "genlink"
MODEL = "tinyllama_1_1b"
KWARGS = {"depth": 4, "embed_dim": 256, "num_heads": 4, "mlp_ratio": 2.75, "seq_len": 8}
CUTS = [0, 3, 6]  # embed + 2 layers | 2 layers + head (units: embed, 4 layers, head)
MICROBATCH = 8
MBPS = [10, 30, 100, 1000]
CHECKED = 4  # prompts checked against the model's own generate


def testbed_config(cpu: float) -> dict[str, Any]:
    return {"client": {"cpu": 0.5},
            "devices": [{"name": "a", "cpu": cpu, "threads": 1, "memory": "1GB"},
                        {"name": "b", "cpu": cpu, "threads": 1, "memory": "1GB"}],
            "links": {"default": {"mbps": 1000, "latency_ms": 0.2}}}


# ---------------------------------------------------------------- the client side (inner)
def inner(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np
    import torch
    from safetensors.torch import load_file

    from edgezmq.client import Client
    from edgezmq.generation import Generator, decoder_limits
    from edgezmq.model import chain as models
    from edgezmq.ops.status import poll
    from edgezmq.orchestrate.address import NodeAddress
    from edgezmq.orchestrate.deploy import deploy, unload
    from edgezmq.orchestrate.inventory import load_cluster
    from edgezmq.orchestrate.planfile import DeployPlan, ModelSpec, StagePlan
    from edgezmq.testbed import Testbed

    tb = Testbed.from_yaml(args.testbed, name=TESTBED)
    cluster = load_cluster(args.cluster)
    by_name = {n.name: n for n in cluster.nodes}
    path = str(models.cached_checkpoint(MODEL, seed=0, **KWARGS))
    chunk, positions, _ = decoder_limits(MODEL, KWARGS)
    vocab = int(models.create_model(MODEL, device="meta", **KWARGS).config.vocab_size)
    rng = np.random.default_rng(args.seed)
    prompts = [rng.integers(1, vocab, args.prompt_len).tolist() for _ in range(args.sequences)]
    kinds = {"pick": True, "logits": False}  # Generator.pick_on_stage
    rows: list[dict[str, Any]] = []
    tokens: dict[str, list[list[int]]] = {}
    with Client([], f"tcp://{cluster.client_address}:0", run="", microbatch=MICROBATCH, timeout=600,
                window=2 + 2) as c:
        spec = ModelSpec(name=MODEL, microbatch=MICROBATCH, checkpoint=path, kwargs=KWARGS, generation_only=True)
        plan = DeployPlan(model=spec, results=c.results_endpoint, stages=[
            StagePlan(units=(a, b), nodes=[NodeAddress(n, by_name[n].control, 1)])
            for (a, b), n in zip(zip(CUTS, CUTS[1:]), ("a", "b"))])
        dep = deploy(plan, load_timeout=600)
        last = [plan.stages[-1].nodes[0]]
        try:
            c.attach(dep.entry, dep.run)
            g = Generator(c, chunk=chunk, max_positions=positions, vocab_size=vocab)
            for on_stage in kinds.values():  # warm: first calls, the caches' allocations, both answers
                g.pick_on_stage = on_stage
                g.generate(prompts[:1], 2)
            for mbps in args.mbps:
                tb.set_link("b", "client", mbps=mbps)
                for kind, on_stage in kinds.items():
                    g.pick_on_stage = on_stage
                    before = poll(last)[0]
                    t = time.time()
                    toks = g.generate(prompts, args.new_tokens, stop_at_eos=False)
                    dt = time.time() - t
                    after = poll(last)[0]
                    sent = after.stage.bytes_out - before.stage.bytes_out  # type: ignore[union-attr]
                    key = f"{mbps}-{kind}"
                    tokens[key] = toks
                    row = {"mbps": mbps, "kind": kind, "tokens_per_s": round(g.stats.tokens / dt, 3),
                           "ms_per_token": round(1e3 * dt / args.new_tokens, 1), "seconds": round(dt, 2),
                           "tokens": g.stats.tokens, "steps": g.stats.steps, "client_mb": round(sent / 1e6, 3),
                           "same_tokens": toks == tokens[f"{mbps}-pick"]}
                    rows.append(row)
                    print(f"{mbps} Mbit/s, {kind}: {row['tokens_per_s']} tokens/s, {row['client_mb']} MB to the "
                          f"client, same tokens: {row['same_tokens']}", file=sys.stderr, flush=True)
        finally:
            tb.set_link("b", "client", mbps=1000)
            unload(plan)
    m = models.create_model(MODEL, **KWARGS)
    m.load_state_dict(load_file(path), strict=False)
    ref = []
    with torch.inference_mode():
        for p in prompts[:CHECKED]:
            ids = torch.tensor([p])
            r = m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new_tokens, do_sample=False,
                           eos_token_id=None, pad_token_id=0)
            ref.append(r[0, len(p):].tolist())
    got = tokens[f"{args.mbps[0]}-pick"][:CHECKED]
    return {"rows": rows, "exact_greedy": ref == got, "generate_reference": ref, "pipeline_greedy": got}


def analyse(result: dict[str, Any]) -> dict[str, Any]:
    """Per rate: tokens/s picking over tokens/s from logits (one run each, the same prompts)."""
    by = {(r["mbps"], r["kind"]): r for r in result["rows"]}
    result["pick_over_logits"] = {str(mbps): round(by[(mbps, "pick")]["tokens_per_s"] / by[(mbps, "logits")]["tokens_per_s"], 3)
                                  for mbps, kind in by if kind == "pick" and (mbps, "logits") in by}
    return result


def plot(result: dict[str, Any]) -> None:
    plt = pyplot()
    if plt is None:
        return
    rates = sorted({r["mbps"] for r in result["rows"]})
    by = {(r["mbps"], r["kind"]): r["tokens_per_s"] for r in result["rows"]}
    fig, ax = plt.subplots(figsize=(6, 4))
    x = range(len(rates))
    for off, kind, label in ((-0.2, "pick", "token picked on the last stage"), (0.2, "logits", "logits to the client, token chosen there")):
        ax.bar([i + off for i in x], [by.get((r, kind), 0) for r in rates], 0.4, label=label)
    ax.set_xticks(list(x), [f"{r} Mbit/s" for r in rates])
    ax.set_ylabel("tokens/s")
    ax.set_ylim(0, 1.35 * max(by.values()))  # room for the legend above the bars
    ax.set_title(f"2 stages, {result['sequences']} sequences, greedy: the last link's rate")
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / f"{result['out']}.png", dpi=100)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--mbps", type=args_.int_list(1, 10000), default=MBPS, help="rates of b <-> client, comma-separated")
    ap.add_argument("--sequences", type=args_.int_in(1, 1024), default=64, help="concurrent sequences of each run")
    ap.add_argument("--new-tokens", type=args_.int_in(1, 64), default=16, help="tokens generated per sequence")
    ap.add_argument("--prompt-len", type=args_.int_in(1, 8), default=8, help="tokens of each random prompt")
    ap.add_argument("--cpu", type=args_.float_in(0.05, 0.75), default=0.25, help="CPU share of each device")
    ap.add_argument("--seed", type=args_.seed, default=0, help="of the prompts")
    ap.add_argument("--out", type=result_name, default=NAME, help="results name: bench/results/OUT.json and .png")
    ap.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--cluster", help=argparse.SUPPRESS)
    ap.add_argument("--testbed", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.inner:
        print(json.dumps(inner(args)))
        return 0
    need_root()
    t0 = time.monotonic()
    from edgezmq.model import chain as models

    models.cached_checkpoint(MODEL, seed=0, **KWARGS)  # written here, at full speed
    cfg = testbed_config(args.cpu)
    with testbed(cfg, TESTBED) as tb:
        argv = [sys.executable, str(Path(__file__).resolve()), "--inner", "--cluster", str(tb.cluster_path),
                "--testbed", str(tb.source), "--mbps", ",".join(map(str, args.mbps)),
                "--sequences", str(args.sequences), "--new-tokens", str(args.new_tokens),
                "--prompt-len", str(args.prompt_len), "--seed", str(args.seed)]
        r = tb.exec_in_client(argv, stdout=subprocess.PIPE, text=True, timeout=3600,
                              env=dict(os.environ, PYTHONPATH=str(ROOT)))
    if r.returncode != 0:
        raise SystemExit(f"the client side failed (exit {r.returncode})")
    result = analyse(json.loads(r.stdout.strip().splitlines()[-1]))
    result.update(bench=NAME, out=args.out, model=MODEL, kwargs=KWARGS, cuts=CUTS, microbatch=MICROBATCH,
                  testbed=cfg, sequences=args.sequences, new_tokens=args.new_tokens, prompt_len=args.prompt_len,
                  wall_s=round(time.monotonic() - t0, 1))
    save(args.out, result, args.json)
    plot(result)
    if not args.json:
        for x in result["rows"]:
            print(f"{x['mbps']:>5} Mbit/s {x['kind']:>6}: {x['tokens_per_s']:8.2f} tokens/s, {x['client_mb']:.3f} MB "
                  f"to the client, same tokens {x['same_tokens']}")
        print(f"picking over logits: {result['pick_over_logits']}; exact greedy: {result['exact_greedy']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
