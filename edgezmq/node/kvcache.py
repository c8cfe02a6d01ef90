"""A decoder stage's KV caches: one per (client session, sequence id), under a byte budget.

A `gen` step (docs/generate.md) names, per batch row, a sequence, the tokens its cache holds
before the step (`pos`) and the tokens it adds (`lens`). A stage runs each row on its own
(batch 1, exactly as the model's `generate` runs one sequence) against that sequence's cache.
What makes it safe to send a step again: a row whose `pos` is below what the cache holds is
cut back to `pos` first, so a resent step (after a timeout, or replayed after a failover)
recomputes the same tokens instead of appending them twice.

Admission: a sequence starts (pos 0) with the most tokens it will ever hold (`max_len`), and
the stage reserves `max_len` x its bytes per token; a step whose new sequences do not fit
beside the reservations held is refused whole (`cache_full`), before anything changes.
Caches leave on a `release`, and when a sequence has not been stepped for `idle_s` (its
client went away), counted from the end of its last step (a stage that spends minutes on
other sequences' steps does not count that against this one); both free the reservation.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from edgezmq.protocol import wire
from edgezmq.protocol.messages import DEFAULT_CACHE_IDLE_S as DEFAULT_IDLE_S

DEFAULT_BUDGET_SHARE = 0.5  # of the memory a node has left after loading its shard, by default


@dataclass
class Sequence:
    cache: Any  # the model's own cache object (transformers' DynamicCache)
    length: int  # tokens it holds
    max_len: int  # tokens reserved
    used: float  # time.monotonic() of its last step
    session: str  # its client's session


class GenError(Exception):
    """A step refused before anything changed; ``code`` is the wire error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code, self.message = code, message


