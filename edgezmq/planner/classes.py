"""Collapse devices into classes the solver can count instead of enumerate (internal).

Two devices are *twins* when they have the same unit times, receive/send costs, NIC rates and
memory, and the same link (bandwidth and latency) to every other node, the client included. Twins are
interchangeable in every plan, so the solver tracks how many of each class are used
(PipeEdge's count vector) and stays exact: a per-pair override makes its two ends
differ from their type-mates, which splits them into classes of their own.

``merged_model`` builds coarser models for bounds, with at most two classes per device
type: the type's largest twin class, and the rest merged into one class whose times,
memory and links are the worst (``pessimistic``: a plan costs at least as much there as
in reality, so its plans are upper bounds) or the best (``optimistic``: its optimum is a
lower bound on the real one) of its members'.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from .cost import shard_memory_bytes
from .problem import Problem

__all__ = ["DeviceArrays", "ClassModel", "device_arrays", "twin_classes", "exact_model", "merged_model",
           "memory_table"]


@dataclass(frozen=True)
class DeviceArrays:
    """The numbers of a problem the solver needs, per device (index 0 of spb/lat = client)."""

    times: np.ndarray          # (N, L) seconds per unit
    cap: np.ndarray            # (N,) memory minus reserved bytes
    spb: np.ndarray            # (N+1, N+1) seconds per byte, NaN diagonal
    lat: np.ndarray            # (N+1, N+1) seconds
    out_bytes: np.ndarray      # (L,)
    param_bytes: np.ndarray    # (L,)
    work_bytes: np.ndarray     # (L,)
    input_bytes: int
    buffers: int
    replication: bool
    types: tuple[str, ...] = ()  # device type names (merged models group by them)
    recv: np.ndarray | None = None  # (N,) stage seconds per byte received (None: all 0)
    send: np.ndarray | None = None  # (N,) ... per byte sent
    up: np.ndarray | None = None    # (N,) NIC seconds per byte sent (None: all 0, unlimited)
    down: np.ndarray | None = None  # (N,) ... per byte received
    client_up: float = 0.0          # the client's NIC, seconds per byte sent
    client_down: float = 0.0        # ... and received

    def io(self) -> tuple[np.ndarray, np.ndarray]:
        n = self.times.shape[0]
        return (np.zeros(n) if self.recv is None else self.recv,
                np.zeros(n) if self.send is None else self.send)

    def nic(self) -> tuple[np.ndarray, np.ndarray]:
        n = self.times.shape[0]
        return (np.zeros(n) if self.up is None else self.up,
                np.zeros(n) if self.down is None else self.down)

    def with_(self, **kw: Any) -> DeviceArrays:
        return replace(self, **kw)


def device_arrays(problem: Problem) -> DeviceArrays:
    """The problem's per-device numbers, as arrays."""
    u = problem.units
    return DeviceArrays(
        times=np.array([d.unit_times_s for d in problem.devices], dtype=float),
        cap=np.array([d.capacity_bytes for d in problem.devices], dtype=float),
        spb=problem.spb.copy(), lat=problem.latency_s.copy(),
        out_bytes=np.array([x.out_bytes for x in u], dtype=float),
        param_bytes=np.array([x.resident_bytes for x in u], dtype=float),  # parameters and caches
        work_bytes=np.array([x.work_bytes for x in u], dtype=float),
        input_bytes=problem.model.input_bytes, buffers=problem.options.buffers,
        replication=problem.options.replication, types=tuple(d.type for d in problem.devices),
        recv=np.array([d.recv_s_per_byte for d in problem.devices], dtype=float),
        send=np.array([d.send_s_per_byte for d in problem.devices], dtype=float),
        up=np.array([d.nic.up_s_per_byte for d in problem.devices], dtype=float),
        down=np.array([d.nic.down_s_per_byte for d in problem.devices], dtype=float),
        client_up=problem.client_nic.up_s_per_byte, client_down=problem.client_nic.down_s_per_byte)


