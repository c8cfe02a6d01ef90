"""``solve(problem)``: the throughput-optimal plan, with a certificate when it is not proven.

Strategy (docs/planner.md has the why):
1. Check that every unit fits some device and the model fits them all (clear errors).
2. Incumbent: depth-first probes on the *pessimistic* merged model (classes.py: few
   classes, links taken worst, so its plans cost no more in reality than there).
3. A* on that model: its optimum, and the proof itself when the model is exact.
4. Otherwise the proof: A* on the *optimistic* merged model (nothing below the incumbent
   proves it optimal, else its optimum is a lower bound), then on the exact twin-class
   model when that is small enough.
5. At the optimal bottleneck, the least latency, then the fewest devices.
With ``max_error`` and a problem that lists encodings, the encoding of each cut is a
decision too: encoded.py (it starts from this solve's raw optimum).
Clusters without class structure (more device profiles than MAX_MIX) go to the device
search instead (parametric.py: bisection on the bottleneck with an exact decision search).
Both start from a greedy plan (anytime).

Limits: the search effort (nodes expanded, shared by every search of the solve; phases
get shares of it) is the primary limit and is the same on every machine; the wall-clock
limit is a safety net. If a limit hits first, the best plan is returned with ``optimal =
False`` and the largest proven lower bound (``lower_bound_s``, ``gap``);
``stats["stopped_by"]`` says "proven", "effort" or "time" (only then can the answer
depend on the machine), ``stats["history"]`` records how the bounds moved.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import time

import numpy as np

from .bounds import Bounds
from .classes import (
    ClassModel,
    DeviceArrays,
    compute_groups,
    device_arrays,
    exact_model,
    memory_table,
    merged_model,
)
from .cost import evaluate, stage_memory_bytes
from .lagrange import Basis, ascend, certifies, farkas_prices
from .parametric import (
    GREEDY_RULES,
    Level,
    Memo,
    Tables,
    first_plan,
    greedy,
    greedy_replicated,
    lower_bound,
    stages_at,
)
from .plan import Plan, Stage, format_bytes
from .problem import PlanError, Problem
from .search import BudgetExceeded, Effort, Result, Search, Timeout

__all__ = ["solve", "solve_arrays", "optimise_model", "plan_stages", "check_memory", "DEFAULT_EFFORT",
           "ENGINES"]

DEFAULT_TIME_LIMIT_S = 60.0     # wall-clock safety net
# search nodes a solve may expand (the deterministic limit): ~10-40 s of CPU on a 2-vCPU VM,
# so that the default time limit rarely decides
DEFAULT_EFFORT = 400_000
ENGINES = ("auto", "classes", "devices")
GREEDY_STEPS = 12               # bisection steps of the greedy first plan
GREEDY_LADDER_STEP = 0.01       # replicated greedy: then bounds this much lower in turn ...
GREEDY_LADDER_MISSES = 4        # ... until it fails this many times in a row
BISECT_STOP = 1e-3              # device search: below this relative gap, try to prove the incumbent
SLICE_SHARE = 0.25              # ... each decision search gets this share of the effort left
MIN_SLICE = 2_000               # ... and at least this many nodes
PRICED_SLICE_SHARE = 0.5        # ... or this share after the LP (its bound is near: fewer, harder steps)
LADDER_START = BISECT_STOP / 2  # ... after the LP: B = bound + this x incumbent (a plan found there closes), doubling
NO_REPLICATION_SHARE = 0.3      # ... with replication: the share for plans without it first
LP_SHARE = 0.35                 # ... then the configuration LP's bisection (prices) at most this share
LP_STOP = 2e-4                  # ... down to this relative width
STRETCH_STEPS = 6               # ... certifying prices are tried this many bisection steps higher
STRETCH_ASCENT = 10             # ... and, after an LP that tailed off, subgradient steps from them
MAX_PRICES = 3                  # ... and the decision searches prune with its last this many prices
CHEAP_SLICE = 500               # ... after a cheap (one closed set per stage size) search of this many
PROBE_BUDGET = 1000             # expansions per depth-first probe
PROBE_LADDER = (1.1, 1.5, 3.0, math.inf)   # first probes, as multiples of the lower bound
MAX_PROBES = 12
PROBE_TOLERANCE = 1e-3          # stop probing once incumbent and probe floor are this close
# deadlines, as shares of the time limit: incumbent probes, the pessimistic model's A* when
# it is not exact, all bottleneck search; the latency search gets at most LATENCY_SHARE
PROBE_SHARE, PESSIMISTIC_SHARE, PHASE1_SHARE, LATENCY_SHARE = 0.25, 0.4, 0.8, 0.2
TIE_RTOL = 1e-9                 # bottlenecks within this relative distance are equal
# Exact search over twin classes only when the root has at most this many (class set,
# replica count) moves; above it the merged models are searched and carry a proven bound.
MAX_EXACT_CLASSES = 12
MAX_EXACT_BRANCHING = 3000
MAX_MIX = 10                    # merged models with more classes than this are searched
RESTRICTED_MIX = 2              # ... with stages of at most this many classes (no proofs)


def check_memory(problem: Problem) -> None:
    """Raise ``PlanError`` when a unit fits no device in any stage, or the parameters fit nowhere."""
    devices = problem.devices
    best = max(devices, key=lambda d: d.capacity_bytes)
    arr = device_arrays(problem)
    cut = (float(arr.input_bytes), *arr.out_bytes.tolist())
    table = memory_table(arr.param_bytes, arr.work_bytes, cut, arr.buffers)
    # the buffers depend on where the stage is cut: the unit's cheapest stage decides:
    # least[i] = min over stages [a, b) holding unit i (a <= i < b) of table[a, b], in
    # O(n^2): each row's suffix minima, then their running minimum over rows a <= i
    running = np.full(table.shape[1], np.inf)
    least = []
    for i in range(len(problem.units)):
        running = np.minimum(running, np.minimum.accumulate(table[i, ::-1])[::-1])
        least.append(float(running[i + 1]))
    for i, u in enumerate(problem.units):
        need = least[i]
        if not any(need + d.reserved_bytes <= d.memory_bytes for d in devices):
            alone = stage_memory_bytes(problem, i, i + 1)
            raise PlanError(
                f"unit {i} ({u.name}) needs {format_bytes(need)} in any stage holding it (alone: "
                f"parameters {format_bytes(u.param_bytes)}{f', caches {format_bytes(u.cache_bytes)}' if u.cache_bytes else ''}, work {format_bytes(u.work_bytes)}, "
                f"{problem.options.buffers} buffers each way = {format_bytes(alone)}), the largest device "
                f"has {format_bytes(best.capacity_bytes)} ({best.name}: {format_bytes(best.memory_bytes)} "
                f"minus {format_bytes(best.reserved_bytes)} reserved)")
    total = sum(u.resident_bytes for u in problem.units)
    offered = sum(max(d.capacity_bytes, 0) for d in devices)
    if total > offered:
        what = "parameters and caches" if any(u.cache_bytes for u in problem.units) else "parameters"
        raise PlanError(f"the model's {what} need {format_bytes(total)}, all {len(devices)} devices "
                        f"together offer {format_bytes(offered)} after reserved memory")


def plan_stages(cm: ClassModel, result: Result, names: list[str]) -> list[Stage]:
    """Concrete stages of a class-level plan: each class's devices taken in file order."""
    pools = [list(m) for m in cm.members]
    stages = []
    for mv in result.moves:
        devs: list[str] = []
        for k, c in enumerate(mv.counts):
            devs.extend(names[d] for d in pools[k][:c])
            del pools[k][:c]
        stages.append(Stage((mv.a, mv.b), tuple(sorted(devs, key=names.index))))
    return stages


