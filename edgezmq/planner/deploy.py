"""The deployable plan: what ``edgezmq plan -o PLAN.yaml`` writes for the bootstrapper.

    model: {name, granularity, microbatch, dtype, checkpoint, kwargs}
    nodes: {device: control address}        # only devices that have one in the problem
    stages: [{units: [a, b], nodes: [device, ...], encoding: [ladder], link_mbps: R}, ...]
                                            # encoding: only on encoded links (encoded.ladders);
                                            # link_mbps: the slowest pair of the outgoing link
    predicted: {bottleneck_s, throughput_per_s, latency_s, window}  # window: Plan.window
    input_encoding: int8                    # how the client sends its inputs: only when not raw
    results: tcp://...                      # only when given
"""

from __future__ import annotations

from typing import Any

from .encoded import ladders
from .plan import Plan
from .problem import CLIENT, RAW, PlanError, Problem

__all__ = ["deployable"]


def deployable(problem: Problem, plan: Plan, *, checkpoint: str | None = None,
               results: str | None = None, max_error: float | None = None,
               min_agreement: float | None = None) -> dict[str, Any]:
    """The deploy-plan dict of a feasible plan (``PlanError`` if it overruns memory);
    ``max_error``, ``min_agreement``: the budgets the plan was solved under (its encoding
    ladders stay within them)."""
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
        "stages": [{"units": list(s.units), "nodes": list(s.devices), **({"encoding": ladder} if ladder else {}),
                    "link_mbps": link_mbps(problem, s.devices, nxt.devices if nxt is not None else (CLIENT,))}
                   for s, nxt, ladder in zip(plan.stages, [*plan.stages[1:], None], ladders(problem, plan, max_error, min_agreement))],
        "predicted": {"bottleneck_s": plan.bottleneck_s, "throughput_per_s": plan.throughput_per_s,
                      "latency_s": plan.latency_s, "window": plan.window},
    }
    if plan.stages[0].input_encoding != RAW:
        out["input_encoding"] = plan.stages[0].input_encoding
    if results is not None:
        out["results"] = results
    return out


def link_mbps(problem: Problem, src: tuple[str, ...] | list[str], dst: tuple[str, ...] | list[str]) -> float:
    """The rate one connection of a stage's outgoing link gets, Mbit/s: its slowest pair, capped
    by the sender's NIC up and the receiver's NIC down (the node sizes its send buffer from it)."""
    return min(min(problem.link(a, b).mbps, problem.nic(a).up_mbps, problem.nic(b).down_mbps)
               for a in src for b in dst)
