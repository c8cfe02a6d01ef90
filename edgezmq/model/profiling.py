"""Measure, on this device, the compute time and memory of every unit of a model, one unit at a time.

    >>> prof = profile_units("vit_tiny_patch16_224", microbatch=8, threads=1)
    >>> [(u["name"], u["time_s"], u["work_bytes"]) for u in prof["units"]]

Each unit is built alone (``build_shard(name, i, i + 1)``), run on a random input of the
shape that enters it (``boundary_specs``), timed, measured and freed before the next one
is built: the process holds one unit at a time, so a device can profile a model it
cannot hold. Then a window of up to ``CHAIN_MAX_UNITS`` middle units that fits in
``CHAIN_MEMORY_SHARE`` of the free memory is timed back to back, as a stage runs them
(fresh input, outputs kept alive a while): a unit timed alone keeps its weights in cache
and recycles its buffers, a stage's units do not, and ``chain.factor`` (back to back ÷
the sum of the units' own times; 1.05-1.25 measured on this project's machine) is what
the planner scales unit times by. Weights are the checkpoint's when one is given, otherwise ``build_shard``'s
seeded placeholder weights (same shapes, same kernels, same time).

Timing: ``warmup`` untimed forwards, then ``reps`` timed rounds under ``inference_mode``;
a round runs the unit back to back for at least ``round_seconds()`` and counts the mean, and
``time_s`` is the median of the rounds. Rounds, not single forwards, because on a device
under a CPU quota a short unit timed alone either slips through unthrottled or pays a
whole throttle: either way not what a busy stage sees. Under a quota a round spans
``PERIODS_PER_ROUND`` CFS periods: its two ends fall at arbitrary phases of the throttle
cycle, so a round of k periods is off by up to ~1/k (with 0.3 CPU = 20 ms every 67 ms, a
0.2 s round was off by up to 25%, and the planner's balanced stages came out 15% slower).

Working memory (``work_bytes``): the growth of the process's resident set during one
extra forward, above its level just before, so it counts every allocation the unit makes
(activations, the output it returns, kernel scratch) but not its parameters or its input.
CPU torch has no caching allocator, but glibc keeps freed memory mapped, so the RSS of a
repeated forward barely moves; hence, before the measured forward, ``malloc_trim(0)``
returns every free page to the kernel, the kernel's RSS high-water mark (VmHWM) is reset by
writing ``5`` to ``/proc/self/clear_refs`` (Linux >= 4.0), and VmHWM is read after the
forward: exact to a page (4 KiB here), plus whatever slack malloc's arenas had left (small: the
trim releases it). Where that file cannot be written, a thread samples RSS every
``SAMPLE_INTERVAL_S`` instead (peaks shorter than that can be missed; reported as
``work_method: "sampled"``). The measure is process-wide: other threads allocating
meanwhile (a running stage) are counted too, so profile an idle node. The measured forward
is separate from the timed ones because the trim makes its page faults slower. Resetting
VmHWM also resets the process's ``ru_maxrss``: after a profile, ``device.peak_rss_bytes()``
is the peak since the last unit was measured, not since the process started.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import functools
import gc
import logging
import math
import os
import platform
import socket
import statistics
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from edgezmq.model import chain as models
from edgezmq.node import device
from edgezmq.terms import MAX_CONTEXT

__all__ = ["DTYPE", "ProgressFn", "device_identity", "profile_units", "decode_step", "format_profile", "spot_check", "rescale"]

log = logging.getLogger(__name__)

DTYPE = "float32"  # the only dtype profiled (and served) so far
TORCH_DTYPE = torch.float32
INPUT_SEED = 0  # random inputs are seeded so that two profiles run on identical data
MIN_ROUND_S = 0.2  # a timed rep lasts at least this long ...
PERIODS_PER_ROUND = 20  # ... and, under a CPU quota, at least this many CFS periods
MAX_ROUND_ITERS = 100_000
CHAIN_MAX_UNITS = 8  # units timed back to back for the chain factor ...
CHAIN_MEMORY_SHARE = 0.25  # ... within this share of the memory the device has free
CHAIN_HELD_OUTPUTS = 2  # outputs alive at once, as in a stage's send queue
DRIFT_TOLERANCE = 0.05  # a spot check this close to the cached time leaves the profile as it is
SAMPLE_INTERVAL_S = 0.0005  # RSS sampling period of the fallback memory meter
CLEAR_REFS = Path("/proc/self/clear_refs")
CLEAR_REFS_RESET_HWM = "5"  # resets VmHWM to the current RSS (proc(5), Linux >= 4.0)
PROC_STATUS = Path("/proc/self/status")
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")  # resolution of the VmHWM meter

ProgressFn = Callable[[int, int, str, float], None]
StopFn = Callable[[], None]  # raises to end a measurement early; returns to let it go on


def _go_on() -> None:
    """The default ``StopFn``: never stops."""


def device_identity() -> dict[str, Any]:
    """What makes a profile valid on this device and no other: the cache key's device part.

    Only stable facts: no free memory, no RSS.
    """
    return {
        "hostname": socket.gethostname(),
        "machine": platform.machine(),
        "cpu": device.cpu_model(),
        "cores": device.cores(),
        "cpu_quota": device.cpu_quota(),
        "cpu_period_s": device.cpu_period_s(),
        "memory_total": device.mem_total(),
        "memory_limit": device.memory_limit(),
    }


# ---------------------------------------------------------------- memory meter


def _vmhwm() -> int:
    for line in PROC_STATUS.read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise OSError(f"no VmHWM line in {PROC_STATUS}")


def _reset_hwm() -> bool:
    try:
        CLEAR_REFS.write_text(CLEAR_REFS_RESET_HWM)
        _vmhwm()
    except OSError:
        return False
    return True


class _PeakMeter:
    """Peak resident-set growth of this process while a callable runs (see the module docstring)."""

    def __init__(self) -> None:
        self.trim = device.malloc_trim()
        self.method = "vmhwm" if _reset_hwm() else "sampled"
        self.resolution_bytes = PAGE_BYTES if self.method == "vmhwm" else None

    def __call__(self, fn: Callable[[], Any]) -> tuple[Any, int]:
        self.trim()
        if self.method == "vmhwm":
            _reset_hwm()
            base = _vmhwm()
            out = fn()
            return out, max(0, _vmhwm() - base)
        return self._sampled(fn)

    @staticmethod
    def _sampled(fn: Callable[[], Any]) -> tuple[Any, int]:
        base = device.rss_bytes()
        peak = [base]
        done = threading.Event()

        def sample() -> None:
            while not done.wait(SAMPLE_INTERVAL_S):
                peak[0] = max(peak[0], device.rss_bytes())

        t = threading.Thread(target=sample, name="edgezmq-rss-sampler", daemon=True)
        t.start()
        try:
            out = fn()
            peak[0] = max(peak[0], device.rss_bytes())  # the output is still alive here
        finally:
            done.set()
            t.join()
        return out, max(0, peak[0] - base)


# ---------------------------------------------------------------- profiling


def round_seconds(period_s: float | None = None) -> float:
    """Length of one timed round on this device: MIN_ROUND_S, or PERIODS_PER_ROUND periods
    of its CPU quota when that is longer (`period_s` defaults to this process's cgroup's)."""
    period = device.cpu_period_s() if period_s is None else period_s
    return max(MIN_ROUND_S, PERIODS_PER_ROUND * period) if period else MIN_ROUND_S


def _nbytes(specs: list[tuple[tuple[int, ...], str]]) -> int:
    return sum(math.prod(shape) * getattr(torch, dt).itemsize for shape, dt in specs)


def _jsonable(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """kwargs as plain JSON/msgpack values (a class such as mlp_layer=SwiGLU becomes its repr)."""
    plain = (str, int, float, bool, type(None))
    return {k: v if isinstance(v, plain) else repr(v) for k, v in sorted(kwargs.items())}


def _check_counts(threads: int | None, warmup: int, reps: int) -> None:
    if threads is not None and threads < 1:
        raise ValueError(f"threads: expected >= 1 or None, got {threads}")
    if warmup < 0:
        raise ValueError(f"warmup: expected >= 0, got {warmup}")
    if reps < 1:
        raise ValueError(f"reps: expected >= 1, got {reps}")


def _timed_rounds(fn: Callable[[], Any], warmup: int, reps: int, round_s: float,
                  stop: StopFn | None = None) -> list[float]:
    """Seconds per call of `fn`: `warmup` untimed calls, then the mean of each of `reps` rounds.
    `stop()` is called before every call: it raises to end the measurement (a job cancelled or
    past its deadline), so no measurement runs longer than one call past it."""
    stop = stop or _go_on
    for _ in range(warmup):
        stop()
        fn()
    times = []
    for _ in range(reps):
        # one rep = as many back-to-back calls as fill round_s: a unit shorter than a CFS
        # period would otherwise dodge a CPU quota's throttling (or pay all of it)
        n, t = 0, time.perf_counter()
        while True:
            stop()
            fn()
            n += 1
            elapsed = time.perf_counter() - t
            if elapsed >= round_s or n >= MAX_ROUND_ITERS:
                break
        times.append(elapsed / n)
    return times


def chain_window(units: list[dict[str, Any]], budget_bytes: int, max_units: int = CHAIN_MAX_UNITS) -> tuple[int, int] | None:
    """Units [a, b) to time back to back: the middle of the chain (embedding and head
    excluded when there is more), at most `max_units`, parameters and peak work within
    `budget_bytes`; None when fewer than two fit."""
    n = len(units)
    a, end = (1, n - 1) if n > 3 else (0, n)
    b = a
    while b < min(end, a + max_units):
        need = sum(u["param_bytes"] for u in units[a:b + 1]) + max(u["work_bytes"] for u in units[a:b + 1])
        if need > budget_bytes:
            break
        b += 1
    return (a, b) if b - a >= 2 else None


def _time_window(model: str, window: tuple[int, int], *, granularity: str, specs: list, fixed: list, warmup: int,
                 reps: int, kwargs: dict[str, Any], checkpoint: str | Path | None, gen: torch.Generator,
                 round_s: float, stop: StopFn | None = None) -> list[float]:
    """Seconds per forward of units [a, b) run as one stage runs them: back to back, on a
    fresh copy of the input each time (as each message is), each output kept alive while the
    next ones run (as the send queue keeps it)."""
    a, b = window
    shard = models.build_shard(model, a, b, granularity=granularity, checkpoint=checkpoint,
                               dtype=TORCH_DTYPE, **kwargs)
    xs = models.example_inputs(specs[a], fixed[a], gen)
    held: collections.deque = collections.deque(maxlen=CHAIN_HELD_OUTPUTS)

    def run() -> None:
        held.append(shard(*[x.clone() for x in xs]))

    with torch.inference_mode():
        return _timed_rounds(run, warmup, reps, round_s, stop)


def _profile_chain(model: str, window: tuple[int, int], units: list[dict[str, Any]], *, granularity: str,
                   specs: list, fixed: list, warmup: int, reps: int, kwargs: dict[str, Any],
                   checkpoint: str | Path | None, gen: torch.Generator, round_s: float,
                   stop: StopFn | None = None) -> dict[str, Any]:
    """Units [a, b) timed as a stage runs them (``_time_window``). Alone, a unit finds its
    weights in cache and its buffers recycled; in a stage it does not, which the ratio to the
    sum of the units' own times captures."""
    a, b = window
    times = _time_window(model, window, granularity=granularity, specs=specs, fixed=fixed, warmup=warmup, reps=reps,
                         kwargs=kwargs, checkpoint=checkpoint, gen=gen, round_s=round_s, stop=stop)
    alone = sum(u["time_s"] for u in units[a:b])
    chained = statistics.median(times)
    return {"units": [a, b], "time_s": chained, "times_s": times, "units_time_s": alone,
            "factor": chained / alone if alone > 0 else 1.0}


