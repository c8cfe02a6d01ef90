"""Calibrate a fresh deployment: run a few microbatches through it, compare what each node's
stage costs while serving with what the planner assumed, correct the device types and re-plan.

A profile times units on a device on its own; a stage serving in a pipeline does not run on
its own: other stages (and the client) share the machine's caches and memory bus when the
devices share a machine, a core given up at every CPU-quota throttle comes back with a cold
cache, and receiving, decoding, encoding and sending take their share of the device's CPU.
On this project's emulated devices that made a stage 10-25% slower than its profile said.
So ``autodeploy``, once the plan is deployed, streams ``CALIBRATION_MICROBATCHES`` random
inputs through it (after a warm-up that fills the pipeline) and reads each node's counters
(``stats``) before and after:

- a node's **serving time** per microbatch is what its stage needs when it is the
  bottleneck: under a CPU quota, the process's CPU seconds per microbatch divided by the
  quota (a saturated stage runs at its quota; the node's ``cpu_s`` leaves out the forward
  in progress, so a replica that processed only a few microbatches is not mis-timed by a
  partial forward at either snapshot); without one, the forwards' wall time, plus
  the rest of its CPU divided by its cores when its torch threads use them all (else the
  rest runs on a spare core, overlapped);
- its **ratio** is serving time / the planner's time for its stage on that device;
- only a stage busy at least ``BUSY`` of the time counts: one that waited for input or
  for its downstream was timed off its saturated pace, and in either direction (measured
  on the EdgePipe testbed, one burst: a replica busy 21% of the time served at x1.17 of
  the plan, its saturated twins of the same stage at x0.98 -- a forward after an idle
  spell starts with caches others have filled; on a board of its own an idle stage would
  rather look faster). A type none of whose devices was saturated keeps its times;
- a device type's factor is the mean ratio of its devices in the plan; every unit time and
  receive/send cost of the type is multiplied by it (types not in the plan keep theirs).

The problem is then solved again with the corrected types. The deployed plan, priced at
the corrected speeds, stays unless the new plan is more than ``TOLERANCE`` faster (then it
is deployed in place of the first). A plan so deployed is calibrated in turn (its moved
stages ran nowhere yet: their times are a type's factor measured on other units, under
another load), factors composing, until a round keeps its plan; the last of the
``MAX_ROUNDS`` bursts only corrects the plan in service (it redeploys nothing: the
prediction printed is always of a plan measured in service, at its corrected speeds).
The warm-up gives every replica work before the timing starts, a cool-down after the timed
microbatches keeps it busy until the timing ends (the pipeline is timed full, not filling or
draining), and each replica of the most replicated stage times at least ``PER_REPLICA``
microbatches.
The burst is at least ``CALIBRATION_SECONDS`` long at the predicted pace, so that under a
CPU quota it spans many CFS periods (as a profiling round does).
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgezmq.client import Batch, Client, split
from edgezmq.orchestrate.deploy import Deployment, deploy, unload
from edgezmq.orchestrate.planfile import DeployPlan
from edgezmq.protocol import messages as msg
from edgezmq.transport.nodeclient import NodeClient

log = logging.getLogger(__name__)

CALIBRATION_MICROBATCHES = 8  # timed microbatches (after the warm-up), at least ...
CALIBRATION_SECONDS = 2.0  # ... this long at the predicted pace (up to 4x as many microbatches)
BUSY = 0.8  # a stage computing at least this share of the time was saturated
TOLERANCE = 0.05  # a new plan replaces the deployed one only if this much faster
MAX_ROUNDS = 2  # bursts in all: a plan that replaced the deployed one is calibrated in turn
PER_REPLICA = 3  # timed microbatches per replica of the most replicated stage, at least
STATS_TIMEOUT_S = 10.0
BURST_INPUTS = 4  # distinct random microbatches a burst cycles through

Say = Callable[[str], None]


@dataclass
class Calibration:
    """What a calibration measured and did."""

    microbatches: int  # timed, in the first burst
    warmup: int  # streamed before them, untimed (the deployment processed warmup + microbatches + cooldown)
    devices: dict[str, dict[str, Any]]  # first burst: device -> predicted_s, serving_s, busy, ratio, counted
    factors: dict[str, float]  # device type -> factor applied (the product over the rounds)
    predicted_before: float  # samples/s the first plan predicted
    predicted_after: float  # samples/s the corrected plan predicts
    redeployed: bool  # a new plan was deployed in place of the first
    seconds: float
    # samples/s the first plan served during the burst (the stats calls between its ends
    # included): what that plan measured, not a prediction
    burst_samples_per_s: float = 0.0
    problem: dict[str, Any] = field(default_factory=dict)  # the corrected problem
    # every burst: round, microbatches, burst_samples_per_s, predicted_samples_per_s (the
    # plan it measured, before correction), factors (relative to that round's problem),
    # devices, redeployed
    rounds: list[dict[str, Any]] = field(default_factory=list)
    measured: bool = True  # the plan left in service was calibrated on itself (not out of rounds)
    cooldown: int = 0  # streamed after them in the first burst, untimed (keeps the pipeline full)

    @property
    def replanned(self) -> bool:
        """Some device type was corrected, so the problem was solved again."""
        return bool(self.factors)

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__, replanned=self.replanned)
        d.pop("problem")
        return d


Snapshot = dict[str, msg.StageStats | None]  # node -> its stage's counters (None: nothing loaded)


def snapshot(plan: DeployPlan) -> Snapshot:
    """Every node's stage counters (``stats``), now."""
    out = {}
    for _, ref in plan.all_nodes:
        with NodeClient(ref.control, timeout=STATS_TIMEOUT_S, retries=1, name=ref.name, curve=plan.curve(ref)) as c:
            out[ref.name] = c.stats().stage
    return out