@dataclasses.dataclass(frozen=True)
class Mark:
    """Where a phase ends: a node count of the solve's effort, and a wall-clock deadline."""

    nodes: float
    deadline: float

    def apply(self, effort: Effort) -> None:
        effort.stop, effort.deadline = self.nodes, self.deadline


def _incumbent(search: Search, lower: float, soft: Mark,
               hard: Mark | None = None) -> tuple[Result | None, float]:
    """A plan by depth-first probes at growing bounds (until ``hard`` if none is found
    sooner), then tightened by bisection until ``soft``. Cheap probes (few class mixes)
    go first; full probes only if they find nothing.

    Returns (best plan or None, proven floor): a full probe that exhausts its space proves
    its bound infeasible *for this model*; the caller decides whether that binds reality.
    """
    effort = search.effort
    (hard or soft).apply(effort)
    best, floor = None, lower
    for cheap in (True, False):
        for factor in PROBE_LADDER:
            try:
                best = search.probe(lower * factor if lower > 0 else math.inf, PROBE_BUDGET, cheap)
            except BudgetExceeded:
                continue
            except Timeout:
                return None, floor
            if best is not None:
                break
            if not cheap:
                floor = max(floor, lower * factor)
        if best is not None:
            break
    if best is None:
        return None, floor
    lo = floor
    for i in range(MAX_PROBES):
        hi = best.bottleneck
        now = time.monotonic()
        if hi <= 0 or (hi - lo) / hi <= PROBE_TOLERANCE or now > soft.deadline or effort.spent >= soft.nodes:
            break
        mid = (lo + hi) / 2
        left = MAX_PROBES - i       # a fair slice each
        effort.stop = effort.spent + (soft.nodes - effort.spent) / left
        effort.deadline = now + (soft.deadline - now) / left
        try:
            found = search.probe(mid, math.inf, cheap=True)
        except Timeout:
            found = None
        if found is None:
            lo = mid        # not a proof (cheap probe, or out of time): where to look next
        else:
            best = found
    return best, floor


