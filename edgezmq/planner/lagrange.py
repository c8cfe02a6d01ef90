"""The configuration LP of the device search's D(B) and its price (Lagrangian) bound (internal).

D(B) asks for a path of stages from cut 0 to cut L, a stage = (a, b, R) with every member
of R able to run [a, b) with |R| replicas (``Level.M``), each device in one stage at most.
Relaxed to an LP (x >= 0 per stage, a unit of flow from 0 to L, each device's stages
summing to at most 1) and priced (docs/planner.md, "Prices"): for any prices mu >= 0 on the
devices, a stage costs the sum of its members' prices, and every plan that still has the
devices F free at cut u pays at least SP_mu(u), the cheapest path from u to L when
devices may be reused, and at most mu(F). So SP_mu(u) > mu(F) proves that no plan
completes from there, whatever the prices: their validity never depends on the LP
solver's accuracy, which only makes them strong. Good prices are the duals of the LP's
phase 1 (least total overuse of devices), solved here by column generation with a small
dense revised simplex (numpy only): rows are the L flow cuts and the N devices, columns
are generated from the duals (per stage and size m, the m cheapest eligible devices).
Solves at successive B start from the previous one's basis (``Basis``).
"""

from __future__ import annotations

import numpy as np

from .search import Effort

__all__ = ["Stages", "Basis", "ascend", "farkas_prices", "certifies", "PRICE_RTOL", "PRICE_ATOL"]

BIG = 1e3                   # cost of the artificial columns (a path that uses no device)
PIVOT_TOL = 1e-9
RC_TOL = 1e-9
MAX_NEW = 64                # columns added per pricing round (the most negative first)
KEEP_ROWS = 4               # stage columns kept between rounds: at most this x rows
PIVOT_WORK = 20_000         # numbers an LP step touches per search node counted
PRICE_RTOL, PRICE_ATOL = 1e-9, 1e-12    # SP must exceed mu(F) by more than this to prune
MAX_PAIR_TABLE = 8_000_000  # devices x (stage, size) pairs above which Stages keeps no table
ASCENT_START, ASCENT_EVERY = 30, 10    # rounds after which, and between which, the ascent is tried
ASCENT_STEPS = 40           # ... for this many subgradient steps
ASCENT_TARGET = 0.05        # ... aiming at this x the master's overuse
FEASIBLE_ATOL = 1e-9        # overuse (with the artificials' BIG) at most this: the LP is feasible


