"""Shared fixtures: a ZeroMQ context that fails the test if sockets are left open."""

from __future__ import annotations

import os

import pytest
import zmq

RECV_TIMEOUT_MS = 10_000  # every receive in the tests is bounded

# Keep the test checkpoints apart from the user's cache, but reuse them across runs.
os.environ.setdefault("EDGEZMQ_CACHE", os.path.join(os.path.dirname(__file__), "..", ".cache", "edgezmq"))


@pytest.fixture(scope="session")
def node_pool(tmp_path_factory):
    """Four idle node processes (node0..node3, threads 1) shared by every test that only needs
    idle nodes: ``with node_pool.take(n) as local`` (helpers.NodePool).  Started as tests need them."""
    from helpers import NodePool

    pool = NodePool(4, tmp_path_factory.mktemp("node-pool"))
    try:
        yield pool
    finally:
        pool.stop()


@pytest.fixture(scope="session", autouse=True)
def quick_job_polls():
    """Deploying from an inventory waits for each node job (profile, link probe) by polling it:
    every 0.2 s made each of a deployment's ~20 sequential waits up to 0.2 s late. The tests wait
    on the same events, polled every 0.02 s (the node answers a poll in well under a millisecond)."""
    from edgezmq.orchestrate import autodeploy

    mp = pytest.MonkeyPatch()
    mp.setattr(autodeploy, "JOB_POLL_S", 0.02)
    yield
    mp.undo()


@pytest.fixture
def ctx():
    c = zmq.Context()
    yield c
    # closing with linger 0 first: ctx.term() hangs while any socket is open
    leftover = [s for s in list(getattr(c, "_sockets", []) or []) if not s.closed]
    for s in leftover:
        s.close(linger=0)
    c.term()
    assert not leftover, f"{len(leftover)} socket(s) left open"


@pytest.fixture
def socks(ctx):
    """A factory: socks(zmq.PUSH) -> socket, closed at teardown with linger 0."""
    made = []

    def make(kind):
        s = ctx.socket(kind)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.RCVTIMEO, RECV_TIMEOUT_MS)
        s.setsockopt(zmq.SNDTIMEO, RECV_TIMEOUT_MS)
        made.append(s)
        return s

    yield make
    for s in made:
        s.close(linger=0)
