"""Are the planner's budget rules safe? The logit error and the top-1 disagreement of two cuts
encoded together against the sum of each cut's alone (docs/planner.md, "Encodings"), on a seeded ViT.

    python bench/encoding_sum.py [--model vit_tiny_patch16_224] [--kwargs JSON] [--samples 16]
        [--encodings f16,int8,int4-ch-aciq] [--json]

Every pair of block-boundary cuts (c1 < c2), each encoding at both: rel_l2 of the logits
with both against rel_l2(c1 alone) + rel_l2(c2 alone), and the percent of samples whose
top-1 class differs from fp32's with both against the sum of the two alone (the union bound
the --min-agreement budget uses), through the wire codecs' own round trip
(edgezmq.protocol.codecs.roundtrip). Prints, per encoding, the largest ratio joint / sum over
the pairs (<= 1: the sum never underestimated) and the median; for the disagreement also the
pairs where the joint one exceeded the sum, and by how many samples.
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
    ap.add_argument("--kwargs", default="{}", help="timm.create_model arguments as JSON")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--encodings", default="f16,int8,int4-ch-aciq")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(SEED)
    kwargs = json.loads(args.kwargs)
    model = chain.create_model(args.model, **kwargs).eval()
    x = torch.randn(chain.input_shape(args.model, args.samples, **kwargs),
                    generator=torch.Generator().manual_seed(SEED))
    sweep = acc.CutSweep(model, "block", x)
    cuts = list(range(1, sweep.num_units))
    result: dict[str, dict] = {}
    for name in args.encodings.split(","):
        f = transform(name)
        logits = {c: sweep.logits(c, f) for c in cuts}
        alone = {c: acc.rel_l2(y, sweep.reference) for c, y in logits.items()}
        dis = {c: 100.0 - acc.agreement(y, sweep.reference) for c, y in logits.items()}
        ratios, d_ratios, over = [], [], []
        for i, c1 in enumerate(cuts):
            for c2 in cuts[i + 1:]:
                y = two_cut_logits(sweep, c1, c2, f)
                joint = acc.rel_l2(y, sweep.reference)
                ratios.append(joint / (alone[c1] + alone[c2]) if alone[c1] + alone[c2] > 0 else float(joint > 0))
                dj, ds = 100.0 - acc.agreement(y, sweep.reference), dis[c1] + dis[c2]
                if ds > 0:
                    d_ratios.append(dj / ds)
                if dj > ds + 1e-9:  # the union bound underestimated: by how many samples
                    over.append(round((dj - ds) * args.samples / 100))
        result[name] = {"pairs": len(ratios), "max_ratio": max(ratios), "median_ratio": statistics.median(ratios),
                        "alone_min": min(alone.values()), "alone_max": max(alone.values()),
                        "disagreement_alone_min": min(dis.values()), "disagreement_alone_max": max(dis.values()),
                        "disagreement_pairs_with_flips": len(d_ratios),
                        "disagreement_max_ratio": max(d_ratios, default=None),
                        "disagreement_median_ratio": statistics.median(d_ratios) if d_ratios else None,
                        "disagreement_pairs_over_sum": len(over), "disagreement_over_by_samples": over}
        if not args.json:
            r = result[name]
            print(f"{name:14s} {r['pairs']} pairs: joint/sum max {r['max_ratio']:.3f}, median "
                  f"{r['median_ratio']:.3f}; one cut alone {r['alone_min']:.2e}..{r['alone_max']:.2e}")
            if d_ratios:
                print(f"{'':14s} top-1 disagreement alone {r['disagreement_alone_min']:.3g}..{r['disagreement_alone_max']:.3g} %;"
                      f" joint/sum max {r['disagreement_max_ratio']:.3f}, median {r['disagreement_median_ratio']:.3f}"
                      f" over {len(d_ratios)} pairs; joint > sum in {len(over)} pairs (by {over} samples)")
            else:
                print(f"{'':14s} no top-1 flips at any cut alone")
    out = {"model": args.model, "kwargs": kwargs, "weights": f"seeded random init (torch seed {SEED})",
           "samples": args.samples,
           "granularity": "block", "cuts": cuts, "encodings": result, "numpy": np.__version__}
    if args.json:
        print(json.dumps(out))


if __name__ == "__main__":
    main()