class Stages:
    """The stages [a, b) some device can run at a level (M_d(a, b) < top), flattened:
    ``a``, ``b`` (P,), ``M`` (N, P) replica needs, ``window`` (P,) the least stage size."""

    def __init__(self, M: np.ndarray, window_m: np.ndarray, top: int) -> None:
        L = M.shape[1] - 1
        some = (M < top).any(axis=0)
        a, b = np.nonzero(some)                  # row-major: sorted by a, then b
        self._set(a, b, np.ascontiguousarray(M[:, a, b]), window_m[a, b], top, L)

    @classmethod
    def from_triangle(cls, ta: np.ndarray, tb: np.ndarray, Mt: np.ndarray, window: np.ndarray, top: int,
                      L: int) -> Stages:
        """The same from the stages a < b, row-major (``Mt``: (N, P) replica needs)."""
        some = (Mt < top).any(axis=0)
        st = cls.__new__(cls)
        st._set(ta[some], tb[some], np.ascontiguousarray(Mt[:, some]), window[some], top, L)
        return st

    def _set(self, a: np.ndarray, b: np.ndarray, M: np.ndarray, window: np.ndarray, top: int, L: int) -> None:
        self.L, self.N, self.top = L, M.shape[0], top
        self.a, self.b = a, b
        self.M = M
        self.window = window
        self.sizes = int(min(self.N, top - 1))
        self.starts = np.searchsorted(a, np.arange(L + 1))
        # the (stage, size) pairs worth pricing, by stage then size: window <= m <= the
        # largest replica need of a device that can run it (``prices``)
        most = np.where(M < top, M, 0).max(axis=0) if M.size else np.zeros(0, dtype=np.int64)
        lo = np.maximum(window, 1)
        span = np.maximum(np.minimum(most, self.sizes) - lo + 1, 0)
        self.pair_k = np.repeat(np.arange(a.size), span)
        self.pair_m = (lo[self.pair_k] + np.arange(self.pair_k.size)
                       - np.repeat(np.cumsum(span) - span, span)).astype(np.int64)
        self.pair_first = np.flatnonzero(np.diff(self.pair_k, prepend=-1))
        # M at the pairs, per device, when it is small enough to keep (else gathered per call)
        self.Mq: np.ndarray | None = None
        if M.shape[0] * self.pair_k.size <= MAX_PAIR_TABLE:
            small = np.int16 if top < np.iinfo(np.int16).max else np.int64     # M <= top (N + 1)
            self.Mq = np.ascontiguousarray(M.astype(small)[:, self.pair_k])

    def prices(self, mu: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per stage: the least price of a feasible member set (its m cheapest eligible
        devices, m >= window) and that m (0: none). Only the sizes from the stage's window
        to the largest replica need of a device that can run it are tried: above it the
        eligible devices stay the same, so a bigger m only adds prices >= 0 (and ties go to
        the smallest m, as they would among all sizes)."""
        kq, mq = self.pair_k, self.pair_m
        cnt = np.zeros(kq.size, dtype=np.int64)
        tot = np.zeros(kq.size)
        Mq = self.Mq
        for d in np.argsort(mu, kind="stable").tolist():
            take = ((Mq[d] if Mq is not None else self.M[d][kq]) <= mq) & (cnt < mq)
            cnt += take
            tot += take * float(mu[d])
        tot[cnt < mq] = np.inf
        P = self.a.size
        cost = np.full(P, np.inf)
        size = np.zeros(P, dtype=np.int64)
        if kq.size:
            # pairs run by stage, then size: the least per stage, the smallest size on ties
            first = self.pair_first
            least = np.minimum.reduceat(tot, first)
            at = np.flatnonzero(tot == np.repeat(least, np.diff(np.append(first, kq.size))))
            at = at[np.unique(kq[at], return_index=True)[1]]
            fin = np.isfinite(tot[at])
            cost[kq[at[fin]]] = tot[at[fin]]
            size[kq[at[fin]]] = mq[at[fin]]
        return cost, size

    def path(self, cost: np.ndarray) -> np.ndarray:
        """SP[u]: the least summed stage price of a path of stages from cut u to L."""
        L, st = self.L, self.starts
        sp = np.full(L + 1, np.inf)
        sp[L] = 0.0
        for u in range(L - 1, -1, -1):
            lo, hi = st[u], st[u + 1]
            if hi > lo:
                sp[u] = np.min(cost[lo:hi] + sp[self.b[lo:hi]])
        return sp

    def usage(self, mu: np.ndarray, cost: np.ndarray, size: np.ndarray, sp: np.ndarray) -> np.ndarray:
        """How often each device is used on a cheapest path of SP (from cut 0; the first
        cheapest stage at each cut), with each stage's m cheapest eligible members."""
        use = np.zeros(self.N)
        order = np.argsort(mu, kind="stable")
        u = 0
        while u < self.L and np.isfinite(sp[u]):
            lo, hi = self.starts[u], self.starts[u + 1]
            k = lo + int(np.argmin(cost[lo:hi] + sp[self.b[lo:hi]]))
            use[list(self.members(mu, k, int(size[k]), order))] += 1.0
            u = int(self.b[k])
        return use

    def members(self, mu: np.ndarray, k: int, m: int, order: np.ndarray | None = None) -> tuple[int, ...]:
        """The m cheapest devices eligible for stage k at size m (``order``: argsort of mu)."""
        if order is None:
            order = np.argsort(mu, kind="stable")
        return tuple(sorted(int(d) for d in order[self.M[order, k] <= m][:m]))


Column = tuple[int, int, tuple[int, ...]]


class Basis:
    """A solve's end state, for the next solve at another B (``farkas_prices(warm=...)``):
    its stage columns and basis. Rows and the fixed columns do not depend on B, so the old
    basis is a starting basis there too; its stage columns no longer feasible at the new B
    are kept only while basic, priced like the artificials (BIG), so the simplex drives
    them out as it drives out those (big M). Prices never rest on the LP's accuracy
    (``certifies`` recomputes the bound), so a warm start only changes how fast they come."""

    def __init__(self) -> None:
        self.made: list[Column] = []
        self.basis: list[int] = []
        self.ascended = False       # the solve's prices came from ``ascend`` (it tailed off)


def _valid(st: Stages, index: dict[tuple[int, int], int], col: Column) -> bool:
    a, b, R = col
    k = index.get((a, b))
    return k is not None and len(R) >= st.window[k] and all(st.M[d, k] <= len(R) for d in R)


def farkas_prices(st: Stages, effort: Effort, pool: list[Column] | tuple = (), max_rounds: int = 200,
                  primal: list[tuple[Column, float]] | None = None,
                  warm: Basis | None = None) -> tuple[float, np.ndarray, list[Column]]:
    """Phase 1 of the configuration LP at the level of ``M`` (least total overuse of the
    devices by a fractional path of stages), by column generation. Returns (overuse,
    prices mu in [0, 1]^N): overuse > 0 means the LP, hence D(B), is infeasible, and the
    prices then certify it (``certifies``), and the stage columns generated. It stops early
    when a pricing round's duals already certify (any prices >= 0 may: those are returned,
    with the master's overuse so far) or when the master's overuse reaches 0 (the LP is
    feasible: its solution is a fractional plan). ``pool``: columns
    of an earlier solve, kept where still feasible here. ``warm``: the end state of an
    earlier solve on the same devices and units, started from and then replaced by this
    one's (``Basis``; the overuse then counts columns infeasible here still basic at BIG).
    Each simplex pivot and each pricing round counts as nodes on ``effort``, weighted by the
    arrays it touches (one node per ~PIVOT_WORK numbers: deterministic), and raises
    ``Timeout`` when it runs out."""
    N, L = st.N, st.L
    rows = L + N
    # columns: [0, N) overuse s_d, [N, 2N) slack t_d, [2N, 2N + L) artificials on the flow
    # rows (the first one is the empty path 0 -> L), then stages.
    cols: list[np.ndarray] = []
    cost: list[float] = []
    for d in range(N):
        v = np.zeros(rows)
        v[L + d] = -1.0
        cols.append(v)
        cost.append(1.0)
    for d in range(N):
        v = np.zeros(rows)
        v[L + d] = 1.0
        cols.append(v)
        cost.append(0.0)
    for u in range(L):
        v = np.zeros(rows)
        v[u] = 1.0
        cols.append(v)
        cost.append(BIG)
    rhs = np.zeros(rows)
    rhs[0] = 1.0
    rhs[L:] = 1.0
    basis = [2 * N + u for u in range(L)] + [N + d for d in range(N)]
    n0 = len(cols)
    A = np.zeros((rows, n0 + MAX_NEW * 16))      # grows by doubling
    A[:, :n0] = np.array(cols).T
    c = np.zeros(A.shape[1])
    c[:n0] = cost
    ncol = n0
    seen: set[Column] = set()
    made: list[Column] = []                      # column n0 + i is made[i]
    index = {(a, b): k for k, (a, b) in enumerate(zip(st.a.tolist(), st.b.tolist()))}
    y = np.zeros(rows)

    def add(col: Column, price: float = 0.0) -> bool:
        nonlocal A, c, ncol
        if col in seen:
            return False
        seen.add(col)
        made.append(col)
        a, b, R = col
        v = np.zeros(rows)
        v[a] = 1.0
        if b < L:
            v[b] = -1.0
        v[[L + d for d in R]] = 1.0
        if ncol == A.shape[1]:
            A = np.concatenate([A, np.zeros_like(A)], axis=1)
            c = np.concatenate([c, np.zeros_like(c)])
        A[:, ncol] = v
        c[ncol] = price
        ncol += 1
        return True

    Binv = np.eye(rows)
    xB = rhs.copy()
    if warm is not None and warm.made and len(warm.basis) == rows:
        # the earlier basis: its stage columns, the infeasible ones only while basic (at BIG)
        in_basis = set(warm.basis)
        where: dict[int, int] = {j: j for j in range(n0)}
        for j, col in enumerate(warm.made):
            ok = _valid(st, index, col)
            if ok or n0 + j in in_basis:
                where[n0 + j] = ncol
                add(col, 0.0 if ok else BIG)
        start = [where[j] for j in warm.basis]
        effort.spent += rows ** 3 // PIVOT_WORK
        try:
            inv = np.linalg.inv(A[:, start])
            x0 = inv @ rhs
        except np.linalg.LinAlgError:
            x0 = None
        if x0 is not None and np.isfinite(x0).all() and x0.min() >= -1e-9:
            basis, Binv, xB = start, inv, np.maximum(x0, 0.0)
        # else numerically lost: a cold start with its columns (the ones at BIG get dropped)
    for a, b, R in pool:
        if _valid(st, index, (a, b, R)):
            add((a, b, R))
    certified: np.ndarray | None = None
    rounds = 0
    ascended = False
    for _ in range(max_rounds):
        # simplex on the current columns
        while True:
            effort.spent += (rows * (ncol + 2 * rows)) // PIVOT_WORK
            effort.tick()
            y = c[basis] @ Binv
            rc = c[:ncol] - y @ A[:, :ncol]
            rc[basis] = 0.0
            j = int(np.argmin(rc))
            if rc[j] >= -RC_TOL:
                break
            dcol = Binv @ A[:, j]
            pos = dcol > PIVOT_TOL
            if not pos.any():
                break                            # unbounded cannot happen (costs >= 0); be safe
            ratio = np.where(pos, xB / np.where(pos, dcol, 1.0), np.inf)
            r = int(np.argmin(ratio))
            theta = ratio[r]
            xB = xB - theta * dcol
            xB[r] = theta
            piv = Binv[r] / dcol[r]
            Binv = Binv - np.outer(dcol, piv)
            Binv[r] = piv
            basis[r] = j
            xB = np.maximum(xB, 0.0)
        # keep the column set small (pivots touch every column): drop the nonbasic stage
        # columns dearest at these duals beyond KEEP_ROWS x rows (pricing may bring them back),
        # and the nonbasic ones infeasible here (cost BIG: a warm start's)
        if ncol - n0 > KEEP_ROWS * rows or (c[n0:ncol] > 0).any():
            rc = c[:ncol] - y @ A[:, :ncol]
            inb = np.zeros(ncol, dtype=bool)
            inb[basis] = True
            stage = np.arange(ncol) >= n0
            cand = np.flatnonzero(stage & ~inb)
            dead = cand[c[cand] > 0]
            cand = cand[c[cand] == 0]
            extra = max(0, ncol - n0 - dead.size - KEEP_ROWS * rows // 2) if ncol - n0 > KEEP_ROWS * rows else 0
            drop = np.concatenate([dead, cand[np.argsort(-rc[cand], kind="stable")][:extra]])
            if drop.size:
                keep = np.ones(ncol, dtype=bool)
                keep[drop] = False
                newpos = np.cumsum(keep) - 1
                for j in drop.tolist():
                    seen.discard(made[j - n0])
                made = [col for j, col in enumerate(made) if keep[n0 + j]]
                k = int(keep.sum())
                A[:, :k] = A[:, :ncol][:, keep]
                c[:k] = c[:ncol][keep]
                ncol = k
                basis = [int(newpos[j]) for j in basis]
        if float(c[basis] @ xB) <= FEASIBLE_ATOL:
            break                                # no overuse: the LP is feasible, done
        # price new stage columns: reduced cost = -(y_a - y_b) + sum over R of mu_d
        effort.spent += (st.N * st.pair_k.size + st.N * st.a.size) // PIVOT_WORK
        effort.tick()
        mu = np.clip(-y[L:], 0.0, None)
        ya = np.concatenate([y[:L], [0.0]])
        scost, size = st.prices(mu)
        if _certified(st.path(scost), mu):
            certified = mu                       # these duals prove it already: done
            break
        red = scost - ya[st.a] + ya[st.b]
        flat = np.flatnonzero(np.isfinite(red) & (red < -RC_TOL))
        added = 0
        order = np.argsort(mu, kind="stable")
        for k in flat[np.argsort(red[flat], kind="stable")][:4 * MAX_NEW].tolist():
            a, b = int(st.a[k]), int(st.b[k])
            if add((a, b, st.members(mu, k, int(size[k]), order))):
                added += 1
                if added >= MAX_NEW:
                    break
        if not added:
            break
        rounds += 1
        if rounds >= ASCENT_START and rounds % ASCENT_EVERY == 0:
            certified = ascend(st, mu, float(c[basis] @ xB), effort)
            if certified is not None:
                ascended = True
                break
    overuse = float(c[basis] @ xB)
    if primal is not None:
        primal.extend((made[j - n0], float(x)) for j, x in zip(basis, xB.tolist())
                      if j >= n0 and x > PIVOT_TOL and c[j] == 0)
    if warm is not None:
        warm.made = list(made)
        warm.basis = list(basis)
        warm.ascended = ascended
    prices = certified if certified is not None else np.clip(-y[L:], 0.0, 1.0)
    return overuse, prices, sorted(col for j, col in enumerate(made) if c[n0 + j] == 0)


def ascend(st: Stages, mu: np.ndarray, overuse: float, effort: Effort, steps: int = 0) -> np.ndarray | None:
    """Prices that certify, found by projected subgradient steps on the Lagrangian bound
    SP_mu(0) - mu(all) from the master's duals, or None. On large LPs the column
    generation tails off long before its duals certify, while a few steps from its duals
    often do (any prices >= 0 that certify are a proof: the steps need no convergence).
    Polyak steps towards ASCENT_TARGET x the master's overuse (the LP's value is at most
    that); each step costs a pricing, counted as one. ``steps``: at most this many
    (default ASCENT_STEPS)."""
    work = (st.N * st.pair_k.size + st.N * st.a.size) // PIVOT_WORK
    mu = mu.astype(float).copy()
    for _ in range(steps or ASCENT_STEPS):
        effort.spent += work
        effort.tick()
        cost, size = st.prices(mu)
        sp = st.path(cost)
        if _certified(sp, mu):
            return mu
        g = st.usage(mu, cost, size, sp) - 1.0
        gg = float(g @ g)
        if not gg or not np.isfinite(sp[0]):
            return None
        step = (ASCENT_TARGET * max(overuse, 0.0) - (float(sp[0]) - float(mu.sum()))) / gg
        mu = np.clip(mu + max(step, 0.0) * g, 0.0, 1.0)
    return None


def certifies(st: Stages, mu: np.ndarray) -> bool:
    """Whether the prices prove D(B) infeasible: SP_mu(0) > mu(all devices) (module doc)."""
    return _certified(st.path(st.prices(mu)[0]), mu)


def _certified(sp: np.ndarray, mu: np.ndarray) -> bool:
    return bool(sp[0] > float(np.sum(mu)) * (1 + PRICE_RTOL) + PRICE_ATOL)
