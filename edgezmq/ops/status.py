"""`edgezmq status`: every node of a plan or cluster inventory — up/down, shard, throughput, time split, bottleneck."""

from __future__ import annotations

import json as jsonlib
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TextIO

from edgezmq.errors import EdgezmqError
from edgezmq.orchestrate.address import NodeAddress
from edgezmq.protocol import control
from edgezmq.protocol import messages as m
from edgezmq.transport.nodeclient import NodeClient

STATS_TIMEOUT_S = 2.0  # per node, per refresh; nodes are asked in parallel
DEFAULT_INTERVAL_S = 2.0
MAX_PARALLEL = 32
CLEAR_SCREEN = "\x1b[H\x1b[2J"
MB = 1e6
PHASES = ("compute", "recv", "wait", "send")  # stats fields <phase>_s
ERROR_FIELDS = ("bad_messages", "compute_errors")  # this stage's own errors; bad_messages includes wrong_run
BOTTLENECK_MARK = "*"


class StatusInputError(EdgezmqError, ValueError):
    """The file given to status is neither a readable plan nor a cluster inventory."""


Placement = tuple[int, tuple[int, int]]  # (stage, units [a, b)) a plan gives a node


def targets(path: str) -> tuple[str, list[NodeAddress], list[Placement | None]]:
    """("plan" | "cluster", the nodes to ask, where the plan puts each (None for an inventory's))
    from a plan file or a cluster inventory; the addresses carry the file's CurveZMQ keys."""
    from edgezmq.fields import read_yaml
    from edgezmq.orchestrate.inventory import is_cluster_file, parse_cluster
    from edgezmq.orchestrate.planfile import parse_plan

    d = read_yaml(path, StatusInputError)
    if is_cluster_file(d):
        cluster = parse_cluster(d, source=path)
        return "cluster", list(cluster.nodes), [None] * len(cluster.nodes)
    if not isinstance(d, dict) or "stages" not in d:
        raise StatusInputError(f"{path}: expected a plan (with stages:) or a cluster inventory (nodes: list)")
    plan = parse_plan(d, source=path)
    return "plan", [n for _, n in plan.all_nodes], [(i, plan.stages[i].units) for i, _ in plan.all_nodes]


def poll(nodes: list[NodeAddress], timeout: float = STATS_TIMEOUT_S) -> list[m.StatsReply | str]:
    """``stats`` of every node in parallel: its reply, or the error text of a node that is down."""

    def one(t: NodeAddress) -> m.StatsReply | str:
        try:
            with NodeClient(t.control, curve=t.curve, timeout=timeout, retries=0, name=t.name) as c:
                return c.stats()
        except control.ControlError as e:
            return e.message

    if not nodes:
        return []
    with ThreadPoolExecutor(max_workers=min(MAX_PARALLEL, len(nodes))) as ex:
        return list(ex.map(one, nodes))


def _same_stage(now: m.StageStats, before: m.StageStats) -> bool:
    return (before.run == now.run and before.units == now.units and now.uptime_s > before.uptime_s
            and now.samples >= before.samples)


def node_row(t: NodeAddress, reply: m.StatsReply | str, before: m.StatsReply | str | None = None,
             planned: Placement | None = None) -> dict[str, Any]:
    """One node's status (``planned``: where its plan puts it).  Rates are over the last refresh
    when ``before`` is of the same deployment, else averaged over the stage's uptime
    (``window_s`` says which)."""
    stage, units = planned if planned is not None else (None, None)
    row: dict[str, Any] = {"name": t.name, "control": t.control, "stage": stage,
                           "units": list(units) if units else None, "bottleneck": False}
    if isinstance(reply, str):
        return {**row, "state": "down", "up": False, "error": reply}
    # the row is a JSON document (`status --json`): it carries the node's reply as on the wire
    row.update(state=reply.state, up=True, error=reply.error, rss=reply.rss, peak_rss=reply.peak_rss,
               stats=reply.to_wire())
    st = reply.stage
    if st is None:
        return row
    plan_units = row["units"]
    row.update(stage=st.stage, units=st.units, run=st.run, in_queue=st.in_queue, out_queue=st.out_queue,
               processed=st.processed, samples=st.samples,
               errors=sum(getattr(st, k) for k in ERROR_FIELDS), last_error=st.last_error or None,
               paused=st.paused)
    if plan_units is not None and (plan_units != row["units"] or stage != row["stage"]):
        row["mismatch"] = f"serves stage {row['stage']} units {row['units']}, plan says stage {stage} units {plan_units}"
    prev = before.stage if isinstance(before, m.StatsReply) else None
    samples0, window = 0, st.uptime_s
    split0 = dict.fromkeys(PHASES, 0.0)
    if prev is not None and _same_stage(st, prev):
        samples0, window = prev.samples, st.uptime_s - prev.uptime_s
        split0 = {p: getattr(prev, f"{p}_s") for p in PHASES}
    row["window_s"] = round(window, 3)
    if window > 0:
        row["samples_per_s"] = (st.samples - samples0) / window
        row["split"] = {p: min(1.0, max(0.0, (getattr(st, f"{p}_s") - split0[p]) / window)) for p in PHASES}
    return row


