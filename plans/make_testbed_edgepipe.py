"""Write plans/testbed-edgepipe.yaml (and its slow-pairs variant): the EdgePipe testbed, scaled to this machine.

    python plans/make_testbed_edgepipe.py --emulated-seconds 23.0 [--host-seconds 2.15] [--microbatch 1]

(``--emulated-seconds``: the ViT-Large profile, summed, of an RCC-VE-like device of the
testbed at its CPU share, e.g. ``bench/edgepipe.py``'s first run, checks.rcc-ve.emulated_s;
``--host-seconds``, for the record: the same profile on one unconstrained thread,
``--measure`` times it here.)

The EdgePipe paper's testbed: 16 boards, 8 RCC-VE (Atom C2558, 8 GB) and 8 MinnowBoard
(Atom E3845, 2 GB), each limited by tc to 30 Mbit/s (RCC-VE) or 10 Mbit/s (MinnowBoard) on
its one interface. Derivation (docs/testbed.md repeats it, with the measured figures):

- Board speeds: ViT-Large at microbatch 8, summed over PipeEdge's 96 sublayers
  (plans/profiles/edge-board-profiles.json, measured by PipeEdge's authors): T_rcc = 35.8 s,
  T_minnow = 44.5 s.
- CPU shares: the 16 emulated devices share this machine's 2 cores, so their shares add up
  to CPU_BUDGET = 1.8 cores (room for the client and the kernel), split in the boards'
  speed ratio: s_minnow / s_rcc = T_rcc / T_minnow, 8 s_rcc + 8 s_minnow = 1.8.
- Time factor: an RCC-VE-like device at its share s_rcc runs ViT-Large at microbatch M in
  t seconds (measured: its profile — PipeEdge's 96 sublayers + embed + head, one at a time,
  summed, as the planner sees any device), so f = T_rcc * (M / 8) / t board-seconds per
  emulated second (the boards' time is per 8 images); f < 1: the emulation is slower. Why
  not t = H / s_rcc from one unconstrained thread's H: a CPU quota is not linear for this
  work — H = 2.15 s, t = 23.0 s at s_rcc = 0.1246, 1.34x the 17.2 s the share predicts
  (each 10 ms quota period starts with cold caches, among 15 other processes). The
  MinnowBoard-like device, whose share follows from the boards' ratio, is the check.
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
import sys
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
GRANULARITY = "sublayer"


def board_seconds(profiles: Path = PROFILES) -> dict[str, float]:
    """ViT-Large at microbatch 8 on each board, summed over its 96 sublayers."""
    data = json.loads(profiles.read_text())
    return {b: sum(t) for b, t in data["models"][MODEL_KEY]["time_s"].items()}


def measure_host_seconds(microbatch: int) -> float:
    """ViT-Large at ``microbatch`` on one thread of this machine, as the planner sees a device:
    its profile (edgezmq.model.profiling, PipeEdge's sublayers, one unit at a time), summed —
    the same measurement an emulated device's profile makes under its CPU quota."""
    from edgezmq.model.profiling import profile_units

    prof = profile_units(MODEL, granularity=GRANULARITY, microbatch=microbatch, threads=1)
    return sum(u["time_s"] for u in prof["units"])


def shares(boards: dict[str, float]) -> dict[str, float]:
    """CPU shares in the boards' speed ratio, adding up to CPU_BUDGET over the 16 devices."""
    t_rcc, t_minnow = boards[RCC], boards[MINNOW]
    s_rcc = CPU_BUDGET / (PER_TYPE * (1 + t_rcc / t_minnow))
    return {RCC: s_rcc, MINNOW: s_rcc * t_rcc / t_minnow}


def derive(emulated_rcc_s: float, microbatch: int, boards: dict[str, float],
           host_s: float | None = None) -> dict[str, Any]:
    """Every figure of the replica from the boards' times and an RCC-VE-like device's
    measured ViT-Large time at its share (``host_s``, one free thread's, is recorded only)."""
    t_rcc, t_minnow = boards[RCC], boards[MINNOW]
    cpu = shares(boards)
    factor = t_rcc * (microbatch / BOARD_MICROBATCH) / emulated_rcc_s
    return {
        "model": MODEL, "granularity": GRANULARITY, "microbatch": microbatch,
        "emulated_rcc_s": emulated_rcc_s, "host_one_thread_s": host_s,
        "quota_slowdown": None if host_s is None else emulated_rcc_s * cpu[RCC] / host_s,
        "board_s": {RCC: t_rcc, MINNOW: t_minnow},
        "cpu": cpu, "cpu_sum": PER_TYPE * (cpu[RCC] + cpu[MINNOW]),
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
        f"  CPU shares {d['cpu'][RCC]:.4f} / {d['cpu'][MINNOW]:.4f} (sum {d['cpu_sum']:.3f} cores); at its "
        f"share an RCC-VE-like device's profile, microbatch {d['microbatch']}: {d['emulated_rcc_s']:.2f} s (measured)",
        f"  time factor f = {d['time_factor']:.4f} board-s per emulated s; NICs 30 f = "
        f"{d['nic_mbps'][RCC]:.3f}, 10 f = {d['nic_mbps'][MINNOW]:.3f} Mbit/s"
        + (f"; slow pairs 5 f = {d['slow_pair_mbps']:.3f} Mbit/s" if slow_pairs else ""),
    ]
    return "".join(f"# {line}\n" for line in lines)


def main(argv: list[str] | None = None) -> int:
    from edgezmq import argtypes

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--emulated-seconds", type=argtypes.seconds, required=True,
                    help="ViT-Large's profile, summed, on an RCC-VE-like device of the testbed")
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--measure", action="store_true", help="time the profile on one free thread here (recorded)")
    src.add_argument("--host-seconds", type=argtypes.seconds, help="that time, measured before")
    ap.add_argument("--microbatch", type=argtypes.microbatch, default=1)
    ap.add_argument("--out", type=Path, default=HERE)
    args = ap.parse_args(argv)
    host_s = measure_host_seconds(args.microbatch) if args.measure else args.host_seconds
    d = derive(args.emulated_seconds, args.microbatch, board_seconds(), host_s)
    for slow, name in ((False, "testbed-edgepipe.yaml"), (True, "testbed-edgepipe-slowpairs.yaml")):
        text = header(d, slow) + yaml.safe_dump(testbed(d, slow_pairs=slow), sort_keys=False)
        (args.out / name).write_text(text)
        print(f"wrote {args.out / name}")
    (args.out / "testbed-edgepipe.derivation.json").write_text(json.dumps(d, indent=1) + "\n")
    print(json.dumps(d))
    return 0


if __name__ == "__main__":
    sys.exit(main())