def optimise_model(cm: ClassModel, time_limit_s: float, effort: int = DEFAULT_EFFORT) -> Result | None:
    """The optimal plan of a class model by its own costs (or the best found within the
    effort and time limits); None when it has none. The baselines use it on their
    simplified models."""
    end = Mark(effort, time.monotonic() + time_limit_s)
    search = Search(cm, effort=Effort())
    best, _ = _incumbent(search, search.bounds.capacity(0, cm.counts), end)
    end.apply(search.effort)
    try:
        better = search.astar(best.bottleneck if best else math.inf)
    except Timeout:
        return best
    return better or best


def solve(problem: Problem, *, time_limit_s: float = DEFAULT_TIME_LIMIT_S, gap: float = 0.0,
          replication: bool | None = None, effort: int = DEFAULT_EFFORT, engine: str = "auto",
          max_error: float | None = None, min_agreement: float | None = None) -> Plan:
    """The plan of least bottleneck (then latency, then devices) for ``problem``.

    ``gap``: stop once the plan is proven within this relative distance of optimal (0:
    prove optimality). ``effort``: search nodes at most (the limit that keeps answers the
    same on every machine); ``time_limit_s``: the wall-clock safety net. ``replication``
    overrides the problem's option. ``engine``: "auto" (class search when devices fall
    into few kinds, else device search), or force "classes" / "devices". ``Plan.optimal``
    is true only when minimality was proven. ``max_error``: the budget of the problem's
    encodings (their errors at the used cuts, summed; encoded.py); None (the default) or a
    problem without encodings: every link raw, as before. ``min_agreement``: top-1
    agreement with fp32 in percent, at least; the used cuts' measured disagreements
    (percent) must sum to at most 100 - it (the union bound, encoded.py). Both may be given.
    Encodings measured on the client's input (``model.encodings.E.input``) make the input's
    encoding a decision too (``Stage.input_encoding`` of the first stage; encoded.py).
    """
    if replication is not None and replication != problem.options.replication:
        problem = dataclasses.replace(problem, options=dataclasses.replace(problem.options,
                                                                           replication=replication))
    if (max_error is not None or min_agreement is not None) and problem.encodings:
        from .encoded import (  # deferred: they call back into solve
            solve_encoded,
            solve_input_encodings,
        )
        if problem.input_encodings:  # the client's input encoding first: one solve per choice
            return solve_input_encodings(problem, max_error, time_limit_s=time_limit_s, gap=gap, effort=effort,
                                         engine=engine, solve=solve, min_agreement=min_agreement)
        return solve_encoded(problem, max_error, time_limit_s=time_limit_s, gap=gap, effort=effort,
                             engine=engine, solve=solve, min_agreement=min_agreement)
    return solve_arrays(problem, device_arrays(problem), time_limit_s=time_limit_s, gap=gap, effort=effort,
                        engine=engine)


