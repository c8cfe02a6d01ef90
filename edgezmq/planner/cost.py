"""The cost model: ``evaluate(problem, stages)`` prices any plan exactly (the reference).

Per stage s with units [a, b) on replicas R:
  time on d   T_d = sum(times_d[a:b]) + recv_d * in_bytes(a) + send_d * out_bytes(b - 1)
  compute C_s = max_{d in R} T_d / |R|
  memory, every d in R: params[a:b] + max(work[a:b]) + buffers * (in_bytes + out_bytes)
                        + reserved_d <= memory_d          (shard_memory_bytes: the node's
                        admission check and the solver's memory table use it too)
Per link between consecutive groups X, Y (the client is a group of one) carrying n bytes
per microbatch (replicas are fed round-robin: each x sends n / |X| bytes per pipeline
microbatch on average, each y receives n / |Y|):
  pair    max_{x, y} n * 8 / (mbps(x, y) * 1e6) / (|X| * |Y|)
  nic up  max_x n * 8 / (up_x * 1e6) / |X|        (x's one uplink carries all it sends)
  nic dn  max_y n * 8 / (down_y * 1e6) / |Y|      (y's one downlink, all it receives)
  time    max(pair, nic up, nic dn)               (a node without ``nic_mbps``: up = down = inf)
  latency max_{x, y} latency(x, y) + n * 8 / (min(mbps(x, y), up_x, down_y) * 1e6)
          (one microbatch crosses at the slowest of its pair's rate, x's uplink, y's downlink)
Bottleneck B = max of every C_s and every link time; throughput = microbatch / B;
latency = sum of max_{d in R} T_d over stages + sum of link latencies.
Without NIC limits the NIC terms are 0 and every figure is what the pair model gives.
Encodings (a stage's ``encoding``: how its output crosses the link to the next stage; the
first stage's ``input_encoding``: how the client's input crosses into it, cut 0; the last
link, cut L, stays raw): the link carries n = ceil(ratio * raw bytes); its device senders add
encode_d * raw bytes to T_d (the client's encoding is not priced: it is not a device), its
receivers decode_d * raw bytes; recv/send costs apply to the wire bytes, memory to the raw
ones (a stage holds decoded tensors).
The plan's error is the sum of the used cuts' errors (docs/planner.md: why a sum), and its
top-1 disagreement the sum of theirs (percent; the union bound, docs/planner.md).
The solver uses the same formulas (on classes of devices); the tests hold both to this one.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, TypeVar

import numpy as np

from .plan import LinkCost, Plan, Stage, StageCost, stage_list
from .problem import CLIENT, RAW, PlanError, Problem, encoded_bytes

__all__ = ["evaluate", "shard_memory_bytes", "stage_memory_bytes", "in_bytes"]

Bytes = TypeVar("Bytes", int, float, np.ndarray)


def shard_memory_bytes(param_bytes: Bytes, work_bytes: Bytes, in_bytes: Bytes, out_bytes: Bytes,
                       buffers: int) -> Bytes:
    """Memory a stage needs on top of what its runtime already holds (a device's reserved
    bytes; on a live node, its resident set): the shard's parameters, the peak working memory
    of its units (one runs at a time), and ``buffers`` microbatches in flight each way (its
    input and its output). The planner's cost model, the exact solver (elementwise, on
    arrays) and a node's ``load`` admission check all count it here."""
    return param_bytes + work_bytes + buffers * (in_bytes + out_bytes)


def in_bytes(problem: Problem, a: int) -> int:
    """Bytes of one microbatch entering unit a (the client's input for unit 0)."""
    return problem.model.input_bytes if a == 0 else problem.units[a - 1].out_bytes


def stage_memory_bytes(problem: Problem, a: int, b: int) -> int:
    """Memory a device needs to run units [a, b), excluding the runtime's reserved bytes."""
    units = problem.units[a:b]
    return shard_memory_bytes(sum(u.resident_bytes for u in units), max(u.work_bytes for u in units),
                              in_bytes(problem, a), problem.units[b - 1].out_bytes, problem.options.buffers)