@dataclass(frozen=True)
class ClassModel:
    """Devices grouped into K classes, with everything the search evaluates precomputed.

    Class k is row/column k+1 of ``spb``/``lat`` (0 is the client); the diagonal entry
    is the link between two distinct members (NaN for a class of one).
    """

    members: tuple[tuple[int, ...], ...]
    counts: tuple[int, ...]
    times: np.ndarray          # (K, L)
    cap: tuple[float, ...]
    spb: np.ndarray            # (K+1, K+1)
    lat: np.ndarray            # (K+1, K+1)
    cut_bytes: tuple[float, ...]   # bytes crossing cut u: input at 0, ..., the last unit's output at L
    param_bytes: np.ndarray
    work_bytes: np.ndarray
    buffers: int
    replication: bool
    exact: bool                # classes are twins (plans of this model cost exactly this)
    dominates: tuple[tuple[bool, ...], ...] = ()   # [a][b]: class a is at least as good as b
    recv: tuple[float, ...] = ()   # (K,) stage seconds per byte received (empty: all 0)
    send: tuple[float, ...] = ()   # (K,) ... per byte sent
    up: tuple[float, ...] = ()     # (K,) NIC seconds per byte sent (empty: all 0, unlimited)
    down: tuple[float, ...] = ()   # (K,) ... per byte received
    client_up: float = 0.0         # the client's NIC, seconds per byte sent
    client_down: float = 0.0       # ... and received

    @property
    def has_io(self) -> bool:
        return any(self.recv) or any(self.send)

    @property
    def has_nic(self) -> bool:
        """Whether some class's NIC is limited (the client's are constants: search.py)."""
        return any(self.up) or any(self.down)

    @property
    def num_units(self) -> int:
        return self.times.shape[1]

    @property
    def num_classes(self) -> int:
        return len(self.counts)

    def memory_table(self) -> np.ndarray:
        """need[a, b] = bytes to run units [a, b) excluding reserved (inf where b <= a)."""
        return memory_table(self.param_bytes, self.work_bytes, self.cut_bytes, self.buffers)


def memory_table(param_bytes: np.ndarray, work_bytes: np.ndarray, cut_bytes: tuple[float, ...],
                 buffers: int) -> np.ndarray:
    """need[a, b]: parameters + peak work of units [a, b) + buffers x (bytes in + bytes out);
    ``cut_bytes[u]`` is what crosses the cut before unit u (the input at 0)."""
    n = len(param_bytes)
    cut = np.asarray(cut_bytes, dtype=float)
    need = np.full((n + 1, n + 1), np.inf)
    pre = np.concatenate([[0.0], np.cumsum(param_bytes)])
    for a in range(n):
        work = np.maximum.accumulate(work_bytes[a:])
        b = np.arange(a + 1, n + 1)
        need[a, a + 1:] = shard_memory_bytes(pre[b] - pre[a], work, cut[a], cut[b], buffers)
    return need


def twin_classes(arr: DeviceArrays) -> list[list[int]]:
    """Partition devices into twin classes (see module doc), ordered by first member."""
    classes: list[list[int]] = []
    for members in compute_groups(arr):
        found: list[list[int]] = []
        for d in members:
            for cls in found:
                if _twins(arr, cls[0], d):
                    cls.append(d)
                    break
            else:
                found.append([d])
        classes.extend(found)
    classes.sort(key=lambda c: c[0])
    return classes


def _twins(arr: DeviceArrays, d: int, e: int) -> bool:
    keep = np.ones(arr.spb.shape[0], dtype=bool)
    keep[[d + 1, e + 1]] = False
    return (np.array_equal(arr.spb[d + 1, keep], arr.spb[e + 1, keep])
            and np.array_equal(arr.lat[d + 1, keep], arr.lat[e + 1, keep]))


def compute_groups(arr: DeviceArrays) -> list[list[int]]:
    """Devices with identical unit times, receive/send costs, NIC rates and memory (a device
    type, usually)."""
    recv, send = arr.io()
    up, down = arr.nic()
    groups: dict[tuple[bytes, float, float, float, float, float], list[int]] = {}
    for d in range(arr.times.shape[0]):
        key = (arr.times[d].tobytes(), float(arr.cap[d]), float(recv[d]), float(send[d]),
               float(up[d]), float(down[d]))
        groups.setdefault(key, []).append(d)
    return sorted(groups.values(), key=lambda c: c[0])