class _Run:
    """One solve: the models, the best real plan so far, the proven floor, the clock."""

    def __init__(self, problem: Problem, arr: DeviceArrays, time_limit_s: float, gap: float,
                 method: str, t0: float, effort: int) -> None:
        self.problem, self.arr, self.gap, self.method = problem, arr, gap, method
        self.t0 = t0
        self.limit = time_limit_s
        self.max_effort = effort
        self.effort = Effort()
        self.names = [d.name for d in problem.devices]
        self.plan: Plan | None = None
        self.lower = 0.0
        self.proven = False
        # (elapsed s, upper bound or None before the first plan, lower bound, nodes spent)
        self.history: list[tuple[float, float | None, float, int]] = []
        self.stats: dict[str, object] = {"history": self.history}

    @functools.cached_property
    def exact(self) -> ClassModel:
        cm = exact_model(self.arr)
        self.stats["classes"] = cm.num_classes
        return cm

    @functools.cached_property
    def pess(self) -> ClassModel:
        cm = merged_model(self.arr, "pessimistic")
        self.stats["merged_classes"] = cm.num_classes
        return cm

    @property
    def split(self) -> bool:
        """Whether the merged model is coarser than the exact one (it *is* the exact one when
        every group has at most two twin classes)."""
        return self.exact.num_classes != self.pess.num_classes

    def _log(self) -> None:
        ub = self.ub()
        entry = (round(time.monotonic() - self.t0, 4), ub if math.isfinite(ub) else None, float(self.lower),
                 self.effort.spent)
        if not self.history or self.history[-1][1:3] != entry[1:3]:
            self.history.append(entry)

    def at(self, share: float) -> Mark:
        """Where a phase ending at this share of the limits ends."""
        return Mark(self.max_effort * share, self.t0 + self.limit * share)

    def stopped(self, t: Timeout) -> None:
        """Note a search stopped by a limit (the first "time" makes the answer machine-dependent)."""
        self.stats["timed_out"] = True
        if self.stats.get("stopped_by") != "time":
            self.stats["stopped_by"] = t.by

    def consider_stages(self, stages: list[Stage]) -> None:
        """Take a plan given by its stages if it is the best so far (it must fit memory)."""
        plan = evaluate(self.problem, stages, method=self.method)
        if plan.violations:
            raise AssertionError(f"solver produced an infeasible plan: {plan.violations}")
        if self.plan is None or plan.bottleneck_s < self.plan.bottleneck_s:
            self.plan = plan
            self._log()

    def ub(self) -> float:
        return self.plan.bottleneck_s if self.plan else math.inf

    def consider(self, cm: ClassModel, res: Result | None, *, relaxed: bool = False) -> None:
        """Take the realisation of ``res`` (a plan of model ``cm``) if it is the best so far.
        A relaxed model's plan (``relaxed``: each merged class has its best member's memory)
        may not fit the real devices it is realised on: it is then skipped."""
        if res is None:
            return
        stages = plan_stages(cm, res, self.names)
        if relaxed and evaluate(self.problem, stages).violations:
            return
        # cannot fail otherwise: exact and pessimistic models check memory per class as it is
        self.consider_stages(stages)

    def raise_floor(self, x: float) -> None:
        if x > self.lower:
            self.lower = x
            self._log()

    def done(self) -> bool:
        if self.proven:
            return True
        if self.plan is None:
            return False
        ub = self.plan.bottleneck_s
        return ub <= 0 or (ub - self.lower) / ub <= max(self.gap, TIE_RTOL)

    def no_plan(self) -> PlanError:
        return PlanError(_no_plan_message(self.problem, self.arr))


