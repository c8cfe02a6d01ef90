"""The lossy encodings autodeploy offers the planner: ratios, per-cut errors and codec costs, measured.

``add_encodings(problem, ...)`` fills in what ``edgezmq plan --max-error`` reads
(docs/planner.md, ``model.encodings`` and ``codec_ms_per_mb``) for a gathered problem:

- ``ratio``: the wire codecs' bytes over raw float32 at the model's own cut shapes (at the
  deployment's microbatch); the largest over the interior cuts, so that no link carries more
  than the planner prices (on a ViT every block cut has the same shape).
- ``error`` / ``disagreement``: per interior cut, the relative L2 of the logits and the percent
  of samples whose top-1 class changed, with that encoding at that cut alone, through the
  codecs' own round trip (``edgezmq.model.accuracy.CutSweep``), on the calibration batch:
  ``CALIBRATION_SAMPLES`` (or ``samples``) seeded standard-normal images (``chain.random_inputs``,
  seed ``CALIBRATION_SEED``, the same kind the calibration bursts send) unless the caller passes
  its own images, in microbatches of the deployment's size (a per-channel scale spans a
  microbatch). The disagreement written is the flips measured **plus one sample** (100 / N
  percent): two encoded cuts together flipped up to 2 samples more than the sum of their flips
  alone (near-ties: bench/encoding_sum.py, docs/planner.md "Why a union bound"), and one sample a
  cut covers every pair measured. So a batch of N samples cannot certify an agreement finer than
  100 / N percent per encoded cut: 16 samples, 6.25 % a cut; --min-agreement 99 needs >= 100.
- ``input``: the same three figures with the client's input encoded so (cut 0: what the
  client sends stage 0), so that the planner may encode the client's link too (docs/planner.md);
  the same one-sample margin.
- ``codec_ms_per_mb``: per device type, the codecs' CPU time per MB measured here, on the
  client, scaled by how much slower the type ran the model's units than this machine does
  with the same number of torch threads (its profile's unit times over the client's). Why
  not on the nodes: a node measures only what its protocol's jobs measure (profile,
  netprobe), and adding codec timing to the profile job would change the node protocol and
  its profile cache for figures that scale with the CPU like the units do; the client's
  measurement needs nothing from the nodes. The codecs run single-threaded numpy, so the
  client's figure is one thread's; the factor carries it to the node's CPU (a node under a
  0.12-CPU quota runs units ~8x slower than the client, and so its codecs).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from edgezmq.errors import EdgezmqError
from edgezmq.protocol import codecs

if TYPE_CHECKING:  # torch is imported where it is used: the CLI reads this module's defaults without it
    import torch

__all__ = ["DEFAULT_ENCODINGS", "CALIBRATION_SAMPLES", "MAX_CALIBRATION_SAMPLES", "CALIBRATION_SEED", "CompressionError", "Measured",
           "measure", "add_encodings", "load_model", "calibration_batch", "speed_factors", "codec_ms_per_mb"]

DEFAULT_ENCODINGS = ("f16", "int8", "int4")  # one of each width: the sweep costs a forward per cut per encoding
CALIBRATION_SAMPLES = 16
MAX_CALIBRATION_SAMPLES = 100_000
CALIBRATION_SEED = 0
TIMING_REPS = 3  # the client's chain is timed this many times (median), after one warm-up


class CompressionError(EdgezmqError, ValueError):
    """The encodings cannot be measured (model, calibration batch, encodings)."""


@dataclass
class Measured:
    """What ``measure`` found: the problem's ``model.encodings``, the client's codec costs and
    its chain times, and where they came from."""

    encodings: dict[str, dict[str, Any]]  # name -> {ratio, error: [...], disagreement: [...] (+1 sample)}
    codec_s_per_mb: dict[str, tuple[float, float]]  # name -> (encode, decode) on the client, one thread
    codec_shape: tuple[int, ...]
    samples: int
    source: str  # "seeded" or "given"
    client_chain_s: dict[int, float] = field(default_factory=dict)  # torch threads -> one microbatch, s
    seconds: float = 0.0
    flips: dict[str, list[int]] = field(default_factory=dict)  # name -> samples flipped per cut (no margin)
    input_flips: dict[str, int] = field(default_factory=dict)  # name -> samples flipped, the input encoded so

    def to_dict(self) -> dict[str, Any]:
        return {"encodings": self.encodings, "flips": self.flips, "input_flips": self.input_flips,
                "samples": self.samples, "calibration": self.source,
                "codec_shape": list(self.codec_shape),
                "client_codec_ms_per_mb": {e: {"encode": a * 1e3, "decode": b * 1e3}
                                           for e, (a, b) in self.codec_s_per_mb.items()},
                "client_chain_s": {str(k): v for k, v in self.client_chain_s.items()}, "seconds": self.seconds}


def _check_encodings(encodings: Sequence[str]) -> list[str]:
    out = []
    for e in encodings:
        if e not in codecs.NAMES or e == codecs.RAW:
            raise CompressionError(f"encodings: expected lossy encodings ({', '.join(codecs.NAMES[1:])}), got {e!r}")
        if e not in out:
            out.append(e)
    if not out:
        raise CompressionError("encodings: expected at least one lossy encoding, got none")
    return out


def load_model(name: str, *, checkpoint: str | None = None, pretrained: bool = False,
               kwargs: dict | None = None) -> torch.nn.Module:
    """The whole model with the weights the nodes load (a checkpoint that must also exist here)."""
    from edgezmq.model import chain as models

    kwargs = dict(kwargs or {})
    if checkpoint is None and not pretrained:
        raise CompressionError(f"{name}: measuring encodings needs the model's weights here: give a checkpoint "
                               "(or pretrained), got placeholder weights")
    model = models.create_model(name, pretrained=pretrained, **kwargs)
    if checkpoint is not None:
        from safetensors.torch import load_file

        try:
            model.load_state_dict(load_file(checkpoint))
        except (OSError, RuntimeError) as e:
            raise CompressionError(f"checkpoint {checkpoint!r}: cannot load it here to measure the encodings "
                                   f"({e})") from None
    return model.eval()


def calibration_batch(name: str, microbatch: int, samples: Any = None, kwargs: dict | None = None,
                      n: int = CALIBRATION_SAMPLES) -> tuple[torch.Tensor, str]:
    """(images, "seeded" | "given"): the caller's samples, or `n` seeded standard-normal ones
    rounded up to whole microbatches."""
    import numpy as np
    import torch

    from edgezmq.model import chain as models

    kwargs = dict(kwargs or {})
    if samples is None:
        if not 1 <= n <= MAX_CALIBRATION_SAMPLES:
            raise CompressionError(f"calibration samples: expected 1..{MAX_CALIBRATION_SAMPLES}, got {n}")
        n = microbatch * math.ceil(n / microbatch)
        x = models.random_inputs(name, n, CALIBRATION_SEED, **kwargs)
        if isinstance(x, tuple):
            raise CompressionError(f"{name}: measuring encodings needs an image model (one float input), "
                                   "got a text model")
        return torch.from_numpy(x), "seeded"
    x = torch.as_tensor(np.asarray(samples, dtype=np.float32))
    want = models.input_shape(name, 1, **kwargs)[1:]
    if x.dim() != 4 or tuple(x.shape[1:]) != tuple(want) or not 1 <= x.shape[0] <= MAX_CALIBRATION_SAMPLES:
        raise CompressionError(f"calibration samples: expected an (N, {', '.join(map(str, want))}) float array, "
                               f"got shape {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise CompressionError("calibration samples: expected finite values, got NaN or inf")
    return x, "given"


def _transform(name: str) -> Callable[[torch.Tensor, int], torch.Tensor]:
    import torch

    return lambda t, i: torch.from_numpy(codecs.roundtrip(name, t.numpy()).copy())


def _ratio(name: str, shapes: list[list[tuple[int, ...]]]) -> float:
    """The largest wire/raw ratio over the cuts (each cut's tensors together)."""
    worst = 0.0
    for cut in shapes:
        raw = sum(4 * math.prod(s) for s in cut)
        wire = sum(codecs.encoded_nbytes(name, s) for s in cut)
        worst = max(worst, wire / raw if raw else 1.0)
    return min(1.0, worst) if worst > 0 else 1.0


def _client_chain_s(model: torch.nn.Module, granularity: str, x: torch.Tensor, threads: int) -> float:
    """Seconds this machine takes for one microbatch through every unit with `threads` torch threads."""
    import torch

    from edgezmq.model import chain as models

    with models.torch_threads(max(1, threads)), torch.no_grad():
        times = []
        for _ in range(TIMING_REPS + 1):
            t0 = time.perf_counter()
            models.run_units(model, granularity, x)
            times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def measure(model: torch.nn.Module, granularity: str, x: torch.Tensor, microbatch: int,
            encodings: Sequence[str] = DEFAULT_ENCODINGS, *, threads: Sequence[int] = (),
            source: str = "given", say: Callable[[str], None] | None = None) -> Measured:
    """Each encoding's ratio, per-cut error and disagreement on `x`, its codec costs here, and
    this machine's chain time per microbatch at each of `threads` (module doc)."""
    import torch

    from edgezmq.model import accuracy

    say = say or (lambda m: None)
    encs = _check_encodings(encodings)
    t0 = time.monotonic()
    sweep = accuracy.CutSweep(model, granularity, x, microbatch)
    cuts = list(range(1, sweep.num_units))
    if not cuts:
        raise CompressionError(f"{granularity}: the model has one unit, no cut to encode")
    shapes = [[tuple(t.shape) for t in sweep.tensors(c)[0]] for c in cuts]
    out: dict[str, dict[str, Any]] = {}
    flips: dict[str, list[int]] = {}
    input_flips: dict[str, int] = {}
    n = int(x.shape[0])
    for e in encs:
        f = _transform(e)
        errs, flipped = [], []
        for c in cuts:
            logits = sweep.logits(c, f)
            err = accuracy.rel_l2(logits, sweep.reference)
            if not math.isfinite(err):
                raise CompressionError(f"encoding {e} at cut {c}: the logits' error is {err} (non-finite activations?)")
            errs.append(round(err, 9))
            flipped.append(int((logits.argmax(-1) != sweep.reference.argmax(-1)).sum()))
        flips[e] = flipped
        # percent, with one sample of margin (module doc); capped at the problem's 100
        dis = [min(100.0, round(100.0 * (k + 1) / n, 6)) for k in flipped]
        out[e] = {"ratio": round(_ratio(e, shapes), 6), "error": errs, "disagreement": dis}
        # the client's input encoded so (cut 0): the same figures, the same margin
        logits = sweep.logits(0, f)
        err = accuracy.rel_l2(logits, sweep.reference)
        if not math.isfinite(err):
            raise CompressionError(f"encoding {e} on the input: the logits' error is {err}")
        k0 = int((logits.argmax(-1) != sweep.reference.argmax(-1)).sum())
        input_flips[e] = k0
        out[e]["input"] = {"ratio": round(_ratio(e, [[(microbatch, *x.shape[1:])]]), 6),
                           "error": round(err, 9), "disagreement": min(100.0, round(100.0 * (k0 + 1) / n, 6))}
        say(f"encoding {e}: ratio {out[e]['ratio']:.4f}, logit error per cut {min(errs):.2g}..{max(errs):.2g}, "
            f"top-1 changed on {min(flipped)}..{max(flipped)} of {n} samples; on the input: error "
            f"{err:.2g}, {k0} changed")
    # the codec costs at the largest activation the links carry (every cut's first tensor)
    shape = max((s[0] for s in shapes), key=math.prod)
    costs = {}
    for e in encs:
        cost = codecs.measure_cost(e, shape)
        costs[e] = (cost.encode_s_per_mb, cost.decode_s_per_mb)
    mb = next(iter(torch.split(x, microbatch)))
    chain_s = {t: _client_chain_s(model, granularity, mb, t) for t in sorted(set(threads))}
    return Measured(out, costs, shape, n, source, chain_s, time.monotonic() - t0, flips, input_flips)


def speed_factors(problem: dict[str, Any], client_chain_s: dict[int, float], threads: dict[str, int]) -> dict[str, float]:
    """Per device type: its profiled time for every unit (the problem's ``unit_times_s``, one
    microbatch) over this machine's time for the same with the type's torch threads."""
    out = {}
    for typ, t in problem["device_types"].items():
        here = client_chain_s.get(threads.get(typ, 1))
        if not here or here <= 0:
            raise CompressionError(f"device type {typ}: no client timing at {threads.get(typ, 1)} thread(s)")
        out[typ] = math.fsum(t["unit_times_s"]) / here
    return out


def codec_ms_per_mb(measured: Measured, factors: dict[str, float]) -> dict[str, dict[str, dict[str, float]]]:
    """Per device type, ``codec_ms_per_mb``: the client's codec costs times the type's speed factor."""
    return {typ: {e: {"encode": round(a * 1e3 * f, 6), "decode": round(b * 1e3 * f, 6)}
                  for e, (a, b) in measured.codec_s_per_mb.items()}
            for typ, f in factors.items()}


def add_encodings(problem: dict[str, Any], model: torch.nn.Module, x: torch.Tensor, *,
                  threads: dict[str, int], encodings: Sequence[str] = DEFAULT_ENCODINGS, source: str = "given",
                  say: Callable[[str], None] | None = None) -> Measured:
    """Fill in `problem` (a gathered problem dict, changed in place) with ``model.encodings``
    and each device type's ``codec_ms_per_mb``; `threads`: each device type's torch threads.
    Returns what was measured."""
    say = say or (lambda m: None)
    granularity = problem["model"].get("granularity", "block")
    microbatch = int(problem["model"]["microbatch"])
    got = measure(model, granularity, x, microbatch, encodings, threads=sorted(set(threads.values()) or {1}),
                  source=source, say=say)
    apply_measured(problem, got, threads=threads, say=say)
    return got


def apply_measured(problem: dict[str, Any], measured: Measured, *, threads: dict[str, int],
                   say: Callable[[str], None] | None = None) -> None:
    """Fill in `problem` (changed in place) with what `measure` found: ``model.encodings`` as
    they are (the per-cut errors belong to the model and the calibration batch, not to the
    devices) and each device type's ``codec_ms_per_mb``, scaled by the type's speed. So a
    re-plan of the same model on other devices (a failover) reuses a measurement without
    running the model again; a type whose torch threads it did not time is an error."""
    say = say or (lambda m: None)
    cuts = len(problem["model"]["units"]) - 1
    for e, d in measured.encodings.items():
        if len(d["error"]) != cuts:
            raise CompressionError(f"encoding {e}: measured at {len(d['error'])} cuts, the problem has {cuts}")
    factors = speed_factors(problem, measured.client_chain_s, threads)
    problem["model"]["encodings"] = measured.encodings
    for typ, c in codec_ms_per_mb(measured, factors).items():
        problem["device_types"][typ]["codec_ms_per_mb"] = c
        say(f"{typ}: {factors[typ]:.2f}x this machine's time for the units: codecs "
            + ", ".join(f"{e} {v['encode']:.1f}/{v['decode']:.1f}" for e, v in c.items()) + " ms per MB (enc/dec)")