def serving_time_s(before: msg.StageStats | None, after: msg.StageStats | None, device: dict,
                   threads: int | None) -> tuple[float, float] | None:
    """(seconds per microbatch the stage needs when saturated, share of the time it computed)
    between two ``stats`` snapshots of a node's stage (``before`` None: since it started, its
    counters start at 0); None if it processed nothing."""
    if after is None:
        return None

    def delta(counter: str) -> float:
        return float(getattr(after, counter)) - (float(getattr(before, counter)) if before is not None else 0.0)

    n = int(delta("processed"))
    wall = delta("uptime_s")
    if n <= 0 or wall <= 0:
        return None
    compute = delta("compute_s") / n
    cpu = delta("cpu_s") / n
    busy = min(1.0, compute * n / wall)
    quota = device.get("cpu_quota")
    if quota:
        return cpu / float(quota), busy
    cores = int(device.get("cores") or 1)
    rest = max(0.0, cpu - delta("compute_cpu_s") / n)
    return compute + (rest / cores if (threads or cores) >= cores else 0.0), busy


def factors(problem: Any, planned: Any, timings: dict[str, tuple[float, float]],
            types: dict[str, str]) -> tuple[dict[str, float], dict[str, dict[str, Any]]]:
    """Device type -> factor, and per device what it was made of (module doc)."""
    from edgezmq.planner.cost import in_bytes

    per_type: dict[str, list[float]] = {}
    devices: dict[str, dict[str, Any]] = {}
    for s in planned.stages:
        a, b = s.units
        for name in s.devices:
            if name not in timings:
                continue
            serving, busy = timings[name]
            predicted = problem.device(name).stage_time_s(a, b, in_bytes(problem, a), problem.units[b - 1].out_bytes)
            ratio = serving / predicted if predicted > 0 else 1.0
            counted = busy >= BUSY
            devices[name] = {"units": [a, b], "predicted_s": predicted, "serving_s": serving, "busy": busy,
                             "ratio": ratio, "counted": counted}
            if counted:
                per_type.setdefault(types[name], []).append(ratio)
    return {t: statistics.fmean(r) for t, r in per_type.items()}, devices


def _layout(planned: Any) -> list[tuple[tuple[int, int], tuple[str, ...]]]:
    return [(tuple(s.units), tuple(s.devices)) for s in planned.stages]