def report(kind: str, source: str, nodes: list[NodeAddress], replies: list, before: list | None = None,
           planned: list[Placement | None] | None = None) -> dict[str, Any]:
    """The whole status: rows, counts and the bottleneck (stage with the highest compute share)."""
    rows = [node_row(t, r, before[i] if before else None, planned[i] if planned else None)
            for i, (t, r) in enumerate(zip(nodes, replies))]
    share: dict[int, list[float]] = {}
    for r in rows:
        if r.get("split") and r.get("stage") is not None and r["state"] == "running":
            share.setdefault(r["stage"], []).append(r["split"]["compute"])
    mean = {s: sum(v) / len(v) for s, v in share.items()}  # replicas: each one's busy share
    bottleneck = max(mean, key=lambda s: mean[s]) if mean and max(mean.values()) > 0 else None
    for r in rows:
        r["bottleneck"] = bottleneck is not None and r.get("stage") == bottleneck and r["state"] == "running"
    return {"source": source, "kind": kind, "time": time.time(), "up": sum(r["up"] for r in rows),
            "down": sum(not r["up"] for r in rows), "bottleneck_stage": bottleneck,
            "bottleneck_compute_share": mean.get(bottleneck) if bottleneck is not None else None,
            "nodes": rows}


def _pct(row: dict, phase: str) -> str:
    return f"{100 * row['split'][phase]:.0f}%" if row.get("split") else "-"


def format_report(rep: dict[str, Any]) -> str:
    """The report as a fixed-width table plus notes (down nodes, errors, the bottleneck)."""
    head = ("", "stage", "node", "state", "units", "q_in", "q_out", "samples", "samples/s",
            "compute", "recv", "wait", "send", "errors", "rss_MB")
    rows = [head]
    for r in rep["nodes"]:
        u = r.get("units")
        rows.append((
            BOTTLENECK_MARK if r["bottleneck"] else "", "-" if r.get("stage") is None else str(r["stage"]),
            r["name"], r["state"], f"[{u[0]}, {u[1]})" if u else "-",
            str(r.get("in_queue", "-")), str(r.get("out_queue", "-")), str(r.get("samples", "-")),
            f"{r['samples_per_s']:.2f}" if "samples_per_s" in r else "-",
            *(_pct(r, p) for p in PHASES), str(r.get("errors", "-")),
            f"{r['rss'] / MB:.0f}" if r.get("rss") else "-"))
    widths = [max(len(row[k]) for row in rows) for k in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    windows = {r["window_s"] for r in rep["nodes"] if "window_s" in r}
    over = ("over the last refresh" if rep.get("refreshed") else "averaged over each stage's uptime")
    title = (f"{rep['source']} ({rep['kind']}): {rep['up']} up, {rep['down']} down; "
             f"rates and time shares {over}" + (f" ({min(windows):.1f}s)" if windows and rep.get("refreshed") else ""))
    notes = []
    if rep["bottleneck_stage"] is not None:
        notes.append(f"{BOTTLENECK_MARK} bottleneck: stage {rep['bottleneck_stage']} "
                     f"(compute {100 * rep['bottleneck_compute_share']:.0f}% of wall time)")
    for r in rep["nodes"]:
        if not r["up"]:
            notes.append(f"{r['name']}: down: {r['error']}")
        elif r.get("error"):
            notes.append(f"{r['name']}: {r['error']}")
        if r.get("paused"):
            notes.append(f"{r['name']}: stage paused (edgezmq resume)")
        if r.get("last_error"):
            notes.append(f"{r['name']}: last error: {r['last_error']}")
        if r.get("mismatch"):
            notes.append(f"{r['name']}: {r['mismatch']}")
    return "\n".join([title, *lines, *notes])


def exit_code(rep: dict[str, Any]) -> int:
    """0 when every node answers and none has a failed load, else 1."""
    return 0 if all(r["up"] and r["state"] != "failed" for r in rep["nodes"]) else 1


def status(
    path: str, watch: bool = False, interval: float = DEFAULT_INTERVAL_S, json: bool = False, *,
    count: int | None = None, timeout: float = STATS_TIMEOUT_S, out: TextIO | None = None,
) -> int:
    """Print the status of every node of ``path`` once, or every ``interval`` s with ``watch``
    (``count`` refreshes at most; Ctrl-C ends it).  Returns the exit code of the last refresh."""
    out = out or sys.stdout
    if interval <= 0:
        raise StatusInputError(f"--interval: must be > 0, got {interval:g}")
    if count is not None and count < 1:
        raise StatusInputError(f"--count: must be >= 1, got {count}")
    kind, nodes, planned = targets(path)
    limit = count if watch else 1
    before: list | None = None
    code, n = 0, 0
    clear = watch and not json and out.isatty()
    try:
        while limit is None or n < limit:
            t0 = time.monotonic()
            replies = poll(nodes, timeout)
            rep = report(kind, path, nodes, replies, before, planned)
            rep["refreshed"] = before is not None
            code = exit_code(rep)
            if json:
                out.write(jsonlib.dumps(rep) + "\n")
            else:
                out.write((CLEAR_SCREEN if clear else ("\n" if n else "")) + format_report(rep) + "\n")
            out.flush()
            before, n = replies, n + 1
            if limit is not None and n >= limit:
                break
            time.sleep(max(0.0, interval - (time.monotonic() - t0)))
    except KeyboardInterrupt:
        pass
    return code
