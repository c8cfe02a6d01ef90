"""How a decoder's next token is chosen from a row's logits: the one rule both ends of the wire
apply, the client on logits it received and a decoder's last stage on the logits it computed
(`gen.pick`, docs/generate.md), so that either gives the same token for the same draw.

Greedy: the most likely token, the first of equal maxima (torch.argmax's, and `generate`'s,
choice). Sampling: the softmax of logits / temperature over the `top_k` most likely (0: all;
a tie at the k-th value keeps every tied token), inverted at a uniform draw `u` in [0, 1):
the first token, in vocabulary order, whose cumulative probability exceeds u. The client
draws u from the sequence's seeded generator and sends it with the step, so where the token
is chosen does not change it.
"""

from __future__ import annotations

import numpy as np

__all__ = ["MAX_TEMPERATURE", "MAX_TOP_K", "sample"]

MAX_TEMPERATURE = 100.0  # temperature in (0, MAX_TEMPERATURE]
MAX_TOP_K = 1 << 24  # top_k in 0..MAX_TOP_K (0: the whole vocabulary)


def sample(logits: np.ndarray, u: float, temperature: float, top_k: int) -> int:
    """The token at draw `u` (in [0, 1)) of softmax(logits / temperature) over the `top_k`
    most likely (module doc); always an index of `logits` with a probability above zero
    (for finite logits)."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    if 0 < top_k < z.size:
        kth = np.partition(z, -top_k)[-top_k]
        z = np.where(z >= kth, z, -np.inf)
    cdf = np.cumsum(np.exp(z - z.max()))
    return int(min(np.searchsorted(cdf, u * cdf[-1], side="right"), z.size - 1))
