"""Generate tokens with a decoder deployed as a pipeline: many sequences in flight at once.

One request keeps one stage busy at a time; many sequences keep every stage busy. The
generator holds a queue of sequences ready for their next step and groups them into
microbatches (prompts with prompts, single decode tokens with decode tokens) as results
come back: continuous batching across the pipeline (`step_tokens` caps a step of prompts: a
smaller one fills the pipeline sooner; docs/generate.md). Each stage keeps every sequence's KV
cache for its own layers (edgezmq.node.kvcache); a message names its rows' sequences and
positions in the wire header's `gen` field (docs/generate.md).

    >>> with Generator.from_plan(plan) as g:
    ...     for i, token in g.stream(prompts, max_new_tokens=32):    # tokens as they come
    ...         ...
    ...     outs = g.generate(prompts, max_new_tokens=32)             # or all at once

Greedy decoding gives the tokens of the model's own `generate(do_sample=False)`: each stage
runs every sequence on its own (batch 1) with the model's cache, masks and positions, and
the head keeps the last position's logits, as `generate` does. Sampling (temperature, top-k)
inverts the distribution at a uniform draw from a numpy generator seeded by (seed, the
sequence's index), one draw per token: the same tokens whatever the window or the number of
stages (and the batching, to the logits' rounding: docs/generate.md, "Exactness"). The last
stage chooses each token itself (torch.argmax, as `generate`, or at the draw the client
sends with the step: edgezmq.protocol.sampling, the rule both ends apply) and sends it, 8
bytes a row where the logits are 4 x vocab (`gen.pick`, docs/generate.md; with
`pick_on_stage = False` the logits come and the client chooses: the same tokens).

A step with no answer after `timeout` is sent again (up to `retries`): a stage cuts a
sequence's cache back to the step's `pos` first, so a resent step recomputes instead of
appending twice. Under a ``ResilientPipeline`` (failover), a lost node's caches are gone
with it: on the new deployment every live sequence starts again from pos 0 with its prompt
and the tokens generated so far (one prefill rebuilds every stage's caches), and goes on
from there: no token is lost or given twice, since a token is taken only from a result of
the deployment in service. A step refused `cache_full` (the stages' KV budget) that starts
several sequences is sent again at once as steps starting half as many each (and so on, down
to one: the budget may hold some of them); a step starting one waits until another sequence
of this generator finishes and is released; if none is in flight, the sequence cannot fit at
all and `PipelineError` says so.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zmq

from edgezmq.client import POLL_MS, Client, FailoverNeeded, PipelineError, ResultTimeout
from edgezmq.errors import EdgezmqError
from edgezmq.orchestrate.planfile import DeployPlan
from edgezmq.protocol import wire
from edgezmq.protocol.messages import DEFAULT_CACHE_IDLE_S
from edgezmq.protocol.sampling import MAX_TEMPERATURE, MAX_TOP_K, sample
from edgezmq.terms import MAX_SECONDS
from edgezmq.transport import sockets

log = logging.getLogger(__name__)

__all__ = ["Sampling", "Generator", "GenerateError", "decoder_limits"]

MAX_NEW_TOKENS = 1 << 20
MAX_STEP_TOKENS = 1 << 24


class GenerateError(EdgezmqError, ValueError):
    """Prompts or settings the deployment cannot take (said before anything is sent)."""


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen from a row's logits (edgezmq.protocol.sampling, the rule
    both ends apply): greedy (argmax, the first of equal maxima, as torch.argmax), or drawn at
    `temperature` from the `top_k` most likely (0: all), each token at a uniform draw from the
    sequence's own generator, seeded by (`seed`, its prompt's index)."""

    greedy: bool = True
    temperature: float = 1.0
    top_k: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if not (0 < self.temperature <= MAX_TEMPERATURE and np.isfinite(self.temperature)):
            raise GenerateError(f"temperature must be in (0, {MAX_TEMPERATURE:g}], got {self.temperature}")
        if not 0 <= self.top_k <= MAX_TOP_K:
            raise GenerateError(f"top_k must be in 0..{MAX_TOP_K}, got {self.top_k}")

    def rng(self, index: int) -> np.random.Generator | None:
        return None if self.greedy else np.random.default_rng([self.seed, index])

    def choose(self, logits: np.ndarray, u: float | None) -> int:
        """The token of a row's `logits`: the most likely (greedy), else the one at draw `u`."""
        if self.greedy or u is None:
            return int(np.argmax(logits))
        return sample(logits, u, self.temperature, self.top_k)

    def pick(self, us: list[float]) -> dict[str, Any]:
        """The `gen` members that have the last stage choose a step's tokens (draws `us`, one per row)."""
        if self.greedy:
            return {"pick": "argmax"}
        return {"pick": "sample", "u": us, "temperature": float(self.temperature), "top_k": self.top_k}


