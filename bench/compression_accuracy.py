"""Accuracy under activation compression: top-1 of the digits task's ViT (trained here,
edgezmq.model.task) with each encoding applied at each cut, against fp32; and the logit
error of the seeded ViT-Large under the same encodings at a few cuts.

    python bench/compression_accuracy.py [--json] [--threads 1] [--encodings f16,int8,...]
        [--large-cuts 1,7,13,19,25] [--large-samples 2] [--no-large] [--codecs] [--name STEM]

Encodings are the wire codecs' names (f16, bf16, int8, int8-aciq, int8-ch, int4-ch-aciq,
...). By default they run as the reference fake-quantizers below (float in, float out: what
the receiver gets back, with the codecs' definitions of scales and clipping); `--codecs`
runs them through `edgezmq.protocol.codecs.roundtrip(name, array)` instead, and names the
reference lacks always go there. "A+B" encodes the first tensor of a two-tensor cut (context or MLP
hidden) with A and the second (the residual) with B; on a one-tensor cut it is A.
Cuts: every block boundary of the task model (block granularity), and every two-tensor
cut (sublayer granularity: which tensor needs the bits). Trains the task model on first
use (a few CPU minutes: `python -m edgezmq.model.task`), then reuses the cached checkpoint.
Writes bench/results/compression_accuracy.json and .png (--name: another stem).
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from common import RESULTS, pyplot, save
from safetensors.torch import load_file

from edgezmq import argtypes as args_
from edgezmq.model import accuracy as acc
from edgezmq.model import chain, task

NAME = "compression_accuracy"
LARGE = "vit_large_patch16_224"
LARGE_CUTS = (1, 7, 13, 19, 25)  # after the embedding, after blocks 5, 11, 17, the last block
LARGE_SUBLAYER_BLOCK = 12  # the two-tensor cuts of this block are measured on ViT-Large too
INPUT_SEED = 0
SCALE_BITS = 32  # one float32 scale per token or channel
# Banner et al. 2019 (ACIQ), clipping value / b minimising the MSE of a Laplace(0, b) variable
# quantized uniformly on [-alpha, alpha] with `bits` bits (the table QuantPipe uses).
ACIQ_LAPLACE = {2: 2.83, 3: 3.89, 4: 5.03, 5: 6.20, 6: 7.41, 8: 9.89}

RoundTrip = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Encoding:
    """A float -> float round trip and its size in bits per value for a tensor shape."""

    roundtrip: RoundTrip
    bits: Callable[[tuple[int, ...]], float]
    what: str


def _cast(dtype: torch.dtype) -> RoundTrip:
    return lambda t: t.to(dtype).to(t.dtype)


def _int(bits: int, *, per: str, aciq: bool = False) -> RoundTrip:
    """Symmetric integer fake-quantizer, as the wire codecs define it: one scale per token
    (row of the last dimension) or per channel (index of the last dimension, over all rows
    of the microbatch); `aciq` clips at ACIQ's Laplace optimum alpha = c(bits) * b, with b the
    mean absolute value over the same group (the Laplace scale's estimate), when below the max."""
    qmax = 2 ** (bits - 1) - 1

    def roundtrip(t: torch.Tensor) -> torch.Tensor:
        x = t.float().reshape(-1, t.shape[-1])
        dim = 1 if per == "token" else 0
        alpha = x.abs().amax(dim=dim, keepdim=True)
        if aciq:
            alpha = torch.minimum(alpha, ACIQ_LAPLACE[bits] * x.abs().mean(dim=dim, keepdim=True))
        scale = torch.where(alpha > 0, alpha / qmax, torch.ones_like(alpha))
        return (x / scale).round().clamp(-qmax, qmax).mul(scale).reshape(t.shape).to(t.dtype)

    return roundtrip


def _int_bits(bits: int, per: str) -> Callable[[tuple[int, ...]], float]:
    """Bits per value of a microbatch tensor of `shape`, its float32 scales included."""
    return lambda shape: bits + SCALE_BITS * (math.prod(shape[:-1]) if per == "token" else shape[-1]) / math.prod(shape)


REFERENCE: dict[str, Encoding] = {
    "f16": Encoding(_cast(torch.float16), lambda s: 16, "IEEE half"),
    "bf16": Encoding(_cast(torch.bfloat16), lambda s: 16, "bfloat16"),
}
for _b in (8, 4):
    for _per, _tag in (("token", ""), ("channel", "-ch")):
        for _aciq in (False, True):
            REFERENCE[f"int{_b}{_tag}{'-aciq' if _aciq else ''}"] = Encoding(
                _int(_b, per=_per, aciq=_aciq), _int_bits(_b, _per),
                f"symmetric int{_b}, max-abs scale per {_per}" + (", ACIQ (Laplace) clipping" if _aciq else ""))
DEFAULT_ENCODINGS = ["f16", "bf16", "int8", "int8-aciq", "int4", "int4-aciq", "int8-ch", "int4-ch"]
# two-tensor cuts: the same encoding on both, and 4 bits on one tensor with 8 on the other
SUBLAYER_ENCODINGS = ["int8", "int4-aciq", "int4-aciq+int8", "int8+int4-aciq"]


USE_CODECS = False  # --codecs: every name through edgezmq.protocol.codecs, not REFERENCE


def _codec(name: str) -> Encoding:
    """`name` from the wire codecs: `edgezmq.protocol.codecs.roundtrip(name, array)`."""
    try:
        codecs = importlib.import_module("edgezmq.protocol.codecs")
    except ImportError:
        codecs = None
    if not hasattr(codecs, "roundtrip"):
        raise SystemExit(f"--encodings: unknown encoding {name!r}: expected one of {', '.join(REFERENCE)} "
                         "(edgezmq.protocol.codecs.roundtrip is not available for others)")
    if hasattr(codecs, "NAMES") and name not in codecs.NAMES:
        raise SystemExit(f"--encodings: unknown encoding {name!r}: expected one of {', '.join(codecs.NAMES)}")

    def roundtrip(t: torch.Tensor) -> torch.Tensor:
        out = codecs.roundtrip(name, t.detach().cpu().float().numpy())
        return torch.as_tensor(np.asarray(out)).reshape(t.shape).to(t.dtype)

    def bits(shape: tuple[int, ...]) -> float:
        if not hasattr(codecs, "encoded_nbytes"):
            return math.nan
        return 8 * codecs.encoded_nbytes(name, shape) / math.prod(shape)

    return Encoding(roundtrip, bits, f"edgezmq.protocol.codecs {name!r}")


def resolve(name: str) -> Encoding:
    return REFERENCE[name] if name in REFERENCE and not USE_CODECS else _codec(name)


def transform(spec: str) -> acc.Transform:
    """'A' applies A to every tensor of the cut; 'A+B' applies A to tensor 0 and B to tensor 1."""
    parts = [resolve(p) for p in spec.split("+")]
    if len(parts) > 2:
        raise SystemExit(f"--encodings: {spec!r}: expected A or A+B")
    return lambda t, i: parts[min(i, len(parts) - 1)].roundtrip(t)


def bits_per_value(spec: str, shapes: list[tuple[int, ...]]) -> float:
    parts = [resolve(p) for p in spec.split("+")]
    sizes = [math.prod(s) for s in shapes]
    bits = [parts[min(i, len(parts) - 1)].bits(s) * n for i, (s, n) in enumerate(zip(shapes, sizes))]
    return round(sum(bits) / sum(sizes), 3)


def sweep_rows(sweep: acc.CutSweep, cuts: list[int], encodings: list[str], labels: torch.Tensor | None,
               names: list[str], model: str, progress: bool) -> list[dict]:
    rows = []
    for cut in cuts:
        shapes = [tuple(t.shape) for t in sweep.tensors(cut)[0]]  # of one (full) microbatch
        for enc in encodings:
            t0 = time.process_time()
            s = acc.score(sweep.logits(cut, transform(enc)), sweep.reference, labels)
            row = {"model": model, "granularity": sweep.granularity, "cut": cut,
                   "after_unit": names[cut - 1] if cut else "(input)", "tensors": len(shapes),
                   "encoding": enc, "bits_per_value": bits_per_value(enc, shapes), **s.as_dict(),
                   "cpu_s": round(time.process_time() - t0, 2)}
            rows.append(row)
            if progress:
                top1 = f"top-1 {s.top1:6.2f}%  " if s.top1 is not None else ""
                print(f"  {model:<8} {sweep.granularity:<8} cut {cut:>2} ({row['after_unit']:<20}) {enc:<16} "
                      f"{top1}agree {s.agreement:6.2f}%  rel L2 {s.rel_l2:.2e}", file=sys.stderr, flush=True)
    return rows


def two_tensor_cuts(sweep: acc.CutSweep, blocks: list[int] | None = None) -> list[int]:
    """Cuts where two tensors cross (sublayer granularity), optionally only in `blocks`."""
    names = chain.unit_names(sweep.model, sweep.granularity)
    return [c for c in range(1, sweep.num_units) if len(sweep.tensors(c)[0]) == 2
            and (blocks is None or int(names[c - 1].split(".")[1]) in blocks)]


def task_part(args: argparse.Namespace, encodings: list[str]) -> tuple[dict, list[dict]]:
    path = task.cached_task_checkpoint(task.TrainConfig(epochs=args.epochs), progress=_epoch_progress)
    meta = task.task_info(path)
    model = task.load_task_model(path)
    split = task.digits_split()
    x, y = split.x_test, split.y_test
    rows = []
    exact = True
    top1_fp32 = None
    reference = None
    for gran, pick, encs in (("block", None, encodings), ("sublayer", "two", SUBLAYER_ENCODINGS)):
        sweep = acc.CutSweep(model, gran, x, args.microbatch, reference)
        reference = sweep.reference
        exact &= sweep.chain_exact
        top1_fp32 = acc.score(sweep.reference, sweep.reference, y).top1
        cuts = list(range(1, sweep.num_units)) if pick is None else two_tensor_cuts(sweep)
        rows += sweep_rows(sweep, cuts, encs, y, chain.unit_names(model, gran), "task", not args.json)
    for r in rows:
        r["top1_drop"] = round(top1_fp32 - r["top1"], 4)
    info = {"model": task.TASK_MODEL, "kwargs": task.TASK_KWARGS, "checkpoint": str(path),
            "train": json.loads(meta["train"]), "train_cpu_s": float(meta["train_cpu_s"]),
            "train_wall_s": float(meta["train_wall_s"]), "test_samples": len(y),
            "top1_fp32": top1_fp32, "top1_fp32_at_training": float(meta["test_top1"]),
            "chain_exact": exact, "microbatch": args.microbatch}
    return info, rows


def large_part(args: argparse.Namespace, encodings: list[str]) -> dict:
    path = chain.cached_checkpoint(LARGE, seed=0)
    model = chain.create_model(LARGE)
    model.load_state_dict(load_file(str(path)))
    g = torch.Generator().manual_seed(INPUT_SEED)
    x = torch.randn(chain.input_shape(LARGE, args.large_samples), generator=g)
    sweep = acc.CutSweep(model, "block", x, args.large_microbatch)
    names = chain.unit_names(model, "block")
    cuts = [c for c in args.large_cuts if 0 < c < sweep.num_units]
    rows = sweep_rows(sweep, cuts, encodings, None, names, "large", not args.json)
    exact = sweep.chain_exact
    sub = acc.CutSweep(model, "sublayer", x, args.large_microbatch, reference=sweep.reference)
    rows += sweep_rows(sub, two_tensor_cuts(sub, [LARGE_SUBLAYER_BLOCK]), SUBLAYER_ENCODINGS, None,
                       chain.unit_names(model, "sublayer"), "large", not args.json)
    return {"model": LARGE, "checkpoint": str(path), "weights": "seeded random init (seed 0)",
            "inputs": f"{args.large_samples} standard normal images (seed {INPUT_SEED})",
            "microbatch": args.large_microbatch, "chain_exact": exact and sub.chain_exact, "rows": rows}


def _epoch_progress(epoch: int, loss: float) -> None:
    print(f"  training the task model: epoch {epoch + 1}, loss {loss:.3f}", file=sys.stderr, flush=True)


def summary(rows: list[dict]) -> dict[str, dict]:
    """Per encoding, the worst over the block-boundary cuts of the task model."""
    out: dict[str, dict] = {}
    for r in rows:
        if r["model"] != "task" or r["granularity"] != "block":
            continue
        s = out.setdefault(r["encoding"], {"bits_per_value": r["bits_per_value"], "worst_top1_drop": -math.inf,
                                           "min_agreement": math.inf, "max_rel_l2": 0.0})
        s["worst_top1_drop"] = max(s["worst_top1_drop"], r["top1_drop"])
        s["min_agreement"] = min(s["min_agreement"], r["agreement"])
        s["max_rel_l2"] = max(s["max_rel_l2"], r["rel_l2"])
    return out


def plot(result: dict, name: str = NAME) -> None:
    plt = pyplot()
    if plt is None:
        return
    large = result.get("large")
    fig, axes = plt.subplots(1, 3 if large else 2, figsize=(17 if large else 12, 4.8))
    rows = [r for r in result["rows"] if r["model"] == "task" and r["granularity"] == "block"]
    cuts = sorted({r["cut"] for r in rows})
    for enc in dict.fromkeys(r["encoding"] for r in rows):
        mine = [r for r in rows if r["encoding"] == enc]
        label = f"{enc} ({mine[0]['bits_per_value']:.1f} bits)"
        axes[0].plot([r["cut"] for r in mine], [r["top1"] for r in mine], marker="o", label=label)
        axes[1].plot([r["cut"] for r in mine], [max(r["rel_l2"], 1e-9) for r in mine], marker="o", label=label)
    axes[0].axhline(result["task"]["top1_fp32"], color="k", ls="--", label="fp32")
    axes[0].set_ylabel("top-1 %")
    axes[0].set_title(f"digits ViT, {result['task']['test_samples']} test images: top-1")
    axes[1].set_yscale("log")
    axes[1].set_ylabel("relative L2 error of the logits vs fp32")
    axes[1].set_title("digits ViT: logit error")
    for ax in axes[:2]:
        ax.set_xticks(cuts)
        ax.set_xlabel("cut: units before it (block granularity)")
        ax.legend(fontsize=7)
    if large:
        lrows = [r for r in large["rows"] if r["granularity"] == "block"]
        for enc in dict.fromkeys(r["encoding"] for r in lrows):
            mine = [r for r in lrows if r["encoding"] == enc]
            axes[2].plot([r["cut"] for r in mine], [max(r["rel_l2"], 1e-9) for r in mine], marker="o",
                         label=f"{enc} ({mine[0]['bits_per_value']:.1f} bits)")
        axes[2].set_yscale("log")
        axes[2].set_xticks(sorted({r["cut"] for r in lrows}))
        axes[2].set_xlabel("cut: units before it (block granularity)")
        axes[2].set_ylabel("relative L2 error of the logits vs fp32")
        axes[2].set_title(f"{LARGE} (seeded, {large['inputs'].split()[0]} images): logit error")
        axes[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / f"{name}.png", dpi=100)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true", help="print the result as one JSON object (last line)")
    ap.add_argument("--threads", type=args_.threads, help="torch threads (default: torch's)")
    ap.add_argument("--encodings", default=",".join(DEFAULT_ENCODINGS),
                    help="comma-separated encoding names or A+B pairs (default: every reference one)")
    ap.add_argument("--epochs", type=args_.int_in(1, task.MAX_EPOCHS), default=task.TrainConfig().epochs,
                    help="training epochs of the task model (part of its cache key)")
    ap.add_argument("--microbatch", type=args_.microbatch, default=acc.MICROBATCH)
    ap.add_argument("--no-large", action="store_true", help="skip the ViT-Large logit errors")
    ap.add_argument("--large-cuts", default=",".join(map(str, LARGE_CUTS)))
    ap.add_argument("--large-samples", type=args_.int_in(1, 64), default=2)
    ap.add_argument("--large-microbatch", type=args_.microbatch, default=2)
    ap.add_argument("--codecs", action="store_true",
                    help="encode with the wire codecs (edgezmq.protocol.codecs.roundtrip) instead of the "
                         "reference fake-quantizers of this file")
    ap.add_argument("--name", default=NAME, help="results file stem in bench/results/")
    ap.add_argument("--plot-only", action="store_true", help="redraw the PNG from the saved JSON")
    args = ap.parse_args()
    if args.plot_only:
        plot(json.loads((RESULTS / f"{args.name}.json").read_text()), args.name)
        return 0
    global USE_CODECS
    USE_CODECS = args.codecs
    encodings = [e.strip() for e in args.encodings.split(",") if e.strip()]
    for e in encodings:
        transform(e)  # unknown names fail before any work
    try:
        args.large_cuts = [int(c) for c in args.large_cuts.split(",")]
    except ValueError:
        ap.error(f"--large-cuts: expected comma-separated integers, got {args.large_cuts!r}")
    if args.threads:
        torch.set_num_threads(args.threads)
    t0, c0 = time.monotonic(), time.process_time()
    info, rows = task_part(args, encodings)
    result: dict = {"bench": NAME, "threads": torch.get_num_threads(), "task": info,
                    "implementation": "edgezmq.protocol.codecs" if USE_CODECS else "reference fake-quantizers",
                    "encodings": {e: resolve(e).what for e in
                                  dict.fromkeys(p for s in [*encodings, *SUBLAYER_ENCODINGS] for p in s.split("+"))},
                    "rows": rows, "summary": summary(rows)}
    if not args.no_large:
        result["large"] = large_part(args, encodings)
    result["wall_s"] = round(time.monotonic() - t0, 1)
    result["cpu_s"] = round(time.process_time() - c0, 1)
    save(args.name, result, args.json)
    plot(result, args.name)
    if not args.json:
        print(f"task top-1 fp32 {info['top1_fp32']:.2f}% on {info['test_samples']} images; worst over block cuts:")
        for enc, s in result["summary"].items():
            print(f"  {enc:<12} {s['bits_per_value']:6.2f} b/value  top-1 drop {s['worst_top1_drop']:+.2f} pts  "
                  f"agreement >= {s['min_agreement']:.2f}%  rel L2 <= {s['max_rel_l2']:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