def corrected(problem_dict: dict[str, Any], type_factors: dict[str, float]) -> dict[str, Any]:
    """`problem_dict` with each device type's unit times, receive/send costs and codec costs
    scaled by its factor (all are the device's CPU time: a device slower serving than profiled
    is slower at each)."""
    out = {**problem_dict, "device_types": {k: dict(v) for k, v in problem_dict["device_types"].items()}}
    for typ, f in type_factors.items():
        t = out["device_types"][typ]
        t["unit_times_s"] = [x * f for x in t["unit_times_s"]]
        for k in ("recv_ms_per_mb", "send_ms_per_mb"):
            if k in t:
                t[k] = t[k] * f
        if "codec_ms_per_mb" in t:
            t["codec_ms_per_mb"] = {e: {k: v * f for k, v in c.items()} for e, c in t["codec_ms_per_mb"].items()}
    return out


def burst(client: Client, dep: Deployment, inputs: list[Batch], n: int,
          warmup: int, window: int | None = None, cooldown: int | None = None) -> tuple[Snapshot, Snapshot, float]:
    """Stream `warmup`, then `n` timed, then `cooldown` (default: as many as `warmup`) more
    microbatches of random input through `dep` in one stream; node stats when the warm-up's
    last result arrived and when the last timed one did, and the seconds between the two.
    The cool-down keeps every replica busy until then: timed to the end of the stream, the
    burst would time the drain, stages idle once they have done their share (with a window
    of dozens, the first stage finishes while the last still has a queue).
    ``window``: at least this many in flight (the plan's ``Plan.window``: a smaller one would
    time a pipeline that starves), whatever the client's own is (restored after)."""
    plan = dep.plan
    cooldown = warmup if cooldown is None else cooldown
    xs = inputs[:max(1, min(len(inputs), warmup + n))]
    client.attach(dep.entry, dep.run, dep.entry_keys)
    first: Snapshot = {}
    last: Snapshot = {}
    t = [0.0, 0.0]

    def on_result(i: int, _: np.ndarray) -> None:
        if i == warmup - 1:
            first.update(snapshot(plan))
            t[0] = time.perf_counter()
        if i == warmup + n - 1:
            t[1] = time.perf_counter()
            last.update(snapshot(plan))

    own, own_enc = client.window, client.input_encoding
    client.window = max(own, window or 1)
    client.input_encoding = plan.input_encoding  # the inputs cross as the plan says
    first_seq = client.next_seq
    total = warmup + n + cooldown
    try:
        for _ in client.stream((xs[i % len(xs)] for i in range(total)), on_result=on_result):
            pass
    finally:
        client.window, client.input_encoding = own, own_enc
    # the rate from when results reached the client (Client.arrivals): the snapshots' times,
    # taken as the stream hands results over in order, would time a bunch, not the pace
    got = client.arrivals(first_seq, total)
    if warmup >= 1 and len(got) >= warmup + n:
        return first, last, got[warmup + n - 1] - got[warmup - 1]
    return first, last, t[1] - t[0]


