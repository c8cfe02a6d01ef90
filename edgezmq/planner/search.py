"""Exact search over plans of a class model (internal; ``solver.py`` drives it).

A partial plan is a state ``(u, res, last)``: units [0, u) are covered, ``res`` says which
devices are spoken for, and ``last = (mask, m)`` is the stage ending at u (its classes
as a bit mask, its replica count; the client is ``(0, 1)``), all the next link's cost
depends on. A move appends a stage: units [u, b) on m devices of the classes in mask.
Its cost is the max of the link into it and its compute time, which depend only on
(mask, m, u, b); a plan's bottleneck is the max over its moves.

NIC terms (cost.py) fold into the stage: a stage's devices alone receive its input and
send its output, so the downlink term of the link into it and the uplink term of the
link out of it are max_d in(u) * down_d / m and max_d out(b) * up_d / m, and with its
compute, max_d max(T_d, in(u) * down_d, out(b) * up_d) / m: one "effective" time per
device, maximised over the stage like T_d (``_t_row``'s first row). The client's own
terms are constants (input * client up, the last output * client down): the first move
and the last one carry them. Latency keeps the plain T_d (``stage_time``), its links
the slowest of pair, uplink and downlink.

How a stage's m devices split among its classes matters only for what is left, so the
split is not enumerated (that is quadratic and worse in the class counts):
- a class b dominated by another class of the mask (classes.py) is taken whole, every b
  device in this stage (the dominance exchange makes that no loss);
- every other ("free") class gives its one mandatory device; if there is one free class
  it also takes the remainder, otherwise the remainder is a pending demand on the free
  classes, ``flex[mask]``, settled at the end.
``res = (fixed, flex)``: devices committed per class, and pending demands per class set.
It is feasible iff fixed <= counts and, by Hall's theorem, every group of demands fits
the uncommitted devices of the union of their classes; then an assignment exists and
``settle`` finds one. Nothing is relaxed: this is exact.

- ``astar`` finds the minimal bottleneck: best-first on f = max(g, h) with an admissible
  h (bounds.py), pruning f >= the incumbent and states dominated by an expanded one
  (same u and last, no more resources, no worse g). The first complete plan popped is
  optimal; if time runs out, the smallest f still open is a proven lower bound.
- ``probe`` answers "is there a plan with bottleneck <= B?" depth-first (longest stage
  first, then most slack), remembering failed states; it finds incumbents fast and, when it exhausts the
  space, proves B infeasible.
- ``astar_latency`` minimises latency, then device count, over plans whose every move
  costs <= B (the optimum), with its own admissible latency bound.
"""

from __future__ import annotations

import heapq
import itertools
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass

from .bounds import Bounds
from .classes import ClassModel

__all__ = ["Search", "Move", "Result", "Timeout", "BudgetExceeded", "Effort"]

CLIENT_DESC = (0, 1)
TIME_CHECK_EVERY = 128          # expansions between deadline checks
LATENCY_QUANTUM_S = 1e-9        # latencies equal to within a nanosecond tie, then fewer devices win
ROW_CACHE = 100_000             # cached stage-time rows

Flex = tuple[tuple[int, int], ...]          # sorted (class mask, devices pending)
Res = tuple[tuple[int, ...], Flex]


class Timeout(Exception):
    """A limit stopped the search: ``by`` = "effort" (its share of search nodes, the
    deterministic limit) or "time" (the wall-clock safety net); ``lower_bound`` is what
    the search proved by then."""

    def __init__(self, lower_bound: float, by: str = "time") -> None:
        super().__init__(f"search stopped by its {by} limit (lower bound {lower_bound:g})")
        self.lower_bound = lower_bound
        self.by = by