def solve_arrays(problem: Problem, arr: DeviceArrays, *, time_limit_s: float = DEFAULT_TIME_LIMIT_S,
                 gap: float = 0.0, method: str = "solve", effort: int = DEFAULT_EFFORT,
                 engine: str = "auto") -> Plan:
    """``solve`` on the problem's numbers as given in ``arr``; the returned plan is costed by
    ``evaluate`` on the real ``problem``."""
    t0 = time.monotonic()  # the time limit counts from here: every step of the solve is in it
    if engine not in ENGINES:
        raise PlanError(f"engine: expected one of {', '.join(ENGINES)}, got {engine!r}")
    check_memory(problem)
    run = _Run(problem, arr, time_limit_s, gap, method, t0, effort)
    tables = Tables(arr)
    run.raise_floor(tables.floor)
    # anytime: a greedy plan first (milliseconds, any size), tightened by bisection
    _greedy(run, tables)
    many = len(compute_groups(arr)) > MAX_MIX
    if engine == "devices" or (engine == "auto" and many and tables.small):
        run.stats["engine"] = "devices"
        _devices(run, tables)
    else:
        run.stats["engine"] = "classes"
        _classes(run)
    if run.plan is None:
        raise PlanError(f"no plan found within the limits ({effort} nodes, {time_limit_s:g} s; "
                        f"lower bound {run.lower:.4g} s); raise them")
    if not run.proven and run.done() and gap == 0:
        run.proven = True               # upper and lower bound meet (within TIE_RTOL)
    plan = run.plan
    plan.optimal = run.proven
    if run.proven:
        run.raise_floor(plan.bottleneck_s)
    plan.lower_bound_s = plan.bottleneck_s if run.proven else min(run.lower, plan.bottleneck_s)
    if run.done():
        run.stats["stopped_by"] = "proven"   # what was asked (optimal, or within gap) is proven
    else:
        run.stats["stopped_by"] = "time" if run.effort.timed else "effort"
    # the device search has no latency search of its own: its plan stands (latency_optimal false)
    if run.proven and run.stats["engine"] == "classes":
        plan = _least_latency(run, plan)
    plan.method = method
    run.stats["effort"] = run.effort.spent
    run.stats["solve_time_s"] = round(time.monotonic() - run.t0, 4)
    plan.stats = run.stats
    return plan


def _greedy(run: _Run, tables: Tables) -> None:
    """The greedy first plan (parametric.py), then the least bound it still meets by bisection."""
    found = first_plan(tables, run.lower)
    if found is None:
        return
    run.consider_stages(_device_stages(run, found))
    lo, hi = run.lower, run.ub()
    for _ in range(GREEDY_STEPS):
        if hi <= 0 or (hi - lo) / hi <= PROBE_TOLERANCE:
            break
        mid = (lo + hi) / 2
        found = greedy(tables, mid)
        if found is None:
            lo = mid                    # greedy is no decision procedure: this proves nothing
        else:
            run.consider_stages(_device_stages(run, found))
            hi = run.ub()


def _greedy_replicated(run: _Run, tables: Tables) -> None:
    """With replication: the replicated greedy (parametric.py), each of its rules bisected
    between the proven bound and the incumbent, then tried on a ladder just below its best
    (it is not monotone in the bound); far better than plans without replicas on large
    clusters."""
    for rule in GREEDY_RULES:
        lo, hi = run.lower, run.ub()
        for _ in range(GREEDY_STEPS):
            if not math.isfinite(hi) or hi <= 0 or (hi - lo) / hi <= PROBE_TOLERANCE:
                break
            mid = (lo + hi) / 2
            found = greedy_replicated(tables, mid, rule)
            if found is None:
                lo = mid                # no decision procedure: this proves nothing
            else:
                run.consider_stages(_device_stages(run, found))
                hi = run.ub()
        misses, x = 0, run.ub()
        while misses < GREEDY_LADDER_MISSES and math.isfinite(x) and x > run.lower:
            x *= 1 - GREEDY_LADDER_STEP
            found = greedy_replicated(tables, x, rule)
            if found is None:
                misses += 1
            else:
                run.consider_stages(_device_stages(run, found))
                misses, x = 0, min(x, run.ub())


def _device_stages(run: _Run, steps: list[tuple[int, int, tuple[int, ...]]] | tuple) -> list[Stage]:
    return [Stage((a, b), tuple(run.names[d] for d in sorted(devs))) for a, b, devs in steps]