def _build(arr: DeviceArrays, classes: list[list[int]], mode: str) -> ClassModel:
    agg = {"exact": np.nanmax, "pessimistic": np.nanmax, "optimistic": np.nanmin}[mode]
    k = len(classes)
    idx = [np.array(c) + 1 for c in [[-1]] + classes]    # node rows; the client is row 0
    spb = np.full((k + 1, k + 1), np.nan)
    lat = np.full((k + 1, k + 1), np.nan)
    for i in range(k + 1):
        for j in range(k + 1):
            if i == j and len(idx[i]) < 2:
                continue
            sub_s = arr.spb[np.ix_(idx[i], idx[j])]
            sub_l = arr.lat[np.ix_(idx[i], idx[j])]
            spb[i, j] = agg(sub_s)
            lat[i, j] = agg(sub_l)
    recv_d, send_d = arr.io()
    up_d, down_d = arr.nic()
    if mode == "optimistic":
        times = np.array([arr.times[c].min(axis=0) for c in classes])
        cap = tuple(float(arr.cap[c].max()) for c in classes)
        recv, send, up, down = (tuple(float(x[c].min()) for c in classes) for x in (recv_d, send_d, up_d, down_d))
    else:
        times = np.array([arr.times[c].max(axis=0) for c in classes])
        cap = tuple(float(arr.cap[c].min()) for c in classes)
        recv, send, up, down = (tuple(float(x[c].max()) for c in classes) for x in (recv_d, send_d, up_d, down_d))
    cut = (float(arr.input_bytes), *(float(x) for x in arr.out_bytes))
    return ClassModel(tuple(tuple(c) for c in classes), tuple(len(c) for c in classes), times, cap,
                      spb, lat, cut, arr.param_bytes, arr.work_bytes, arr.buffers, arr.replication,
                      exact=(mode == "exact"),
                      dominates=_dominance(times, cap, spb, lat, (*recv, *send, *up, *down)),
                      recv=recv, send=send, up=up, down=down,
                      client_up=arr.client_up, client_down=arr.client_down)


def _dominance(times: np.ndarray, cap: tuple[float, ...], spb: np.ndarray, lat: np.ndarray,
               costs: tuple[float, ...]) -> tuple[tuple[bool, ...], ...]:
    """dom[a][b]: a is no worse than b in every unit time, per-device cost (``costs``: K
    receive, K send, K NIC up, K NIC down, seconds per byte, smaller is better), memory, and
    link to every node.

    Then a stage holding both can trade its a's for b's held elsewhere (or unused) without
    any cost, latency or device count getting worse, so the search only considers stages
    mixing a and b that hold every b (see search.py). A NaN entry is a link between two
    members of a class of one, which no plan uses: it is skipped.
    """
    k = len(cap)
    dom = [[False] * k for _ in range(k)]
    for a in range(k):
        for b in range(k):
            if a == b or cap[a] < cap[b] or (times[a] > times[b]).any() or any(
                    costs[a + i] > costs[b + i] for i in range(0, len(costs), k)):
                continue
            ra_s, rb_s, ra_l, rb_l = spb[a + 1], spb[b + 1], lat[a + 1], lat[b + 1]
            ok = True
            for x in range(k + 1):
                if np.isnan(ra_s[x]) or np.isnan(rb_s[x]):
                    continue
                if ra_s[x] > rb_s[x] or ra_l[x] > rb_l[x]:
                    ok = False
                    break
            dom[a][b] = ok
    return tuple(tuple(row) for row in dom)


def exact_model(arr: DeviceArrays) -> ClassModel:
    """The exact class model (twin classes)."""
    return _build(arr, twin_classes(arr), "exact")


def merged_model(arr: DeviceArrays, mode: str) -> ClassModel:
    """A coarser model for bounds (module doc): in each device type, the largest twin class
    stays as it is and the rest of the type is merged into one class whose times, memory and
    links are the worst (pessimistic) or the best (optimistic) of its members'. Grouping by
    type (not by equal figures) keeps measured, slightly different devices few classes."""
    classes: list[list[int]] = []
    twins = twin_classes(arr)
    types = arr.types or tuple("" for _ in range(arr.times.shape[0]))
    by_type: dict[str, list[list[int]]] = {}
    for c in twins:
        # a twin class may hold devices of several types only if they are identical: use the first
        by_type.setdefault(types[c[0]], []).append(c)
    for mine in by_type.values():
        bulk = max(mine, key=len)
        rest = sorted(d for c in mine if c is not bulk for d in c)
        classes.append(bulk)
        if rest:
            classes.append(rest)
    classes.sort(key=lambda c: c[0])
    return _build(arr, classes, mode)