def _profile_unit(model: str, i: int, *, granularity: str, specs: list, fixed: list, warmup: int, reps: int,
                  kwargs: dict[str, Any], checkpoint: str | Path | None, gen: torch.Generator,
                  meter: _PeakMeter, round_s: float, stop: StopFn | None = None) -> dict[str, Any]:
    t0 = time.perf_counter()
    shard = models.build_shard(model, i, i + 1, granularity=granularity, checkpoint=checkpoint,
                               dtype=TORCH_DTYPE, **kwargs)
    build_s = time.perf_counter() - t0
    xs = models.example_inputs(specs[i], fixed[i], gen)
    with torch.inference_mode():
        times = _timed_rounds(functools.partial(shard, *xs), warmup, reps, round_s, stop)
        out, work = meter(functools.partial(shard, *xs))
    got = [(tuple(y.shape), str(y.dtype).removeprefix("torch.")) for y in out]
    want = [(tuple(s), dt) for s, dt in specs[i + 1]]
    if got != want:  # pragma: no cover - guards model.boundary_specs
        raise models.ModelError(f"{model} unit {i} ({shard.units[0].name}): output {got}, "
                                f"boundary_specs says {want}")
    entry = {
        "index": i,
        "name": shard.units[0].name,
        "time_s": statistics.median(times),
        "times_s": times,
        "in_bytes": _nbytes(specs[i]),
        "out_bytes": _nbytes(specs[i + 1]),
        "param_bytes": shard.param_bytes(),
        "work_bytes": work,
        "build_s": build_s,
    }
    del shard, xs, out
    gc.collect()  # free the unit before the next is built (never two units at once)
    return entry