class KVStore:
    """The caches of one stage: changed by its compute thread only; `stats` reads it from the
    control thread."""

    def __init__(self, new_cache: Callable[[], Any], bytes_per_token: int, budget_bytes: int,
                 max_positions: int, idle_s: float = DEFAULT_IDLE_S) -> None:
        self.new_cache = new_cache
        self.bytes_per_token = bytes_per_token  # 0: a shard without layers (embedding, head) holds no cache
        self.budget_bytes = budget_bytes
        self.max_positions = max_positions
        self.idle_s = idle_s
        self.seqs: dict[tuple[str, int], Sequence] = {}
        self.heard: dict[str, float] = {}  # session -> time.monotonic() its last step here ended
        self.reserved_tokens = 0
        self.refused = 0  # steps refused with cache_full
        self.expired = 0  # sequences dropped for idleness
        self.released = 0  # sequences dropped by a release

    @property
    def reserved_bytes(self) -> int:
        return self.reserved_tokens * self.bytes_per_token

    @property
    def held_tokens(self) -> int:
        # list(): one C-level copy under the GIL; `stats` reads this from the control thread
        # while the compute thread adds and drops sequences
        return sum(s.length for s in list(self.seqs.values()))

    def admit(self, session: str, gen: dict[str, Any], tokens: int) -> list[Sequence]:
        """The sequences of a step's rows, new ones made and old ones cut back to `pos`; raises
        GenError (nothing changed) when a row does not continue what the stage holds, goes past
        its reservation or the model's positions, or new reservations do not fit the budget.
        `tokens`: the message's token dimension (each row's `lens` fits in it)."""
        ids, pos, lens = gen["ids"], gen["pos"], gen["lens"]
        max_len = gen.get("max_len") or [0] * len(ids)
        grow = 0  # reserved tokens this step adds (new sequences minus the ones they restart)
        for i, sid in enumerate(ids):
            if lens[i] > tokens:
                raise GenError("gen_state", f"sequence {sid}: lens {lens[i]} over the message's {tokens} tokens")
            end = pos[i] + lens[i]
            s = self.seqs.get((session, sid))
            if pos[i] == 0:
                if not lens[i] <= max_len[i] <= self.max_positions:
                    raise GenError("gen_state", f"sequence {sid}: max_len {max_len[i]} outside {lens[i]}.."
                                   f"{self.max_positions} (its first tokens .. the model's positions)")
                grow += max_len[i] - (s.max_len if s is not None else 0)
                continue
            if s is None:
                raise GenError("gen_state", f"sequence {sid} is not cached here (never started, released, or "
                               f"dropped after {self.idle_s:g} s idle): start it again from pos 0")
            if pos[i] > s.length:
                raise GenError("gen_state", f"sequence {sid}: step continues at token {pos[i]}, the cache "
                               f"holds {s.length} (a step was lost)")
            if end > s.max_len:
                raise GenError("gen_state", f"sequence {sid}: {end} tokens, over its max_len {s.max_len}")
        if grow > 0 and (self.reserved_tokens + grow) * self.bytes_per_token > self.budget_bytes:
            self.refused += 1
            raise GenError("cache_full", f"{len(ids)} sequence(s) need {grow * self.bytes_per_token} more "
                           f"bytes of KV cache; {self.reserved_bytes} of {self.budget_bytes} are reserved by "
                           f"{len(self.seqs)} sequence(s)")
        now = time.monotonic()
        out = []
        for i, sid in enumerate(ids):
            key = (session, sid)
            s = self.seqs.get(key)
            if pos[i] == 0:
                if s is not None:
                    self.reserved_tokens -= s.max_len
                s = self.seqs[key] = Sequence(self.new_cache(), 0, max_len[i], now, session)
                self.reserved_tokens += max_len[i]
            assert s is not None
            if s.length > pos[i]:  # a resent step: recompute from pos
                s.cache.crop(pos[i] - s.length)
                s.length = pos[i]
            s.used = now
            out.append(s)
        return out

    def advanced(self, s: Sequence, n: int) -> None:
        s.length += n
        # idle from the step's end, and its session heard from: the stage's long steps of this
        # client's other sequences are not the client's absence
        s.used = self.heard[s.session] = time.monotonic()

    def drop(self, session: str, ids: list[int], released: bool = True) -> int:
        """Forget these sequences (unknown ones are fine: a release may be sent again)."""
        n = 0
        for sid in ids:
            s = self.seqs.pop((session, sid), None)
            if s is not None:
                self.reserved_tokens -= s.max_len
                n += 1
        if n:
            self._forget_quiet_sessions()
        if released:
            self.released += n
        return n

    def expire(self, now: float | None = None) -> int:
        """Drop the sequences whose client went away: no step of theirs, nor of any sequence
        of their session, has ended here for over `idle_s`; how many. (A live client's
        sequences waiting behind its own long steps are kept: a one-device stage at 0.2 of a
        core took 5 min for one 4,096-token prompt step.)"""
        now = time.monotonic() if now is None else now
        old = [k for k, s in self.seqs.items() if now - max(s.used, self.heard.get(s.session, 0.0)) > self.idle_s]
        for k in old:
            self.reserved_tokens -= self.seqs.pop(k).max_len
        if old:
            self._forget_quiet_sessions()
        self.expired += len(old)
        return len(old)

    def _forget_quiet_sessions(self) -> None:
        """Sessions with nothing left here (released, expired) leave `heard`: it stays bounded
        by the sequences held."""
        live = {s.session for s in self.seqs.values()}
        self.heard = {k: t for k, t in self.heard.items() if k in live}

    def stats(self) -> dict[str, int]:
        return {"sequences": len(self.seqs), "cache_reserved_bytes": self.reserved_bytes,
                "cache_held_bytes": self.held_tokens * self.bytes_per_token, "cache_budget_bytes": self.budget_bytes,
                "cache_refused": self.refused, "cache_expired": self.expired, "cache_released": self.released}


def check_step_tensors(msg: wire.Message, expected: tuple[tuple[int, ...], str], microbatch: int) -> None:
    """A step's one tensor against what a decoder stage takes: token ids (B, T) int64 at the
    embedding, hidden states (B, T, D) float32 after it; B = the rows named, <= microbatch;
    T in 1..the deployment's seq_len (the most tokens one message carries)."""
    g = msg.gen
    assert g is not None
    if g["op"] == "release":
        if msg.tensors:
            raise wire.WireError("bad_arity", "a gen release carries no tensors", msg.seq)
        return
    shape, dtype = expected
    if len(msg.tensors) != 1:
        raise wire.WireError("bad_arity", f"a gen step carries 1 tensor, got {len(msg.tensors)}", msg.seq)
    a = msg.tensors[0]
    if a.dtype.name != dtype:
        raise wire.WireError("bad_dtype", f"tensors[0]: expected {dtype}, got {a.dtype.name}", msg.seq)
    if a.ndim != len(shape) or tuple(a.shape[2:]) != tuple(shape[2:]) or not 1 <= a.shape[1] <= shape[1]:
        raise wire.WireError("bad_shape", f"tensors[0]: expected (B, 1..{shape[1]}{''.join(f', {d}' for d in shape[2:])})"
                             f", got {tuple(a.shape)}", msg.seq)
    if a.shape[0] != len(g["ids"]) or a.shape[0] > microbatch:
        raise wire.WireError("bad_shape", f"tensors[0]: batch {a.shape[0]}, gen names {len(g['ids'])} sequence(s) "
                             f"(at most the microbatch, {microbatch})", msg.seq)
