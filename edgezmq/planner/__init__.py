"""Plan a pipeline: which devices run which units, replicated how, for the most throughput.

Pure functions (no sockets, no torch): parse a problem, price plans, solve exactly.

    >>> from edgezmq.planner import load_problem, solve, evaluate, baseline, deployable
    >>> problem = load_problem("plans/edgepipe-vit-large-half.problem.yaml")
    >>> plan = solve(problem, time_limit_s=10)
    >>> plan.bottleneck_s, plan.optimal, plan.lower_bound_s, plan.gap
    >>> print(plan.table(problem))
    >>> baseline(problem, "pipeedge").bottleneck_s       # priced by the same cost model
    >>> evaluate(problem, [((0, 20), ["rcc-1"]), ((20, 50), ["rcc-2", "rcc-3"])])
    >>> deployable(problem, plan)                        # the dict `edgezmq plan -o` writes

The cost model is cost.py's docstring; the problem format and the algorithm are in
docs/planner.md. Modules: problem (parse, validate), cost (evaluate), plan (results),
classes/bounds/search (the exact solver's internals), solver (solve), encoded (the solve
with each cut's encoding a decision, ``solve(problem, max_error=E)``), baselines,
deploy (deployable plan), cli (`edgezmq plan`).
"""

from .baselines import BASELINES, baseline
from .cli import add_cli
from .cost import evaluate
from .deploy import deployable
from .plan import LinkCost, Plan, Stage, StageCost
from .problem import (
    Device,
    DeviceType,
    Link,
    ModelChain,
    Options,
    PlanError,
    Problem,
    Unit,
    load_problem,
)
from .solver import solve

__all__ = [
    "Problem", "Plan", "Stage", "StageCost", "LinkCost", "PlanError", "Unit", "DeviceType", "Device",
    "Link", "ModelChain", "Options", "solve", "evaluate", "baseline", "BASELINES", "load_problem",
    "deployable", "add_cli",
]
