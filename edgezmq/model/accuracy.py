"""What a transform of the activations crossing one cut of a unit chain does to the output:
top-1 accuracy, and the relative L2 error and top-1 agreement of the logits against the
exact (fp32) model — the two budget measures of ``--max-error`` and ``--min-agreement``.

    >>> sweep = CutSweep(model, "block", images)           # exact logits and every cut's inputs
    >>> logits = sweep.logits(cut=3, transform=fake_int8)  # units [0, 3), transform, units [3, L)
    >>> score(logits, sweep.reference, labels)              # Score(top1=..., agreement=..., rel_l2=...)

A cut c (0 <= c <= L) stands where the tensors entering unit c travel: c = 0 is the image
the client sends, c = L the logits coming back, 0 < c < L a link between two stages. A cut
inside a block at sublayer granularity carries two tensors, (context or hidden, residual):
the transform is called once per tensor with its index, so each can be encoded on its own
terms. The model runs in microbatches of `microbatch` samples, and the transform sees each
microbatch's tensors, as they would cross the wire.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from edgezmq.model.chain import ModelError, run_units, unit_names

__all__ = ["Transform", "identity", "Score", "CutSweep", "score", "rel_l2", "agreement",
           "model_logits", "cut_logits"]

# (tensor crossing the cut, its index among the cut's tensors) -> the tensor that arrives
Transform = Callable[[torch.Tensor, int], torch.Tensor]
MICROBATCH = 8


def identity(t: torch.Tensor, index: int) -> torch.Tensor:
    """The exact link: the tensor arrives as sent."""
    return t


@dataclass(frozen=True)
class Score:
    """One transform's effect on the logits of n samples (percentages in 0..100)."""

    n: int
    agreement: float  # samples whose top-1 class equals the exact model's, percent
    rel_l2: float  # ||logits - exact||_2 / ||exact||_2 over all n samples' logits
    rel_l2_max: float  # the same, of the worst sample
    top1: float | None = None  # percent correct, when labels are known

    def as_dict(self) -> dict[str, float | int | None]:
        return {"n": self.n, "top1": self.top1, "agreement": self.agreement, "rel_l2": self.rel_l2,
                "rel_l2_max": self.rel_l2_max}


def rel_l2(logits: torch.Tensor, exact: torch.Tensor) -> float:
    """Relative L2 error of `logits` against `exact` over the whole (N, C) array; 0 for equal
    arrays, inf when `exact` is all zeros and `logits` is not, NaN when `logits` has a NaN."""
    diff = torch.linalg.vector_norm((logits.double() - exact.double()).flatten())
    ref = torch.linalg.vector_norm(exact.double().flatten())
    if ref == 0:
        return 0.0 if diff == 0 else float("inf")
    return float(diff / ref)


def agreement(logits: torch.Tensor, exact: torch.Tensor) -> float:
    """Percent of samples whose top-1 class equals the exact logits' top-1 class."""
    return 100.0 * float((logits.argmax(-1) == exact.argmax(-1)).double().mean())


def score(logits: torch.Tensor, exact: torch.Tensor, labels: torch.Tensor | None = None) -> Score:
    """`logits` (N, C) judged against the exact model's logits and, if given, the labels."""
    if logits.shape != exact.shape or logits.dim() != 2:
        raise ValueError(f"logits: expected two (N, C) arrays of one shape, got {tuple(logits.shape)} "
                         f"and {tuple(exact.shape)}")
    if labels is not None and labels.shape != logits.shape[:1]:
        raise ValueError(f"labels: expected shape ({logits.shape[0]},), got {tuple(labels.shape)}")
    per_sample = max((rel_l2(a[None], b[None]) for a, b in zip(logits, exact)), default=0.0)
    top1 = None if labels is None else 100.0 * float((logits.argmax(-1) == labels).double().mean())
    return Score(n=logits.shape[0], agreement=agreement(logits, exact), rel_l2=rel_l2(logits, exact),
                 rel_l2_max=per_sample, top1=top1)


