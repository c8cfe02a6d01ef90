"""Types for argparse flags that take numbers: every number a flag takes has a finite range.

Shared by the ``edgezmq`` command line, the planner's ``plan`` command and the bench
scripts; dependency-free (the planner imports nothing of the runtime). argparse refuses an
out-of-range value with exit 2, naming the flag:
``argument --seed: expected an integer in 0..4294967295, got -1``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from edgezmq.terms import MAX_MICROBATCH, MAX_PORT, MAX_SECONDS, MAX_THREADS

__all__ = ["int_in", "int_list", "float_in", "count", "count_or_zero", "window", "seed", "threads", "microbatch", "port",
           "seconds", "pipeline_window", "MAX_COUNT", "MAX_WINDOW", "MAX_LOCAL_NODES", "MAX_SEED", "MAX_MEMORY_BYTES"]

MAX_COUNT = 1_000_000  # batches, images, refreshes, retries
MAX_WINDOW = 4096  # microbatches in flight
MAX_LOCAL_NODES = 64  # node processes `demo` starts on this machine
MAX_SEED = 2**32 - 1
MAX_MEMORY_BYTES = 1 << 50  # a node's --memory-limit: 1 PiB


def pipeline_window(devices: int, in_service: int = 0) -> int:
    """Microbatches a client keeps in flight on a pipeline of ``devices`` devices: the
    ``in_service`` ones its latency holds (edgezmq.planner.Plan.window: latency / bottleneck),
    and two more per device (one waiting to be computed, one on its inbound link) and two
    for the client's turnaround; in 1..MAX_WINDOW. Without a latency (a plan file without
    ``predicted.window``) that is what a pipeline needs to stay busy when its steps differ
    in work: at 4,096 sequences on 8 devices, 9 in flight left every stage idle 21-25 % of
    the run (README, "Enough sequences")."""
    return max(1, min(MAX_WINDOW, in_service + 2 * devices + 2))


def int_in(lo: int, hi: int) -> Callable[[str], int]:
    """An argparse type: an integer in lo..hi."""
    def parse(text: str) -> int:
        n = int(text)
        if not lo <= n <= hi:
            raise argparse.ArgumentTypeError(f"expected an integer in {lo}..{hi}, got {text}")
        return n

    parse.__name__ = "integer"  # argparse says "invalid integer value: 'x'"
    return parse


def int_list(lo: int, hi: int) -> Callable[[str], list[int]]:
    """An argparse type: comma-separated integers in lo..hi, sorted, without repeats (empty: none)."""
    one = int_in(lo, hi)

    def parse(text: str) -> list[int]:
        return sorted({one(t) for t in text.split(",") if t.strip()})

    parse.__name__ = "integer list"
    return parse


def float_in(lo: float, hi: float, *, lo_open: bool = False) -> Callable[[str], float]:
    """An argparse type: a number in lo..hi (``lo_open``: above lo); never NaN or infinite."""
    def parse(text: str) -> float:
        x = float(text)
        if not ((lo < x) if lo_open else (lo <= x)) or not x <= hi:
            raise argparse.ArgumentTypeError(f"expected a number {'>' if lo_open else '>='} {lo:g} and "
                                             f"<= {hi:g}, got {text}")
        return x

    parse.__name__ = "number"
    return parse


count = int_in(1, MAX_COUNT)
count_or_zero = int_in(0, MAX_COUNT)
window = int_in(1, MAX_WINDOW)
seed = int_in(0, MAX_SEED)
threads = int_in(1, MAX_THREADS)
microbatch = int_in(1, MAX_MICROBATCH)
port = int_in(0, MAX_PORT)
seconds = float_in(0, MAX_SECONDS, lo_open=True)