class Effort:
    """Search nodes expanded by one solve, shared by all its searches, against a limit.

    ``stop`` is the absolute count at which the current phase ends (phases get shares of
    the solve's limit), ``deadline`` the wall-clock safety net. The node count is the same
    on every machine, so a search stopped by ``stop`` gives the same answer everywhere; one
    stopped by ``deadline`` does not (``Timeout.by`` says which)."""

    def __init__(self, stop: float = math.inf, deadline: float = math.inf) -> None:
        self.spent = 0
        self.stop = stop
        self.deadline = deadline
        self.timed = False      # some search was stopped by the clock (results may vary by machine)

    def tick(self, lower: float = 0.0) -> None:
        """Count one node; raise ``Timeout`` when a limit is reached."""
        self.spent += 1
        if self.spent > self.stop:
            raise Timeout(lower, "effort")
        if self.spent % TIME_CHECK_EVERY == 0 and time.monotonic() > self.deadline:
            raise self.out_of_time(lower)

    def out_of_time(self, lower: float) -> Timeout:
        self.timed = True
        return Timeout(lower, "time")


class BudgetExceeded(Exception):
    """A probe expanded more states than it was allowed."""


@dataclass(frozen=True)
class Move:
    """Units [a, b) on ``counts[k]`` devices of each class k."""

    a: int
    b: int
    counts: tuple[int, ...]


@dataclass(frozen=True)
class _Step:
    """A move as searched: its fixed devices per class and its pending demand."""

    a: int
    b: int
    mask: int
    m: int
    fixed: tuple[int, ...]
    flex_mask: int
    flex: int


@dataclass(frozen=True)
class Result:
    """A plan of the class model with its model cost (bottleneck, latency)."""

    moves: tuple[Move, ...]
    bottleneck: float
    latency: float
    expanded: int