def _batches(x: torch.Tensor, microbatch: int) -> list[torch.Tensor]:
    if microbatch < 1:
        raise ValueError(f"microbatch: expected >= 1, got {microbatch}")
    return list(torch.split(x, microbatch))


@torch.no_grad()
def model_logits(model: nn.Module, x: torch.Tensor, microbatch: int = MICROBATCH) -> torch.Tensor:
    """The model's own forward, microbatch by microbatch: the exact reference."""
    model.eval()
    return torch.cat([model(b) for b in _batches(x, microbatch)])


def _transformed(tensors: tuple[torch.Tensor, ...], transform: Transform, cut: int) -> tuple[torch.Tensor, ...]:
    out = []
    for i, t in enumerate(tensors):
        y = transform(t, i)
        if not isinstance(y, torch.Tensor) or y.shape != t.shape:
            got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
            raise ValueError(f"transform at cut {cut}, tensor {i}: expected a tensor of shape "
                             f"{tuple(t.shape)}, got {got}")
        out.append(y.to(t.dtype))
    return tuple(out)


def _check_cut(model: nn.Module, granularity: str, cut: int) -> int:
    n = len(unit_names(model, granularity))
    if not 0 <= cut <= n:
        raise ModelError(f"cut {cut}: expected 0..{n} at {granularity} granularity ({n} units)")
    return n


@torch.no_grad()
def cut_logits(model: nn.Module, granularity: str, x: torch.Tensor, cut: int,
               transform: Transform = identity, microbatch: int = MICROBATCH) -> torch.Tensor:
    """Logits of the unit chain with `transform` applied to the tensors crossing `cut`."""
    n = _check_cut(model, granularity, cut)
    model.eval()
    out = []
    for b in _batches(x, microbatch):
        ts: tuple[torch.Tensor, ...] = (b,)
        if cut > 0:
            ts = run_units(model, granularity, *ts, start=0, end=cut)
        ts = _transformed(ts, transform, cut)
        if cut < n:
            ts = run_units(model, granularity, *ts, start=cut, end=n)
        out.append(ts[0])
    return torch.cat(out)


class CutSweep:
    """Many (cut, transform) pairs on one model and input set: the exact logits and the
    tensors crossing each cut are computed once, so each pair runs only units [cut, L)."""

    def __init__(self, model: nn.Module, granularity: str, x: torch.Tensor,
                 microbatch: int = MICROBATCH, reference: torch.Tensor | None = None) -> None:
        """`reference`: the model's logits of `x` at this microbatch, if already computed
        (another sweep's), so that a large model runs its forward once."""
        self.model, self.granularity, self.microbatch = model.eval(), granularity, microbatch
        self.num_units = _check_cut(model, granularity, 0)
        self._inputs: list[list[tuple[torch.Tensor, ...]]] = []  # [microbatch][cut] -> tensors
        with torch.no_grad():
            for b in _batches(x, microbatch):
                ts: tuple[torch.Tensor, ...] = (b,)
                row = [ts]
                for u in range(self.num_units):
                    ts = run_units(model, granularity, *ts, start=u, end=u + 1)
                    row.append(ts)
                self._inputs.append(row)
        # the model's own forward, the reference every transform is judged against; the
        # chain's exact output (`chain_exact`) must equal it bit for bit
        self.reference = model_logits(model, x, microbatch) if reference is None else reference
        self.chain_exact = torch.equal(torch.cat([row[-1][0] for row in self._inputs]), self.reference)

    def tensors(self, cut: int) -> list[tuple[torch.Tensor, ...]]:
        """Per microbatch, the exact tensors crossing `cut`."""
        _check_cut(self.model, self.granularity, cut)
        return [row[cut] for row in self._inputs]

    @torch.no_grad()
    def logits(self, cut: int, transform: Transform = identity) -> torch.Tensor:
        out = []
        for ts in self.tensors(cut):
            ts = _transformed(ts, transform, cut)
            if cut < self.num_units:
                ts = run_units(self.model, self.granularity, *ts, start=cut, end=self.num_units)
            out.append(ts[0])
        return torch.cat(out)
