"""What a decode step costs per row, by rows per microbatch; and what a CPU quota lets a short step do.

    sudo python bench/decode_rows.py [--json] [--layers 4] [--reps 6]

Two measurements behind bench/generate.py's figures (README, "Generating text across devices"):

1. **Rows curve** (full speed, 1 thread): the median time of one batched decode step
   (`Shard.step_batch`, 16 cached tokens per row) of `--layers` decoder layers of the generate
   bench's model, for microbatches of 1..128 rows; per row = step / rows. A pipeline of N
   stages with S sequences runs microbatches of ceil(S / (N + 1)) rows (N + 1 in flight), one
   device ceil(S / 2) (2 in flight): each stage does 1/N of the layers for every row, so the
   compute bound on N devices' speedup is N x per_row(one device's rows) / per_row(the
   pipeline's rows). Printed for S = 64, 256, 512 and 1024 (`bound`): what the decode steps'
   arithmetic allows, before messages, the head's share, the client's turnaround and prefill.
   And the same curve in two numbers (`fit`, least squares from 16 rows on): step = fixed +
   rows x per_row, `fixed` being what every step pays whatever its rows (the layers' weights,
   read from memory: `weights_gb_per_s` is their size over it).
2. **Bursts under a CPU quota** (root): a 1-row step of 2 and of 4 layers inside a cgroup holding
   `--cpu` of a core with the testbed's own period and quota (edgezmq.testbed.cgroups), once
   back to back and once after `--gap` s idle. A step that fits in one period's quota runs at
   the core's full speed after an idle stretch; an emulated device at 0.2 of a core runs a
   pipeline stage that works one step in eight faster than the device it emulates.

Writes bench/results/decode-rows.json; `--json` prints one object (last line).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import need_root, save

from edgezmq import argtypes as args_

NAME = "decode-rows"
ROWS = [1, 2, 4, 8, 16, 32, 64, 128]
SEQUENCES = [64, 256, 512, 1024]
FIT_FROM = 16  # rows: the step's time fitted as fixed + per row from here on (fewer rows: weight-read bound)
DEVICES = [2, 4, 8]
BURST_LAYERS = [2, 4]  # a 1-row step of ~12 ms and of ~24 ms at full speed: under and over a 20 ms quota
CONTEXT = 16  # cached tokens per row: the generate bench's prompts (8) and half its new tokens


def pipeline_rows(sequences: int, devices: int) -> int:
    """Rows per microbatch: one device keeps 2 microbatches in flight, N devices N + 1
    (bench/generate.py's window with --queued 1)."""
    return math.ceil(sequences / (2 if devices == 1 else devices + 1))


def step_fn(layers: int, rows: int) -> Any:
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from generate import KWARGS, MODEL

    from edgezmq.model import chain as models
    from edgezmq.model.profiling import decode_step

    shard = models.build_shard(MODEL, 1, 1 + layers, dtype=torch.float32, **KWARGS)
    return decode_step(shard, rows, CONTEXT, torch.Generator().manual_seed(0))  # the same context every call


def layers_mb(layers: int) -> float:
    """The float32 weights of `layers` decoder layers of the bench's model, in MB."""
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from generate import KWARGS, MODEL

    from edgezmq.model import chain as models

    shard = models.build_shard(MODEL, 1, 1 + layers, dtype=torch.float32, **KWARGS)
    return sum(p.numel() * p.element_size() for p in shard.parameters()) / 1e6


def timed(step: Any, reps: int, gap: float = 0.0) -> float:
    step()
    step()
    ts = []
    for _ in range(reps):
        if gap:
            time.sleep(gap)
        t = time.perf_counter()
        step()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def rows_curve(layers: int, reps: int) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)
    need = sorted(set(ROWS) | {pipeline_rows(s, n) for s in SEQUENCES for n in [1, *DEVICES]})
    per_row = {}
    with torch.inference_mode():
        for m in need:
            t = timed(step_fn(layers, m), reps)
            per_row[m] = t / m
            print(f"{m:4d} rows: {t * 1e3:7.1f} ms per step, {t * 1e3 / m:6.2f} ms per row", file=sys.stderr, flush=True)
    bound = {f"{n}_devices_{s}_sequences": round(n * per_row[pipeline_rows(s, 1)] / per_row[pipeline_rows(s, n)], 2)
             for s in SEQUENCES for n in DEVICES}
    return {"step_ms": {m: round(per_row[m] * m * 1e3, 2) for m in need},
            "per_row_ms": {m: round(per_row[m] * 1e3, 3) for m in need}, "bound": bound,
            "fit": fixed_plus_per_row({m: per_row[m] * m * 1e3 for m in need if m >= FIT_FROM}, layers)}


