"""Operations commands: `edgezmq status`, `edgezmq trace`, `edgezmq install-service`."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from edgezmq.argtypes import count, seconds, seed, window
from edgezmq.cli.args import FMT, CommandFailed, UsageError, node_failures
from edgezmq.errors import EXIT_FAILED
from edgezmq.node import config as nodeconfig

SYSTEMD_RUNNING = Path("/run/systemd/system")  # exists iff PID 1 is systemd

EPILOG_STATUS = """examples:
  edgezmq status plans/my-cluster.yaml                 # once: up/down, shard, samples/s, time split
  edgezmq status cluster.yaml --watch                  # redraw every 2 s until Ctrl-C
  edgezmq status plans/my-cluster.yaml --watch --interval 5 --count 12
  edgezmq status plans/my-cluster.yaml --json          # one JSON object (JSON lines with --watch)

columns: compute/recv/wait/send are shares of wall time of the stage's threads (compute +
wait = the compute thread; send includes back-pressure from downstream); '*' marks the
bottleneck, the stage with the highest compute share.  Exit code 1 if a node is down.
"""
EPILOG_TRACE = """examples:
  edgezmq trace plans/my-cluster.yaml --batches 16                  # trace.png + trace.json
  edgezmq trace plans/my-cluster.yaml --batches 32 --window 6 --out run1.png
  edgezmq trace plans/my-cluster.yaml --batches 8 --json            # summary on stdout

The plan must be deployed (edgezmq deploy).  Stages on different hosts timestamp with
their own clocks: offsets are estimated from ping round trips (see docs/operations.md).
"""
EPILOG_INSTALL = """examples:
  sudo edgezmq install-service board-1 --config board-1.yaml       # unit + /etc/edgezmq/board-1.yaml, enable --now
  edgezmq install-service board-1 --config board-1.yaml --dry-run  # print what would be written
  edgezmq install-service board-1 --root /tmp/img --no-start       # into an image's root filesystem
