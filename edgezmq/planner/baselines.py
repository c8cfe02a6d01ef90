"""What other planners would choose, costed by our exact model (for benchmarks and the CLI).

- ``even``: every device in file order, one per stage, equal unit counts (the first
  L mod N stages get one unit more; with more devices than units, the first L devices).
- ``pipeedge``: PipeEdge's ``sched-pipeline`` model, solved exactly: one bandwidth per
  device type (its fastest link to another device, capped by the device's own NIC, the
  slower of up and down: the rate a PipeEdge user would give its ``bw_Mbps``), a link
  costs at the slower end's bandwidth, no client links, no latency, no replication (so
  no NIC sharing either), no CPU cost of receiving and sending. Memory is
  checked with our memory model. Devices of a type are taken in file order.
- ``pipedream``: PipeDream's optimizer assumption: every device is a copy of the first
  one (its times and memory) and every link is the default link (capped by the first
  device's NIC, as between two copies of it); replication allowed (if the problem
  allows it) with links priced per pair (no NIC sharing), no client links, no CPU cost
  of receiving and sending. Devices are taken in file order.
Each choice is then priced by ``evaluate`` on the real problem; a plan that overruns a
device's memory there is returned with ``violations`` (not ``feasible``).
"""

from __future__ import annotations

import numpy as np

from .classes import DeviceArrays, device_arrays, exact_model
from .cost import evaluate
from .plan import Plan, Stage
from .problem import PlanError, Problem
from .solver import DEFAULT_TIME_LIMIT_S, optimise_model, plan_stages

__all__ = ["baseline", "BASELINES"]

BASELINES = ("even", "pipeedge", "pipedream")


def baseline(problem: Problem, name: str, *, time_limit_s: float = DEFAULT_TIME_LIMIT_S) -> Plan:
    """The plan baseline ``name`` would choose, costed under the real model."""
    if name == "even":
        return evaluate(problem, even_stages(problem), method="even")
    if name == "pipeedge":
        arr = pipeedge_arrays(problem)
    elif name == "pipedream":
        arr = pipedream_arrays(problem)
    else:
        raise PlanError(f"unknown baseline {name!r} (known: {', '.join(BASELINES)})")
    cm = exact_model(arr)
    res = optimise_model(cm, time_limit_s)
    if res is None:
        raise PlanError(f"baseline {name}: no plan fits memory under its model")
    return evaluate(problem, plan_stages(cm, res, [d.name for d in problem.devices]), method=name)


def even_stages(problem: Problem) -> list[Stage]:
    n_units, devices = problem.num_units, problem.devices
    k = min(len(devices), n_units)
    size, extra = divmod(n_units, k)
    stages, a = [], 0
    for i in range(k):
        b = a + size + (i < extra)
        stages.append(Stage((a, b), (devices[i].name,)))
        a = b
    return stages


def pipeedge_arrays(problem: Problem) -> DeviceArrays:
    arr = device_arrays(problem)
    n = len(problem.devices)
    types = [d.type for d in problem.devices]
    dev_spb = arr.spb[1:, 1:]
    up, down = arr.nic()
    # a device's own rate cap (seconds per byte): the slower direction of its NIC (0: none)
    cap = np.maximum(up, down)
    nic = {}      # per type: seconds per byte of its fastest device-device link, NIC-capped
    for t in set(types):
        rows = [i for i in range(n) if types[i] == t]
        vals = dev_spb[rows]
        if np.isfinite(vals).any():   # each device's fastest link, capped by its NIC; the type's best
            nic[t] = float(np.maximum(np.nanmin(vals, axis=1), cap[rows]).min())
        else:
            nic[t] = max(float(arr.spb[0, 1]), float(cap[rows].min()))
    spb = np.zeros_like(arr.spb)
    for i in range(n):
        for j in range(n):
            spb[i + 1, j + 1] = max(nic[types[i]], nic[types[j]])
    np.fill_diagonal(spb, np.nan)
    spb[0, :] = spb[:, 0] = 0.0       # PipeEdge does not model the client's links
    spb[0, 0] = np.nan
    lat = np.where(np.isnan(arr.lat), np.nan, 0.0)
    return arr.with_(spb=spb, lat=lat, replication=False, recv=None, send=None, up=None, down=None,
                     client_up=0.0, client_down=0.0)


def pipedream_arrays(problem: Problem) -> DeviceArrays:
    arr = device_arrays(problem)
    n = len(problem.devices)
    link = problem.default_link
    first = problem.devices[0].nic
    spb = np.full_like(arr.spb, max(link.s_per_byte, first.up_s_per_byte, first.down_s_per_byte))
    lat = np.full_like(arr.lat, link.latency_ms / 1000.0)
    spb[0, :] = spb[:, 0] = 0.0       # nor does PipeDream's
    lat[0, :] = lat[:, 0] = 0.0
    np.fill_diagonal(spb, np.nan)
    np.fill_diagonal(lat, np.nan)
    return arr.with_(times=np.repeat(arr.times[:1], n, axis=0), cap=np.repeat(arr.cap[:1], n), spb=spb,
                     lat=lat, recv=None, send=None, up=None, down=None, client_up=0.0, client_down=0.0)
