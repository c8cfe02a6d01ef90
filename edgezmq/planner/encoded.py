"""The solve when each used cut's encoding is a decision, under an error budget (internal).

``solve(problem, max_error=E, min_agreement=A)`` comes here when the problem lists encodings
(docs/planner.md, "Encodings"). The exact problem: least bottleneck B over plans whose
summed cut errors are at most E and whose summed cut disagreements (percent of samples
whose top-1 class the encoding at that cut alone changes) are at most 100 - A (either
budget may be absent: unbounded). For a fixed B, the plans with every cost <= B are the
paths over the states (units covered, how the last cut is encoded, devices used, devices
of the last stage): errors and disagreements add along the chain, and every cost (a
stage's time with its decode and encode, a link's with its encoded bytes) is local to one
stage and the link into it. Each state keeps the Pareto front of (error, disagreement) over
its suffixes (one point, the least error, without an agreement budget: the shortest path),
so B is feasible iff some plan is within both budgets, which is monotone in B: bisection
between a proven bound and the incumbent, each feasible answer lowering the incumbent to
its real bottleneck, finds the optimum to TIE_RTOL.

Devices are tracked by twin class (classes.py; twins must also have the same codec costs),
each class's devices taken in file order, and every figure is computed by the cost model's
own functions (cost.py) on those real devices, so a plan's price here is ``evaluate``'s.
The incumbent is the raw optimum (error 0, always within budget). With more than
MAX_COMPOSITIONS stage compositions (many distinct devices, replication) the search is not
tried: the raw plan is returned, not claimed optimal. The search's moves count
against the solve's effort; when it runs out, the best plan so far is returned with its
proven lower bound (``optimal`` false). Among plans of the optimal bottleneck, the least
total error is returned (not the least latency: ``latency_optimal`` is false).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
from collections.abc import Callable
from typing import Any

from .classes import device_arrays, twin_classes
from .cost import _link, evaluate, in_bytes, stage_memory_bytes
from .plan import Plan, Stage
from .problem import CLIENT, RAW, Device, PlanError, Problem, encoded_bytes
from .search import Effort, Timeout

__all__ = ["solve_encoded", "solve_input_encodings", "with_input_encoding", "without_encodings", "codec_classes",
           "ladders", "max_disagreement"]

TIE_RTOL = 1e-9     # bottlenecks within this relative distance are equal (as solver.py)
RAW_SHARE = 0.3     # the raw incumbent's share of the effort and time limits
SLACK = 1 + 1e-9    # prefix-sum estimates prune only beyond this (their rounding is not fsum's)
MAX_COMPOSITIONS = 20_000   # stage compositions (class count vectors) the search may enumerate


def without_encodings(problem: Problem) -> Problem:
    """The same problem with no lossy candidates (every link raw)."""
    return dataclasses.replace(problem, model=dataclasses.replace(problem.model, encodings={}))


def with_input_encoding(problem: Problem, name: str) -> Problem:
    """The problem as the client's input encoded ``name`` makes it, for the solver's tables:
    the input crosses as its wire bytes, every device's first unit (always on the first
    stage) takes the decoding too, and its parameters count what the input's buffers hold
    beyond the wire bytes (a stage holds decoded tensors), so that ``evaluate`` of the same
    stages on ``problem`` with ``input_encoding=name`` prices them exactly the same; and no
    input figures left (the choice is made). ``PlanError`` when a device cannot decode it."""
    encodings = {n: dataclasses.replace(e, input=None) for n, e in problem.encodings.items()}
    if name == RAW:
        return dataclasses.replace(problem, model=dataclasses.replace(problem.model, encodings=encodings))
    raw = problem.model.input_bytes
    wire = encoded_bytes(raw, problem.cut_ratio(name, 0))

    def times(d: Any) -> tuple[float, ...]:
        per_byte = d.codec_s_per_byte(name, False)
        if math.isinf(per_byte):
            raise PlanError(f"device {d.name}: no codec_ms_per_mb.{name}: it cannot decode the input encoded so")
        return (d.unit_times_s[0] + per_byte * raw, *d.unit_times_s[1:])

    devices = tuple(dataclasses.replace(d, unit_times_s=times(d)) for d in problem.devices)
    first = problem.units[0]
    units = (dataclasses.replace(first, param_bytes=first.param_bytes + problem.options.buffers * (raw - wire)),
             *problem.units[1:])
    model = dataclasses.replace(problem.model, input_bytes=wire, units=units, encodings=encodings)
    return dataclasses.replace(problem, model=model, devices=devices)


def solve_input_encodings(problem: Problem, max_error: float | None, *, time_limit_s: float, gap: float,
                          effort: int, engine: str, solve: Callable[..., Plan],
                          min_agreement: float | None = None) -> Plan:
    """The client's input encoding is one decision for the whole plan: solve once per choice
    (raw, then each encoding the problem measured on the input, within the budgets and
    decodable by every device) on ``with_input_encoding``'s problem, with what is left of
    the budgets, and keep the least bottleneck (then the least error; raw first on a tie),
    priced by ``evaluate`` on ``problem``. Exact when each solve is (``optimal`` only if
    every one was proven); each gets an equal share of what is left of the time limit."""
    t0 = time.monotonic()
    max_dis = max_disagreement(min_agreement)
    options = [RAW, *problem.input_encodings]
    best: Plan | None = None
    tried: dict[str, Any] = {}
    proven, lower = True, math.inf
    for k, name in enumerate(options):
        err_left = None if max_error is None else max_error - problem.cut_error(name, 0)
        dis_left = None if max_dis is None else max_dis - problem.cut_disagreement(name, 0)
        if (err_left is not None and err_left < 0) or (dis_left is not None and dis_left < 0):
            tried[name] = "over the budget alone"
            continue
        try:
            derived = with_input_encoding(problem, name)
        except PlanError as e:
            tried[name] = str(e)
            continue
        left = max(time_limit_s - (time.monotonic() - t0), 0.0) / (len(options) - k)
        try:
            got = solve(derived, time_limit_s=max(left, 1e-3), gap=gap, effort=effort, engine=engine,
                        max_error=err_left, min_agreement=None if dis_left is None else 100.0 - dis_left)
        except PlanError as e:
            tried[name] = str(e)
            proven = False
            continue
        stages = [dataclasses.replace(got.stages[0], input_encoding=name), *got.stages[1:]]
        plan = evaluate(problem, stages, method=got.method)
        tried[name] = plan.bottleneck_s
        proven = proven and got.optimal
        lower = min(lower, got.lower_bound_s if got.lower_bound_s is not None else 0.0)
        plan.stats = dict(got.stats)
        if best is None or plan.bottleneck_s < best.bottleneck_s * (1 - TIE_RTOL) or (
                plan.bottleneck_s <= best.bottleneck_s * (1 + TIE_RTOL) and plan.error < best.error - 1e-12):
            best = plan
    if best is None:
        raise PlanError("no plan within the budget: " + "; ".join(f"input {n}: {v}" for n, v in tried.items()))
    best.optimal = proven
    best.lower_bound_s = best.bottleneck_s if proven else min(lower, best.bottleneck_s)
    best.stats["input_encodings"] = tried
    best.stats["solve_time_s"] = round(time.monotonic() - t0, 4)
    return best


def codec_classes(problem: Problem) -> list[list[int]]:
    """Twin classes (classes.py) split further by codec costs: interchangeable devices."""
    out: list[list[int]] = []
    for members in twin_classes(device_arrays(problem)):
        by_codec: dict[tuple, list[int]] = {}
        for d in members:
            c = problem.devices[d].codecs
            key = tuple(sorted((n, x.encode_s_per_byte, x.decode_s_per_byte) for n, x in c.items()))
            by_codec.setdefault(key, []).append(d)
        out.extend(by_codec.values())
    return sorted(out, key=lambda c: c[0])


Best = tuple[float, tuple[Stage, ...]]   # (least error of a plan, its stages)
Point = tuple[float, float, tuple[Stage, ...]]   # (error, disagreement, stages) of a suffix
Front = list[Point]   # the Pareto front of a state's suffixes: none is as good in both


def _dominated(front: Front, err: float, dis: float) -> bool:
    return any(e <= err and d <= dis for e, d, _ in front)


def _add(front: Front, err: float, dis: float, stages: tuple[Stage, ...]) -> Front:
    """``front`` with the point added unless one already is as good (the first found stays)."""
    if _dominated(front, err, dis):
        return front
    return [p for p in front if not (err <= p[0] and dis <= p[1])] + [(err, dis, stages)]


class _Decision:
    """For a bound B: the least total error of a plan whose every cost is <= B, within the
    budgets (or None). ``max_disagreement`` None: not bounded (every disagreement counts 0)."""

    def __init__(self, problem: Problem, max_error: float, effort: Effort,
                 max_disagreement: float | None = None) -> None:
        self.p, self.max_error, self.effort = problem, max_error, effort
        self.max_dis = math.inf if max_disagreement is None else max_disagreement
        self.agreement = max_disagreement is not None
        self.L = problem.num_units
        self.pools: list[list[Device]] = [[problem.devices[d] for d in c] for c in codec_classes(problem)]
        self.K = len(self.pools)
        self.encs = (RAW, *problem.encodings)
        self.raw = [in_bytes(problem, c) for c in range(self.L)] + [problem.units[-1].out_bytes]
        self.wire = {(c, e): encoded_bytes(self.raw[c], problem.cut_ratio(e)) for c in range(self.L + 1)
                     for e in self.encs}
        self._links: dict[tuple, float] = {}
        self._mem: dict[tuple[int, int], int] = {}
        self.comps = self._compositions()
        self.pre = [[0.0, *itertools.accumulate(p[0].unit_times_s)] for p in self.pools]

    @staticmethod
    def compositions(problem: Problem) -> int:
        """How many stage compositions the search would enumerate."""
        pools = codec_classes(problem)
        return len(pools) if not problem.options.replication else math.prod(len(c) + 1 for c in pools) - 1

    def _compositions(self) -> list[tuple[int, ...]]:
        counts = [len(p) for p in self.pools]
        if not self.p.options.replication:
            return [tuple(int(j == k) for j in range(self.K)) for k in range(self.K)]
        every = itertools.product(*(range(n + 1) for n in counts))
        return [c for c in every if any(c)]

    def devices(self, used: tuple[int, ...], comp: tuple[int, ...]) -> tuple[Device, ...]:
        """The devices of a stage of ``comp`` after ``used``: each class's next ones in file order."""
        return tuple(d for k in range(self.K) for d in self.pools[k][used[k]:used[k] + comp[k]])

    def link_s(self, src: tuple[str, ...], dst: tuple[str, ...], nbytes: int) -> float:
        key = (src, dst, nbytes)
        t = self._links.get(key)
        if t is None:
            t = self._links[key] = _link(self.p, src, dst, nbytes, ("", "")).time_s
        return t

    def fits(self, a: int, b: int, devs: list[Device]) -> bool:
        need = self._mem.get((a, b))
        if need is None:
            need = self._mem[(a, b)] = stage_memory_bytes(self.p, a, b)
        return all(need + d.reserved_bytes <= d.memory_bytes for d in devs)

    def dis(self, name: str, cut: int) -> float:
        return self.p.cut_disagreement(name, cut) if self.agreement else 0.0

    def run(self, bound: float) -> Best | None:
        memo: dict[tuple, Front] = {}
        p, L, K = self.p, self.L, self.K
        exact = (0.0, 0.0)

        def best(u: int, ein: str, prev: tuple[str, ...], used: tuple[int, ...]) -> Front:
            key = (u, ein, prev, used)
            if key in memo:
                return memo[key]
            found: Front = []
            raw_in, w_in = self.raw[u], self.wire[(u, ein)]
            for comp in self.comps:
                if any(used[k] + comp[k] > len(self.pools[k]) for k in range(K)):
                    continue
                self.effort.tick()
                devs = self.devices(used, comp)
                names = tuple(d.name for d in devs)
                m = len(devs)
                # twins cost the same: one device of each class in the stage stands for all
                reps = [(k, self.pools[k][used[k]]) for k in range(K) if comp[k]]
                dec_in = [_codec_s(d, ein, False, raw_in) for _, d in reps]
                if any(math.isinf(x) for x in dec_in):
                    continue
                if self.link_s(prev, names, w_in) > bound:
                    continue
                after = tuple(x + y for x, y in zip(used, comp))
                for b in range(u + 1, L + 1):
                    self.effort.tick()
                    # prefix sums only prune (with slack); the exact check below is cost.py's
                    compute = [self.pre[k][b] - self.pre[k][u] for k, _ in reps]
                    if max(compute) / m > bound * SLACK:
                        break       # compute only grows with b
                    if not self.fits(u, b, [d for _, d in reps]):
                        continue
                    raw_out = self.raw[b]
                    io = [c + d.recv_s_per_byte * w_in + x for c, (_, d), x in zip(compute, reps, dec_in)]
                    for eo in (self.encs if b < L else (RAW,)):
                        err = p.cut_error(eo, b) if b < L else 0.0
                        dis = self.dis(eo, b) if b < L else 0.0
                        if err > self.max_error or dis > self.max_dis:
                            continue
                        if _dominated(found, err, dis):
                            continue
                        w_out = self.wire[(b, eo)]
                        enc_out = [_codec_s(d, eo, True, raw_out) for _, d in reps]
                        est = max(t + d.send_s_per_byte * w_out + e for t, (_, d), e in zip(io, reps, enc_out)) / m
                        if not est <= bound * SLACK:   # also inf (a device that cannot encode eo)
                            continue
                        t = max(d.stage_time_s(u, b, w_in, w_out, x + e)
                                for (_, d), x, e in zip(reps, dec_in, enc_out)) / m
                        if not t <= bound:
                            continue
                        stage = Stage((u, b), tuple(sorted(names, key=self.order)), eo)
                        if b == L:
                            if self.link_s(names, (CLIENT,), w_out) <= bound:
                                found = [(0.0, 0.0, (stage,))]
                            continue
                        for se, sd, sst in best(b, eo, names, after):
                            if err + se <= self.max_error and dis + sd <= self.max_dis:
                                found = _add(found, err + se, dis + sd, (stage, *sst))
                    if found and found[0][:2] == exact:
                        break
                if found and found[0][:2] == exact:
                    break       # nothing beats no error and no disagreement
            memo[key] = found
            return found

        front = [q for q in best(0, RAW, (CLIENT,), (0,) * K) if q[0] <= self.max_error and q[1] <= self.max_dis]
        if not front:
            return None
        e, _, st = min(front, key=lambda q: (q[0], q[1]))
        return e, st

    @property
    def order(self) -> Callable[[str], int]:
        return self.p.node_index