def _devices(run: _Run, tables: Tables) -> None:
    """Bisection on the bottleneck with the device search's decision procedure (parametric.py).

    With replication, the plans without it come first (a restriction: its plans are real,
    its failures prove nothing; it is much smaller and often within a few % of the optimum),
    on NO_REPLICATION_SHARE of the effort.
    """
    effort = run.effort
    end = run.at(1.0)               # no latency search follows (module doc): all of the limits
    end.apply(effort)
    if tables.eff is None:
        run.stats["bound"] = "capacity only: too many units x devices for the device search"
        return
    run.raise_floor(lower_bound(tables, run.lower, run.ub() if run.plan else _big(tables), effort))
    if tables.replication:
        _greedy_replicated(run, tables)
    prices: list[np.ndarray] = []
    hint: dict = {}
    climb = False
    try:
        if tables.replication:
            single = copy.copy(tables)
            single.replication = False
            # skipped when the root bounds already show no such plan beats the incumbent
            if Level(single, run.ub() * (1 - TIE_RTOL / 2)).possible():
                _bisect(run, single, run.at(PHASE1_SHARE * NO_REPLICATION_SHARE), proofs=False)
            start = effort.spent
            prices, hint, lp_hi = _lp_bound(run, tables, Mark(min(end.nodes, start + run.max_effort * LP_SHARE),
                                                              end.deadline))
            climb = lp_hi - run.lower <= BISECT_STOP * run.ub()     # the LP's bound is (near) its optimum
            run.stats["lp_effort"] = effort.spent - start
            end.apply(effort)
        _bisect(run, tables, end, proofs=True, prices=prices, hint=hint, climb=climb)
    except Timeout as t:
        run.stopped(t)


def _lp_bound(run: _Run, tables: Tables, end: Mark) -> tuple[list[np.ndarray], dict, float]:
    """Bisection on the configuration LP (lagrange.py) between the proven bound and the
    incumbent: every B whose LP is infeasible, with prices that certify it, is a proven
    lower bound. Returns the certifying prices, highest B first (the decision searches
    prune with them), and the hint: the stages of the last feasible LP's solution with
    their values, by (a, b, devices) and by (a, b) (the decision searches try them first),
    and the least B where the LP was found feasible (the incumbent's if none).
    Stops at LP_STOP, the gap, or ``end`` (raises ``Timeout`` by time)."""
    effort = run.effort
    end.apply(effort)
    eff = tables.eff
    assert eff is not None
    found: list[np.ndarray] = []
    pool: list = []
    warm = Basis()          # each LP starts from the last one's basis
    hint: dict = {}
    hi = run.ub()
    while not run.done() and math.isfinite(hi) and hi - run.lower > LP_STOP * hi:
        mid = (run.lower + hi) / 2
        st = stages_at(tables, mid)
        primal: list = []
        try:
            overuse, mu, pool = farkas_prices(st, effort, pool, primal=primal, warm=warm)
        except Timeout as t:
            if t.by == "time":
                raise
            break
        if certifies(st, mu):
            # the same prices often certify well above mid: stretch them (no LP needed);
            # where they do not, after an LP that tailed off (its prices came from the
            # ascent), a few subgradient steps from them often find ones that do
            lo, top = mid, hi
            stopped: Timeout | None = None
            for _ in range(STRETCH_STEPS):
                x = (lo + top) / 2
                try:
                    effort.tick()
                    stx = stages_at(tables, x)
                    better = mu if certifies(stx, mu) else ascend(stx, mu, overuse, effort, STRETCH_ASCENT) if warm.ascended else None
                except Timeout as t:
                    stopped = t
                    break
                if better is not None:
                    lo, mu = x, better
                else:
                    top = x
            run.raise_floor(lo)
            found.insert(0, mu)
            if stopped is not None:
                if stopped.by == "time":
                    raise stopped
                break
        else:
            # the LP is feasible wherever its solution's stages are: at their largest cost
            # (only where the next LP goes: no proof rests on it)
            hi = min(mid, max((max(float(eff[d, a, b]) for d in R) / len(R) for (a, b, R), _ in primal),
                              default=mid))
            hint = {}
            for (a, b, R), x in primal:
                hint[(a, b, R)] = hint.get((a, b, R), 0.0) + x
                hint[(a, b)] = hint.get((a, b), 0.0) + x
    return found[:MAX_PRICES], hint, hi


