"""Names the pure planner and the runtime share, defined once here and free of dependencies.

The planner imports nothing of the runtime (no torch, no ZeroMQ), yet it reads the same
words as the model code and the orchestrator; those words live here so that both import
one definition.
"""

from __future__ import annotations

__all__ = ["CLIENT", "GRANULARITIES"]

# The client's (and bootstrapper's) name in link tables: planner problems, cluster
# inventories, testbed configs, traces. Reserved: no device or node may be called so.
CLIENT = "client"

# How finely a model is cut into units (edgezmq.model.chain): one unit per transformer
# block, per half block (attention | MLP), or per sub-layer.
GRANULARITIES = ("block", "half", "sublayer")
