"""Testbed errors: a failed operation, and a missing prerequisite (root, iproute2, cgroups)."""

from __future__ import annotations

from edgezmq.errors import EXIT_BAD_INPUT, EdgezmqError


class TestbedError(EdgezmqError, RuntimeError):
    """A testbed operation failed; the message names the command or file and what it said."""

    __test__ = False  # not a pytest test class


class PrerequisiteError(TestbedError):
    """This machine or user cannot run a testbed (not root, no `ip`/`tc`, no cgroup controller)."""

    exit_code = EXIT_BAD_INPUT  # run it as root / install iproute2: the invocation, not the testbed, is wrong