def decode_step(shard: Any, microbatch: int, context: int, gen: torch.Generator) -> Callable[[], Any]:
    """One decode step of `shard` at `context` cached tokens, repeatable: each call's new
    token is cut from the caches again, so every call sees the same context."""
    x, caches = shard.decode_inputs(microbatch, context, gen)
    lengths = [context] * microbatch

    def step() -> Any:
        y = shard.step_batch(x, caches, lengths)
        for c in caches:
            c.crop(-1)
        return (y,)

    return step


def _profile_decode_unit(model: str, i: int, *, granularity: str, microbatch: int, context: int, warmup: int,
                         reps: int, kwargs: dict[str, Any], checkpoint: str | Path | None, gen: torch.Generator,
                         meter: _PeakMeter, round_s: float, stop: StopFn | None = None) -> dict[str, Any]:
    t0 = time.perf_counter()
    shard = models.build_shard(model, i, i + 1, granularity=granularity, checkpoint=checkpoint, dtype=TORCH_DTYPE,
                               **kwargs)
    build_s = time.perf_counter() - t0
    step = decode_step(shard, microbatch, context, gen)
    with torch.inference_mode():
        x_bytes = sum(t.numel() * t.element_size() for t in [shard.decode_inputs(microbatch, 0, gen)[0]])
        times = _timed_rounds(step, warmup, reps, round_s, stop)
        (out,), work = meter(step)
    entry = {
        "index": i,
        "name": shard.units[0].name,
        "time_s": statistics.median(times),
        "times_s": times,
        "in_bytes": x_bytes,
        "out_bytes": out.numel() * out.element_size(),
        "param_bytes": shard.param_bytes(),
        "work_bytes": work,
        "cache_bytes_per_token": shard.cache_bytes_per_token(),
        "build_s": build_s,
    }
    del shard, step, out
    gc.collect()
    return entry


