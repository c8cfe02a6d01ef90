"""Local search on device-search plans, priced exactly on the device tables (internal).

A plan here is the device search's list of stages (a, b, devices). Its costs are those of
``Level.search``'s D(B) (the same as ``cost.evaluate``'s bottleneck terms, docs/planner.md
"The cost model"): per stage max_d eff_d(a, b) / |R| (compute, receive/send and NIC terms
folded, inf when memory does not fit), per link cut x max pair spb / (|X| |Y|), the client's
NIC floor. ``improve`` climbs on the *leximax* order (the costs sorted high to low, compared
as a word: lowering the bottleneck, or the number of terms at it, is progress) with the
moves: shift a cut by 1..MAX_SHIFT units, move a device to another stage or out, bring an
unused device in, swap two devices (between stages, or with an unused one). From a local
optimum it kicks (a few random moves, seeded: deterministic) and climbs again, keeping the
best. Every evaluation counts one node on the effort counter, so where it stops depends
only on the problem and the limit. Its plans are only incumbents: it proves nothing.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator

from .parametric import Tables
from .search import Effort

__all__ = ["improve"]

Steps = list[tuple[int, int, tuple[int, ...]]]
MAX_SHIFT = 3           # a cut moves by at most this many units in one move
KICK_MOVES = 3          # random moves in one kick
SEED = 14


class _Priced:
    """The costs of a plan on the tables (module doc)."""

    def __init__(self, tb: Tables) -> None:
        assert tb.eff is not None
        self.tb = tb
        self.eff = tb.eff
        self.cut = tb.cut.tolist()
        self.spb = tb.spb
        self.L = tb.L

    def terms(self, steps: Steps) -> list[float]:
        eff, cut, spb = self.eff, self.cut, self.spb
        out = [self.tb.floor]
        prev: tuple[int, ...] = (0,)
        for a, b, R in steps:
            m = len(R)
            out.append(max(float(eff[d, a, b]) for d in R) / m)
            ys = [d + 1 for d in R]
            out.append(cut[a] * max(spb[x][y] for x in prev for y in ys) / (len(prev) * m))
            prev = tuple(ys)
        out.append(cut[self.L] * max(spb[x][0] for x in prev) / len(prev))
        return out

    def key(self, steps: Steps) -> tuple[float, ...]:
        return tuple(sorted(self.terms(steps), reverse=True))

    def bottleneck(self, steps: Steps) -> float:
        return max(self.terms(steps))


def _neighbours(steps: Steps, n: int, replication: bool) -> Iterator[Steps]:
    """Every plan one move away (module doc), cuts first."""
    k = len(steps)
    for i in range(k - 1):
        a, b, R = steps[i]
        _, c, S = steps[i + 1]
        for delta in range(1, MAX_SHIFT + 1):
            for nb in (b - delta, b + delta):
                if a < nb < c:
                    yield [*steps[:i], (a, nb, R), (nb, c, S), *steps[i + 2:]]
    used = {d for _, _, R in steps for d in R}
    unused = [d for d in range(n) if d not in used]
    for i, (a, b, R) in enumerate(steps):
        for d in R:
            for e in unused:                    # swap with an unused device
                yield [*steps[:i], (a, b, tuple(sorted((*[x for x in R if x != d], e)))), *steps[i + 1:]]
            for j in range(i + 1, k):           # swap with a device of a later stage
                a2, b2, S = steps[j]
                for e in S:
                    out = list(steps)
                    out[i] = (a, b, tuple(sorted((*[x for x in R if x != d], e))))
                    out[j] = (a2, b2, tuple(sorted((*[x for x in S if x != e], d))))
                    yield out
    if not replication:
        return
    for i, (a, b, R) in enumerate(steps):
        for e in unused:                        # add an unused device
            yield [*steps[:i], (a, b, tuple(sorted((*R, e)))), *steps[i + 1:]]
        if len(R) > 1:
            for d in R:
                rest = tuple(x for x in R if x != d)
                yield [*steps[:i], (a, b, rest), *steps[i + 1:]]       # drop it
                for j, (a2, b2, S) in enumerate(steps):               # move it
                    if j != i:
                        out = list(steps)
                        out[i] = (a, b, rest)
                        out[j] = (a2, b2, tuple(sorted((*S, d))))
                        yield out


def _climb(pr: _Priced, steps: Steps, key: tuple[float, ...], n: int, rep: bool, effort: Effort,
           stop: int) -> tuple[Steps, tuple[float, ...]]:
    """First-improvement descent on the leximax order until no move improves (or ``stop``)."""
    improved = True
    while improved:
        improved = False
        for nxt in _neighbours(steps, n, rep):
            if effort.spent >= stop:
                return steps, key
            effort.tick()
            k2 = pr.key(nxt)
            if k2 < key:
                steps, key, improved = nxt, k2, True
                break
    return steps, key


def improve(tb: Tables, steps: Steps, effort: Effort, evals: int) -> Steps:
    """The best plan found by iterated local search from ``steps`` within ``evals``
    evaluations (counted on ``effort``; its ``Timeout`` passes through)."""
    pr = _Priced(tb)
    n, rep = tb.N, tb.replication
    rng = random.Random(SEED)
    stop = effort.spent + evals
    best = list(steps)
    best_key = pr.key(best)
    cur, cur_key = best, best_key
    while effort.spent < stop:
        cur, cur_key = _climb(pr, cur, cur_key, n, rep, effort, stop)
        if cur_key < best_key:
            best, best_key = cur, cur_key
        else:
            cur, cur_key = best, best_key
        for _ in range(KICK_MOVES):
            moves = list(_neighbours(cur, n, rep))
            if not moves:
                break
            cur = rng.choice(moves)
        cur_key = pr.key(cur)
        if not math.isfinite(cur_key[0]):
            cur, cur_key = best, best_key
    return best