def _bisect(run: _Run, tables: Tables, end: Mark, *, proofs: bool, prices: list[np.ndarray] | tuple = (),
            hint: dict | None = None, climb: bool = False) -> None:
    """Every exhausted exact decision search at B proves B infeasible (a lower bound, when
    ``proofs``); every plan found is an incumbent. A cheap search (one closed device set per
    stage size) is tried first at each B; an exact search that runs out of its slice leaves
    B open, and the next B is nearer the proven bound (``proofs`` with replication: the
    replicated greedy and the cheap searches find the plans, only exact searches prove)
    or else nearer the incumbent. ``climb`` (the LP's bound is near its optimum): B climbs
    from the bound instead (LADDER_START x incumbent above it, doubling), with larger
    slices. Every exact search starts from the failures of the nearest exact search at a
    B above it (they hold below: docs/planner.md, "Failures carry down"). Returns when
    the gap closes, the open interval above the bound is within BISECT_STOP (with
    ``climb``: nearly empty), or ``end`` is reached (raises ``Timeout`` if by time)."""
    effort = run.effort
    probe_lo = run.lower
    hi_open = math.inf          # with proofs: the least B whose exact search ran out
    ladder = LADDER_START
    memos: list[tuple[float, Memo]] = []    # (B, failed states of exact searches at B or above)
    while not run.done() and run.plan is not None and effort.spent < end.nodes:
        ub = run.ub()
        close = (ub - probe_lo) / ub <= BISECT_STOP
        top = min(ub, hi_open)
        if not close and top - probe_lo <= BISECT_STOP * ub * (LADDER_START if climb else 1.0):
            return                  # every B left between the bound and the open one is too hard
        target = ub * (1 - TIE_RTOL / 2) if close else (probe_lo + top) / 2
        if climb and not close:
            # the LP's bound is near the optimum: climb from it (priced searches near their
            # prices' B prune the most, and each one exhausted is a proof)
            target = min(target, probe_lo + ladder * ub)
            ladder *= 2
        if not close:
            effort.stop = min(end.nodes, effort.spent + CHEAP_SLICE)
            try:
                found = Level(tables, target, exact=False, prices=prices, hint=hint).search(effort)
            except Timeout as t:
                if t.by == "time":
                    raise
                found = None
            if found is not None:
                run.consider_stages(_device_stages(run, found.stages))
                continue
        left = end.nodes - effort.spent
        share = PRICED_SLICE_SHARE if climb else SLICE_SHARE
        effort.stop = end.nodes if close else min(end.nodes, effort.spent + max(MIN_SLICE, left * share))
        # the failures of an exact search at B hold at every lower B: start from the nearest
        above = [(b, m) for b, m in memos if b >= target]
        memo: Memo = {k: list(v) for k, v in min(above, key=lambda bm: bm[0])[1].items()} if above else {}
        memos.append((target, memo))
        try:
            found = Level(tables, target, prices=prices, hint=hint).search(effort, memo=memo)
        except Timeout as t:
            if t.by == "time":
                raise
            if close or effort.spent >= end.nodes:
                return
            if proofs and tables.replication:
                hi_open = target    # open: look for a proof nearer the bound (the greedy finds plans)
            else:
                probe_lo = target   # open: look nearer the incumbent
            continue
        if found is None:
            if proofs:
                run.raise_floor(target)
            elif close:
                return              # the restricted space has nothing better
            probe_lo = max(probe_lo, target)
        else:
            run.consider_stages(_device_stages(run, found.stages))


def _big(tables: Tables) -> float:
    """A bound no plan's cost exceeds when any plan exists: everything at its worst."""
    finite = tables.eff[np.isfinite(tables.eff)] if tables.eff is not None else np.array([1.0])
    return float(finite.max() if finite.size else 1.0) * 2 + float(np.max(tables.cut)) * max(
        max(row) for row in tables.spb) + tables.floor + 1.0


def _classes(run: _Run) -> None:
    """The class search (module doc, steps 2-4)."""
    # with many classes, stages mix at most MAX_MIX of them: plans stay valid, proofs do not
    s_pess = Search(run.pess, max_mix=_mix(run.pess), effort=run.effort)
    run.raise_floor(Bounds(run.exact).capacity(0, run.exact.counts))

    # 1. an incumbent (pessimistic plans never cost more in reality than in their model)
    res, floor = _incumbent(s_pess, run.lower, run.at(PROBE_SHARE), run.at(PHASE1_SHARE))
    run.consider(run.pess, res)
    exact_pess = not run.split and s_pess.complete
    if exact_pess:
        run.raise_floor(floor)          # the model is exact: its proofs are real
    # 2. the pessimistic model's optimum (the proof itself when the model is exact)
    if not run.done():
        run.at(PHASE1_SHARE if not run.split else PESSIMISTIC_SHARE).apply(run.effort)
        try:
            run.consider(run.pess, s_pess.astar(run.ub()))
            if run.plan is None and s_pess.complete:   # links never make a plan infeasible
                raise run.no_plan()
            run.proven = exact_pess and run.plan is not None
        except Timeout as t:
            run.stopped(t)
            if exact_pess:
                run.raise_floor(t.lower_bound)
    # 3. lower bounds that bind reality: the optimistic model, then the exact one
    if not exact_pess and not run.done() and run.plan is not None:
        _prove(run)