def _codec_s(d: Device, name: str, encode: bool, nbytes: int) -> float:
    """Seconds ``d`` takes to encode (decode) ``nbytes`` raw bytes; inf when it cannot."""
    c = d.codec_s_per_byte(name, encode)
    return c if math.isinf(c) else c * nbytes


def max_disagreement(min_agreement: float | None) -> float | None:
    """The budget of summed disagreements (percent) a top-1 agreement of ``min_agreement`` percent leaves."""
    return None if min_agreement is None else 100.0 - min_agreement


def solve_encoded(problem: Problem, max_error: float | None, *, time_limit_s: float, gap: float, effort: int,
                  engine: str, solve: Callable[..., Plan], min_agreement: float | None = None) -> Plan:
    """The plan of least bottleneck whose encodings' summed error is at most ``max_error``
    and summed disagreement at most 100 - ``min_agreement`` (module doc; None: that budget is
    absent); ``solve`` is solver.solve, for the raw incumbent."""
    t0 = time.monotonic()
    max_dis = max_disagreement(min_agreement)
    if max_dis is not None and problem.num_units > 1:
        for name in problem.encodings:   # one clear error before searching: every candidate measured
            problem.cut_disagreement(name, 1)
    budget = math.inf if max_error is None else max_error
    raw = solve(without_encodings(problem), time_limit_s=time_limit_s * RAW_SHARE, gap=gap,
                effort=max(1, int(effort * RAW_SHARE)), engine=engine)
    plan = evaluate(problem, raw.stages, method="solve")
    if _Decision.compositions(problem) > MAX_COMPOSITIONS:
        plan.optimal, plan.lower_bound_s = False, 0.0
        plan.stats = {"engine": "encodings", "stopped_by": "size", "raw_bottleneck_s": raw.bottleneck_s,
                      "encoded": f"not searched: more than {MAX_COMPOSITIONS} stage compositions "
                                 "(device classes); the raw plan", "max_error": max_error,
                      "min_agreement": min_agreement}
        return plan
    run = Effort(stop=max(0, effort - int(raw.stats.get("effort", 0))), deadline=t0 + time_limit_s)
    decide = _Decision(problem, budget, run, max_dis)
    lo, hi = 0.0, plan.bottleneck_s
    stats: dict[str, object] = {"engine": "encodings", "raw_bottleneck_s": raw.bottleneck_s,
                                "raw_optimal": raw.optimal}
    stopped, decisions = "proven", 0

    def done() -> bool:
        return hi <= 0 or (hi - lo) / hi <= max(gap, TIE_RTOL)

    try:
        while not done():
            # first just below the raw optimum: when encoding cannot help, that one search proves it
            mid = hi * (1 - TIE_RTOL) if decisions == 0 else (lo + hi) / 2
            decisions += 1
            found = decide.run(mid)
            if found is None:
                lo = mid
                continue
            cand = evaluate(problem, found[1], method="solve")
            if (cand.violations or cand.error > budget + 1e-12 or cand.bottleneck_s > mid * (1 + TIE_RTOL)
                    or (max_dis is not None and cand.disagreement is not None and cand.disagreement > max_dis + 1e-9)):
                raise AssertionError(f"encoded search produced a plan it should not have: {cand.to_dict()}")
            plan, hi = cand, cand.bottleneck_s
    except Timeout as t:
        stopped = t.by
    plan.optimal = stopped == "proven" and hi > 0 and (hi - lo) / hi <= TIE_RTOL
    if stopped == "proven" and plan.error > 0:
        try:    # at the optimal bottleneck (or within the gap), the least error
            found = decide.run(hi * (1 + TIE_RTOL / 2))
        except Timeout as t:
            found, stats["least_error_stopped_by"] = None, t.by
        if found is not None:
            cand = evaluate(problem, found[1], method="solve")
            if cand.bottleneck_s <= hi * (1 + TIE_RTOL) and cand.error < plan.error:
                cand.optimal = plan.optimal
                plan = cand
    plan.lower_bound_s = plan.bottleneck_s if plan.optimal else min(lo, plan.bottleneck_s)
    stats.update({"stopped_by": stopped, "decisions": decisions,
                  "effort": run.spent + int(raw.stats.get("effort", 0)),
                  "solve_time_s": round(time.monotonic() - t0, 4), "max_error": max_error,
                  "min_agreement": min_agreement})
    plan.stats = stats
    return plan


