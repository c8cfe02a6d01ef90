"""Microbatch traces through a deployed pipeline: per-stage intervals from the wire timestamps, and their timeline PNG.

Every data message carries ``t``: the client's ``[-1, t_submit]``, one
``[stage, t_recv, t_start, t_end, t_send]`` per stage, and the client adds
``[-1, t_result]`` (docs/wire.md).  ``collect`` pushes random microbatches through a
running plan and turns those into intervals per microbatch and stage:

    queued   t_recv  -> t_start       decoded, waiting for the compute thread
    compute  t_start -> t_end
    send     t_end   -> next t_recv   output queue, socket, wire, until the next hop has it

Clocks: each timestamp is taken by the host that did the work.  On one host they share a
clock.  Across hosts, ``collect`` estimates every node's offset from ``ping`` round
trips (NTP-style: node time minus the midpoint of the shortest round trip, error at most
half that round trip) and subtracts it only where it exceeds that error, and only for
stages served by one node (a replica's entry does not say which replica it was).  With
NTP/PTP-synchronised boards the residual error is the sync error (NTP: ~1 ms on a LAN).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from edgezmq.orchestrate.planfile import DeployPlan
from edgezmq.terms import CLIENT
from edgezmq.transport.nodeclient import NodeClient

TRACE_VERSION = 1
OFFSET_PINGS = 5
PING_TIMEOUT_S = 2.0
DEFAULT_TIMEOUT_S = 120.0
MIN_LABEL_FRACTION = 0.012  # label a compute bar only when it is at least this share of the x range
FIG_WIDTH_IN = 13.0
ROW_HEIGHT_IN = 0.55
DPI = 110
PHASE_STYLE = {  # name -> (lane y offset, bar height, alpha, hatch) within a lane of height 1
    "queued": (0.66, 0.22, 0.35, None),
    "compute": (0.30, 0.34, 0.95, None),
    "send": (0.06, 0.22, 0.55, "////"),
}


def clock_offsets(plan: DeployPlan, pings: int = OFFSET_PINGS, timeout: float = PING_TIMEOUT_S) -> dict[str, dict]:
    """node name -> {offset_s (node clock minus ours, from `ping.time`), rtt_s}."""
    if pings < 1:
        raise ValueError(f"pings: must be >= 1, got {pings}")
    out: dict[str, dict] = {}
    for _, ref in plan.all_nodes:
        best: tuple[float, float | None] = (float("inf"), None)
        with NodeClient(ref.control, curve=plan.curve(ref), timeout=timeout, retries=0, name=ref.name) as c:
            for _ in range(pings):
                t0 = time.time()
                node_t = c.ping().time
                t1 = time.time()
                sample = (t1 - t0, node_t - (t0 + t1) / 2)
                if sample[0] < best[0]:
                    best = sample
        out[ref.name] = {"rtt_s": best[0], "offset_s": best[1]}
    return out


def _stage_corrections(plan: DeployPlan, offsets: dict[str, dict]) -> dict[int, float]:
    """stage -> seconds to subtract from its timestamps (0 where not significant or not attributable)."""
    corr: dict[int, float] = {}
    for i, st in enumerate(plan.stages):
        o = offsets.get(st.nodes[0].name) if len(st.nodes) == 1 else None
        off = o.get("offset_s") if o else None
        corr[i] = off if o is not None and off is not None and abs(off) > o["rtt_s"] / 2 else 0.0
    return corr


def intervals(ts: dict[int, list], corrections: dict[int, float] | None = None) -> list[dict[str, Any]]:
    """``Client.timestamps`` -> per microbatch: submit, result and per-stage recv/start/end/send."""
    corrections = corrections or {}
    out = []
    for seq in sorted(ts):
        t = ts[seq]
        stages = []
        for e in t[1:-1]:
            d = corrections.get(int(e[0]), 0.0)
            stages.append({"stage": int(e[0]), "recv": e[1] - d, "start": e[2] - d, "end": e[3] - d,
                           "send": e[4] - d})
        out.append({"seq": seq, "submit": t[0][1], "result": t[-1][1], "stages": stages})
    return out


def _mean(v: list[float]) -> float | None:
    return sum(v) / len(v) if v else None


def summarize(mbs: list[dict[str, Any]], replicas: list[int]) -> list[dict[str, Any]]:
    """Per stage: mean queued / compute / send seconds, and the compute time per replica."""
    out = []
    for k, n in enumerate(replicas):
        q, c, s = [], [], []
        for mb in mbs:
            hops = mb["stages"]
            for j, h in enumerate(hops):
                if h["stage"] != k:
                    continue
                nxt = hops[j + 1]["recv"] if j + 1 < len(hops) else mb["result"]
                q.append(h["start"] - h["recv"])
                c.append(h["end"] - h["start"])
                s.append(nxt - h["end"])
        out.append({"stage": k, "replicas": n, "queued_s": _mean(q), "compute_s": _mean(c),
                    "send_s": _mean(s), "compute_per_replica_s": (sum(c) / len(c) / n) if c else None})
    return out


def idle(mbs: list[dict[str, Any]], stages: int) -> list[dict[str, float] | None]:
    """Where each stage's time went between the first submit and the last result of `mbs`
    (``intervals``), as shares of that span: ``compute``, and its idle time split into ``fill``
    (before its first step: the steps ahead of it in the pipeline), ``drain`` (after its last:
    the steps behind it) and ``gaps`` (between steps: it waited for work mid-run). The four
    add up to 1 where a stage runs one step at a time (one node). None: a stage in no `mbs`."""
    if not mbs:
        return [None] * stages
    t0, t1 = min(mb["submit"] for mb in mbs), max(mb["result"] for mb in mbs)
    span = max(t1 - t0, 1e-9)
    out: list[dict[str, float] | None] = []
    for k in range(stages):
        steps = sorted((h["start"], h["end"]) for mb in mbs for h in mb["stages"] if h["stage"] == k)
        if not steps:
            out.append(None)
            continue
        compute = sum(e - s for s, e in steps)
        fill, drain = steps[0][0] - t0, t1 - steps[-1][1]
        gaps = sum(max(0.0, b[0] - a[1]) for a, b in zip(steps, steps[1:]))
        out.append({"compute": round(compute / span, 4), "fill": round(fill / span, 4),
                    "drain": round(drain / span, 4), "gaps": round(gaps / span, 4)})
    return out


def collect(
    plan: DeployPlan, n_batches: int, *, window: int | None = None, seed: int = 0,
    timeout: float = DEFAULT_TIMEOUT_S, correct_clocks: bool = True,
) -> dict[str, Any]:
    """Run ``n_batches`` random microbatches through the running deployment of ``plan``; the trace."""

    from edgezmq.client import TIMESTAMPS_KEPT, Client, split
    from edgezmq.model import chain as models

    if n_batches < 1:
        raise ValueError(f"--batches: must be >= 1, got {n_batches}")
    m = plan.model
    xs = split(models.random_inputs(m.name, n_batches * m.microbatch, seed, **m.kwargs), m.microbatch)
    offsets = clock_offsets(plan) if correct_clocks else {}
    corr = _stage_corrections(plan, offsets) if offsets else {}
    # window None: what any client of the plan keeps in flight (Client.from_plan: DeployPlan.in_flight)
    with Client.from_plan(plan, window=window or None, timeout=timeout,
                          keep_timestamps=max(n_batches, TIMESTAMPS_KEPT)) as c:
        t0 = time.time()
        samples = sum(len(y) for y in c.stream(xs))
        seconds = time.time() - t0
        run, ts, window = c.run, dict(c.timestamps), c.window
    mbs = intervals(ts, corr)
    span = max(mb["result"] for mb in mbs) - min(mb["submit"] for mb in mbs)
    summary = summarize(mbs, [len(s.nodes) for s in plan.stages])
    known = [s for s in summary if s["compute_per_replica_s"] is not None]
    return {
        "version": TRACE_VERSION, "model": m.name, "microbatch": m.microbatch, "batches": n_batches,
        "window": window, "run": run, "seconds": seconds, "samples": samples,
        "samples_per_s": samples / span if span > 0 else None,
        "stages": [{"index": i, "units": list(s.units), "nodes": [n.name for n in s.nodes]}
                   for i, s in enumerate(plan.stages)],
        "clock": {"offsets": offsets, "subtracted_s": {str(k): v for k, v in corr.items()},
                  "note": "per-host clocks; offsets estimated from ping round trips, subtracted "
                          "where larger than half the round trip (single-node stages only)"},
        "t0": min(mb["submit"] for mb in mbs),
        "summary": summary,
        "bottleneck_stage": max(known, key=lambda s: s["compute_per_replica_s"])["stage"] if known else None,
        "microbatches": mbs,
    }


def save_trace(trace: dict[str, Any], path: str | Path) -> Path:
    p = Path(path)
    p.write_text(json.dumps(trace, indent=1))
    return p


def _lanes(spans: list[tuple[float, float, int]]) -> dict[int, int]:
    """Greedy interval partitioning: seq -> lane, so that overlapping computes (replicas) get their own lane."""
    ends: list[float] = []
    lane: dict[int, int] = {}
    for a, b, seq in sorted(spans):
        for i, e in enumerate(ends):
            if e <= a:
                ends[i], lane[seq] = b, i
                break
        else:
            ends.append(b)
            lane[seq] = len(ends) - 1
    return lane


def draw_timeline(trace: dict[str, Any], path: str | Path, *, title: str | None = None) -> Path:
    """A PNG: one row per stage (lanes for replicas) plus the client; queued, compute and send
    bars per microbatch, coloured and labelled by microbatch id."""
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    mbs, t0 = trace["microbatches"], trace["t0"]
    n_stages = len(trace["stages"])

    def ms(t: float) -> float:
        return (t - t0) * 1e3

    # per stage: lane of each microbatch; rows stack top-down: client, stage 0, stage 1, ...
    lanes = []
    for k in range(n_stages):
        spans = [(h["start"], h["end"], mb["seq"]) for mb in mbs for h in mb["stages"] if h["stage"] == k]
        lanes.append(_lanes(spans))
    n_lanes = [max(ln.values(), default=0) + 1 for ln in lanes]
    base, y = [], 1.0  # y of each stage's first lane (client lane is [0, 1))
    for k in range(n_stages):
        base.append(y)
        y += n_lanes[k]
    height = y
    x_max = max(ms(mb["result"]) for mb in mbs)
    fig = Figure(figsize=(FIG_WIDTH_IN, 1.6 + ROW_HEIGHT_IN * height), dpi=DPI)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    cmap = colormaps["tab10"]

    def bar(row_y: float, a: float, b: float, phase: str, color: Any) -> None:
        off, h, alpha, hatch = PHASE_STYLE[phase]
        ax.broken_barh([(ms(a), max(ms(b) - ms(a), 1e-3))], (height - row_y - 1 + off, h),
                       facecolors=color, alpha=alpha, hatch=hatch, edgecolor=color if hatch else "none",
                       linewidth=0)

    for mb in mbs:
        color = cmap(mb["seq"] % 10)
        hops = mb["stages"]
        if hops:  # client -> stage 0
            bar(0, mb["submit"], hops[0]["recv"], "send", color)
        ax.plot([ms(mb["result"])] * 2, [height - 1 + 0.1, height - 0.1], color=color, linewidth=1.5)
        ax.text(ms(mb["result"]), height - 0.05, str(mb["seq"]), ha="center", va="bottom", fontsize=7)
        for j, h in enumerate(hops):
            k = h["stage"]
            if not 0 <= k < n_stages:
                continue
            row = base[k] + lanes[k].get(mb["seq"], 0)
            nxt = hops[j + 1]["recv"] if j + 1 < len(hops) else mb["result"]
            bar(row, h["recv"], h["start"], "queued", color)
            bar(row, h["start"], h["end"], "compute", color)
            bar(row, h["end"], nxt, "send", color)
            if (ms(h["end"]) - ms(h["start"])) >= MIN_LABEL_FRACTION * x_max:
                off, hh, _, _ = PHASE_STYLE["compute"]
                ax.text((ms(h["start"]) + ms(h["end"])) / 2, height - row - 1 + off + hh / 2,
                        str(mb["seq"]), ha="center", va="center", fontsize=7, color="white")
    ticks = [height - 0.5] + [height - base[k] - n_lanes[k] / 2 for k in range(n_stages)]
    labels = [CLIENT] + [
        f"stage {s['index']} [{s['units'][0]}, {s['units'][1]})\n{', '.join(s['nodes'])}"
        + (" *" if trace.get("bottleneck_stage") == s["index"] else "")
        for s in trace["stages"]]
    ax.set_yticks(ticks, labels, fontsize=8)
    for k in range(n_stages):
        ax.axhline(height - base[k], color="0.85", linewidth=0.8)
    ax.set_ylim(0, height + 0.3)
    ax.set_xlim(0, x_max * 1.02)
    ax.set_xlabel("ms since the first submit (client clock)")
    rate = trace.get("samples_per_s")
    b = trace.get("bottleneck_stage")
    auto = (f"{trace['model']}: {trace['batches']} microbatches of {trace['microbatch']}, window "
            f"{trace['window']}" + (f", {rate:.1f} samples/s" if rate else "")
            + (f"; * bottleneck: stage {b} (compute {trace['summary'][b]['compute_s'] * 1e3:.1f} ms)"
               if b is not None else ""))
    ax.set_title(title or auto, fontsize=10)
    ax.legend(handles=[Patch(facecolor="0.4", alpha=PHASE_STYLE["queued"][2], label="queued (received, waiting)"),
                       Patch(facecolor="0.4", alpha=PHASE_STYLE["compute"][2], label="compute"),
                       Patch(facecolor="0.4", alpha=PHASE_STYLE["send"][2], hatch="////",
                             label="send (out queue + transfer)")],
              loc="upper center", bbox_to_anchor=(0.5, -0.12 - 0.25 / max(height, 1)), ncol=3, fontsize=8,
              frameon=False)
    fig.tight_layout()
    p = Path(path)
    fig.savefig(p)
    return p
