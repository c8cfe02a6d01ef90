"""The ``edgezmq plan`` subcommand: solve (or run a baseline on) a problem file.

    edgezmq plan PROBLEM.yaml [--baseline even|pipeedge|pipedream] [--json] [-o PLAN.yaml]
                 [--effort N] [--time-limit S] [--gap G] [--no-replication] [--max-error E]
                 [--min-agreement A] [--checkpoint PATH] [--results ADDR]

Prints the plan as a table (or one JSON object with ``--json``) and writes the deployable
plan with ``-o``. A bad or infeasible problem file exits with code 2 and one clear line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from edgezmq.argtypes import float_in, int_in, seconds
from edgezmq.terms import MAX_SEARCH_NODES

from .baselines import BASELINES, baseline
from .deploy import deployable
from .problem import MAX_DISAGREEMENT, MAX_ERROR, Options, PlanError, load_problem
from .solver import DEFAULT_EFFORT, DEFAULT_TIME_LIMIT_S, solve

__all__ = ["add_cli", "run"]

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2


def add_cli(subparsers: Any) -> None:
    """Register ``plan`` on an argparse subparsers object (its handler returns an exit code)."""
    p = subparsers.add_parser("plan", help="choose stages and devices for the most throughput",
                              description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog="examples:\n"
                                     "  edgezmq plan plans/edgepipe-vit-large-half.problem.yaml\n"
                                     "  edgezmq plan plans/edgepipe-vit-large-half.problem.yaml --baseline pipeedge --json\n"
                                     "  edgezmq plan plans/home-vit-large-half.problem.yaml -o plan.yaml --checkpoint vit_l.safetensors\n")
    p.add_argument("problem", type=Path, help="problem file (YAML or JSON, see docs/planner.md)")
    p.add_argument("--baseline", choices=BASELINES, help="plan as this baseline would, costed by our model")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("-o", "--output", type=Path, help="write the deployable plan (YAML) here")
    p.add_argument("--effort", type=int_in(1, MAX_SEARCH_NODES), default=DEFAULT_EFFORT, metavar="N",
                   help=f"search nodes at most, 1..{MAX_SEARCH_NODES:.0e} (default {DEFAULT_EFFORT}); then the "
                        "best plan and a proven lower bound are returned, the same on every machine")
    p.add_argument("--time-limit", type=seconds, default=DEFAULT_TIME_LIMIT_S, metavar="S",
                   help=f"wall-clock safety net in seconds (default {DEFAULT_TIME_LIMIT_S:g}); a search "
                        "it stops reports stopped_by: time, and may differ between machines")
    p.add_argument("--gap", type=float_in(0, 1), default=0.0, metavar="G",
                   help="stop once proven within this relative gap of optimal, 0..1 (default 0: prove it)")
    p.add_argument("--no-replication", action="store_true", help="one device per stage")
    p.add_argument("--max-error", type=float_in(0, MAX_ERROR), metavar="E",
                   help="let the planner encode the links between stages with the problem's model.encodings, "
                        "their errors at the used cuts (relative L2 of the logits) summing to at most E "
                        f"(0..{MAX_ERROR:g}; default: every link raw, exact)")
    p.add_argument("--min-agreement", type=float_in(0, MAX_DISAGREEMENT), metavar="A",
                   help="let the planner encode those links keeping top-1 agreement with fp32 at least A "
                        "percent (0..100): the encodings' measured disagreements (model.encodings.*.disagreement, "
                        "percent) at the used cuts summing to at most 100 - A; with --max-error, both hold")
    p.add_argument("--checkpoint", help="checkpoint path to put in the deployable plan")
    p.add_argument("--results", help="results address (tcp://...) to put in the deployable plan")
    p.set_defaults(func=run)


def _fail(msg: str, code: int) -> int:
    print(f"edgezmq plan: error: {msg}", file=sys.stderr)
    return code


def run(args: argparse.Namespace) -> int:
    """Handle ``edgezmq plan``."""
    if args.time_limit <= 0:
        return _fail(f"--time-limit: expected a positive number of seconds, got {args.time_limit:g}",
                     EXIT_BAD_INPUT)
    try:
        problem = load_problem(args.problem)
        if args.no_replication:
            problem = dataclasses.replace(
                problem, options=Options(replication=False, buffers=problem.options.buffers))
        if args.baseline:
            plan = baseline(problem, args.baseline, time_limit_s=args.time_limit)
        else:
            plan = solve(problem, time_limit_s=args.time_limit, gap=args.gap, effort=args.effort,
                         max_error=args.max_error, min_agreement=args.min_agreement)
    except PlanError as e:
        return _fail(str(e), EXIT_BAD_INPUT)

    if args.json:
        print(json.dumps({"problem": str(args.problem), **plan.to_dict()}))
    else:
        print(f"{args.problem}: {problem.model.name}, {problem.num_units} units, "
              f"{len(problem.devices)} devices, plan by {plan.method}")
        print(plan.table(problem))
    if args.output:
        try:
            doc = deployable(problem, plan, checkpoint=args.checkpoint, results=args.results,
                             max_error=None if args.baseline else args.max_error,
                             min_agreement=None if args.baseline else args.min_agreement)
        except PlanError as e:
            return _fail(f"not writing {args.output}: {e}", EXIT_FAILED)
        import yaml  # deferred: only -o needs it

        try:
            args.output.write_text(yaml.safe_dump(doc, sort_keys=False, default_flow_style=None))
        except OSError as e:
            return _fail(f"cannot write {args.output}: {e.strerror or e}", EXIT_FAILED)
        if not args.json:
            print(f"wrote {args.output}")
    return EXIT_OK