def ladders(problem: Problem, plan: Plan, max_error: float | None,
            min_agreement: float | None = None) -> list[list[str]]:
    """Each stage's encoding ladder for the deployable plan (planfile: largest first): the
    chosen encoding, then the smaller ones (by ratio) the adaptive policy may drop to. It may
    drop any link to any rung at any time, so the ladders must stay within the budgets with
    every link on its worst rung at once: the slack (budget minus the plan's error, and
    100 - min_agreement minus its disagreement) is spent cut by cut in pipeline order, each
    rung only if its extra error and extra disagreement still fit and the stage's devices can
    encode it and the next stage's decode it. The last stage's ladder is empty (raw). No
    budget at all: no rung beyond the chosen one."""
    max_dis = max_disagreement(min_agreement)
    if max_error is None and max_dis is None:
        spare, spare_d = 0.0, 0.0   # no budget: nothing more
    else:
        spare = math.inf if max_error is None else max_error - plan.error
        spare_d = math.inf if max_dis is None else max_dis - math.fsum(
            [problem.cut_disagreement(plan.stages[0].input_encoding, 0),
             *(problem.cut_disagreement(s.encoding, s.units[1]) for s in plan.stages[:-1])])

    def dis(e: str, cut: int) -> float:
        return 0.0 if max_dis is None else problem.cut_disagreement(e, cut)
    out: list[list[str]] = []
    for i, s in enumerate(plan.stages):
        if i == len(plan.stages) - 1:
            out.append([])
            break
        cut, chosen = s.units[1], s.encoding
        devs = [(problem.device(d), True) for d in s.devices] + [(problem.device(d), False)
                                                                 for d in plan.stages[i + 1].devices]
        rung = [chosen]
        base_err, base_dis = problem.cut_error(chosen, cut), dis(chosen, cut)
        worst, worst_d = base_err, base_dis
        smaller = sorted((e for e in problem.encodings if problem.cut_ratio(e) < problem.cut_ratio(chosen)),
                         key=lambda e: (-problem.cut_ratio(e), e))
        for e in smaller:
            err, d_e = problem.cut_error(e, cut), dis(e, cut)
            if max(err, worst) - base_err > spare + 1e-15 or max(d_e, worst_d) - base_dis > spare_d + 1e-12:
                continue
            if any(math.isinf(d.codec_s_per_byte(e, enc)) for d, enc in devs):
                continue
            rung.append(e)
            worst, worst_d = max(worst, err), max(worst_d, d_e)
        spare -= worst - base_err
        spare_d -= worst_d - base_dis
        out.append(rung if rung != [RAW] else [])
    return out
