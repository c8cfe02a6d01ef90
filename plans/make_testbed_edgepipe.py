"""Write plans/testbed-edgepipe.yaml (and its slow-pairs variant): the EdgePipe testbed, scaled to this machine.

    python plans/make_testbed_edgepipe.py --measure [--microbatch 1]     # time ViT-Large here first
    python plans/make_testbed_edgepipe.py --host-seconds 3.61 [--microbatch 1]

The EdgePipe paper's testbed: 16 boards, 8 RCC-VE (Atom C2558, 8 GB) and 8 MinnowBoard
(Atom E3845, 2 GB), each limited by tc to 30 Mbit/s (RCC-VE) or 10 Mbit/s (MinnowBoard) on
its one interface. Derivation (docs/testbed.md repeats it, with the measured figures):

- Board speeds: ViT-Large at microbatch 8, summed over PipeEdge's 96 sublayers
  (plans/profiles/edge-board-profiles.json, measured by PipeEdge's authors): T_rcc = 35.8 s,
  T_minnow = 44.5 s.
- CPU shares: the 16 emulated devices share this machine's 2 cores, so their shares add up
  to CPU_BUDGET = 1.8 cores (room for the client and the kernel), split in the boards'
  speed ratio: s_minnow / s_rcc = T_rcc / T_minnow, 8 s_rcc + 8 s_minnow = 1.8.
- Time factor: one thread of this machine runs ViT-Large at microbatch M in H seconds
  (measured: ``--measure``), so an emulated RCC-VE-like device takes t = H / s_rcc and
  f = T_rcc * (M / 8) / t board-seconds per emulated second (per sample: the boards' time
  is per 8 images). f < 1: the emulation runs slower than the boards.
- Links: transfer time / compute time must equal the boards' at their NIC rates. Bytes
  per microbatch scale with M as the compute does, so each NIC is the board's rate x f:
  30 f (RCC-VE-like) and 10 f (MinnowBoard-like) Mbit/s, up and down, per device (one
  interface: a device feeding three replicas shares it). Pairs are otherwise unshaped
  (1000 Mbit/s); the client's NIC is an RCC-VE's (the paper's data source is a board).
- Memory: the boards' 8 GB and 2 GB as cgroup limits, unscaled: they are caps, not
  reservations; what ViT-Large's shards and 16 node processes actually use (~9 GB) fits.
- Slow pairs (as plans/edgepipe-slowpairs-vit-large-half.problem.yaml): four disjoint
  pairs of RCC-VE-like devices joined at 5 f Mbit/s.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
PROFILES = HERE / "profiles" / "edge-board-profiles.json"
MODEL, MODEL_KEY = "vit_large_patch16_224", "google/vit-large-patch16-224"
RCC, MINNOW = "RCC-VE-C2000", "Minnowboard-E3845"
BOARD_MICROBATCH = 8
PER_TYPE = 8
CPU_BUDGET = 1.8  # cores for the 16 devices together (of 2)
NIC_MBPS = {RCC: 30.0, MINNOW: 10.0}  # the paper's per-device tc limits
SLOW_PAIR_MBPS = 5.0
MEMORY = {RCC: "8GB", MINNOW: "2GB"}
UNSHAPED_MBPS = 1000.0
TIMED_FORWARDS = 3


def board_seconds(profiles: Path = PROFILES) -> dict[str, float]:
    """ViT-Large at microbatch 8 on each board, summed over its 96 sublayers."""
    data = json.loads(profiles.read_text())
    return {b: sum(t) for b, t in data["models"][MODEL_KEY]["time_s"].items()}


def measure_host_seconds(microbatch: int) -> float:
    """Median seconds of ViT-Large forwards at ``microbatch`` on one thread of this machine."""
    import torch

    from edgezmq.model import chain as models

    torch.set_num_threads(1)
    m = models.create_model(MODEL).eval()
    x = torch.randn(models.input_shape(MODEL, microbatch))
    times = []
    with torch.inference_mode():
        m(x)  # warm-up
        for _ in range(TIMED_FORWARDS):
            t = time.perf_counter()
            m(x)
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def derive(host_s: float, microbatch: int, boards: dict[str, float]) -> dict[str, Any]:
    """Every figure of the replica from the boards' times and this machine's one-thread time."""
    t_rcc, t_minnow = boards[RCC], boards[MINNOW]
    s_rcc = CPU_BUDGET / (PER_TYPE * (1 + t_rcc / t_minnow))
    s_minnow = s_rcc * t_rcc / t_minnow
    emulated_rcc_s = host_s / s_rcc
    factor = t_rcc * (microbatch / BOARD_MICROBATCH) / emulated_rcc_s
    return {
        "model": MODEL, "microbatch": microbatch, "host_one_thread_s": host_s,
        "board_s": {RCC: t_rcc, MINNOW: t_minnow},
        "cpu": {RCC: s_rcc, MINNOW: s_minnow}, "cpu_sum": PER_TYPE * (s_rcc + s_minnow),
        "emulated_s": {RCC: emulated_rcc_s, MINNOW: host_s / s_minnow},
        "time_factor": factor,
        "nic_mbps": {b: NIC_MBPS[b] * factor for b in NIC_MBPS},
        "slow_pair_mbps": SLOW_PAIR_MBPS * factor,
    }


def testbed(d: dict[str, Any], *, slow_pairs: bool = False) -> dict[str, Any]:
    rcc_nic, minnow_nic = round(d["nic_mbps"][RCC], 3), round(d["nic_mbps"][MINNOW], 3)
    cfg: dict[str, Any] = {
        "name": "edgepipe-slow" if slow_pairs else "edgepipe",
        "client": {"nic_mbps": rcc_nic},
        "devices": [
            {"name": "rcc", "count": PER_TYPE, "cpu": round(d["cpu"][RCC], 4), "threads": 1,
             "memory": MEMORY[RCC], "type": "rcc-ve", "nic_mbps": rcc_nic},
            {"name": "minnow", "count": PER_TYPE, "cpu": round(d["cpu"][MINNOW], 4), "threads": 1,
             "memory": MEMORY[MINNOW], "type": "minnowboard", "nic_mbps": minnow_nic},
        ],
        "links": {"default": {"mbps": UNSHAPED_MBPS, "latency_ms": 0.2}},
    }
    if slow_pairs:
        slow = round(d["slow_pair_mbps"], 3)
        cfg["links"]["overrides"] = [{"a": f"rcc-{2 * i}", "b": f"rcc-{2 * i + 1}", "mbps": slow}
                                     for i in range(4)]
    return cfg


def header(d: dict[str, Any], slow_pairs: bool) -> str:
    lines = [
        "The EdgePipe testbed (8 RCC-VE + 8 MinnowBoard, per-device NICs), scaled to this machine"
        + (": with four slow RCC-VE pairs" if slow_pairs else "") + ".",
        "Written by plans/make_testbed_edgepipe.py (the derivation is in its docstring and docs/testbed.md):",
        f"  ViT-Large at microbatch 8 on the boards: RCC-VE {d['board_s'][RCC]:.1f} s, "
        f"MinnowBoard {d['board_s'][MINNOW]:.1f} s",
        f"  this machine, one thread, microbatch {d['microbatch']}: {d['host_one_thread_s']:.2f} s",
        f"  CPU shares {d['cpu'][RCC]:.4f} / {d['cpu'][MINNOW]:.4f} (sum {d['cpu_sum']:.3f} cores): "
        f"an RCC-VE-like device takes {d['emulated_s'][RCC]:.1f} s",
        f"  time factor f = {d['time_factor']:.4f} board-s per emulated s; NICs 30 f = "
        f"{d['nic_mbps'][RCC]:.3f}, 10 f = {d['nic_mbps'][MINNOW]:.3f} Mbit/s"
        + (f"; slow pairs 5 f = {d['slow_pair_mbps']:.3f} Mbit/s" if slow_pairs else ""),
    ]
    return "".join(f"# {line}\n" for line in lines)


def main(argv: list[str] | None = None) -> int:
    from edgezmq import argtypes

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--measure", action="store_true", help="time ViT-Large on one thread here")
    src.add_argument("--host-seconds", type=argtypes.seconds, help="that time, measured before")
    ap.add_argument("--microbatch", type=argtypes.microbatch, default=1)
    ap.add_argument("--out", type=Path, default=HERE)
    args = ap.parse_args(argv)
    host_s = measure_host_seconds(args.microbatch) if args.measure else args.host_seconds
    d = derive(host_s, args.microbatch, board_seconds())
    for slow, name in ((False, "testbed-edgepipe.yaml"), (True, "testbed-edgepipe-slowpairs.yaml")):
        text = header(d, slow) + yaml.safe_dump(testbed(d, slow_pairs=slow), sort_keys=False)
        (args.out / name).write_text(text)
        print(f"wrote {args.out / name}")
    (args.out / "testbed-edgepipe.derivation.json").write_text(json.dumps(d, indent=1) + "\n")
    print(json.dumps(d))
    return 0


if __name__ == "__main__":
    sys.exit(main())