@dataclass
class _Seq:
    sid: int  # its id on the wire
    index: int  # its prompt's
    tokens: list[int]  # prompt, then what was generated
    prompt_len: int
    max_len: int
    rng: np.random.Generator | None
    pos: int = 0  # tokens every stage's cache holds
    stepped: float = 0.0  # time.time() its last step's result came back
    done: bool = False
    # sampling: the draw of its next token, made once (a resent or re-prefilled step reuses it,
    # so that no draw is spent on an answer never taken)
    u: float | None = None

    @property
    def generated(self) -> int:
        return len(self.tokens) - self.prompt_len


@dataclass
class _Pending:
    frames: list
    rows: list[_Seq]
    lens: list[int]
    sent: float
    attempts: int = 1
    release: bool = False


@dataclass
class GenerateStats:
    """What the last `stream` did."""

    sequences: int = 0
    tokens: int = 0  # generated
    steps: int = 0  # step messages answered
    prefill_steps: int = 0  # step messages of prompt chunks sent
    prefill_rows: int = 0
    decode_rows: int = 0
    resent: int = 0
    restarted: int = 0  # live sequences started again on a new deployment (failover)
    cache_full: int = 0  # steps refused for the stages' KV budget, then waited and sent again
    seconds: float = 0.0
    first_token_s: list[float] = field(default_factory=list)  # per sequence: time to its first token


def decoder_limits(name: str, kwargs: dict[str, Any]) -> tuple[int, int, int | None]:
    """(tokens per message: the deployment's seq_len, the model's positions, its eos token id)."""
    from edgezmq.model import text

    if not text.is_decoder(name):
        raise GenerateError(f"{name} is not a decoder language model (one of: "
                            f"{', '.join(n for n in text.TEXT_MODELS if text.is_decoder(n))})")
    config, seq_len = text.model_config(name, kwargs)
    eos = config.eos_token_id
    return seq_len, text.max_positions(config), eos if isinstance(eos, int) else None


