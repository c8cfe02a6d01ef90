"""The `edgezmq` command: builds the parser from the command groups, runs the command, applies the exit-code policy.

Exit codes (docs/operations.md "Exit codes"): 0 done; 1 the operation ran and failed; 2 bad
input (argparse's own 2 included); 130 interrupted (Ctrl-C); 143 terminated (SIGTERM, after the
same clean-up as Ctrl-C).  Only an :class:`~edgezmq.errors.EdgezmqError`
becomes one line on stderr; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys

from edgezmq.blas import pin_blas_threads
from edgezmq.errors import EXIT_INTERRUPTED, EdgezmqError
from edgezmq.interrupts import Terminated, sigterm_interrupts

DESCRIPTION = ("Pipeline-parallel inference of timm models (ViTs, CNNs, any traceable one) across edge devices over ZeroMQ. "
               "Exit codes: 0 done, 1 failed, 2 bad input, 130 interrupted (docs/operations.md).")


def _setup_logging(verbose: int) -> None:
    level = logging.WARNING - 10 * verbose
    logging.basicConfig(level=max(level, logging.DEBUG), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def build_parser() -> argparse.ArgumentParser:
    from edgezmq.cli import demo, deploy, generate, node, ops, probe
    from edgezmq.planner import add_cli as add_plan_cli
    from edgezmq.testbed import add_cli as add_testbed_cli

    p = argparse.ArgumentParser(prog="edgezmq", description=DESCRIPTION)
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    sub = p.add_subparsers(dest="command", required=True)
    node.add_cli(sub)      # node, keys
    deploy.add_cli(sub)    # deploy, undeploy, submit, run, checkpoint
    generate.add_cli(sub)  # generate
    probe.add_cli(sub)     # profile, netprobe, pause, resume
    demo.add_cli(sub)      # demo
    add_plan_cli(sub)      # plan
    add_testbed_cli(sub)   # testbed
    ops.add_cli(sub)       # status, trace, install-service
    return p


# commands whose process runs the planner and nothing else that wants BLAS threads (edgezmq.blas)
PLANNER_COMMANDS = ("plan",)


def _command(argv: list[str]) -> str | None:
    """The command word of `argv` (the global options before it take no value)."""
    return next((a for a in argv if not a.startswith("-")), None)


def main(argv: list[str] | None = None) -> int:
    if _command(sys.argv[1:] if argv is None else argv) in PLANNER_COMMANDS:
        pin_blas_threads()  # before build_parser: the planner's import loads numpy
    args = build_parser().parse_args(argv)  # bad usage: argparse exits 2
    _setup_logging(args.verbose)
    try:
        # SIGTERM (systemd, `timeout`, `kill`) takes Ctrl-C's way out, so that the same clean-up
        # runs: a `run` unloads its nodes, a testbed `up` removes what it made
        with sigterm_interrupts():
            return int(args.func(args) or 0)
    except EdgezmqError as e:
        print(f"edgezmq {args.command}: {e}", file=sys.stderr)
        return e.exit_code
    except Terminated as e:
        print(f"edgezmq {args.command}: terminated", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