class Search:
    """Search plans of one class model; one instance answers many queries (caches persist)."""

    def __init__(self, cm: ClassModel, deadline: float = math.inf, max_mix: int | None = None,
                 effort: Effort | None = None) -> None:
        self.cm = cm
        # limits: the shared node count (its ``stop``) and this search's own wall-clock deadline
        self.effort = effort or Effort()
        self.deadline = deadline
        # at most this many classes in one stage (None: any); only then is the search complete
        self.max_mix = cm.num_classes if max_mix is None else max_mix
        self.complete = self.max_mix >= cm.num_classes
        self.L = cm.num_units
        self.K = cm.num_classes
        self.n = cm.counts
        self.pre = [[0.0, *itertools.accumulate(row.tolist())] for row in cm.times]
        self.io = cm.has_io  # stage time = compute + recv * bytes in + send * bytes out
        self.recv = list(cm.recv) or [0.0] * self.K
        self.send = list(cm.send) or [0.0] * self.K
        self.nic = cm.has_nic  # a stage's cost folds its devices' NIC terms in (module doc)
        self.up = list(cm.up) or [0.0] * self.K
        self.down = list(cm.down) or [0.0] * self.K
        self.c_up, self.c_down = cm.client_up, cm.client_down
        # per node row (0: the client), for link latencies
        self.up_row = [self.c_up, *self.up]
        self.down_row = [self.c_down, *self.down]
        self.nic_latency = self.nic or bool(self.c_up) or bool(self.c_down)
        need = cm.memory_table()
        self.need = need.tolist()
        self.min_need = [float(need[a, a + 1:].min()) if a < self.L else 0.0 for a in range(self.L + 1)]
        self.cut = list(cm.cut_bytes)
        self.spb = cm.spb.tolist()
        self.lat = cm.lat.tolist()
        self.bounds = Bounds(cm)
        self.expanded = 0
        self._mask_cache: dict[int, tuple[tuple[int, ...], float, tuple[int, ...], tuple[int, ...]]] = {}
        self._link_cache: dict[tuple[int, int], float] = {}
        self._t_cache: dict[tuple[int, int], tuple[list[float], list[float], list[float]]] = {}
        self._minrho: dict[int, tuple[list[float], float]] = {}

    # --- pieces of the cost model, per class set --------------------------------------------

    def mask_info(self, mask: int) -> tuple[tuple[int, ...], float, tuple[int, ...], tuple[int, ...]]:
        """(classes, smallest memory capacity, dominated classes, free classes) of a mask."""
        hit = self._mask_cache.get(mask)
        if hit is None:
            ks = tuple(k for k in range(self.K) if mask >> k & 1)
            dom = self.cm.dominates
            forced = tuple(k for k in ks if self.cm.replication and any(dom[a][k] for a in ks if a != k))
            free = tuple(k for k in ks if k not in forced)
            hit = (ks, min(self.cm.cap[k] for k in ks), forced, free)
            self._mask_cache[mask] = hit
        return hit

    def link_spb(self, prev: int, mask: int) -> float:
        """Worst seconds-per-byte over device pairs between two consecutive class sets."""
        key = (prev, mask)
        hit = self._link_cache.get(key)
        if hit is None:
            rows = (0,) if prev == 0 else tuple(k + 1 for k in self.mask_info(prev)[0])
            cols = (0,) if mask == 0 else tuple(k + 1 for k in self.mask_info(mask)[0])
            hit = max(self.spb[i][j] for i in rows for j in cols)
            self._link_cache[key] = hit
        return hit

    def link_latency(self, prev: int, mask: int, nbytes: float) -> float:
        rows = (0,) if prev == 0 else tuple(k + 1 for k in self.mask_info(prev)[0])
        cols = (0,) if mask == 0 else tuple(k + 1 for k in self.mask_info(mask)[0])
        if self.nic_latency:   # one microbatch at the slowest of pair, sender's up, receiver's down
            up, down = self.up_row, self.down_row
            return max(self.lat[i][j] + nbytes * max(self.spb[i][j], up[i], down[j]) for i in rows for j in cols)
        return max(self.lat[i][j] + nbytes * self.spb[i][j] for i in rows for j in cols)

    def stage_time(self, mask: int, a: int, b: int) -> float:
        """Unreplicated time of units [a, b) on the mask's slowest class (what latency counts)."""
        return self._t_row(a, mask)[2][b]

    def stage_cost(self, mask: int, a: int, b: int) -> float:
        """The stage's bottleneck term times its replicas: its time, NIC terms folded in."""
        return self._t_row(a, mask)[0][b]

    def _t_row(self, u: int, mask: int) -> tuple[list[float], list[float], list[float]]:
        """For stages [u, b), every b: (the effective time, NIC terms folded in; a lower bound
        on it that never falls as b grows; the plain unreplicated time).

        Compute only grows with b; the cost of sending the stage's output, and its uplink
        term, do not (the last units' outputs are small), so the search stops extending a
        stage on the bound.
        """
        key = (u, mask)
        hit = self._t_cache.get(key)
        if hit is None:
            pre, ks, cut = self.pre, self.mask_info(mask)[0], self.cut
            if not self.io:
                if len(ks) == 1:
                    p = pre[ks[0]]
                    pu = p[u]
                    row = [p[b] - pu for b in range(self.L + 1)]
                else:
                    row = [max(pre[k][b] - pre[k][u] for k in ks) for b in range(self.L + 1)]
                mono = row
            else:
                rin = [pre[k][u] - self.recv[k] * cut[u] for k in ks]
                row = [max(pre[k][b] - r + self.send[k] * cut[b] for k, r in zip(ks, rin))
                       for b in range(self.L + 1)]
                mono = [max(pre[k][b] - r for k, r in zip(ks, rin)) for b in range(self.L + 1)]
            if self.nic:
                # max over d of max(T_d, in * down_d, out_b * up_d) = max(max T, in * max down, out_b * max up)
                down_in = cut[u] * max(self.down[k] for k in ks)
                up = max(self.up[k] for k in ks)
                eff = [max(t, down_in, cut[b] * up) for b, t in enumerate(row)]
                hit = (eff, [max(t, down_in) for t in mono], row)
            else:
                hit = (row, mono, row)
            if len(self._t_cache) < ROW_CACHE:
                self._t_cache[key] = hit
        return hit

    def masks(self, free: tuple[int, ...], cheap: bool = False) -> Iterator[int]:
        """Class sets a stage may use; ``cheap``: at most one free class (no pending demand)."""
        avail = [k for k in range(self.K) if free[k] > 0]
        if not self.cm.replication:
            yield from (1 << k for k in avail)
            return
        for size in range(1, min(len(avail), self.max_mix) + 1):
            for combo in itertools.combinations(avail, size):
                mask = sum(1 << k for k in combo)
                if not cheap or size == 1 or len(self.mask_info(mask)[3]) <= 1:
                    yield mask

    # --- resources ------------------------------------------------------------------------------

    def _feasible(self, free: list[int], flex: Flex) -> bool:
        """Hall's condition: every group of pending demands fits its classes' free devices."""
        if any(f < 0 for f in free):
            return False
        for size in range(1, len(flex) + 1):
            for group in itertools.combinations(flex, size):
                union = 0
                for mask, _ in group:
                    union |= mask
                if sum(x for _, x in group) > sum(free[k] for k in self.mask_info(union)[0]):
                    return False
        return True

    def _flex_min(self, mask: int) -> tuple[list[float], float]:
        """Per reference, the least capacity a device of mask's classes adds; least memory."""
        hit = self._minrho.get(mask)
        if hit is None:
            ks = self.mask_info(mask)[0]
            rho, cap = self.bounds.rho, self.bounds.cap_pos
            hit = ([min(rho[k][j] for k in ks) for j in range(len(self.bounds.W))],
                   min(cap[k] for k in ks))
            self._minrho[mask] = hit
        return hit

    @staticmethod
    def _covers(a: Res, b: Res) -> bool:
        """Resources a are no more than b (so a state holding a can do all b can)."""
        if any(x > y for x, y in zip(a[0], b[0])):
            return False
        if not a[1]:
            return True
        other = dict(b[1])
        return all(x <= other.get(mask, 0) for mask, x in a[1])

    def settle(self, steps: list[_Step]) -> list[Move]:
        """Assign every pending demand to classes (Hall's condition guarantees it works)."""
        counts = [list(s.fixed) for s in steps]
        free = [self.n[k] - sum(s.fixed[k] for s in steps) for k in range(self.K)]
        pending = [(i, s.flex_mask, s.flex) for i, s in enumerate(steps) if s.flex]
        for idx, (i, mask, x) in enumerate(pending):
            rest = tuple((m2, x2) for _, m2, x2 in pending[idx + 1:])
            for k in self.mask_info(mask)[0]:
                take = min(x, free[k])
                while take > 0:
                    free[k] -= take
                    if self._feasible(free, _merge(rest, mask, x - take)):
                        break
                    free[k] += take
                    take -= 1
                counts[i][k] += take
                x -= take
            if x:
                raise AssertionError("pending demand could not be settled")   # Hall says never
        return [Move(s.a, s.b, tuple(c)) for s, c in zip(steps, counts)]

    # --- moves ----------------------------------------------------------------------------------

    def moves(self, u: int, res: Res, last: tuple[int, int], g: float, bound: float, strict: bool,
              cheap: bool = False) -> list[tuple[float, float, int, int, int, Res, _Step]]:
        """Moves from a state whose cost and f = max(cost, h) stay within ``bound``.

        Returns (f, cost, b, mask, m, res2, step): cost is the state's bottleneck after the
        move (the client link included when b == L), f adds the capacity bound of what is
        left. ``strict`` drops f >= bound instead of f > bound.
        """
        self.expanded += 1
        self.effort.spent += 1
        K, L, need, cut, n = self.K, self.L, self.need, self.cut, self.n
        fixed, flex = res
        free = [n[k] - fixed[k] for k in range(K)]
        prev, prev_m = last
        nbytes = cut[u]
        row = need[u]
        bnd = self.bounds
        rho, cap_pos, W = bnd.rho, bnd.cap_pos, bnd.W
        refs = range(len(W))
        replication = self.cm.replication
        flex_total = sum(x for _, x in flex)
        c_base = [sum(free[k] * rho[k][j] for k in range(K) if free[k]) for j in refs]
        mem_base = sum(free[k] * cap_pos[k] for k in range(K))
        for mask, x in flex:
            mins, mcap = self._flex_min(mask)
            for j in refs:
                c_base[j] -= x * mins[j]
            mem_base -= x * mcap
        psuf = bnd.param_suffix
        out = []
        for mask in self.masks(tuple(free), cheap):
            ks, cap, forced, frees = self.mask_info(mask)
            if self.min_need[u] > cap or any(fixed[k] for k in forced):
                continue
            base_m = sum(n[k] for k in forced) + len(frees)
            top_m = base_m - len(frees) + sum(free[k] for k in frees)
            if not replication:
                top_m = base_m = 1
            spb = self.link_spb(prev, mask)
            out_spb = self.link_spb(mask, 0)
            t_row, t_mono, _ = self._t_row(u, mask)
            fixed_add = [0] * K
            for k in forced:
                fixed_add[k] = n[k]
            for k in frees:
                fixed_add[k] += 1
            for m in range(base_m, top_m + 1):
                rest = m - base_m
                add = fixed_add
                flex2 = flex
                if rest:
                    if len(frees) == 1:
                        add = list(fixed_add)
                        add[frees[0]] += rest
                    else:
                        flex2 = _merge(flex, mask_of(frees), rest)
                free2 = [free[k] - add[k] for k in range(K)]
                if not self._feasible(free2, flex2):
                    break                    # more replicas only need more devices
                link = nbytes * spb / (prev_m * m)
                if prev == 0 and nbytes * self.c_up > link:
                    link = nbytes * self.c_up         # the client's uplink carries every input
                base = g if g >= link else link
                if base > bound or (strict and base == bound):
                    continue
                cands = []
                for b in range(u + 1, L + 1):
                    lb = t_mono[b] / m
                    if lb > bound or (strict and lb == bound):
                        break            # this lower bound on the stage time only grows with b
                    sc = t_row[b] / m
                    if sc > bound or (strict and sc == bound):
                        continue
                    if row[b] > cap:
                        continue
                    cost = base if base >= sc else sc
                    if b == L:
                        co = cut[L] * out_spb / m
                        if cut[L] * self.c_down > co:
                            co = cut[L] * self.c_down   # the client's downlink, every result
                        if co > cost:
                            cost = co
                        if cost > bound or (strict and cost == bound):
                            continue
                    cands.append((b, cost))
                if not cands:
                    continue
                left = sum(free2) - flex_total - (rest if flex2 is not flex else 0)
                if replication:
                    cs = [c_base[j] - sum(add[k] * rho[k][j] for k in ks) for j in refs]
                    mem2 = mem_base - sum(add[k] * cap_pos[k] for k in ks)
                    if flex2 is not flex:
                        mins, mcap = self._flex_min(mask_of(frees))
                        cs = [cs[j] - rest * mins[j] for j in refs]
                        mem2 -= rest * mcap
                res2 = (tuple(fixed[k] + add[k] for k in range(K)), flex2)
                step = None
                # largest b first: the capacity bound only grows as b shrinks (with replication)
                for b, cost in reversed(cands):
                    if b == L:
                        f = cost
                    elif left <= 0:
                        break
                    elif replication:
                        if psuf[b] > mem2:
                            break
                        h = bnd.floor
                        for j in refs:
                            w = W[j][b]
                            if w > 0.0:
                                c = cs[j]
                                v = w / c if c > 0.0 else math.inf
                                if v > h:
                                    h = v
                        if h > bound or (strict and h == bound):
                            break
                        f = cost if cost >= h else h
                    else:
                        h = bnd.capacity(b, tuple(free2))
                        f = cost if cost >= h else h
                    if f > bound or (strict and f == bound):
                        continue
                    if step is None or step.b != b:
                        fm = mask_of(frees) if flex2 is not flex else 0
                        step = _Step(u, b, mask, m, tuple(add), fm, rest if fm else 0)
                    out.append((f, cost, b, mask, m, res2, step))
        return out

    def _check(self, lower: float) -> None:
        if self.effort.spent > self.effort.stop:
            raise Timeout(lower, "effort")
        if self.expanded % TIME_CHECK_EVERY == 0 and time.monotonic() > min(self.deadline, self.effort.deadline):
            raise self.effort.out_of_time(lower)

    # --- bottleneck: A* -------------------------------------------------------------------------

    def astar(self, incumbent: float = math.inf) -> Result | None:
        """The minimal-bottleneck plan if one beats ``incumbent`` (None: the incumbent is optimal
        or, without one, there is no plan). Raises ``Timeout`` with the bound proved so far."""
        L = self.L
        start: Res = ((0,) * self.K, ())
        h0 = self.bounds.capacity(0, self.n)
        if h0 >= incumbent or math.isinf(h0):
            return None
        # per state: (u, res, last, g, parent, step)
        states: list[tuple[int, Res, tuple[int, int], float, int, _Step | None]] = [
            (0, start, CLIENT_DESC, 0.0, -1, None)]
        heap = [(h0, 0, 0)]
        closed: dict[tuple[int, tuple[int, int]], list[tuple[Res, float]]] = {}
        while heap:
            f, _, sid = heapq.heappop(heap)
            self._check(min(f, incumbent))
            u, res, last, g, _, _ = states[sid]
            if u == L:
                return self._result(states, sid)
            seen = closed.setdefault((u, last), [])
            if any(g2 <= g and self._covers(r2, res) for r2, g2 in seen):
                continue
            seen.append((res, g))
            for f2, cost, b, mask, m, res2, step in self.moves(u, res, last, g, incumbent, strict=True):
                states.append((b, res2, (mask, m), cost, sid, step))
                heapq.heappush(heap, (f2, -b, len(states) - 1))
        return None

    def _result(self, states: list, sid: int) -> Result:
        steps = []
        while sid > 0:
            steps.append(states[sid][5])
            sid = states[sid][4]
        steps.reverse()
        moves = self.settle(steps)
        return Result(tuple(moves), self.bottleneck(moves), self.latency(moves), self.expanded)

    # --- bottleneck: depth-first probe ----------------------------------------------------------

    def probe(self, bound: float, budget: float, cheap: bool = False) -> Result | None:
        """A plan with bottleneck <= bound, or None when there is none. Raises
        ``BudgetExceeded`` after ``budget`` expansions, ``Timeout`` late. ``cheap`` probes
        (see ``masks``) are fast at scale, but their None proves nothing."""
        L = self.L
        failed: dict[tuple[int, tuple[int, int]], list[Res]] = {}
        start = self.expanded

        def rec(u: int, res: Res, last: tuple[int, int], g: float) -> list[_Step] | None:
            dead = failed.get((u, last), ())
            if any(self._covers(r, res) for r in dead):
                return None
            if self.expanded - start > budget:
                raise BudgetExceeded
            self._check(0.0)
            cands = self.moves(u, res, last, g, bound, strict=False, cheap=cheap)
            # longest stage first (few big replicated stages fit tight bounds best), then slack
            cands.sort(key=lambda c: (-c[2], c[0], c[4]))
            for _f, cost, b, mask, m, res2, step in cands:
                if b == L:
                    return [step]
                rest = rec(b, res2, (mask, m), cost)
                if rest is not None:
                    return [step, *rest]
            failed.setdefault((u, last), []).append(res)
            return None

        steps = rec(0, ((0,) * self.K, ()), CLIENT_DESC, 0.0)
        if steps is None:
            return None
        moves = self.settle(steps)
        return Result(tuple(moves), self.bottleneck(moves), self.latency(moves), self.expanded)

    # --- latency at a fixed bottleneck ----------------------------------------------------------

    def astar_latency(self, bound: float) -> Result | None:
        """Among plans whose every cost is <= bound, the one of least latency, then fewest
        devices (None if there is none). Raises ``Timeout``."""
        L = self.L
        lat_h = self.bounds.latency
        states: list[tuple[int, Res, tuple[int, int], float, int, _Step | None]] = [
            (0, ((0,) * self.K, ()), CLIENT_DESC, 0.0, -1, None)]
        heap = [(_q(lat_h(0, self.n)), 0, 0, 0)]
        closed: dict[tuple[int, tuple[int, int]], list[tuple[Res, float]]] = {}
        while heap:
            _, ndev, _, sid = heapq.heappop(heap)
            self._check(0.0)
            u, res, last, g, _, _ = states[sid]
            if u == L:
                return self._result(states, sid)
            seen = closed.setdefault((u, last), [])
            if any(g2 <= g and self._covers(r2, res) for r2, g2 in seen):
                continue
            seen.append((res, g))
            prev = last[0]
            for _, _, b, mask, m, res2, step in self.moves(u, res, last, 0.0, bound, strict=False):
                add = self.stage_time(mask, u, b) + self.link_latency(prev, mask, self.cut[u])
                if b == L:
                    add += self.link_latency(mask, 0, self.cut[L])
                    h = 0.0
                else:
                    h = lat_h(b, _free_upper(self.n, res2))
                g2 = g + add
                states.append((b, res2, (mask, m), g2, sid, step))
                heapq.heappush(heap, (_q(g2 + h), ndev + m, -b, len(states) - 1))
        return None

    # --- pricing a class-level plan -------------------------------------------------------------

    def bottleneck(self, moves: list[Move] | tuple[Move, ...]) -> float:
        worst, prev, prev_m = self.bounds.floor, 0, 1
        for mv in moves:
            mask = mask_of(k for k in range(self.K) if mv.counts[k])
            m = sum(mv.counts)
            worst = max(worst, self.cut[mv.a] * self.link_spb(prev, mask) / (prev_m * m),
                        self.stage_cost(mask, mv.a, mv.b) / m)
            prev, prev_m = mask, m
        return max(worst, self.cut[self.L] * self.link_spb(prev, 0) / prev_m)

    def latency(self, moves: list[Move] | tuple[Move, ...]) -> float:
        total, prev = 0.0, 0
        for mv in moves:
            mask = mask_of(k for k in range(self.K) if mv.counts[k])
            total += self.stage_time(mask, mv.a, mv.b)
            total += self.link_latency(prev, mask, self.cut[mv.a])
            prev = mask
        return total + self.link_latency(prev, 0, self.cut[self.L])


def mask_of(ks: Iterator[int] | tuple[int, ...]) -> int:
    out = 0
    for k in ks:
        out |= 1 << k
    return out


def _merge(flex: Flex, mask: int, x: int) -> Flex:
    """flex with x more devices pending on mask."""
    if x <= 0:
        return flex
    d = dict(flex)
    d[mask] = d.get(mask, 0) + x
    return tuple(sorted(d.items()))


def _free_upper(n: tuple[int, ...], res: Res) -> tuple[int, ...]:
    """Uncommitted devices per class (pending demands not deducted: an upper bound)."""
    return tuple(n[k] - res[0][k] for k in range(len(n)))


def _q(x: float) -> int:
    return round(x / LATENCY_QUANTUM_S) if math.isfinite(x) else 1 << 62
