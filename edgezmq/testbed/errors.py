"""Testbed errors: a failed operation, and a missing prerequisite (root, iproute2, cgroups)."""

from __future__ import annotations


class TestbedError(RuntimeError):
    """A testbed operation failed; the message names the command or file and what it said."""

    __test__ = False  # not a pytest test class


class PrerequisiteError(TestbedError):
    """This machine or user cannot run a testbed (not root, no `ip`/`tc`, no cgroup controller)."""
