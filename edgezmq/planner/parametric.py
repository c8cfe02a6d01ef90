"""Bottleneck-first exact search over individual devices, for clusters without class structure (internal).

When every device is its own kind (solver.py sends such problems here), the class
search has nothing to count. This module searches devices directly, on the decision
problem D(B): "is there a plan whose every cost is <= B?", and minimises B by bisection
over D (docs/planner.md, "Every device different", has the arguments):

- ``Tables``: per device d and stage [a, b), its effective time eff_d(a, b) (compute,
  receive/send costs and its NIC terms folded in, search.py) or inf when the stage does
  not fit d's memory; built once.
- ``Level``: what D(B) needs at one B. M_d(a, b) = the fewest replicas with which d may
  run [a, b) (eff_d / m <= B); a stage of m devices is feasible iff every member has
  M <= m, so "d can do all e can" at B is M_d <= M_e everywhere (B-dominance).
- Bounds at B (each a necessary condition for D(B), monotone in B, so bisection on them
  gives a proven lower bound): capacity, sum over the devices left of C_d(u) >= w(u, L)
  where C_d(u) = max over stages [a, b), a >= u, of w(a, b) / M_d(a, b) (what one device
  can carry of any nonnegative unit weights w), and cover, the fewest devices that cover
  [u, L) when devices may be reused <= the devices left.
- ``Level.search``: depth-first D(B) on states (u, devices used, last stage), with the
  two bounds, failures memoised (a state using a superset of a failed state's devices, at
  the same u and an equivalent last stage, fails too; ``memo`` carries them to searches at
  lower bounds, where they hold too), and only *closed* stages: devices
  with equal links are grouped; a stage may hold d and leave out an eligible unused e
  of d's group only if d does not B-dominate e (else swapping them loses nothing).
- ``greedy``: a first plan in O(N L) per stage (anytime; any size); with replication,
  ``greedy_replicated`` then builds replicated plans stage by stage (least waste first).
"""

from __future__ import annotations

import math
from bisect import bisect_right
from dataclasses import dataclass

import numpy as np

from .classes import DeviceArrays, memory_table
from .lagrange import PRICE_ATOL, PRICE_RTOL, Stages
from .search import Effort

__all__ = ["Tables", "Level", "stages_at", "Found", "Memo", "greedy", "greedy_replicated", "GREEDY_RULES", "MAX_TABLE"]

MAX_TABLE = 12_000_000      # devices x (units + 1)^2 entries: above it, no exact device search
MAX_DOMINANCE = 96          # devices up to which B-dominance is computed pair by pair
SLACK_RTOL = 1e-9           # capacity slack below -this x total weight proves infeasible
# greedy_replicated's rules (score, pick), each tried: none is best on every cluster
GREEDY_RULES = (("waste", "capacity"), ("waste", "rank"), ("reach", "capacity"))
MAX_REFERENCES = 3          # unit weightings w tried by the capacity bound
HINT_EDGE = 0.5             # hint order: other member sets on an LP solution's window, by this x its value


# failed states of the decision search: (u, last stage's link groups, its size) -> used masks
Memo = dict[tuple[int, tuple[int, ...], int], list[int]]


@dataclass(frozen=True)
class Found:
    """A plan of D(B): stages (a, b, devices), every cost <= B."""

    stages: tuple[tuple[int, int, tuple[int, ...]], ...]