@contextlib.contextmanager
def _frozen_heap() -> Iterator[None]:
    """Objects alive before profiling (caches of traced graphs: many thousands of nodes) left out
    of the collections run after each unit: those then scan the unit's garbage, not the heap."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def profile_units(model: str, *, granularity: str = "block", microbatch: int = 8,
                  threads: int | None = None, warmup: int = 1, reps: int = 3,
                  kwargs: Mapping[str, Any] | None = None, checkpoint: str | Path | None = None,
                  progress: ProgressFn | None = None, stop: StopFn | None = None,
                  context: int | None = None) -> dict[str, Any]:
    """Time and measure every unit of `model` at `microbatch` on this device, one unit at a time.

    `threads`: torch intra-op threads while profiling (None: the current setting); the
    previous setting is restored afterwards. `progress(i, n, unit_name, time_s)` is
    called after each unit. `stop()`, called before every timed forward, raises to end the
    profile early (a cancelled job). Returns plain values only (JSON- and msgpack-ready).

    `context` (a decoder only): time each unit on one decode step instead (docs/generate.md):
    `microbatch` sequences, one new token each, `context` tokens in each cache; each unit also
    reports the KV-cache bytes one token costs it (``cache_bytes_per_token``), and the profile
    says ``phase: decode`` and its ``context`` (no chain factor: ``chain`` null).
    """
    _check_counts(threads, warmup, reps)
    kw = dict(kwargs or {})
    if context is not None:
        if not 1 <= context <= MAX_CONTEXT:
            raise models.ModelError(f"context must be 1..{MAX_CONTEXT} tokens, got {context}")
        if not models.text.is_decoder(model):
            raise models.ModelError(f"{model} is not a decoder: only a decoder's units take decode steps")
        specs, fixed = [], []
        n = len(models.unit_infos(model, granularity, **kw))
    else:
        specs = models.boundary_specs(model, granularity, microbatch, dtype=TORCH_DTYPE, **kw)
        fixed = models.boundary_values(model, granularity, microbatch, dtype=TORCH_DTYPE, **kw)
        n = len(specs) - 1
    used = threads or torch.get_num_threads()
    meter = _PeakMeter()
    gen = torch.Generator().manual_seed(INPUT_SEED)
    base_rss = device.rss_bytes()
    round_s = round_seconds()
    started = time.perf_counter()
    units = []
    with models.torch_threads(used), _frozen_heap():
        for i in range(n):
            if context is not None:
                entry = _profile_decode_unit(model, i, granularity=granularity, microbatch=microbatch, context=context,
                                             warmup=warmup, reps=reps, kwargs=kw, checkpoint=checkpoint, gen=gen, meter=meter,
                                             round_s=round_s, stop=stop)
            else:
                entry = _profile_unit(model, i, granularity=granularity, specs=specs, fixed=fixed, warmup=warmup,
                                      reps=reps, kwargs=kw, checkpoint=checkpoint, gen=gen, meter=meter,
                                      round_s=round_s, stop=stop)
            units.append(entry)
            log.debug("%s unit %d/%d %s: %.4f s, work %d B", model, i + 1, n, entry["name"],
                      entry["time_s"], entry["work_bytes"])
            if progress is not None:
                progress(i, n, entry["name"], entry["time_s"])
        window = None if context is not None else chain_window(units, int(CHAIN_MEMORY_SHARE * device.memory_budget()))
        chain = None if window is None else _profile_chain(
            model, window, units, granularity=granularity, specs=specs, fixed=fixed, warmup=warmup, reps=reps,
            kwargs=kw, checkpoint=checkpoint, gen=gen, round_s=round_s, stop=stop)
        gc.collect()  # the chain's shard is gone with _profile_chain's frame
    return {
        "model": model,
        "granularity": granularity,
        "microbatch": microbatch,
        "threads": used,
        "dtype": DTYPE,
        "kwargs": _jsonable(kw),
        "checkpoint": str(checkpoint) if checkpoint is not None else None,
        "device": device_identity(),
        "warmup": warmup,
        "reps": reps,
        "round_s": round_s,
        "work_method": meter.method,
        "work_resolution_bytes": meter.resolution_bytes,
        "base_rss_bytes": base_rss,  # the process before any unit: the runtime's own footprint
        **({"phase": "decode", "context": context} if context is not None else {}),
        "units": units,
        # units [a, b) timed back to back: factor = that time / the sum of their own times
        # (the planner scales every unit's time by it; None: too little memory to measure)
        "chain": chain,
        "input_bytes": units[0]["in_bytes"] if context is not None else _nbytes(specs[0]),
        "total_time_s": sum(u["time_s"] for u in units),
        "profile_s": time.perf_counter() - started,
    }


def spot_check(prof: Mapping[str, Any], *, kwargs: Mapping[str, Any] | None = None,
               checkpoint: str | Path | None = None, warmup: int = 1, reps: int = 3,
               stop: StopFn | None = None) -> dict[str, Any]:
    """Time a cached profile's reference again, now, on this device: its chain window (or,
    without one, its slowest unit), as profiling timed it. ``ratio`` = now / then says how
    the device's speed has moved since (a board that throttles when hot, other tenants, a
    VM's host): ``rescale`` applies it. Seconds, where a whole profile takes minutes."""
    kw = dict(kwargs or {})
    units, chain = prof["units"], prof.get("chain")
    if prof.get("phase") == "decode":  # a decode profile: its slowest unit's decode step again
        i = max(range(len(units)), key=lambda j: units[j]["time_s"])
        started = time.perf_counter()
        shard = models.build_shard(prof["model"], i, i + 1, granularity=prof.get("granularity", "block"),
                                   checkpoint=checkpoint, dtype=TORCH_DTYPE, **kw)
        step = decode_step(shard, int(prof["microbatch"]), int(prof["context"]), torch.Generator().manual_seed(INPUT_SEED))
        with models.torch_threads(int(prof["threads"])), torch.inference_mode():
            times = _timed_rounds(step, warmup, reps, round_seconds(), stop)
        del shard, step
        gc.collect()
        now, then = statistics.median(times), float(units[i]["time_s"])
        return {"units": [i, i + 1], "time_s": now, "times_s": times, "cached_time_s": then,
                "ratio": now / then if then > 0 else 1.0, "at": time.time(), "check_s": time.perf_counter() - started}
    specs = models.boundary_specs(prof["model"], prof["granularity"], prof["microbatch"], dtype=TORCH_DTYPE, **kw)
    fixed = models.boundary_values(prof["model"], prof["granularity"], prof["microbatch"], dtype=TORCH_DTYPE, **kw)
    if chain:
        window, then = (int(chain["units"][0]), int(chain["units"][1])), float(chain["time_s"])
    else:
        i = max(range(len(units)), key=lambda j: units[j]["time_s"])
        window, then = (i, i + 1), float(units[i]["time_s"])
    started = time.perf_counter()
    with models.torch_threads(int(prof["threads"])):
        times = _time_window(prof["model"], window, granularity=prof["granularity"], specs=specs, fixed=fixed, warmup=warmup,
                             reps=reps, kwargs=kw, checkpoint=checkpoint,
                             gen=torch.Generator().manual_seed(INPUT_SEED), round_s=round_seconds(), stop=stop)
    gc.collect()
    now = statistics.median(times)
    return {"units": list(window), "time_s": now, "times_s": times, "cached_time_s": then,
            "ratio": now / then if then > 0 else 1.0, "at": time.time(), "check_s": time.perf_counter() - started}