def fixed_plus_per_row(step_ms: dict[int, float], layers: int) -> dict[str, float]:
    """Least squares step_ms = fixed + rows x per_row over the points given. `fixed` is what
    every step pays whatever its rows (reading the layers' weights: they do not fit the cache);
    a pipeline's N stages run N + 1 steps per round where one device runs 2, so each pays it
    N + 1 times per round: the bound above, in two numbers."""
    xs, ys = list(step_ms), list(step_ms.values())
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    per_row = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    fixed = my - per_row * mx
    weights_mb = layers_mb(layers)
    return {"from_rows": FIT_FROM, "fixed_ms": round(fixed, 1), "per_row_ms": round(per_row, 3),
            "layers_weights_mb": round(weights_mb, 1), "weights_gb_per_s": round(weights_mb / fixed, 2) if fixed > 0 else None}


def child(args: argparse.Namespace) -> dict[str, Any]:
    """The burst measurement, in the cgroup the parent made (joined first)."""
    import torch

    for d in args.join.split(","):
        Path(d, "cgroup.procs").write_text(f"{0}\n")  # 0: this process
    torch.set_num_threads(1)
    out = []
    with torch.inference_mode():
        for layers in BURST_LAYERS:
            step = step_fn(layers, 1)
            back = timed(step, args.reps)
            idle = timed(step, args.reps, args.gap)
            out.append({"layers": layers, "back_to_back_ms": round(back * 1e3, 1), "after_idle_ms": round(idle * 1e3, 1)})
    return {"steps": out}


def bursts(args: argparse.Namespace) -> dict[str, Any]:
    from edgezmq.testbed import cgroups

    ctrls = cgroups.detect()
    dirs = cgroups.create_host(ctrls, "decoderows", "device", cpu=args.cpu, memory=None, memory_accounting=False)
    try:
        argv = [sys.executable, str(Path(__file__).resolve()), "--child", "--join", ",".join(map(str, dirs)),
                "--reps", str(args.reps), "--gap", str(args.gap)]
        r = subprocess.run(argv, stdout=subprocess.PIPE, text=True, timeout=3600, check=True)
        got = json.loads(r.stdout.strip().splitlines()[-1])
    finally:
        cgroups.remove_dirs(dirs + cgroups.group_dir(ctrls, "decoderows"))
    period, quota = cgroups.cpu_period_quota(args.cpu)
    return {"cpu": args.cpu, "period_us": period, "quota_us": quota, "gap_s": args.gap, **got}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true", help="print the result as one JSON object (last line)")
    ap.add_argument("--layers", type=args_.int_in(1, 8), default=4, help="decoder layers in the shard")
    ap.add_argument("--reps", type=args_.int_in(3, 100), default=6, help="timed steps per point (median)")
    ap.add_argument("--cpu", type=args_.float_in(0.05, 1.0), default=0.2, help="the quota's CPU share")
    ap.add_argument("--gap", type=args_.float_in(0.0, 5.0), default=0.3, help="idle seconds before each step")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--join", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return 0
    need_root()
    t0 = time.monotonic()
    result = {"bench": NAME, "layers": args.layers, "context": CONTEXT, "rows": rows_curve(args.layers, args.reps),
              "bursts": bursts(args)}
    result["wall_s"] = round(time.monotonic() - t0, 1)
    save(NAME, result, args.json)
    if not args.json:
        print(json.dumps(result["rows"]["bound"]))
        print(json.dumps(result["rows"]["fit"]))
        print(json.dumps(result["bursts"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