class Tables:
    """Per-device stage times and memory fit of a problem (``DeviceArrays``), built once."""

    def __init__(self, arr: DeviceArrays) -> None:
        self.arr = arr
        n, L = arr.times.shape
        self.N, self.L = n, L
        self.replication = arr.replication
        cut = np.array([float(arr.input_bytes), *arr.out_bytes.tolist()])
        self.cut = cut
        self.pre = np.concatenate([np.zeros((n, 1)), np.cumsum(arr.times, axis=1)], axis=1)
        recv, send = arr.io()
        up, down = arr.nic()
        self.recv, self.send, self.up, self.down = recv, send, up, down
        self.cap = arr.cap.astype(float)
        self.spb = np.nan_to_num(arr.spb, nan=0.0).tolist()   # the diagonal is never used
        self.floor = max(cut[0] * arr.client_up, cut[-1] * arr.client_down)
        self.need = memory_table(arr.param_bytes, arr.work_bytes, tuple(cut.tolist()), arr.buffers)
        self.groups = _link_groups(arr)
        self.small = n * (L + 1) ** 2 <= MAX_TABLE
        self.eff: np.ndarray | None = None
        if self.small:
            a = np.arange(L + 1)
            t = (self.pre[:, None, :] - self.pre[:, :, None] + (recv[:, None] * cut)[:, :, None]
                 + (send[:, None] * cut)[:, None, :])
            eff = np.maximum(t, np.maximum((down[:, None] * cut)[:, :, None], (up[:, None] * cut)[:, None, :]))
            ok = (a[None, :] > a[:, None])[None] & (self.need[None] <= self.cap[:, None, None])
            self.eff = np.where(ok, eff, np.inf)
        # the stages [a, b), a < b, row-major (by a, then b): Level works on these only
        ta, tb_ = np.triu_indices(L + 1, k=1)
        self.tri_a, self.tri_b = ta, tb_
        self.tri_starts = np.searchsorted(ta, np.arange(L + 1))
        self.eff_tri = np.ascontiguousarray(self.eff[:, ta, tb_]) if self.eff is not None else None
        # unit weightings for the capacity bound: a few device profiles, fastest first
        order = np.argsort(self.pre[:, -1], kind="stable")
        refs: list[np.ndarray] = []
        seen: set[bytes] = set()
        for d in order.tolist():
            key = arr.times[d].tobytes()
            if key not in seen and len(refs) < MAX_REFERENCES:
                seen.add(key)
                refs.append(self.pre[d])
        if not refs or all(r[-1] <= 0 for r in refs):
            refs = [np.arange(L + 1, dtype=float)]        # no work anywhere: count units
        self.refs = refs

    def row(self, u: int) -> np.ndarray:
        """eff_d(u, b) for every device and b (inf where memory does not fit or b <= u)."""
        if self.eff is not None:
            return self.eff[:, u, :]
        cut, L = self.cut, self.L
        t = (self.pre - self.pre[:, u:u + 1] + (self.recv * cut[u])[:, None] + self.send[:, None] * cut[None, :])
        eff = np.maximum(t, np.maximum((self.down * cut[u])[:, None], self.up[:, None] * cut[None, :]))
        ok = (np.arange(L + 1) > u)[None, :] & (self.need[u][None, :] <= self.cap[:, None])
        return np.where(ok, eff, np.inf)

    def link(self, xs: tuple[int, ...], ys: tuple[int, ...], nbytes: float) -> float:
        """Pair term of a link between node sets (spb rows: 0 is the client, device d is d + 1)."""
        spb = self.spb
        return nbytes * max(spb[x][y] for x in xs for y in ys) / (len(xs) * len(ys))


def _link_groups(arr: DeviceArrays) -> list[int]:
    """Group index per device: devices with the same pair links (rate) to every other node."""
    n = arr.times.shape[0]
    group = [-1] * n
    heads: list[int] = []
    for d in range(n):
        for g, h in enumerate(heads):
            keep = np.ones(n + 1, dtype=bool)
            keep[[d + 1, h + 1]] = False
            if np.array_equal(arr.spb[d + 1, keep], arr.spb[h + 1, keep]):
                group[d] = g
                break
        else:
            group[d] = len(heads)
            heads.append(d)
    return group