"""


# ---- status -------------------------------------------------------------------
@node_failures
def cmd_status(args: argparse.Namespace) -> int:
    from edgezmq.ops.status import status

    return status(args.file, watch=args.watch, interval=args.interval, json=args.json,
                  count=args.count, timeout=args.timeout)


# ---- trace --------------------------------------------------------------------
@node_failures
def cmd_trace(args: argparse.Namespace) -> int:
    from edgezmq.ops.trace import collect, draw_timeline, save_trace
    from edgezmq.orchestrate.planfile import load_plan

    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise UsageError(f"--out: expected a .png path, got {args.out!r}")
    json_path = Path(args.trace_json) if args.trace_json else out.with_suffix(".json")
    plan = load_plan(args.plan)
    trace = collect(plan, args.batches, window=args.window, seed=args.seed, timeout=args.timeout,
                    correct_clocks=not args.no_clock_offsets)
    try:
        save_trace(trace, json_path)
        draw_timeline(trace, out)
    except OSError as e:
        raise UsageError(f"--out/--trace-json: cannot write {e.filename or out} ({e.strerror or e})") from None
    if args.json:
        print(json.dumps({"png": str(out), "trace": str(json_path),
                          **{k: trace[k] for k in ("model", "run", "batches", "samples", "samples_per_s",
                                                   "bottleneck_stage", "summary", "clock")}}))
    else:
        rate = trace["samples_per_s"]
        print(f"{trace['samples']} samples in {trace['seconds']:.2f}s"
              + (f" ({rate:.2f} samples/s)" if rate else "")
              + f"; timeline -> {out}, trace -> {json_path}")
        for s in trace["summary"]:
            mark = " *bottleneck" if s["stage"] == trace["bottleneck_stage"] else ""
            print(f"  stage {s['stage']}: compute {_ms(s['compute_s'])}, queued {_ms(s['queued_s'])}, "
                  f"send {_ms(s['send_s'])} per microbatch{mark}")
    return 0


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1e3:.1f} ms"


# ---- install-service ------------------------------------------------------------
def default_exec() -> str:
    """The `edgezmq` script of this installation (a venv's bin/ first), for ExecStart."""
    beside = Path(sys.executable).parent / "edgezmq"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("edgezmq") or nodeconfig.DEFAULT_EXEC


def absolute_path(text: str) -> str:
    """--exec: systemd's ExecStart takes an absolute path only."""
    if not os.path.isabs(text):
        raise argparse.ArgumentTypeError(f"expected an absolute path (ExecStart needs one), got {text!r}")
    return text


def cmd_install_service(args: argparse.Namespace) -> int:
    exec_path = args.exec_path or default_exec()
    plan = nodeconfig.plan_install(args.name, args.config, root=args.root, exec_path=exec_path)
    if args.dry_run:
        print(f"# would write {plan.unit_path}\n{plan.unit_text}")
        print(f"# would write {plan.config_path}\n{plan.config_text}")
        print("# then run:\n" + "\n".join(" ".join(c) for c in plan.commands))
        return 0
    if plan.config_path.exists() and plan.config_path.read_text() != plan.config_text and not args.force:
        raise UsageError(f"{plan.config_path} exists and differs from {args.config or 'the example config'} "
                         "(--force to overwrite)")
    for path, text, mode in ((plan.unit_path, plan.unit_text, 0o644), (plan.config_path, plan.config_text, 0o644)):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            path.chmod(mode)
        except OSError as e:  # typically: not root
            raise CommandFailed(f"{path}: cannot write ({e.strerror or e})") from None
        print(f"wrote {path}")
    live = Path(args.root).resolve() == Path("/") and SYSTEMD_RUNNING.is_dir()
    if args.no_start or not live:
        why = "--no-start" if args.no_start else "not the running system's root or systemd not running"
        print(f"not started ({why}); to start:\n" + "\n".join("  " + " ".join(c) for c in plan.commands))
        return 0
    for c in plan.commands:
        r = subprocess.run(c, capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            print(f"edgezmq install-service: {' '.join(c)} failed: {r.stderr.strip()}", file=sys.stderr)
            return EXIT_FAILED
    print(f"started edgezmq-node@{args.name}; logs: journalctl -u edgezmq-node@{args.name} -f")
    return 0


# ---- registration ---------------------------------------------------------------
def add_cli(sub: argparse._SubParsersAction) -> None:
    """Register `status`, `trace` and `install-service` on the `edgezmq` subparsers."""
    from edgezmq.ops.status import DEFAULT_INTERVAL_S, STATS_TIMEOUT_S
    from edgezmq.ops.trace import DEFAULT_TIMEOUT_S

    st = sub.add_parser("status", help="every node of a plan or cluster: up/down, shard, samples/s, time split",
                        epilog=EPILOG_STATUS, formatter_class=FMT)
    st.add_argument("file", metavar="PLAN_OR_CLUSTER.yaml", help="a plan file or a cluster inventory")
    st.add_argument("--watch", action="store_true", help="refresh live until Ctrl-C")
    st.add_argument("--interval", type=seconds, default=DEFAULT_INTERVAL_S,
                    help=f"seconds between refreshes (default {DEFAULT_INTERVAL_S:g})")
    st.add_argument("--count", type=count, help="stop after this many refreshes")
    st.add_argument("--timeout", type=seconds, default=STATS_TIMEOUT_S,
                    help=f"seconds to wait for each node (default {STATS_TIMEOUT_S:g})")
    st.add_argument("--json", action="store_true", help="JSON (one object per refresh)")
    st.set_defaults(func=cmd_status)

    tr = sub.add_parser("trace", help="trace microbatches through a deployed plan; draw the timeline PNG",
                        epilog=EPILOG_TRACE, formatter_class=FMT)
    tr.add_argument("plan", metavar="PLAN.yaml")
    tr.add_argument("--batches", type=count, required=True, help="random microbatches to send")
    tr.add_argument("--out", default="trace.png", help="timeline PNG (default trace.png)")
    tr.add_argument("--trace-json", help="raw trace JSON (default: --out with .json)")
    tr.add_argument("--window", type=window, help="microbatches in flight (default: the plan's, else 2 per node + 2)")
    tr.add_argument("--seed", type=seed, default=0)
    tr.add_argument("--timeout", type=seconds, default=DEFAULT_TIMEOUT_S, help="seconds per microbatch")
    tr.add_argument("--no-clock-offsets", action="store_true", help="do not estimate per-node clock offsets")
    tr.add_argument("--json", action="store_true", help="print a JSON summary")
    tr.set_defaults(func=cmd_trace)

    ins = sub.add_parser("install-service", help="install the systemd unit and a node config for this board",
                         epilog=EPILOG_INSTALL, formatter_class=FMT)
    ins.add_argument("name", help="instance name: edgezmq-node@NAME, config /etc/edgezmq/NAME.yaml")
    ins.add_argument("--config", help="node config to install (default: a minimal one)")
    ins.add_argument("--root", default="/", help="filesystem root to install under (default /)")
    ins.add_argument("--exec", dest="exec_path", type=absolute_path, help="absolute path of the edgezmq script for ExecStart "
                     "(default: this installation's)")
    ins.add_argument("--dry-run", action="store_true", help="print the files and commands, write nothing")
    ins.add_argument("--force", action="store_true", help="overwrite an existing, different config")
    ins.add_argument("--no-start", action="store_true", help="write the files only")
    ins.set_defaults(func=cmd_install_service)