def _prove(run: _Run) -> None:
    opt = merged_model(run.arr, "optimistic")
    if opt.num_classes > MAX_MIX:   # a search restricted to fewer mixes proves nothing
        run.stats["bound"] = "capacity only: too many device types to search the relaxation"
        return
    run.at(PHASE1_SHARE).apply(run.effort)
    try:
        s_opt = Search(opt, effort=run.effort)
        res = s_opt.astar(run.ub())
        if res is None:             # nothing in the relaxation beats the incumbent
            run.proven = True
            return
        run.raise_floor(res.bottleneck)
        run.stats["optimistic_bound_s"] = res.bottleneck
        run.consider(opt, res, relaxed=True)  # its realisation may already cost the bound
        if not run.done() and _small(run.exact):
            run.consider(run.exact, Search(run.exact, effort=run.effort).astar(run.ub()))
            run.proven = True
    except Timeout as t:            # optimistic and exact bounds both bind reality
        run.stopped(t)
        run.raise_floor(t.lower_bound)


def _least_latency(run: _Run, plan: Plan) -> Plan:
    """Among plans with the optimal bottleneck, the least latency, then fewest devices.

    Exact on the twin-class model when its branching is small; otherwise on the
    pessimistic model (its plans cost no more in reality), and not claimed optimal.
    """
    bound = plan.bottleneck_s * (1 + TIE_RTOL)
    exact_ok = _small(run.exact)
    cm = run.exact if exact_ok else run.pess
    effort = run.effort
    Mark(min(run.max_effort, effort.spent + run.max_effort * LATENCY_SHARE),
         min(run.at(1.0).deadline, time.monotonic() + run.limit * LATENCY_SHARE)).apply(effort)
    try:
        res = Search(cm, max_mix=_mix(cm), effort=effort).astar_latency(bound)
    except Timeout as t:
        run.stats["latency_timed_out"] = True
        run.stats["latency_stopped_by"] = t.by
        return plan
    if res is None:
        return plan
    cand = evaluate(run.problem, plan_stages(cm, res, run.names), method=run.method)
    if cand.violations or cand.bottleneck_s > bound:
        return plan
    if (round(cand.latency_s, 9), cand.num_devices) <= (round(plan.latency_s, 9), plan.num_devices):
        cand.optimal, cand.lower_bound_s = plan.optimal, plan.lower_bound_s
        plan = cand
    plan.latency_optimal = exact_ok
    return plan


def _mix(cm: ClassModel) -> int:
    """Classes one stage may mix: all of them, or (too many to enumerate) pairs."""
    return cm.num_classes if cm.num_classes <= MAX_MIX else RESTRICTED_MIX


def _small(cm: ClassModel) -> bool:
    """Whether exact search over this model is affordable: its root branching is bounded."""
    if cm.num_classes > MAX_EXACT_CLASSES:
        return False
    search = Search(cm)
    moves = 0
    for mask in search.masks(cm.counts):
        _, _, forced, free = search.mask_info(mask)
        moves += 1 + sum(cm.counts[k] - 1 for k in free) if cm.replication else 1
        if moves > MAX_EXACT_BRANCHING:
            return False
    return True


def _no_plan_message(problem: Problem, arr: DeviceArrays) -> str:
    n = len(problem.devices)
    rep = "with" if arr.replication else "without"
    return (f"no plan fits the devices' memory: the {problem.num_units} units cannot be split into "
            f"contiguous stages over the {n} devices ({rep} replication) so that every stage fits "
            f"its devices (buffers: {problem.options.buffers} each way)")