def _check(problem: Problem, stages: list[Stage]) -> None:
    if not stages:
        raise PlanError("stages: expected at least one stage")
    n_units = problem.num_units
    known = {d.name for d in problem.devices}
    used: dict[str, int] = {}
    expect = 0
    for i, s in enumerate(stages):
        p = f"stages[{i}]"
        if len(s.units) != 2 or not all(isinstance(x, int) and not isinstance(x, bool) for x in s.units):
            raise PlanError(f"{p}.units: expected [a, b] with whole numbers, got {list(s.units)}")
        a, b = s.units
        if a != expect:
            raise PlanError(f"{p}.units: expected to start at unit {expect} (stages must be contiguous "
                            f"from 0), got [{a}, {b}]")
        if not a < b <= n_units:
            raise PlanError(f"{p}.units: expected {a} < b <= {n_units}, got [{a}, {b}]")
        expect = b
        if not s.devices:
            raise PlanError(f"{p}.devices: expected at least one device")
        for dev in s.devices:
            if dev not in known:
                raise PlanError(f"{p}.devices: unknown device {dev!r}")
            if dev in used:
                raise PlanError(f"{p}.devices: device {dev!r} is already used by stages[{used[dev]}]")
            used[dev] = i
        if len(s.devices) > 1 and not problem.options.replication:
            raise PlanError(f"{p}.devices: {len(s.devices)} replicas but options.replication is false")
        if s.encoding != RAW:
            _check_encoding(problem, stages, i)
        if s.input_encoding != RAW:
            _check_input_encoding(problem, stages, i)
    if expect != n_units:
        raise PlanError(f"stages: cover units [0, {expect}), expected [0, {n_units})")


def _check_encoding(problem: Problem, stages: list[Stage], i: int) -> None:
    """Stage i's output encoding: a lossy candidate of the problem, on a link between stages,
    that its devices can encode and the next stage's can decode."""
    p, name = f"stages[{i}].encoding", stages[i].encoding
    if name not in problem.encodings:
        known = ", ".join([RAW, *problem.encodings])
        raise PlanError(f"{p}: expected one of the problem's encodings ({known}), got {name!r}")
    if i == len(stages) - 1:
        raise PlanError(f"{p}: the last stage's output goes to the client raw, got {name!r}")
    for dev, encode in [*((d, True) for d in stages[i].devices), *((d, False) for d in stages[i + 1].devices)]:
        if math.isinf(problem.device(dev).codec_s_per_byte(name, encode)):
            raise PlanError(f"{p}: device {dev!r} has no codec_ms_per_mb.{name} (cannot "
                            f"{'encode' if encode else 'decode'} it)")


def _check_input_encoding(problem: Problem, stages: list[Stage], i: int) -> None:
    """Stage i's input encoding: only the first stage's (the client's link), one the problem
    measured on the input, that every one of its devices can decode."""
    p, name = f"stages[{i}].input_encoding", stages[i].input_encoding
    if i != 0:
        raise PlanError(f"{p}: only the first stage takes the client's input, got {name!r} on stage {i}")
    if name not in problem.input_encodings:
        known = ", ".join([RAW, *problem.input_encodings])
        raise PlanError(f"{p}: expected one the problem measured on the input ({known}), got {name!r}")
    for dev in stages[i].devices:
        if math.isinf(problem.device(dev).codec_s_per_byte(name, False)):
            raise PlanError(f"{p}: device {dev!r} has no codec_ms_per_mb.{name} (cannot decode it)")


def _link(problem: Problem, src: Sequence[str], dst: Sequence[str], nbytes: int,
          labels: tuple[str, str]) -> LinkCost:
    rows = [problem.node_index(x) for x in src]
    cols = [problem.node_index(y) for y in dst]
    spb = problem.spb[np.ix_(rows, cols)]
    transfer = nbytes * spb
    worst = np.unravel_index(int(np.argmax(transfer)), transfer.shape)
    pair = float(transfer[worst]) / (len(src) * len(dst))
    if not problem.has_nic:
        latency = problem.latency_s[np.ix_(rows, cols)] + transfer
        return LinkCost(labels[0], labels[1], nbytes, pair, float(latency.max()),
                        (src[int(worst[0])], dst[int(worst[1])]), pair_s=pair)
    up = np.array([problem.nic(x).up_s_per_byte for x in src])
    down = np.array([problem.nic(y).down_s_per_byte for y in dst])
    i, j = int(np.argmax(up)), int(np.argmax(down))
    up_s, down_s = nbytes * float(up[i]) / len(src), nbytes * float(down[j]) / len(dst)
    # one microbatch moves at the slowest of its pair's rate, the sender's up, the receiver's down
    slowest = np.maximum(spb, np.maximum(up[:, None], down[None, :]))
    latency = problem.latency_s[np.ix_(rows, cols)] + nbytes * slowest
    return LinkCost(labels[0], labels[1], nbytes, max(pair, up_s, down_s), float(latency.max()),
                    (src[int(worst[0])], dst[int(worst[1])]), pair, up_s, down_s, src[i], dst[j])