def rescale(prof: Mapping[str, Any], check: Mapping[str, Any], tolerance: float = DRIFT_TOLERANCE) -> dict[str, Any]:
    """`prof` with `check` (``spot_check``'s) recorded as ``spot_check``; when the device has
    drifted by more than `tolerance` (``spot_check.rescaled``), every time in it scaled by the
    check's ratio (the profile's shape stays, its level follows the device) and
    ``rescaled_by`` (the product of every rescale so far) set."""
    out = copy.deepcopy(dict(prof))
    r = float(check["ratio"])
    drifted = math.isfinite(r) and r > 0 and abs(r - 1) > tolerance
    out["spot_check"] = {**check, "rescaled": drifted}
    if not drifted:
        return out
    for u in out["units"]:
        u["time_s"] *= r
        u["times_s"] = [t * r for t in u["times_s"]]
    out["total_time_s"] = sum(u["time_s"] for u in out["units"])
    if out.get("chain"):  # the factor is a ratio of two times: unchanged
        c = out["chain"]
        c["time_s"] *= r
        c["units_time_s"] *= r
        c["times_s"] = [t * r for t in c["times_s"]]
    out["rescaled_by"] = float(out.get("rescaled_by") or 1.0) * r
    return out


def format_profile(prof: Mapping[str, Any]) -> str:
    """A profile as an aligned text table (one line per unit, then the total)."""
    mib = 1024 * 1024
    lines = [f"{prof['model']} {prof['granularity']} microbatch {prof['microbatch']} "
             f"threads {prof['threads']} {prof['dtype']}",
             f"{'#':>3}  {'unit':<20} {'time ms':>9} {'out MiB':>8} {'param MiB':>9} {'work MiB':>8}"]
    for u in prof["units"]:
        lines.append(f"{u['index']:>3}  {u['name']:<20} {u['time_s'] * 1e3:>9.2f} "
                     f"{u['out_bytes'] / mib:>8.2f} {u['param_bytes'] / mib:>9.2f} "
                     f"{u['work_bytes'] / mib:>8.2f}")
    lines.append(f"{'':>3}  {'total':<20} {prof['total_time_s'] * 1e3:>9.2f}")
    return "\n".join(lines)