class Generator:
    """Sequences through a deployed decoder pipeline (``client``: a Client of that deployment)."""

    def __init__(self, client: Client, *, chunk: int, max_positions: int, vocab_size: int,
                 eos_token_id: int | None = None, retries: int = 1, step_tokens: int | None = None) -> None:
        if client.microbatch is None:
            raise GenerateError("the client must know the deployment's microbatch")
        self.client, self.chunk, self.max_positions = client, chunk, max_positions
        self.vocab_size, self.eos_token_id, self.retries = vocab_size, eos_token_id, retries
        self.step_tokens = step_tokens
        self.max_wait_s = DEFAULT_CACHE_IDLE_S / 2
        self.stats = GenerateStats()
        self._starts = 0  # sequences a step may start (0: a microbatch); halved by a cache_full refusal
        # the last stage picks each token (gen.pick: 8 bytes a row); False: it sends each row's
        # logits (4 x vocab bytes) and the client picks, by the same rule and draws
        self.pick_on_stage = True
        self._sampling = Sampling()  # of the stream in progress
        self._next_id = 0  # sequence ids on the wire: unique per generator (its session keys them)

    @property
    def microbatch(self) -> int:
        """Rows per step: the client's microbatch (at most the deployment's), read at each step,
        and at most the rows one gen message carries (``wire.MAX_GEN_ROWS``; a stage refuses more)."""
        assert self.client.microbatch is not None  # checked at construction
        return min(self.client.microbatch, wire.MAX_GEN_ROWS)

    @property
    def step_tokens(self) -> int | None:
        """The most prompt tokens one prefill step carries (None: a microbatch of whole chunks,
        the deployment's message). Each row brings a whole chunk of its prompt; a step has at
        least one row. Decode steps are unaffected (a token per row, a microbatch of rows)."""
        return self._step_tokens

    @step_tokens.setter
    def step_tokens(self, n: int | None) -> None:
        if n is not None and not 1 <= n <= MAX_STEP_TOKENS:
            raise GenerateError(f"step_tokens must be in 1..{MAX_STEP_TOKENS}, got {n}")
        self._step_tokens = n

    @property
    def max_wait_s(self) -> float:
        """Seconds a started sequence may wait for its next step before the started sequences
        go ahead of new prompts; in 0..MAX_SECONDS (default: half a stage's default idle limit,
        after which the stage drops the sequence's cache)."""
        return self._max_wait_s

    @max_wait_s.setter
    def max_wait_s(self, s: float) -> None:
        if not 0 <= s <= MAX_SECONDS:  # False for NaN too
            raise GenerateError(f"max_wait_s must be in 0..{MAX_SECONDS:g} s, got {s}")
        self._max_wait_s = float(s)

    @classmethod
    def for_model(cls, client: Client, name: str, kwargs: dict[str, Any], *, retries: int = 1) -> Generator:
        """A generator over `client`'s deployment of decoder `name` (its limits from the model's config)."""
        from edgezmq.model import text

        chunk, positions, eos = decoder_limits(name, kwargs)
        config, _ = text.model_config(name, kwargs)
        return cls(client, chunk=chunk, max_positions=positions, vocab_size=int(config.vocab_size),
                   eos_token_id=eos, retries=retries)

    @classmethod
    def from_plan(cls, plan: DeployPlan, *, window: int | None = None, timeout: float = 120.0,
                  retries: int = 1) -> Generator:
        """A generator (and its client) for the running deployment of `plan`."""
        replicated = [i for i, st in enumerate(plan.stages) if len(st.nodes) > 1]
        if replicated:  # round-robin would send a sequence's steps to replicas without its cache
            raise GenerateError(f"stage(s) {replicated} of the plan are replicated: generation needs one node per "
                                "stage (a sequence's KV cache lives on one node; plan with --no-replication)")
        client = Client.from_plan(plan, window=window, timeout=timeout)
        return cls.for_model(client, plan.model.name, dict(plan.model.kwargs), retries=retries)

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> Generator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------
    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                 sampling: Sampling = Sampling(), *, stop_at_eos: bool = True) -> list[list[int]]:
        """Each prompt's generated tokens (without the prompt)."""
        out: list[list[int]] = [[] for _ in prompts]
        for i, tok in self.stream(prompts, max_new_tokens, sampling, stop_at_eos=stop_at_eos):
            out[i].append(tok)
        return out

    def _check(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> list[list[int]]:
        if not 1 <= max_new_tokens <= MAX_NEW_TOKENS:
            raise GenerateError(f"max_new_tokens must be in 1..{MAX_NEW_TOKENS}, got {max_new_tokens}")
        if not prompts:
            raise GenerateError("no prompt given")
        out = []
        for i, p in enumerate(prompts):
            ids = [int(t) for t in p]
            if not ids:
                raise GenerateError(f"prompt {i} is empty")
            bad = [t for t in ids if not 0 <= t < self.vocab_size]
            if bad:
                raise GenerateError(f"prompt {i}: token id {bad[0]} outside the vocabulary 0..{self.vocab_size - 1}")
            if len(ids) + max_new_tokens > self.max_positions:
                raise GenerateError(f"prompt {i}: {len(ids)} tokens + {max_new_tokens} new is over the model's "
                                    f"{self.max_positions} positions")
            out.append(ids)
        return out

    def stream(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, sampling: Sampling = Sampling(),
               *, stop_at_eos: bool = True) -> Iterator[tuple[int, int]]:
        """(prompt index, token) as each token is chosen, over all sequences at once. A sequence
        ends after `max_new_tokens`, or at the model's eos token (`stop_at_eos`, as `generate`)."""
        ps = self._check(prompts, max_new_tokens)
        c = self.client
        self._sampling = sampling
        eos = self.eos_token_id if stop_at_eos else None
        seqs = {}
        for i, prompt in enumerate(ps):
            seqs[self._next_id] = _Seq(self._next_id, i, prompt, len(prompt), len(prompt) + max_new_tokens,
                                       sampling.rng(i))
            self._next_id = (self._next_id + 1) % (wire.MAX_SEQUENCE_ID + 1)
        ready: deque[int] = deque(seqs)  # sequence ids ready for their next step
        self._starts = 0
        waiting: list[int] = []  # refused cache_full: sent again when a sequence is released
        finished: list[int] = []  # to release
        pending: dict[int, _Pending] = {}  # message seq -> what it carries
        live = len(seqs)
        t0 = time.time()
        self.stats = st = GenerateStats(sequences=len(seqs))
        poller = zmq.Poller()
        poller.register(c.pull, zmq.POLLIN)
        while live or pending or finished:
            if c.failed.is_set() and c.recover is not None:
                self._fail_over(seqs, ready, pending)
                waiting.clear()
                finished = []  # the old run's caches went with it
                continue
            try:
                while len(pending) < c.window and (ready or finished):
                    if finished:
                        self._send_release(finished, pending)
                        finished = []
                        continue
                    self._send_step(ready, seqs, pending)
            except FailoverNeeded:  # a node died while stage 0 would not take a step: fail over first
                continue
            events: list[tuple[int, int]] = []
            while (frames := sockets.recv_frames(c.pull, 0)) is not None:
                msg = self._accept(frames, pending)
                if msg is None:
                    continue
                p = pending.pop(msg.seq)
                if p.release:
                    continue
                if msg.kind == "error":
                    err = msg.error or {}
                    if err.get("code") == "cache_full":
                        st.cache_full += 1
                        starting = sum(1 for s in p.rows if s.pos == 0)
                        if starting > 1:  # fewer at once may fit: try again at once, half as many per step
                            self._starts = starting // 2
                            ready.extendleft(reversed([s.sid for s in p.rows]))
                            continue
                        if not any(not q.release for q in pending.values()) and not finished and not ready:
                            raise PipelineError(msg.seq, "cache_full", f"{err.get('message', '')}; no other "
                                                "sequence of this generator holds cache: it can never fit", msg.stage)
                        waiting.extend(s.sid for s in p.rows)
                        continue
                    raise PipelineError(msg.seq, err.get("code", "?"), err.get("message", ""), msg.stage)
                out = msg.tensors[0]  # (rows,) tokens (gen.pick) or (rows, vocab) logits
                c.keep_trace(msg)
                st.steps += 1
                now = time.time()
                for row, (s, n) in enumerate(zip(p.rows, p.lens)):
                    s.pos += n
                    s.stepped = now
                    if s.pos < len(s.tokens):  # a long prompt's next chunk: no token yet
                        ready.append(s.sid)
                        continue
                    tok = int(out[row]) if self.pick_on_stage else sampling.choose(out[row], s.u)
                    s.u = None  # spent: the next token draws anew
                    s.tokens.append(tok)
                    if s.generated == 1:
                        st.first_token_s.append(time.time() - t0)
                    st.tokens += 1
                    events.append((s.index, tok))
                    if s.generated >= max_new_tokens or (eos is not None and tok == eos):
                        s.done = True
                        live -= 1
                        finished.append(s.sid)
                        ready.extend(waiting)  # caches are freed: the refused may fit now
                        waiting.clear()
                    else:
                        ready.append(s.sid)
            yield from events
            if not events and live and not pending and not ready and not finished and waiting:
                ready.extend(waiting)  # nothing in flight: try again (the release went out)
                waiting.clear()
            if finished and len(pending) < c.window:
                continue
            if not events:
                poller.poll(POLL_MS)
                self._expire(pending)
        st.seconds = time.time() - t0

    # ------------------------------------------------------------------
    def _fail_over(self, seqs: dict[int, _Seq], ready: deque[int], pending: dict[int, _Pending]) -> None:
        """Move to the new deployment (Client.recover) and start every live sequence again there."""
        c = self.client
        c.failed.clear()
        assert c.recover is not None
        try:
            entry, run, keys = c.recover()
        except Exception as e:
            raise PipelineError(-1, "failover_failed", f"{e}; live sequences: "
                                f"{sorted(s.index for s in seqs.values() if not s.done)}", -1) from e
        c.attach(entry, run, keys)
        pending.clear()
        ready.clear()
        for s in seqs.values():
            if not s.done:
                s.pos = 0  # prompt + tokens so far, prefilled again
                ready.append(s.sid)
        self._starts = 0  # the new deployment's budget is another
        self.stats.restarted += len(ready)
        log.warning("failed over to run %s: %d sequence(s) started again from their tokens so far", run, len(ready))

    def _send_step(self, ready: deque[int], seqs: dict[int, _Seq], pending: dict[int, _Pending]) -> None:
        """The next microbatch from the ready queue: its first sequence, and up to a microbatch of
        the ready ones of the same kind (prompt chunks, or one decode token each), in order;
        prompt chunks up to `step_tokens` tokens in all. The queue is in the order sequences
        became ready, so new prompts (ready since the start) go before the next steps of started
        ones; but a started sequence whose last step ended `max_wait_s` ago puts the started
        ones first: its caches are on the stages, which drop them after `cache_idle_s` idle (on a
        slow device every prompt's prefill can take longer than that)."""
        now = time.time()
        started = [sid for sid in ready if seqs[sid].pos > 0]
        overdue = any(now - seqs[sid].stepped >= self.max_wait_s for sid in started)
        order = started if overdue else list(ready)
        first = seqs[order[0]]
        prefill = len(first.tokens) - first.pos > 1
        budget = self.step_tokens if prefill and self.step_tokens is not None else None
        ids: list[int] = []
        starts = tokens = 0
        for sid in order:
            s = seqs[sid]
            if (len(s.tokens) - s.pos > 1) == prefill:
                n = min(self.chunk, len(s.tokens) - s.pos)
                if budget is not None and ids and tokens + n > budget:
                    break
                if s.pos == 0:
                    if self._starts and starts == self._starts:  # the cache budget took fewer: they wait
                        continue
                    starts += 1
                ids.append(sid)
                ready.remove(sid)
                tokens += n
                if len(ids) == self.microbatch:
                    break
        rows = [seqs[i] for i in ids]
        lens = [min(self.chunk, len(s.tokens) - s.pos) for s in rows]
        x = np.zeros((len(rows), max(lens)), dtype=np.int64)
        for r, (s, n) in enumerate(zip(rows, lens)):
            x[r, :n] = s.tokens[s.pos:s.pos + n]
        gen: dict[str, Any] = {"op": "step", "ids": ids, "pos": [s.pos for s in rows], "lens": lens}
        for s in rows:  # each row's draw for its next token, kept until that token is taken
            if s.u is None and s.rng is not None:
                s.u = float(s.rng.random())
        if self.pick_on_stage:
            gen.update(self._sampling.pick([s.u if s.u is not None else 0.0 for s in rows]))
        if any(s.pos == 0 for s in rows):
            gen["max_len"] = [s.max_len for s in rows]
        if prefill:
            self.stats.prefill_steps += 1
            self.stats.prefill_rows += len(rows)
        else:
            self.stats.decode_rows += len(rows)
        self._send(gen, [x], rows, lens, pending)

    def _send_release(self, ids: list[int], pending: dict[int, _Pending]) -> None:
        for k in range(0, len(ids), wire.MAX_GEN_ROWS):
            self._send({"op": "release", "ids": ids[k:k + wire.MAX_GEN_ROWS]}, [], [], [], pending, release=True)

    def _send(self, gen: dict[str, Any], xs: list[np.ndarray], rows: list[_Seq], lens: list[int],
              pending: dict[int, _Pending], release: bool = False) -> None:
        c = self.client
        seq = c.take_seq()
        frames = wire.encode(wire.Message("act", c.run, seq, -1, xs, t=[[-1, time.time()]], session=c.session,
                                          gen=gen))
        c.send_frames(seq, frames, time.time() + c.timeout)
        pending[seq] = _Pending(frames, rows, lens, time.time(), release=release)

    def _accept(self, frames: list, pending: dict[int, _Pending]) -> wire.Message | None:
        c = self.client
        msg = c.admit(frames, pending)
        if msg is None:
            return None
        p = pending[msg.seq]
        if msg.kind == "result" and not p.release and not self._answers(p, msg.tensors):
            c.ignored += 1  # not the logits (or tokens) of this step's rows
            return None
        return msg

    def _answers(self, p: _Pending, tensors: list[np.ndarray]) -> bool:
        """`tensors` are what the last stage owes for step `p`: each row's token, an int64 id in
        the vocabulary (rows,) (gen.pick, `pick_on_stage`), else each row's logits (rows, vocab)."""
        if len(tensors) != 1:
            return False
        y = tensors[0]
        if not self.pick_on_stage:
            return y.shape == (len(p.rows), self.vocab_size)
        return (y.shape == (len(p.rows),) and y.dtype == wire.GEN_TOKEN_DTYPE
                and bool(((y >= 0) & (y < self.vocab_size)).all()))

    def _expire(self, pending: dict[int, _Pending]) -> None:
        c = self.client
        now = time.time()
        for seq, p in list(pending.items()):
            if now - p.sent <= c.timeout:
                continue
            if p.attempts > self.retries:
                raise ResultTimeout(f"no answer to generation step {seq} within {c.timeout:g}s ({p.attempts} attempt(s))")
            self.stats.resent += 1
            c.send_frames(seq, p.frames, now + c.timeout)
            p.sent, p.attempts = time.time(), p.attempts + 1

