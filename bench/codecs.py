"""Encode and decode speed of every activation encoding (edgezmq/protocol/codecs.py), and its error.

Per encoding, on a seeded tensor of a ViT activation's shape: CPU seconds per MB of float32
(``codecs.measure_cost``, the calling thread's CPU time, so other load on the machine costs
wall time, not these figures), the same as MB/s, the wire bytes relative to raw, and the
relative L2 error of one round trip on that tensor (normal; its token rows of varied scale).

    python bench/codecs.py [--shape 8,197,768] [--reps 5] [--json] [--out bench/results/codecs.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgezmq import argtypes as args_  # noqa: E402
from edgezmq.protocol import codecs  # noqa: E402

MAX_DIM = 1 << 16


def shape_arg(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(d) for d in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not 1 <= len(dims) <= 8 or not all(1 <= d <= MAX_DIM for d in dims) or np.prod(dims) * 4 > 1 << 30:
        raise argparse.ArgumentTypeError(f"expected 1..8 dimensions of 1..{MAX_DIM}, at most 1 GiB, got {text!r}")
    return dims


def rows(shape: tuple[int, ...], reps: int) -> list[dict]:
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape, dtype=np.float32)
    x *= rng.lognormal(0, 1, shape[:-1] + (1,)).astype(np.float32)  # tokens of varied scale
    out = []
    for name in codecs.NAMES:
        c = codecs.measure_cost(name, shape, reps=reps)
        y = codecs.roundtrip(name, x)
        err = float(np.linalg.norm(y - x) / np.linalg.norm(x))
        out.append({**c.to_dict(), "encode_mb_per_s": 1 / c.encode_s_per_mb if c.encode_s_per_mb else None,
                    "decode_mb_per_s": 1 / c.decode_s_per_mb if c.decode_s_per_mb else None, "rel_l2": err})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", type=shape_arg, default=(8, 197, 768), help="tensor shape (default: ViT-Base, mb 8)")
    ap.add_argument("--reps", type=args_.int_in(1, 1000), default=5, help="timed round trips per encoding")
    ap.add_argument("--json", action="store_true", help="print one JSON object (last line of stdout)")
    ap.add_argument("--out", type=Path, help="also write the JSON here")
    a = ap.parse_args(argv)
    res = {"shape": list(a.shape), "reps": a.reps, "codecs": rows(a.shape, a.reps)}
    if a.out:
        a.out.write_text(json.dumps(res, indent=1) + "\n")
    if a.json:
        print(json.dumps(res))
        return 0
    print(f"{'encoding':<14}{'ratio':>8}{'enc MB/s':>10}{'dec MB/s':>10}{'enc s/MB':>10}{'dec s/MB':>10}{'rel L2':>10}")
    for r in res["codecs"]:
        print(f"{r['name']:<14}{r['ratio']:>8.4f}{r['encode_mb_per_s'] or 0:>10.0f}{r['decode_mb_per_s'] or 0:>10.0f}"
              f"{r['encode_s_per_mb']:>10.5f}{r['decode_s_per_mb']:>10.5f}{r['rel_l2']:>10.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
