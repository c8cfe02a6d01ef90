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
"""

from __future__ import annotations

import numpy as np

from .search import Effort

__all__ = ["Stages", "farkas_prices", "certifies", "PRICE_RTOL", "PRICE_ATOL"]

BIG = 1e3                   # cost of the artificial columns (a path that uses no device)
PIVOT_TOL = 1e-9
RC_TOL = 1e-9
MAX_NEW = 64                # columns added per pricing round (the most negative first)
KEEP_ROWS = 4               # stage columns kept between rounds: at most this x rows
PIVOT_WORK = 20_000         # numbers an LP step touches per search node counted
PRICE_RTOL, PRICE_ATOL = 1e-9, 1e-12    # SP must exceed mu(F) by more than this to prune


class Stages:
    """The stages [a, b) some device can run at a level (M_d(a, b) < top), flattened:
    ``a``, ``b`` (P,), ``M`` (N, P) replica needs, ``window`` (P,) the least stage size."""

    def __init__(self, M: np.ndarray, window_m: np.ndarray, top: int) -> None:
        L = M.shape[1] - 1
        some = (M < top).any(axis=0)
        a, b = np.nonzero(some)                  # row-major: sorted by a, then b
        self.L, self.N, self.top = L, M.shape[0], top
        self.a, self.b = a, b
        self.M = np.ascontiguousarray(M[:, a, b])
        self.window = window_m[a, b]
        self.sizes = int(min(self.N, top - 1))
        self.starts = np.searchsorted(a, np.arange(L + 1))

    def prices(self, mu: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per stage: the least price of a feasible member set (its m cheapest eligible
        devices, m >= window) and that m (0: none)."""
        ms = np.arange(1, self.sizes + 1)[:, None]
        P = self.a.size
        cnt = np.zeros((self.sizes, P), dtype=np.int64)
        tot = np.zeros((self.sizes, P))
        for d in np.argsort(mu, kind="stable").tolist():
            take = (self.M[d][None, :] <= ms) & (cnt < ms)
            cnt += take
            tot += take * float(mu[d])
        tot = np.where((cnt == ms) & (ms >= self.window[None, :]), tot, np.inf)
        best = np.argmin(tot, axis=0)
        cost = tot[best, np.arange(P)]
        return cost, np.where(np.isfinite(cost), best + 1, 0)

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

    def members(self, mu: np.ndarray, k: int, m: int) -> tuple[int, ...]:
        """The m cheapest devices eligible for stage k at size m."""
        order = np.argsort(mu, kind="stable")
        return tuple(sorted(int(d) for d in order[self.M[order, k] <= m][:m]))


Column = tuple[int, int, tuple[int, ...]]


def farkas_prices(st: Stages, effort: Effort, pool: list[Column] | tuple = (), max_rounds: int = 200,
                  primal: list[tuple[Column, float]] | None = None) -> tuple[float, np.ndarray, list[Column]]:
    """Phase 1 of the configuration LP at the level of ``M`` (least total overuse of the
    devices by a fractional path of stages), by column generation. Returns (overuse,
    prices mu in [0, 1]^N): overuse > 0 means the LP, hence D(B), is infeasible, and the
    prices then certify it (``certifies``), and the stage columns generated. ``pool``: columns
    of an earlier solve, kept where still feasible here (a warm start). Each simplex pivot
    and each pricing round counts as nodes on ``effort``, weighted by the arrays it touches
    (one node per ~PIVOT_WORK numbers: deterministic), and raises ``Timeout`` when it runs out."""
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
    Binv = np.eye(rows)
    xB = rhs.copy()
    n0 = len(cols)
    A = np.zeros((rows, n0 + MAX_NEW * 16))      # grows by doubling
    A[:, :n0] = np.array(cols).T
    c = np.zeros(A.shape[1])
    c[:n0] = cost
    ncol = n0
    seen: set[Column] = set()
    made: list[Column] = []                      # column n0 + i is made[i]
    index = {(a, b): k for k, (a, b) in enumerate(zip(st.a.tolist(), st.b.tolist()))}
    kept: list[Column] = []
    for a, b, R in pool:
        k = index.get((a, b))
        if k is not None and len(R) >= st.window[k] and all(st.M[d, k] <= len(R) for d in R):
            kept.append((a, b, R))
    y = np.zeros(rows)
    def add(col: Column) -> bool:
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
        ncol += 1
        return True

    for col in kept:
        add(col)
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
        # columns dearest at these duals beyond KEEP_ROWS x rows (pricing may bring them back)
        if ncol - n0 > KEEP_ROWS * rows:
            rc = c[:ncol] - y @ A[:, :ncol]
            inb = np.zeros(ncol, dtype=bool)
            inb[basis] = True
            stage = np.arange(ncol) >= n0
            cand = np.flatnonzero(stage & ~inb)
            drop = cand[np.argsort(-rc[cand], kind="stable")][:ncol - n0 - KEEP_ROWS * rows // 2]
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
        # price new stage columns: reduced cost = -(y_a - y_b) + sum over R of mu_d
        effort.spent += (st.sizes * st.N * st.a.size) // PIVOT_WORK
        effort.tick()
        mu = np.clip(-y[L:], 0.0, None)
        ya = np.concatenate([y[:L], [0.0]])
        scost, size = st.prices(mu)
        red = scost - ya[st.a] + ya[st.b]
        flat = np.flatnonzero(np.isfinite(red) & (red < -RC_TOL))
        added = 0
        for k in flat[np.argsort(red[flat], kind="stable")][:4 * MAX_NEW].tolist():
            a, b = int(st.a[k]), int(st.b[k])
            if add((a, b, st.members(mu, k, int(size[k])))):
                added += 1
                if added >= MAX_NEW:
                    break
        if not added:
            break
    overuse = float(c[basis] @ xB)
    if primal is not None:
        primal.extend((made[j - n0], float(x)) for j, x in zip(basis, xB.tolist()) if j >= n0 and x > PIVOT_TOL)
    return overuse, np.clip(-y[L:], 0.0, 1.0), sorted(seen)


def certifies(st: Stages, mu: np.ndarray) -> bool:
    """Whether the prices prove D(B) infeasible: SP_mu(0) > mu(all devices) (module doc)."""
    sp = st.path(st.prices(mu)[0])
    return bool(sp[0] > float(np.sum(mu)) * (1 + PRICE_RTOL) + PRICE_ATOL)
