"""edgezmq: pipeline-parallel inference of vision transformers across edge devices over ZeroMQ.

The public API (everything else is internal and may change)::

    import edgezmq

    plan = edgezmq.load_plan("plans/my-plan.yaml")     # or: plan a cluster inventory
    edgezmq.deploy(plan)                                #   edgezmq.autodeploy(edgezmq.load_cluster(...), spec)
                                                        #   (budget=edgezmq.Budget(max_error=0.01): may compress)
    with edgezmq.Client.from_plan(plan) as c:
        for y in c.stream(edgezmq.split(images, plan.model.microbatch)):
            ...
    edgezmq.unload(plan)

Every error edgezmq raises on purpose is an :class:`EdgezmqError` (mixed with the builtin
callers expect, e.g. ``ValueError`` for a bad file). Names other than the error root are
imported on first use, so ``import edgezmq`` (and ``import edgezmq.planner``, which must
stay free of the runtime) loads neither zmq nor the model code.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from edgezmq.errors import EdgezmqError

__version__ = "0.1.0"

# public name -> the module that defines it
_LAZY = {
    "load_plan": "edgezmq.orchestrate.planfile",
    "ModelSpec": "edgezmq.orchestrate.planfile",
    "deploy": "edgezmq.orchestrate.deploy",
    "unload": "edgezmq.orchestrate.deploy",
    "load_cluster": "edgezmq.orchestrate.inventory",
    "autodeploy": "edgezmq.orchestrate.autodeploy",
    "Budget": "edgezmq.orchestrate.autodeploy",
    "ResilientPipeline": "edgezmq.orchestrate.failover",
    "LocalCluster": "edgezmq.orchestrate.local",
    "Client": "edgezmq.client",
    "split": "edgezmq.client",
    "Node": "edgezmq.node.daemon",
    "load_problem": "edgezmq.planner",
    "solve": "edgezmq.planner",
}

__all__ = [  # pinned by tests/test_public_api.py
    "EdgezmqError", "__version__",
    "load_plan", "ModelSpec", "deploy", "unload",
    "load_cluster", "autodeploy", "ResilientPipeline", "LocalCluster",
    "Budget",
    "Client", "split",
    "Node",
    "load_problem", "solve",
]

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time __getattr__ imports on first use
    from edgezmq.client import Client, split
    from edgezmq.node.daemon import Node
    from edgezmq.orchestrate.autodeploy import Budget, autodeploy
    from edgezmq.orchestrate.deploy import deploy, unload
    from edgezmq.orchestrate.failover import ResilientPipeline
    from edgezmq.orchestrate.inventory import load_cluster
    from edgezmq.orchestrate.local import LocalCluster
    from edgezmq.orchestrate.planfile import ModelSpec, load_plan
    from edgezmq.planner import load_problem, solve


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'edgezmq' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value  # the next access skips __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
