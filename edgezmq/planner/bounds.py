"""Admissible bounds on what the rest of a plan can achieve (internal; used by search.py).

Capacity bound. Pick a reference profile t_ref (a few class profiles in turn) and,
for class k, rho_k = max_u t_ref(u) / t_k(u): a device of class k does at most rho_k
seconds of reference work per second of its own time. A stage of |R| replicas on units
[a, b) has max_d t_d(a, b) <= |R| * B, so its reference work t_ref(a, b) <= min_d
rho_d t_d(a, b) <= B * sum_{d in R} rho_d. Summed over the stages covering [b, L):
B >= t_ref(b, L) / sum(rho of the devices left). Without replication at most L - b
devices can still be used, so only the best L - b count. A plan also needs its
parameters to fit: sum(params[b:L]) <= sum of the remaining devices' memory, else inf.

NIC limits (cost.py) only add terms to a plan's bottleneck and latency, so both bounds,
built from unit times and pair links, stay valid. Two terms are known before any choice:
the client's uplink carries every input and its downlink every result, so every plan has
B >= ``floor`` = max(input * client up, last output * client down) (seconds per byte),
and the capacity bound is raised to it. The latency bound's client-out term takes the
slowest of pair rate, the class's uplink and the client's downlink, as the link does.

Latency bound. Every remaining unit runs on some available class, unreplicated, and the
last stage sends the result to the client: sum_u min_k t_k(u) + min_k client-out latency.
"""

from __future__ import annotations

import math

import numpy as np

from .classes import ClassModel

__all__ = ["Bounds"]

MAX_REFERENCES = 4     # reference profiles tried per bound (each costs a pass over the classes)


class Bounds:
    """Capacity and latency lower bounds for states of one class model."""

    def __init__(self, cm: ClassModel) -> None:
        self.cm = cm
        self.L = cm.num_units
        self.K = cm.num_classes
        times = cm.times
        # any set of references gives a valid bound; the biggest classes' profiles, a few
        profiles: set[bytes] = set()
        refs: list[np.ndarray] = []
        for k in sorted(range(self.K), key=lambda k: -cm.counts[k]):
            key = times[k].tobytes()
            if key not in profiles and len(refs) < MAX_REFERENCES:
                profiles.add(key)
                refs.append(times[k])
        # suffix sums of each reference profile; W[j][b] = t_ref_j(b, L)
        self.W = [[*np.concatenate([np.cumsum(r[::-1])[::-1], [0.0]]).tolist()] for r in refs]
        self.rho = [[_ratio(refs[j], times[k]) for j in range(len(refs))] for k in range(self.K)]
        self.order = [sorted(range(self.K), key=lambda k: -self.rho[k][j]) for j in range(len(refs))]
        self.param_suffix = np.concatenate(
            [np.cumsum(cm.param_bytes[::-1])[::-1], [0.0]]).tolist()
        self.cap_pos = [max(c, 0.0) for c in cm.cap]
        # what the client's own NIC costs every plan (module doc)
        self.floor = max(cm.cut_bytes[0] * cm.client_up, cm.cut_bytes[-1] * cm.client_down)
        self._lat_cache: dict[int, tuple[list[float], float]] = {}

    def _capacity_sum(self, j: int, rem: tuple[int, ...], b: int) -> float:
        if self.cm.replication:
            return sum(rem[k] * self.rho[k][j] for k in range(self.K) if rem[k])
        left, total = self.L - b, 0.0
        for k in self.order[j]:
            if left <= 0:
                break
            take = min(rem[k], left)
            if take:
                total += take * self.rho[k][j]
                left -= take
        return total

    def capacity(self, b: int, rem: tuple[int, ...]) -> float:
        """Lower bound on the bottleneck of covering units [b, L) with ``rem`` devices."""
        if b >= self.L:
            return 0.0
        if not any(rem):
            return math.inf
        if self.param_suffix[b] > sum(r * c for r, c in zip(rem, self.cap_pos)):
            return math.inf
        best = self.floor
        for j, W in enumerate(self.W):
            w = W[b]
            if w <= 0.0:
                continue
            c = self._capacity_sum(j, rem, b)
            if c <= 0.0:
                return math.inf
            v = w / c
            if v > best:
                best = v
        return best

    def latency(self, b: int, rem: tuple[int, ...]) -> float:
        """Lower bound on the latency still to come after a stage ending at b (b < L)."""
        mask = sum(1 << k for k in range(self.K) if rem[k])
        hit = self._lat_cache.get(mask)
        if hit is None:
            ks = [k for k in range(self.K) if rem[k]]
            if not ks:
                hit = ([math.inf] * (self.L + 1), math.inf)
            else:
                best = self.cm.times[ks].min(axis=0)
                suffix = np.concatenate([np.cumsum(best[::-1])[::-1], [0.0]]).tolist()
                up, down = self.cm.up or (0.0,) * self.K, self.cm.client_down
                out = min(self.cm.lat[k + 1, 0] + self.cm.cut_bytes[-1] * max(self.cm.spb[k + 1, 0], up[k], down)
                          for k in ks)
                hit = (suffix, float(out))
            self._lat_cache[mask] = hit
        suffix, out = hit
        return suffix[b] + out


def _ratio(ref: np.ndarray, t: np.ndarray) -> float:
    """max_u ref[u] / t[u] over units where ref does work (inf if t does it for free)."""
    pos = ref > 0
    if not pos.any():
        return 0.0
    if (t[pos] <= 0).any():
        return math.inf
    return float((ref[pos] / t[pos]).max())