def evaluate(problem: Problem, stages: Sequence[Any], *, method: str = "evaluate") -> Plan:
    """Price a plan exactly. Structural errors raise ``PlanError``; memory overruns are listed
    in ``Plan.violations`` (the plan is then not ``feasible``) so baselines can still be shown."""
    stages = stage_list(stages)
    _check(problem, stages)
    by_name = {d.name: d for d in problem.devices}
    costs, violations = [], []
    encs = [stages[0].input_encoding, *(s.encoding for s in stages)]  # encs[i]: how stage i's input arrives
    wire = [encoded_bytes(problem.model.input_bytes, problem.cut_ratio(encs[0], 0))]  # wire[i]: into stage i
    for i, s in enumerate(stages):
        a, b = s.units
        n_in, n_out = in_bytes(problem, a), problem.units[b - 1].out_bytes
        w_in, w_out = wire[i], encoded_bytes(n_out, problem.cut_ratio(s.encoding))
        wire.append(w_out)
        ei, eo = encs[i], s.encoding
        times = {d: by_name[d].stage_time_s(a, b, w_in, w_out, _codec_s(by_name[d], ei, n_in, eo, n_out))
                 for d in s.devices}
        slowest = max(times.values())
        need = stage_memory_bytes(problem, a, b)
        tight = min(s.devices, key=lambda d: by_name[d].capacity_bytes)
        for d in s.devices:
            dev = by_name[d]
            if need + dev.reserved_bytes > dev.memory_bytes:
                violations.append(
                    f"stage {i} units [{a},{b}): {d} needs {need + dev.reserved_bytes} bytes "
                    f"({need} + {dev.reserved_bytes} reserved), has {dev.memory_bytes}")
        costs.append(StageCost(slowest / len(s.devices), slowest, need + by_name[tight].reserved_bytes,
                               by_name[tight].memory_bytes, tight))
    groups = [(CLIENT,), *(s.devices for s in stages), (CLIENT,)]
    labels = [CLIENT, *(f"stage {i}" for i in range(len(stages))), CLIENT]
    links = []
    for k in range(len(groups) - 1):
        link = _link(problem, groups[k], groups[k + 1], wire[k], (labels[k], labels[k + 1]))
        links.append(link if encs[k] == RAW else dataclasses.replace(link, encoding=encs[k]))

    bottleneck, where = -1.0, ""
    for i, c in enumerate(costs):
        if c.compute_s > bottleneck:
            bottleneck, where = c.compute_s, f"stage {i}"
    for link in links:
        if link.time_s > bottleneck:
            bottleneck, where = link.time_s, link.where
    latency = math.fsum([c.unreplicated_s for c in costs] + [k.latency_s for k in links])
    mb = problem.model.microbatch
    throughput = mb / bottleneck if bottleneck > 0 else math.inf
    # (encoding, cut) of every encoded link: the client's input (cut 0), then the stages' outputs
    used = [(e, c) for e, c in [(stages[0].input_encoding, 0), *((s.encoding, s.units[1]) for s in stages)]
            if e != RAW]
    error = math.fsum(problem.cut_error(e, c) for e, c in used)
    try:
        disagreement: float | None = math.fsum(problem.cut_disagreement(e, c) for e, c in used)
    except PlanError:  # one of them was not measured
        disagreement = None
    return Plan(stages, costs, links, bottleneck, throughput, latency, where, mb, violations,
                method=method, error=error, disagreement=disagreement)


def _codec_s(dev: Any, ein: str, n_in: int, eo: str, n_out: int) -> float:
    """A device's seconds decoding its input (``ein``) and encoding its output (``eo``)."""
    if ein == RAW and eo == RAW:
        return 0.0
    return dev.codec_s_per_byte(ein, False) * n_in + dev.codec_s_per_byte(eo, True) * n_out
