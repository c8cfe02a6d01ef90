"""Is the planner's budget rule safe? The logit error of two cuts encoded together against
the sum of each cut's error alone (docs/planner.md, "Encodings"), on a seeded ViT.

    python bench/encoding_sum.py [--model vit_tiny_patch16_224] [--samples 16]
        [--encodings f16,int8,int4-ch-aciq] [--json]

Every pair of block-boundary cuts (c1 < c2), each encoding at both: rel_l2 of the logits
with both against rel_l2(c1 alone) + rel_l2(c2 alone), through the wire codecs' own round
trip (edgezmq.protocol.codecs.roundtrip). Prints, per encoding, the largest ratio
joint / sum over the pairs (<= 1: the sum never underestimated) and the median.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgezmq.model import accuracy as acc  # noqa: E402
from edgezmq.model import chain  # noqa: E402
from edgezmq.protocol import codecs  # noqa: E402

SEED = 0


def transform(name: str) -> acc.Transform:
    return lambda t, i: torch.from_numpy(codecs.roundtrip(name, t.numpy()).copy())


@torch.no_grad()
def two_cut_logits(sweep: acc.CutSweep, c1: int, c2: int, f: acc.Transform) -> torch.Tensor:
    out = []
    for ts in sweep.tensors(c1):
        ts = tuple(f(t, i) for i, t in enumerate(ts))
        ts = chain.run_units(sweep.model, sweep.granularity, *ts, start=c1, end=c2)
        ts = tuple(f(t, i) for i, t in enumerate(ts))
        ts = chain.run_units(sweep.model, sweep.granularity, *ts, start=c2, end=sweep.num_units)
        out.append(ts[0])
    return torch.cat(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="vit_tiny_patch16_224")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--encodings", default="f16,int8,int4-ch-aciq")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(SEED)
    model = chain.create_model(args.model).eval()
    x = torch.randn(chain.input_shape(args.model, args.samples), generator=torch.Generator().manual_seed(SEED))
    sweep = acc.CutSweep(model, "block", x)
    cuts = list(range(1, sweep.num_units))
    result: dict[str, dict] = {}
    for name in args.encodings.split(","):
        f = transform(name)
        alone = {c: acc.rel_l2(sweep.logits(c, f), sweep.reference) for c in cuts}
        ratios = []
        for i, c1 in enumerate(cuts):
            for c2 in cuts[i + 1:]:
                joint = acc.rel_l2(two_cut_logits(sweep, c1, c2, f), sweep.reference)
                ratios.append(joint / (alone[c1] + alone[c2]) if alone[c1] + alone[c2] > 0 else float(joint > 0))
        result[name] = {"pairs": len(ratios), "max_ratio": max(ratios), "median_ratio": statistics.median(ratios),
                        "alone_min": min(alone.values()), "alone_max": max(alone.values())}
        if not args.json:
            r = result[name]
            print(f"{name:14s} {r['pairs']} pairs: joint/sum max {r['max_ratio']:.3f}, median "
                  f"{r['median_ratio']:.3f}; one cut alone {r['alone_min']:.2e}..{r['alone_max']:.2e}")
    out = {"model": args.model, "weights": f"seeded random init (torch seed {SEED})", "samples": args.samples,
           "granularity": "block", "cuts": cuts, "encodings": result, "numpy": np.__version__}
    if args.json:
        print(json.dumps(out))


if __name__ == "__main__":
    main()
