"""BLAS threads of a process that runs the planner: one, unless its environment says otherwise.

The planner's matrices are small (the LP's basis: units + devices rows); BLAS threads only
spin on them, which on a shared machine counts as CPU seconds (16 distinct devices,
replicated: 1.3 s with one thread, 1.5-1.9 s with OpenBLAS's default on 2 cores,
docs/planner.md), and the thread count changes the LP's float sums, hence the nodes an
effort-limited search spends. OpenBLAS reads the setting once, when numpy loads it: this
runs before numpy is imported. Dependency-free on purpose.
"""

from __future__ import annotations

import os
import sys

__all__ = ["BLAS_THREADS_ENV", "PLANNER_BLAS_THREADS", "pin_blas_threads"]

BLAS_THREADS_ENV = "OPENBLAS_NUM_THREADS"  # numpy's bundled OpenBLAS
PLANNER_BLAS_THREADS = 1


def pin_blas_threads() -> bool:
    """Set ``OPENBLAS_NUM_THREADS`` to one unless it is set; True if it now holds for this
    process. False, and nothing set, if numpy is loaded already: too late for this process,
    and its child processes would inherit a setting meant for the planner."""
    if "numpy" in sys.modules:
        return False
    os.environ.setdefault(BLAS_THREADS_ENV, str(PLANNER_BLAS_THREADS))
    return True