def calibrate(
    dep: Deployment, problem_dict: dict[str, Any], problem: Any, planned: Any, *, client: Client,
    infos: dict[str, dict], types: dict[str, str], replan: Callable[[dict[str, Any]], tuple[Any, Any]],
    to_plan: Callable[[Any], DeployPlan], n: int = CALIBRATION_MICROBATCHES, load_timeout: float = 600.0,
    say: Say | None = None, watch: Callable[[Deployment], AbstractContextManager[Any]] | None = None,
    rounds: int = MAX_ROUNDS,
) -> tuple[Deployment, Any, Any, Calibration]:
    """Calibrate `dep`, deployed from `planned`, the plan for `problem` (module doc).
    `replan(problem_dict)` -> (Problem, planner plan); `to_plan(planner plan)` -> the plan to
    deploy should a new one replace `dep` (which is then unloaded first); `watch(dep)`, a
    context manager around each burst, keeps the deployment's nodes under liveness. A plan
    that replaced the deployed one is calibrated in turn, up to `rounds` bursts in all.
    Returns the deployment in service, the problem and planner plan it follows, and what was
    measured."""
    from edgezmq.model import chain as models  # torch and timm: only when calibrating
    from edgezmq.planner import evaluate

    say = say or (lambda m: log.info("%s", m))
    t0 = time.time()
    m = dep.plan.model
    inputs = split(models.random_inputs(m.name, BURST_INPUTS * m.microbatch, 0, **m.kwargs), m.microbatch)
    cur_dict, cur_problem, cur = problem_dict, problem, planned
    combined: dict[str, float] = {}
    history: list[dict[str, Any]] = []
    first_devices: dict[str, dict[str, Any]] | None = None
    first_burst = 0.0
    redeployed = measured = False
    for r in range(max(1, rounds)):
        # every replica busy before the timing starts, and each replica times at least
        # PER_REPLICA microbatches (one or two are mostly boundary: noise that moved factors
        # by +-25% and plans with them)
        warmup = sum(len(s.nodes) for s in dep.plan.stages) + 1
        most = max(len(s.nodes) for s in dep.plan.stages)
        # under a CPU quota the burst must span many CFS periods (profile.round_seconds), so at
        # least CALIBRATION_SECONDS at the predicted pace, up to 4 n microbatches
        n_r = max(min(max(n, math.ceil(CALIBRATION_SECONDS / max(cur.bottleneck_s, 1e-9))), 4 * n),
                  PER_REPLICA * most)
        with watch(dep) if watch is not None else nullcontext():
            before, after, seconds = burst(client, dep, inputs, n_r, warmup, window=cur.window)
        threads = {ref.name: ref.threads or infos[ref.name].get("threads") for _, ref in dep.plan.all_nodes}
        timings = {}
        for name in after:
            got = serving_time_s(before.get(name), after[name], infos[name]["device"], threads[name])
            if got is not None:
                timings[name] = got
        type_factors, devices = factors(cur_problem, cur, timings, types)
        served = n_r * m.microbatch / seconds if seconds > 0 else 0.0
        if first_devices is None:
            first_devices, first_burst, n_first, warmup_first = devices, served, n_r, warmup
        for name, d in devices.items():
            say(f"calibration: {name} units {d['units'][0]}-{d['units'][1] - 1}: {d['serving_s'] * 1e3:.0f} ms per "
                f"microbatch serving, planner said {d['predicted_s'] * 1e3:.0f} ms (x{d['ratio']:.2f}, busy "
                f"{d['busy']:.0%}{'' if d['counted'] else ', not saturated: not counted'})")
        step: dict[str, Any] = {"round": r + 1, "microbatches": n_r, "burst_samples_per_s": served,
                                "predicted_samples_per_s": cur.throughput_per_s, "factors": type_factors,
                                "devices": devices, "redeployed": False}
        history.append(step)
        measured = True  # the plan in service is the one this burst measured
        if not type_factors:
            break
        for t, f in type_factors.items():
            combined[t] = combined.get(t, 1.0) * f
        cur_dict = corrected(cur_dict, type_factors)
        new_problem, candidate = replan(cur_dict)
        kept = evaluate(new_problem, cur.stages)  # the deployed plan at the corrected speeds
        cur_problem = new_problem
        last = r == max(1, rounds) - 1  # the last round corrects the plan in service: no redeploy
        if (not last and _layout(candidate) != _layout(cur)
                and candidate.throughput_per_s > kept.throughput_per_s * (1 + TOLERANCE)):
            say(f"calibration: at the corrected speeds another plan is "
                f"{candidate.throughput_per_s / kept.throughput_per_s - 1:.0%} faster: redeploying")
            unload(dep.plan)
            dep = deploy(to_plan(candidate), load_timeout=load_timeout, progress=say)
            cur, redeployed, measured = candidate, True, False
            step["redeployed"] = True
            continue  # the new plan's moved stages ran nowhere yet: calibrate it in turn
        cur = kept
        # the plan in service at the corrected speeds: its latency, hence its window, may differ
        dep.plan.window = kept.window
        break
    assert first_devices is not None
    factors_text = ", ".join(f"{t} x{f:.2f}" for t, f in combined.items()) or "none counted"
    say(f"calibration ({factors_text}, {len(history)} burst(s)): {'new plan' if redeployed else 'plan kept'}, "
        f"predicted {planned.throughput_per_s:.2f} -> {cur.throughput_per_s:.2f} samples/s"
        f"{'' if measured else ' (the last plan deployed was not measured: out of rounds)'}")
    cal = Calibration(n_first, warmup_first, first_devices, combined, planned.throughput_per_s, cur.throughput_per_s,
                      redeployed, time.time() - t0, first_burst, cur_dict, rounds=history, measured=measured,
                      cooldown=warmup_first)
    return dep, cur_problem, cur, cal
