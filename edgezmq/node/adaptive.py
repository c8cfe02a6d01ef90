"""Run-time choice of a link's encoding: step down a ladder when the link is the bottleneck, probe back up (pure).

A sending stage is given a *ladder* of rungs, largest first (``[f16, int8, int4]``).  Per
microbatch it tells the policy how long the stage took to produce it (``observe_pace``:
compute plus waiting for input) and how long the send took for how many bytes
(``observe_send``); the policy answers which rung the next message goes out on.
docs/compression.md explains the rules and their thresholds; in short:

- **goodput** = bytes / send seconds, smoothed (EWMA); the time to send one message at it
  is compared with the stage's **pace** (smoothed).
- **down**: send time > ``down`` x pace (the link is the bottleneck) -> the next smaller rung.
- **pay**: ``dwell`` microbatches later the send time must have fallen below ``pay`` x what
  it was; if it stayed about the same (up to what it was / ``pay``), the back-pressure came
  from downstream (a slower stage), not from the link: step back up and hold off stepping
  down (``hold``, doubling).  If it rose, the link slowed again meanwhile: the step stays.
- **up** (probe): a send that does not block says the link has room, not how much, so the
  larger rung is tried after ``probe`` microbatches with send time < ``up`` x pace; a probe
  that makes the link the bottleneck again steps down and doubles the interval.
- a rung is kept at least ``dwell`` microbatches; the first ``settle`` sends after a switch
  are not measured (they queue behind messages of the previous rung).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Thresholds:
    """The policy's tunables (docs/compression.md)."""

    down: float = 1.25  # step down when send time > down x pace
    up: float = 0.5  # probe up only when send time < up x pace (the larger rung carries ~2x the bytes)
    pay: float = 0.85  # a step down must bring the send time below pay x its value before, else undo
    dwell: int = 8  # microbatches on a rung before the next decision (> SNDHWM + queues in flight)
    settle: int = 3  # sends after a switch left unmeasured: they wait behind the previous rung's messages
    probe: int = 32  # microbatches on a smaller rung, link idle, before trying the larger one
    hold: int = 32  # microbatches without stepping down after a step down that did not pay
    max_backoff: int = 1024  # probe and hold intervals double up to this
    alpha: float = 0.3  # EWMA weight of the newest sample
    pace_jump: float = 4.0  # one pace sample counts at most this x the smoothed pace (an idle gap)

    def __post_init__(self) -> None:
        if not (0 < self.up < 1 < self.down and 0 < self.pay < 1 and 0 < self.alpha <= 1):
            raise ValueError(f"thresholds: expected 0 < up < 1 < down, 0 < pay < 1, 0 < alpha <= 1, got {self}")
        if not (0 <= self.settle < self.dwell <= self.probe <= self.max_backoff and 1 <= self.hold <= self.max_backoff):
            raise ValueError(f"thresholds: expected 0 <= settle < dwell <= probe <= max_backoff, 1 <= hold, got {self}")


@dataclass
class Switch:
    """One rung change, for logs and tests: at the ``index``-th observed send, ``old`` -> ``new``."""

    index: int
    old: int
    new: int
    why: str  # down | undo | probe | fail


@dataclass
class LinkPolicy:
    """The rung of the next message on one outgoing link; thread-safe (compute and send threads)."""

    rungs: int
    th: Thresholds = field(default_factory=Thresholds)
    level: int = 0
    switches: list[Switch] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        if self.rungs < 1:
            raise ValueError(f"rungs: expected >= 1, got {self.rungs}")
        self._pace: float | None = None
        self._spb: float | None = None  # smoothed send seconds per byte on this rung
        self._bytes = 0  # the last message's bytes on this rung
        self._last = 0.0  # the last measured send time
        self._shown: float | None = None  # the goodput stats show: the last rung's, across switches
        self._n = 0  # sends since the last switch
        self._sent = 0  # sends ever
        self._state = ""  # "stepped": a step down under evaluation; "probing": a probe up
        self._before = 0.0  # send time before the step down under evaluation
        self._hold = 0  # sends left before stepping down is allowed again
        self._hold_next = self.th.hold
        self._probe_next = self.th.probe
        self.switch_count = 0

    # ---- measurements -------------------------------------------------
    def observe_pace(self, seconds: float) -> None:
        """The stage took ``seconds`` to produce one microbatch (compute + waiting for input)."""
        if not seconds >= 0:
            return
        with self._lock:
            p = self._pace
            if p is None:
                self._pace = seconds
            else:
                s = min(seconds, self.th.pace_jump * p) if p > 0 else seconds
                self._pace = p + self.th.alpha * (s - p)

    def observe_send(self, nbytes: int, seconds: float) -> int:
        """One message of ``nbytes`` took ``seconds`` to send; returns the rung of the next one."""
        with self._lock:
            self._sent += 1
            self._n += 1
            if self._hold:
                self._hold -= 1
            if self._n > self.th.settle and nbytes > 0 and seconds >= 0:
                spb = seconds / nbytes
                self._spb = spb if self._spb is None else self._spb + self.th.alpha * (spb - self._spb)
                self._bytes, self._last, self._shown = nbytes, seconds, self._spb
            if self.rungs > 1 and self._n >= self.th.dwell and self._spb is not None and self._pace:
                self._decide(self._bytes * self._spb, self._pace)
            return self.level

    # ---- what it measured ---------------------------------------------
    @property
    def goodput(self) -> float | None:
        """Smoothed bytes per second of sending, as last measured (None before a measurement)."""
        spb = self._shown
        return None if spb is None else (1.0 / spb if spb > 0 else float("inf"))

    @property
    def pace(self) -> float | None:
        return self._pace

    # ---- the rules ----------------------------------------------------
    def _decide(self, t: float, pace: float) -> None:
        th = self.th
        busy = t > th.down * pace
        if self._state == "stepped":  # dwell sends after a step down: did it pay?
            self._state = ""
            # a slower stage downstream keeps the send time where it was, whatever the bytes; a
            # send time that rose with fewer bytes means the link slowed again meanwhile: keep it
            if th.pay * self._before < t <= self._before / th.pay:
                self._move(self.level - 1, "undo")
                self._hold = self._hold_next
                self._hold_next = min(2 * self._hold_next, th.max_backoff)
                return
            self._hold_next = th.hold
        elif self._state == "probing":  # dwell sends after a probe up: did the link keep up?
            self._state = ""
            if busy:
                self._move(self.level + 1, "fail")
                self._probe_next = min(2 * self._probe_next, th.max_backoff)
                return
            self._probe_next = th.probe
        if busy and self.level < self.rungs - 1 and not self._hold:
            # the smoothed time lags a link that just slowed: the last send says more about it
            self._before = max(t, self._last)
            self._move(self.level + 1, "down")
            self._state = "stepped"
        elif self.level > 0 and self._n >= self._probe_next and t < th.up * pace:
            self._move(self.level - 1, "probe")
            self._state = "probing"

    def _move(self, new: int, why: str) -> None:
        self.switch_count += 1
        self.switches.append(Switch(self._sent, self.level, new, why))
        del self.switches[:-64]  # the recent ones are enough for stats and logs
        self.level, self._n, self._spb = new, 0, None
