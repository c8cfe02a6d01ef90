"""Cost of one edgezmq stage hop vs a raw zero-copy PUSH/PULL forwarder, 64 KiB - 10 MiB.

Three processes in a chain, source -> middle -> sink, over tcp loopback. The middle
is either
  raw:   recv_multipart(copy=False) -> send_multipart(copy=False), nothing else;
  stage: a real edgezmq StageRuntime (recv thread: decode + validate; compute thread:
         numpy -> torch -> identity shard -> numpy; send thread: encode + send; bounded
         queues between them), i.e. everything a node does except the model.
Both see the same messages and the same CPU contention, in the same run; the ratio
raw_rate / stage_rate is the overhead of our hop (goal <= 1.2).  The direct
source -> sink rate (two processes) is reported for reference.

    python bench/transport.py [--seconds 2] [--json] [--out bench/results/transport.json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

import numpy as np
import zmq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgezmq import argtypes as args_
from edgezmq.protocol import wire  # noqa: E402
from edgezmq.transport import sockets

SIZES = [64 * 1024, 256 * 1024, 1024 * 1024, 4 * 1024 * 1024, 10 * 1024 * 1024]
RUN = "bench"


def _message(size: int, seq: int, arr: np.ndarray) -> list:
    return wire.encode(wire.Message("act", RUN, seq, 0, [arr]))


def source(ep: str, size: int, n: int) -> None:
    ctx = zmq.Context()
    s = sockets.make_socket(ctx, zmq.PUSH, sockets.DATA)
    s.setsockopt(zmq.SNDTIMEO, -1)
    s.connect(ep)
    arr = np.ones(size // 4, dtype=np.float32)
    for i in range(n):
        sockets.send_frames(s, _message(size, i, arr))
    time.sleep(0.5)
    s.close(linger=5000)
    ctx.term()


def sink(ep_q: mp.Queue, res_q: mp.Queue, n: int) -> None:
    ctx = zmq.Context()
    s = sockets.make_socket(ctx, zmq.PULL, sockets.DATA)
    ep_q.put(sockets.bind(s, "tcp://127.0.0.1:0"))
    got, t_first = 0, None
    while got < n:
        if sockets.recv_frames(s, 60_000) is None:
            break
        got += 1
        if t_first is None:
            t_first = time.perf_counter()
    dt = time.perf_counter() - (t_first or time.perf_counter())
    # first message excluded: it includes connection set-up
    res_q.put({"received": got, "rate": (got - 1) / dt if got > 1 and dt > 0 else 0.0})
    s.close(linger=0)
    ctx.term()


def middle_raw(ep_q: mp.Queue, downstream: str, n: int, cpu_q: mp.Queue) -> None:
    ctx = zmq.Context()
    pull = sockets.make_socket(ctx, zmq.PULL, sockets.DATA)
    push = sockets.make_socket(ctx, zmq.PUSH, sockets.DATA)
    push.setsockopt(zmq.SNDTIMEO, -1)
    ep_q.put(sockets.bind(pull, "tcp://127.0.0.1:0"))
    push.connect(downstream)
    c0 = time.process_time()
    for _ in range(n):
        if not pull.poll(60_000):
            break
        push.send_multipart(pull.recv_multipart(copy=False), copy=False)
    cpu_q.put((time.process_time() - c0) / n)
    time.sleep(0.5)
    pull.close(linger=0)
    push.close(linger=5000)
    ctx.term()


def middle_stage(ep_q: mp.Queue, downstream: str, n: int, size: int, cpu_q: mp.Queue) -> None:
    import torch

    from edgezmq.node.stage import LoadSpec, StageRuntime

    torch.set_num_threads(1)
    ctx = zmq.Context()
    pull = sockets.make_socket(ctx, zmq.PULL, sockets.DATA)
    pull.setsockopt(zmq.RCVTIMEO, 100)  # as Node.cmd_load sets it
    ep = sockets.bind(pull, "tcp://127.0.0.1:0")
    spec = LoadSpec(run=RUN, model="identity", start=0, end=1, stage=1, last=False, microbatch=size // 4)
    rt = StageRuntime(ctx, spec, pull, ep)
    rt.shard = lambda *xs: tuple(xs)
    rt.expected_in = [((size // 4,), "float32")]
    ep_q.put(ep)
    c0 = time.process_time()
    rt.start([downstream])
    while rt.counters.sent < n:
        time.sleep(0.01)
    cpu_q.put((time.process_time() - c0) / n)
    rt.drain(5.0)
    ctx.term()


def measure(kind: str, size: int, n: int) -> dict:
    mpc = mp.get_context("spawn")
    ep_q, res_q, cpu_q = mpc.Queue(), mpc.Queue(), mpc.Queue()
    procs = [mpc.Process(target=sink, args=(ep_q, res_q, n))]
    procs[0].start()
    sink_ep = ep_q.get(timeout=60)
    entry = sink_ep
    if kind == "raw":
        procs.append(mpc.Process(target=middle_raw, args=(ep_q, sink_ep, n, cpu_q)))
    elif kind == "stage":
        procs.append(mpc.Process(target=middle_stage, args=(ep_q, sink_ep, n, size, cpu_q)))
    if kind != "direct":
        procs[-1].start()
        entry = ep_q.get(timeout=60)
    src = mpc.Process(target=source, args=(entry, size, n))
    src.start()
    procs.append(src)
    res = res_q.get(timeout=300)
    cpu = cpu_q.get(timeout=60) if kind != "direct" else None
    for p in procs:
        p.join(30)
        if p.is_alive():
            p.kill()
    return {"rate": res["rate"], "received": res["received"], "middle_cpu_ms": cpu * 1e3 if cpu else None}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=args_.float_in(0, 3600, lo_open=True), default=2.0, help="target duration per measurement")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--sizes", type=lambda v: [int(x) * 1024 for x in v.split(",")], default=SIZES,
                    help="message sizes in KiB, comma-separated (default: 64,256,1024,4096,10240)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "transport.json"))
    ap.add_argument("--plot", default=str(Path(__file__).parent / "results" / "transport.png"))
    args = ap.parse_args()
    rows = []
    for size in args.sizes:
        probe = measure("raw", size, 50)
        n = int(min(20000, max(50, probe["rate"] * args.seconds)))
        r = {k: measure(k, size, n) for k in ("direct", "raw", "stage")}
        row = {
            "bytes": size, "messages": n,
            "direct_msgs_per_s": round(r["direct"]["rate"], 1),
            "raw_hop_msgs_per_s": round(r["raw"]["rate"], 1),
            "stage_hop_msgs_per_s": round(r["stage"]["rate"], 1),
            "raw_hop_cpu_ms": round(r["raw"]["middle_cpu_ms"], 3),
            "stage_hop_cpu_ms": round(r["stage"]["middle_cpu_ms"], 3),
            "ratio": round(r["raw"]["rate"] / r["stage"]["rate"], 3) if r["stage"]["rate"] else None,
        }
        rows.append(row)
        if not args.json:
            print(f"{size / 1024:>8.0f} KiB  direct {row['direct_msgs_per_s']:>8.1f}/s  raw hop "
                  f"{row['raw_hop_msgs_per_s']:>8.1f}/s  stage hop {row['stage_hop_msgs_per_s']:>8.1f}/s  "
                  f"ratio {row['ratio']}  (hop CPU {row['raw_hop_cpu_ms']} vs {row['stage_hop_cpu_ms']} ms/msg)",
                  flush=True)
    result = {"bench": "transport", "cores": os.cpu_count(), "rows": rows,
              "note": "ratio = raw forwarder msgs/s / edgezmq stage hop msgs/s, same run; goal <= 1.2"}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    _plot(rows, args.plot)
    if args.json:
        print(json.dumps(result))
    return 0


def _plot(rows: list[dict], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing (pip install -e '.[bench]'): no plot", file=sys.stderr)
        return
    x = [r["bytes"] / 1024 for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in (("direct_msgs_per_s", "direct (2 processes)"),
                       ("raw_hop_msgs_per_s", "raw zero-copy forwarder"),
                       ("stage_hop_msgs_per_s", "edgezmq stage hop")):
        ax.plot(x, [r[key] * r["bytes"] / 1e9 for r in rows], marker="o", label=label)
    ax.set_xscale("log")
    ax.set_xlabel("message size (KiB)")
    ax.set_ylabel("throughput (GB/s)")
    ax.set_title("Transport: one hop, tcp loopback")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    sys.exit(main())