def _min_replicas(eff: np.ndarray, bound: float, top: int) -> np.ndarray:
    """Fewest replicas m with eff / m <= bound (as the search compares), capped at top."""
    fin = np.isfinite(eff)
    e = eff[fin]
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        m = np.clip(np.nan_to_num(np.ceil(e / bound), nan=1, posinf=top), 1, top)   # nan: 0 / 0, one will do
    # float division may put ceil one off the comparison eff / m <= bound: settle it exactly
    lower = np.maximum(m - 1, 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        m -= (m > 1) & (e / lower <= bound)
        m += (m < top) & (e / m > bound)
    out = np.full(eff.shape, top, dtype=np.int64)
    out[fin] = m
    return out


def _windows(Mt: np.ndarray, top: int, replication: bool) -> np.ndarray:
    """Per stage (a < b): the least m with at least m devices whose M <= m (top: none)."""
    if not replication:
        return np.where(Mt.min(axis=0) <= 1, 1, top)
    good = np.sort(Mt, axis=0) <= np.arange(1, Mt.shape[0] + 1)[:, None]
    return np.where(good.any(axis=0), good.argmax(axis=0) + 1, top)


def stages_at(tables: Tables, bound: float) -> Stages:
    """``Level(tables, bound).stages`` without the rest of the level (its bounds)."""
    assert tables.eff_tri is not None
    top = tables.N + 1 if tables.replication else 2
    Mt = _min_replicas(tables.eff_tri, bound, top)
    return Stages.from_triangle(tables.tri_a, tables.tri_b, Mt, _windows(Mt, top, tables.replication),
                                top, tables.L)


class Level:
    """D(B) at one bound: replica needs, bounds, dominance, and the depth-first search."""

    def __init__(self, tables: Tables, bound: float, *, exact: bool = True,
                 prices: list[np.ndarray] | tuple = (), hint: dict | None = None) -> None:
        tb = self.tb = tables
        self.B = bound
        n, L = tb.N, tb.L
        self.top = top = n + 1 if tb.replication else 2   # M == top: d cannot run the stage
        assert tb.eff_tri is not None
        ta, tb_, starts = tb.tri_a, tb.tri_b, tb.tri_starts
        Mt = _min_replicas(tb.eff_tri, bound, top)                  # (n, P): stages a < b
        self.Mt = Mt
        self._M: np.ndarray | None = None
        self.ok = tb.floor <= bound
        # cover: fewest devices covering [u, L) with reuse; a window [a, b) needs the least m
        # with at least m devices whose M <= m
        first_t = _windows(Mt, top, tb.replication)
        self.window_t = first_t
        first = np.full((L + 1, L + 1), top, dtype=np.int64)
        first[ta, tb_] = first_t
        self.window_m = first
        # capacity: C[j][d][u] = max over a >= u, b of w_j(a, b) / max(M_d(a, b), window_m(a, b))
        self.C: list[list[list[float]]] = []
        self.Cn: list[np.ndarray] = []     # the same as arrays (n, L+1)
        self.wsuf: list[list[float]] = []
        # a stage [a, b) holding d has m >= M_d(a, b) members and m >= window_m(a, b)
        size = np.maximum(Mt, first_t[None])
        inv = np.where(size < top, 1.0 / size, 0.0)
        for ref in tb.refs:
            w = np.maximum(ref[tb_] - ref[ta], 0.0)
            per = np.zeros((n, L + 1))
            per[:, :L] = np.maximum.reduceat(w[None] * inv, starts[:L], axis=1)   # best b per a
            suf = np.maximum.accumulate(per[:, ::-1], axis=1)[:, ::-1]
            self.Cn.append(suf)
            self.C.append(suf.tolist())
            self.wsuf.append((ref[-1] - ref).tolist())
        cover = np.zeros(L + 1, dtype=np.int64)
        for u in range(L - 1, -1, -1):
            cover[u] = (first_t[starts[u]:starts[u + 1]] + cover[u + 1:]).min()
        self.cover = cover.tolist()
        self.exact = exact
        self._stages: Stages | None = None
        # prices (lagrange.py): a state at u with free devices F fails when SP(u) > mu(F)
        self.prices = [(mu.tolist(), self.stages.path(self.stages.prices(mu)[0]).tolist()) for mu in prices]
        self.hint = hint or {}
        self.dom: list[int] = []      # dom[d]: devices d strictly B-dominates (search() fills)
        self.above: list[int] = []    # above[d]: devices that strictly B-dominate d
        self.rank: list[int] = []     # a linear extension, weaker first
        self.pos: dict[int, int] = {}  # d -> its place in rank
        self._cols: dict[tuple[int, int], list[tuple[int, int]]] = {}

    def _dominance(self) -> None:
        """B-dominance within link groups (module doc); exact mode needs it for completeness,
        so above MAX_DOMINANCE devices only exact twins at B (equal M) are ordered."""
        tb, n = self.tb, self.tb.N
        flat = self.Mt
        weight = flat.sum(axis=1).tolist()
        self.rank = sorted(range(n), key=lambda d: (-weight[d], d))
        self.pos = {d: i for i, d in enumerate(self.rank)}
        self.dom, self.above = [0] * n, [0] * n
        for d in range(n):
            same = [e for e in range(n) if e != d and tb.groups[e] == tb.groups[d]]
            if not same or (n > MAX_DOMINANCE and not self.exact):
                continue
            le = (flat[d][None, :] <= flat[same]).all(axis=1)       # M_d <= M_e: d can do all e can
            eq = (flat[d][None, :] == flat[same]).all(axis=1)
            for i, e in enumerate(same):
                if le[i] and (not eq[i] or e < d):                  # ties: the lower index is weaker
                    self.dom[d] |= 1 << e
                    self.above[e] |= 1 << d

    # --- bounds ---------------------------------------------------------------------------

    def slack(self, u: int, free: list[int]) -> list[float]:
        """Per weighting w: (capacity of the free devices from u on) - w(u, L), as a share of
        w(0, L) (a weighting without work: inf)."""
        out = []
        for C, wsuf in zip(self.C, self.wsuf):
            total = wsuf[0]
            out.append((sum(C[d][u] for d in free) - wsuf[u]) / total if total > 0 else math.inf)
        return out

    def possible(self) -> bool:
        """The bounds at the root: a cheap necessary condition for D(B)."""
        if not self.ok:
            return False
        free = list(range(self.tb.N))
        return self.cover[0] <= len(free) and min(self.slack(0, free)) >= -SLACK_RTOL

    @property
    def M(self) -> np.ndarray:
        """M[d, a, b]: the fewest replicas with which d may run [a, b) (top: it cannot)."""
        if self._M is None:
            tb = self.tb
            self._M = np.full((tb.N, tb.L + 1, tb.L + 1), self.top, dtype=np.int64)
            self._M[:, tb.tri_a, tb.tri_b] = self.Mt
        return self._M

    @property
    def stages(self) -> Stages:
        """The stages some device can run at this B, for the configuration LP (lagrange.py)."""
        if self._stages is None:
            tb = self.tb
            self._stages = Stages.from_triangle(tb.tri_a, tb.tri_b, self.Mt, self.window_t, self.top, tb.L)
        return self._stages

    # --- the search -----------------------------------------------------------------------

    def column(self, u: int, b: int) -> list[tuple[int, int]]:
        """(M_d(u, b), d) for devices that can run [u, b) at all, fewest replicas first."""
        key = (u, b)
        hit = self._cols.get(key)
        if hit is None:
            col = self.Mt[:, self.tb.tri_starts[u] + b - u - 1]
            idx = np.flatnonzero(col < self.top)
            hit = sorted(zip(col[idx].tolist(), idx.tolist()))
            self._cols[key] = hit
        return hit

    def closed_sets(self, elig: list[int], m: int, limit: int,
                    caps: tuple[tuple[list[float], float], ...] = ()) -> list[tuple[int, ...]]:
        """Stages of m devices from ``elig`` that are closed (module doc), weaker first;
        without ``exact``, only the first ``limit`` of them. ``caps``: (weights >= 0 per
        device, cap) pairs; a set whose weights sum above a cap is left out, and so is every
        branch of the enumeration that cannot stay within one (its partial sum plus the
        cheapest weight left for each member still to pick exceeds the cap, with a margin
        that only lets more through): the search drops those sets anyway, so this changes
        no answer, only the work."""
        if not self.rank:
            self._dominance()
        pos = self.pos
        order = sorted(elig, key=pos.__getitem__)
        n_el = len(order)
        out: list[tuple[int, ...]] = []
        if n_el < m:
            return out
        ws: list[list[float]] = []
        lims: list[float] = []
        sufs: list[list[float]] = []
        for w, cap in caps:
            ow = [w[d] for d in order]
            so = sorted(ow)
            lim = cap + 1e-9 * (abs(cap) + sum(so[-m:]))     # rounding only lets more through
            if sum(so[:m]) > lim:
                return out
            suf = [math.inf] * (n_el + 1)
            for i in range(n_el - 1, -1, -1):
                suf[i] = min(suf[i + 1], ow[i])
            ws.append(ow)
            lims.append(lim)
            sufs.append(suf)
        # at most two caps are used (capacity waste, reduced price): pad to two
        while len(ws) < 2:
            ws.append([0.0] * n_el)
            lims.append(math.inf)
            sufs.append([0.0] * (n_el + 1))
        w1, w2 = ws[0], ws[1]
        lim1, lim2 = lims[0], lims[1]
        suf1, suf2 = sufs[0], sufs[1]
        emask = 0
        for d in order:
            emask |= 1 << d
        dom, above = self.dom, self.above
        exact = self.exact
        chosen: list[int] = []
        prefix = [0]                # prefix[i]: the devices order[:i], as a mask
        for d in order:
            prefix.append(prefix[-1] | 1 << d)

        def rec(i: int, banned: int, cmask: int, s1: float, s2: float) -> None:
            need = m - len(chosen)
            if need == 0:
                if s1 <= lim1 and s2 <= lim2:
                    out.append(tuple(chosen))
                return
            if n_el - i < need or (not exact and len(out) >= limit):
                return
            if s1 + need * suf1[i] > lim1 or s2 + need * suf2[i] > lim2:
                return
            x = order[i]
            # x may join only if every earlier eligible device it dominates was chosen
            if not banned >> x & 1 and dom[x] & emask & prefix[i] & ~cmask == 0:
                chosen.append(x)
                rec(i + 1, banned, cmask | 1 << x, s1 + w1[i], s2 + w2[i])
                chosen.pop()
            rec(i + 1, banned | above[x], cmask, s1, s2)

        rec(0, 0, 0, 0.0, 0.0)
        return out

    def search(self, effort: Effort, *, greedy_sets: int = 1, memo: Memo | None = None) -> Found | None:
        """A plan with every cost <= B, or None when there is none (with ``exact``; else
        None proves nothing). ``memo``: the failed states of exact searches at bounds >= this
        one (a state with no completion within a bound has none within a lower one), used and
        extended in place; only for an exact search. Raises ``Timeout`` when ``effort`` runs
        out (the failures recorded so far stay valid)."""
        if memo is not None and not self.exact:
            raise ValueError("memo: only an exact search proves its failures")
        tb = self.tb
        if not self.possible():
            return None
        if not self.rank:
            self._dominance()
        L, N, B = tb.L, tb.N, self.B
        cut, groups, rep = tb.cut.tolist(), tb.groups, tb.replication
        failed: Memo = {} if memo is None else memo
        wsuf0 = self.wsuf[0]
        C0 = self.C[0]
        C0u = [[C0[d][u] for d in range(N)] for u in range(L + 1)]   # C0u[u][d] = C0[d][u]
        mu0, sp0 = self.prices[0] if self.prices else ([], [])

        def rec(u: int, used: int, last: tuple[int, ...]) -> list[tuple[int, int, tuple[int, ...]]] | None:
            effort.tick()
            # a last stage whose link into any next stage is within B constrains nothing: its
            # failures hold for every last stage at u (key (u, (), 0)), so they are looked up too
            loose = last != (0,) and cut[u] * max(max(tb.spb[x][1:]) for x in last) / len(last) <= B
            sig = (u, (), 0) if loose else (
                u, tuple(sorted({groups[x - 1] for x in last if x})) if last != (0,) else (-1,), len(last))
            for key in (sig,) if loose else (sig, (u, (), 0)):
                for f in failed.get(key, ()):
                    if used & f == f:
                        return None
            free = [d for d in range(N) if not used >> d & 1]
            nfree = len(free)
            slack = self.slack(u, free)
            if self.cover[u] > nfree or min(slack) < -SLACK_RTOL or any(
                    sp[u] > sum(mu[d] for d in free) * (1 + PRICE_RTOL) + PRICE_ATOL for mu, sp in self.prices):
                failed.setdefault(sig, []).append(used)
                return None
            pslack = math.inf
            for mu, sp in self.prices[:1]:
                pslack = sum(mu[d] for d in free) * (1 + PRICE_RTOL) + PRICE_ATOL - sp[u]
            # a move's waste under weighting 0 lowers the child's slack by at least as much
            total = wsuf0[0] if wsuf0[0] > 0 else 1.0
            budget = slack[0] * total if math.isfinite(slack[0]) else math.inf
            c0u = C0u[u]
            cands = []
            for b in range(L, u, -1):
                col = [(mm, d) for mm, d in self.column(u, b) if not used >> d & 1]
                if not col:
                    continue
                if b < L and self.cover[b] > nfree - 1:
                    continue
                w_ab = wsuf0[u] - wsuf0[b]
                tops = min(len(col), nfree - (self.cover[b] if b < L else 0)) if rep else 1
                needs = [mm for mm, _ in col]       # sorted: the eligible at m are a prefix
                devs = [d for _, d in col]
                for m in range(1, tops + 1):
                    k = bisect_right(needs, m)
                    if k < m:
                        continue
                    elig = devs[:k]
                    lk_base = cut[u] / (len(last) * m)
                    effort.tick()           # a stage considered is work too: limits stay responsive
                    caps = [(c0u, budget + SLACK_RTOL * total + w_ab)]
                    if self.prices:
                        caps.append((mu0, pslack - sp0[b] + sp0[u]))
                    for R in self.closed_sets(elig, m, greedy_sets, tuple(caps)):
                        effort.tick()
                        waste = sum(C0[d][u] for d in R) - w_ab
                        if waste > budget + SLACK_RTOL * total:
                            continue
                        ys = tuple(d + 1 for d in R)
                        if lk_base * max(tb.spb[x][y] for x in last for y in ys) > B:
                            continue
                        if b == L and cut[L] * max(tb.spb[y][0] for y in ys) / m > B:
                            continue
                        if self.prices:     # reduced price: what the stage costs beyond the bound's path
                            rc = sum(mu0[d] for d in R) + sp0[b] - sp0[u]
                            if rc > pslack:
                                continue
                            cands.append((rc, -b, m, R, w_ab))
                            continue
                        cands.append((waste, -b, m, R, w_ab))
            if self.prices:
                hint = self.hint
                if hint:
                    cands.sort(key=lambda c: (-hint.get((u, -c[1], c[3]), hint.get((u, -c[1]), 0.0) * HINT_EDGE), c[0], c[1], c[2]))
                else:
                    cands.sort(key=lambda c: (c[0], c[1], c[2]))
            elif rep:     # replicated: least capacity wasted per work carried first (finds plans early)
                cands.sort(key=lambda c: (c[0] / c[4] if c[4] > 0 else c[0], c[1], c[2]))
            else:
                cands.sort(key=lambda c: (c[1], c[0], c[2]))
            for _waste, nb, _m, R, _w in cands:
                b = -nb
                step = (u, b, R)
                if b == L:
                    return [step]
                mask = 0
                for d in R:
                    mask |= 1 << d
                rest = rec(b, used | mask, tuple(d + 1 for d in R))
                if rest is not None:
                    return [step, *rest]
            failed.setdefault(sig, []).append(used)
            return None

        steps = rec(0, 0, (0,))
        return None if steps is None else Found(tuple(steps))


def greedy(tables: Tables, bound: float) -> list[tuple[int, int, tuple[int, ...]]] | None:
    """A plan with every cost <= bound, one device a stage, built stage by stage: the device
    that reaches furthest (ties: the one with least memory), or None if it gets stuck.
    Not a decision procedure: None proves nothing. O(N L) per stage, any problem size."""
    tb = tables
    if tb.floor > bound:
        return None
    L, N = tb.L, tb.N
    used = np.zeros(N, dtype=bool)
    u, last = 0, 0
    stages: list[tuple[int, int, tuple[int, ...]]] = []
    cut = tb.cut
    spb = np.array(tb.spb)
    while u < L:
        row = tb.row(u)
        link = cut[u] * spb[last, 1:]
        ok = (row <= bound) & np.isfinite(row) & ~used[:, None] & (link <= bound)[:, None]
        ok[:, L] &= cut[L] * spb[1:, 0] <= bound
        reach = np.where(ok.any(axis=1), L - np.argmax(ok[:, ::-1], axis=1), -1)
        best = reach.max()
        if best <= u:
            return None
        cands = np.flatnonzero(reach == best)
        d = int(cands[np.argmin(tb.cap[cands])])
        stages.append((u, int(best), (d,)))
        used[d] = True
        u, last = int(best), d + 1
    return stages


def greedy_replicated(tables: Tables, bound: float, rule: tuple[str, str] = ("waste", "capacity")
                      ) -> list[tuple[int, int, tuple[int, ...]]] | None:
    """A plan with every cost <= bound, with replicas, built stage by stage without
    backtracking, or None if it gets stuck (proves nothing). At each cut u, every end b gets
    its fewest replicas m (at least m free devices with M <= m) and, of those eligible, the
    m picked by ``rule[1]``: "capacity" (least C_d(u)) or "rank" (weakest: most replicas
    needed summed over all stages); the stage scored best by ``rule[0]`` wins: "waste"
    (least capacity wasted per work carried) or "reach" (most units per replica), among
    those that keep the cover and capacity bounds of what is left. O(N L^2) per stage
    with the level's tables; needs ``tables.eff``."""
    score_by, pick = rule
    tb = tables
    level = Level(tb, bound)
    if not level.ok or tb.eff is None:
        return None
    L, N, Mt, starts = tb.L, tb.N, level.Mt, tb.tri_starts
    C0 = level.Cn[0]
    weight = Mt.sum(axis=1)
    wsuf = np.array(level.wsuf[0])
    cut, spb = tb.cut, tb.spb
    free = np.ones(N, dtype=bool)
    u = 0
    last: tuple[int, ...] = (0,)
    stages: list[tuple[int, int, tuple[int, ...]]] = []
    Cs = level.Cn
    wsufs = [np.array(w) for w in level.wsuf]
    cover = np.array(level.cover)
    spb_a = np.array(spb)
    while u < L:
        idx = np.flatnonzero(free)
        nf = len(idx)
        Mf = np.full((nf, L + 1), level.top, dtype=np.int64)    # Mf[i, b]: M_idx[i](u, b)
        Mf[:, u + 1:] = Mt[idx, starts[u]:starts[u + 1]]
        good = np.sort(Mf, axis=0) <= np.arange(1, nf + 1)[:, None]
        fewest = np.where(good.any(axis=0), good.argmax(axis=0) + 1, 0)
        # every end b at once: its stage = the first fewest[b] eligible devices in key order
        key = C0[idx, u] if pick == "capacity" else -weight[idx]
        ordk = idx[np.argsort(key, kind="stable")]
        E = (Mf[np.searchsorted(idx, ordk)] <= fewest[None, :]) & (fewest > 0)[None, :]
        sel = E & (np.cumsum(E, axis=0) <= fewest[None, :])
        m = np.maximum(fewest, 1)
        ok = fewest > 0
        ok[:u + 1] = False
        lk = spb_a[np.array(last)][:, ordk + 1].max(axis=0)     # worst pair link from the last stage
        lkmax = np.where(sel, lk[:, None], -np.inf).max(axis=0)
        ok &= ~(cut[u] * lkmax / (len(last) * m) > bound)
        if ok[L]:
            out = spb_a[ordk[sel[:, L]] + 1, 0].max()
            ok[L] = not cut[L] * out / m[L] > bound
        # what is left after each stage keeps the cover and capacity bounds
        inner = np.arange(L + 1) < L
        ok &= ~(inner & (cover > nf - m))
        for Cj, wj in zip(Cs, wsufs):
            if wj[0] > 0:
                rest = Cj[idx].sum(axis=0) - np.where(sel, Cj[ordk], 0.0).sum(axis=0)
                ok &= ~(inner & ((rest - wj) / wj[0] < -SLACK_RTOL))
        if not ok.any():
            return None
        w = wsuf[u] - wsuf
        if score_by == "waste":
            waste = np.where(sel, C0[ordk, u][:, None], 0.0).sum(axis=0) - w
            score = np.where(w > 0, waste / np.where(w > 0, w, 1.0), waste)
        else:
            score = -(np.arange(L + 1) - u) / m
        b = int(np.argmin(np.where(ok, score, np.inf)))
        R = tuple(int(d) for d in ordk[sel[:, b]])
        stages.append((u, b, R))
        free[list(R)] = False
        u, last = b, tuple(d + 1 for d in R)
    return stages


def lower_bound(tables: Tables, lo: float, hi: float, effort: Effort, rtol: float = 1e-5) -> float:
    """The largest B proven infeasible by the root bounds (capacity, cover), by bisection
    over [lo, hi] (the bounds only get weaker as B grows, so every B below it fails too).
    Its steps are counted as nodes but never cut: a bounded cost (log2(1 / rtol) levels),
    so even the smallest effort limit returns this bound."""
    if hi <= lo:
        return lo
    if not Level(tables, lo).possible():
        while hi - lo > rtol * hi:
            effort.spent += 1
            mid = (lo + hi) / 2
            if Level(tables, mid).possible():
                hi = mid
            else:
                lo = mid
    return lo


def first_plan(tables: Tables, lower: float) -> list[tuple[int, int, tuple[int, ...]]] | None:
    """A greedy plan at the lowest bound of a doubling ladder from ``lower`` (anytime's
    first incumbent; None when even an unlimited bound gets stuck)."""
    x = lower if lower > 0 else 1e-3
    for _ in range(64):
        found = greedy(tables, x)
        if found is not None:
            return found
        x *= 2
    return greedy(tables, math.inf)
