"""The deployable plan: what ``edgezmq plan -o PLAN.yaml`` writes for the bootstrapper.

    model: {name, granularity, microbatch, dtype, checkpoint, kwargs}
    nodes: {device: control address}        # only devices that have one in the problem
    stages: [{units: [a, b], nodes: [device, ...], encoding: [ladder]}, ...]   # encoding: only
                                            # on encoded links (encoded.ladders)
    predicted: {bottleneck_s, throughput_per_s, latency_s, window}  # window: Plan.window
    results: tcp://...                      # only when given
"""

from __future__ import annotations

from typing import Any

from .encoded import ladders
from .plan import Plan
from .problem import PlanError, Problem

__all__ = ["deployable"]


def deployable(problem: Problem, plan: Plan, *, checkpoint: str | None = None,
               results: str | None = None, max_error: float | None = None) -> dict[str, Any]:
    """The deploy-plan dict of a feasible plan (``PlanError`` if it overruns memory);
    ``max_error``: the budget the plan was solved under (its encoding ladders stay within it)."""
    if not plan.feasible:
        raise PlanError("the plan does not fit the devices' memory: " + "; ".join(plan.violations))
    m = problem.model
    model: dict[str, Any] = {"name": m.name}
    if m.granularity is not None:
        model["granularity"] = m.granularity
    model.update({"microbatch": m.microbatch, "dtype": m.dtype,
                  "checkpoint": checkpoint if checkpoint is not None else m.checkpoint,
                  "kwargs": dict(m.kwargs)})
    used = {d for s in plan.stages for d in s.devices}
    out: dict[str, Any] = {
        "model": model,
        "nodes": {d.name: d.control for d in problem.devices if d.control and d.name in used},
        "stages": [{"units": list(s.units), "nodes": list(s.devices), **({"encoding": ladder} if ladder else {})}
                   for s, ladder in zip(plan.stages, ladders(problem, plan, max_error))],
        "predicted": {"bottleneck_s": plan.bottleneck_s, "throughput_per_s": plan.throughput_per_s,
                      "latency_s": plan.latency_s, "window": plan.window},
    }
    if results is not None:
        out["results"] = results
    return out
