"""`edgezmq demo`: a local pipeline on N node processes, verified against the whole model."""

from __future__ import annotations

import argparse

from edgezmq.argtypes import MAX_LOCAL_NODES, count, int_in, microbatch, seed, threads, window
from edgezmq.cli.args import FMT, node_failures
from edgezmq.orchestrate.planfile import GRANULARITIES

EPILOG_DEMO = """examples:
  edgezmq demo
  edgezmq demo --model vit_tiny_patch16_224 --nodes 2 --batches 8 --json
"""


@node_failures
def cmd_demo(args: argparse.Namespace) -> int:
    from edgezmq.orchestrate.demo import run_demo

    return run_demo(args)


def add_cli(sub: argparse._SubParsersAction) -> None:
    """Register `demo` on the `edgezmq` subparsers."""
    m = sub.add_parser("demo", help="local pipeline on N node processes, verified against the whole model",
                       epilog=EPILOG_DEMO, formatter_class=FMT)
    m.add_argument("--model", default="vit_small_patch16_224")
    m.add_argument("--nodes", type=int_in(1, MAX_LOCAL_NODES), default=3, help=f"node processes (1..{MAX_LOCAL_NODES})")
    m.add_argument("--microbatch", type=microbatch, default=8)
    m.add_argument("--batches", type=count, default=16)
    m.add_argument("--threads", type=threads, help="torch threads per node (default: cores // nodes, at least 1)")
    m.add_argument("--granularity", default="block", choices=GRANULARITIES)
    m.add_argument("--split", default="planner", choices=("planner", "even"),
                   help="how to cut the model: profile + plan (default), or equal unit counts")
    m.add_argument("--replication", action="store_true",
                   help="let the planner replicate stages (on identical local nodes it then "
                        "prefers whole-model replicas: data parallelism, not a pipeline)")
    m.add_argument("--window", type=window, help="microbatches in flight (default: the plan's: the planner's window, "
                   "else 2 per node + 2)")
    m.add_argument("--seed", type=seed, default=0)
    m.add_argument("--json", action="store_true", help="print one JSON object")
    m.set_defaults(func=cmd_demo)
