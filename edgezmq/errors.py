"""The root of every error edgezmq raises for bad input or a failed operation, and the exit codes they map to.

Each error class subclasses :class:`EdgezmqError` and mixes in the builtin its callers
already catch (as pyzmq's ``ZMQError`` family does)::

    class PlanFileError(EdgezmqError, ValueError)    # a bad plan file: exit code 2
    class DeployError(EdgezmqError, RuntimeError)    # deployment failed: exit code 1

so ``except EdgezmqError`` catches everything the package means to raise, and
``except ValueError`` keeps working where it did. What is not an ``EdgezmqError`` is a
bug: the command line lets it through with its traceback.

This module imports nothing, so every layer (the planner included) may import it.
"""

from __future__ import annotations

__all__ = ["EXIT_BAD_INPUT", "EXIT_FAILED", "EXIT_INTERRUPTED", "EXIT_OK", "EdgezmqError"]

# The command line's exit codes (docs/operations.md "Exit codes").
EXIT_OK = 0            # done
EXIT_FAILED = 1        # the operation ran and failed: a node down or unreachable, a deploy or a result that failed
EXIT_BAD_INPUT = 2     # bad input: usage, a bad file, field or argument (argparse's own code too)
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT, as shells report it)


class EdgezmqError(Exception):
    """An error edgezmq raises on purpose; the message names the field or file, what was
    expected and what came."""

    @property
    def exit_code(self) -> int:
        """The command line's exit code for this error: bad input (a ``ValueError``: a bad
        file, field or argument) is 2; any other failure is 1."""
        return EXIT_BAD_INPUT if isinstance(self, ValueError) else EXIT_FAILED
