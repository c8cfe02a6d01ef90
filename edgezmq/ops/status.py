"""`edgezmq status`: every node of a plan or cluster inventory — up/down, shard, throughput, time split, bottleneck."""

from __future__ import annotations

import json as jsonlib
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import yaml

from edgezmq import yamlfile
from edgezmq.protocol import control
from edgezmq.transport.rpc import ControlClient

STATS_TIMEOUT_S = 2.0  # per node, per refresh; nodes are asked in parallel
DEFAULT_INTERVAL_S = 2.0
MAX_PARALLEL = 32
CLEAR_SCREEN = "\x1b[H\x1b[2J"
MB = 1e6
PHASES = ("compute", "recv", "wait", "send")  # stats fields <phase>_s
ERROR_FIELDS = ("bad_messages", "wrong_run", "compute_errors")  # this stage's own errors
BOTTLENECK_MARK = "*"


class StatusInputError(ValueError):
    """The file given to status is neither a readable plan nor a cluster inventory."""


@dataclass
class Target:
    name: str
    control: str
    stage: int | None = None  # planned stage (plans only)
    units: tuple[int, int] | None = None  # planned units (plans only)
    curve: Any = None  # security.Curve of a secured plan's or inventory's node (its `keys:` section)


def node_curve(plan: Any, ref: Any) -> Any:
    """How to reach a plan's node: CurveZMQ when the plan has `keys:`, else None (plaintext)."""
    curve = getattr(plan, "curve", None)
    return curve(ref) if callable(curve) else None


def control_client(address: str, *, curve: Any = None, **kw: Any) -> ControlClient:
    return ControlClient(address, **kw, **({"curve": curve} if curve is not None else {}))


def targets(path: str) -> tuple[str, list[Target]]:
    """("plan" | "cluster", the nodes to ask) from a plan file or a cluster inventory."""
    from edgezmq.orchestrate.inventory import is_cluster_file, parse_cluster
    from edgezmq.orchestrate.planfile import parse_plan

    try:
        d = yamlfile.safe_load(Path(path).read_text())
    except OSError as e:
        raise StatusInputError(f"{path}: cannot read file ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise StatusInputError(f"{path}: not valid YAML ({e})") from None
    if is_cluster_file(d):
        cluster = parse_cluster(d, source=path)
        return "cluster", [Target(n.name, n.control, curve=cluster.curve(n.name)) for n in cluster.nodes]
    if not isinstance(d, dict) or "stages" not in d:
        raise StatusInputError(f"{path}: expected a plan (with stages:) or a cluster inventory (nodes: list)")
    plan = parse_plan(d, source=path)
    return "plan", [Target(n.name, n.control, i, plan.stages[i].units, node_curve(plan, n))
                    for i, n in plan.all_nodes]


def poll(nodes: list[Target], timeout: float = STATS_TIMEOUT_S) -> list[dict[str, Any] | str]:
    """``stats`` of every node in parallel: its reply, or the error text of a node that is down."""

    def one(t: Target) -> dict[str, Any] | str:
        try:
            with control_client(t.control, curve=t.curve, timeout=timeout, retries=0, name=t.name) as c:
                return c.call("stats")
        except control.ControlError as e:
            return e.message

    if not nodes:
        return []
    with ThreadPoolExecutor(max_workers=min(MAX_PARALLEL, len(nodes))) as ex:
        return list(ex.map(one, nodes))


def _same_stage(now: dict, before: dict) -> bool:
    return (before.get("run") == now.get("run") and before.get("units") == now.get("units")
            and now.get("uptime_s", 0) > before.get("uptime_s", 0)
            and now.get("samples", 0) >= before.get("samples", 0))


def node_row(t: Target, reply: dict | str, before: dict | str | None = None) -> dict[str, Any]:
    """One node's status.  Rates are over the last refresh when ``before`` is of the same
    deployment, else averaged over the stage's uptime (``window_s`` says which)."""
    row: dict[str, Any] = {"name": t.name, "control": t.control, "stage": t.stage,
                           "units": list(t.units) if t.units else None, "bottleneck": False}
    if isinstance(reply, str):
        return {**row, "state": "down", "up": False, "error": reply}
    st = reply.get("stage") or {}
    row.update(state=reply.get("state"), up=True, error=reply.get("error"), rss=reply.get("rss"),
               peak_rss=reply.get("peak_rss"), stats=reply)
    if not st:
        return row
    planned = row["units"]
    row.update(stage=st.get("stage"), units=st.get("units"), run=st.get("run"),
               in_queue=st.get("in_queue"), out_queue=st.get("out_queue"),
               processed=st.get("processed"), samples=st.get("samples"),
               errors=sum(st.get(k, 0) for k in ERROR_FIELDS), last_error=st.get("last_error") or None,
               paused=bool(st.get("paused")))
    if planned is not None and (planned != row["units"] or t.stage != row["stage"]):
        row["mismatch"] = f"serves stage {row['stage']} units {row['units']}, plan says stage {t.stage} units {planned}"
    prev = before.get("stage") if isinstance(before, dict) else None
    if prev and _same_stage(st, prev):
        base, window = prev, st["uptime_s"] - prev["uptime_s"]
    else:
        base, window = {}, st.get("uptime_s", 0.0)
    row["window_s"] = round(window, 3)
    if window > 0:
        row["samples_per_s"] = (st.get("samples", 0) - base.get("samples", 0)) / window
        row["split"] = {p: min(1.0, max(0.0, (st.get(f"{p}_s", 0.0) - base.get(f"{p}_s", 0.0)) / window))
                        for p in PHASES}
    return row


def report(kind: str, source: str, nodes: list[Target], replies: list, before: list | None = None) -> dict[str, Any]:
    """The whole status: rows, counts and the bottleneck (stage with the highest compute share)."""
    rows = [node_row(t, r, before[i] if before else None) for i, (t, r) in enumerate(zip(nodes, replies))]
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
    kind, nodes = targets(path)
    limit = count if watch else 1
    before: list | None = None
    code, n = 0, 0
    clear = watch and not json and out.isatty()
    try:
        while limit is None or n < limit:
            t0 = time.monotonic()
            replies = poll(nodes, timeout)
            rep = report(kind, path, nodes, replies, before)
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
