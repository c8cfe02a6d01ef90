"""A plan and its figures: stages, per-stage and per-link costs, JSON form and the human table.

Plans are produced by ``evaluate`` (cost.py), which every solver and baseline result goes
through, so the numbers on a plan are always the cost model's own.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from edgezmq.argtypes import pipeline_window
from edgezmq.terms import CLIENT, ENCODINGS

if TYPE_CHECKING:
    from .problem import Problem

__all__ = ["Stage", "StageCost", "LinkCost", "Plan"]

BOTTLENECK_MARK = "<-"


@dataclass(frozen=True)
class Stage:
    """Units [a, b) of the chain on one or more devices (replicas, fed round-robin), the
    encoding of its output on the link to the next stage (the last stage's is raw) and, for
    the first stage only, the encoding of the client's input on the link into it."""

    units: tuple[int, int]
    devices: tuple[str, ...]
    encoding: str = ENCODINGS[0]
    input_encoding: str = ENCODINGS[0]

    def __post_init__(self) -> None:
        object.__setattr__(self, "units", tuple(self.units))
        object.__setattr__(self, "devices", tuple(self.devices))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"units": list(self.units), "devices": list(self.devices)}
        if self.encoding != ENCODINGS[0]:
            out["encoding"] = self.encoding
        if self.input_encoding != ENCODINGS[0]:
            out["input_encoding"] = self.input_encoding
        return out


@dataclass(frozen=True)
class StageCost:
    """A stage's figures: compute time per microbatch (replicated and not) and its tightest memory."""

    compute_s: float          # max over replicas of the range's time, divided by the replica count
    unreplicated_s: float     # max over replicas of the range's time (what a microbatch waits)
    memory_bytes: int         # need on the tightest replica, including its reserved bytes
    memory_limit_bytes: int   # that replica's memory
    tightest_device: str


@dataclass(frozen=True)
class LinkCost:
    """A link between consecutive stages (or the client): its bottleneck time and its latency.

    ``time_s`` is the largest of three terms (cost.py): the pairs', the senders' uplinks
    and the receivers' downlinks; ``bound_by`` says which one binds.
    """

    src: str                  # "client" or "stage i"
    dst: str
    bytes: int
    time_s: float             # max(pair_s, nic_up_s, nic_down_s)
    latency_s: float          # max over device pairs of latency + transfer time at the slowest rate
    slowest_pair: tuple[str, str]
    pair_s: float = 0.0       # max over device pairs of transfer time / (replicas on each side)
    nic_up_s: float = 0.0     # max over senders of their share of the bytes / their uplink
    nic_down_s: float = 0.0   # max over receivers of their share / their downlink
    nic_up_node: str = ""     # the sender and receiver those maxima come from
    nic_down_node: str = ""
    encoding: str = ENCODINGS[0]  # how the activations cross it (``bytes`` are the wire's)

    @property
    def bound_by(self) -> str:
        """What sets ``time_s``: "pair" (the slowest pair's own rate), "nic up of NODE" or
        "nic down of NODE" (a NIC's term strictly above the pairs'; up before down on a tie)."""
        if self.nic_up_s > self.pair_s and self.nic_up_s >= self.nic_down_s:
            return f"nic up of {self.nic_up_node}"
        if self.nic_down_s > self.pair_s:
            return f"nic down of {self.nic_down_node}"
        return "pair"

    @property
    def where(self) -> str:
        """The link as ``Plan.bottleneck_at`` names it: "link stage 0->stage 1", with
        " (nic up of rcc-3)" when a NIC binds."""
        by = self.bound_by
        return f"link {self.src}->{self.dst}" + ("" if by == "pair" else f" ({by})")


@dataclass
class Plan:
    """A costed plan. ``optimal`` is true only when the solver proved ``bottleneck_s`` minimal."""

    stages: list[Stage]
    stage_costs: list[StageCost]
    links: list[LinkCost]        # client->stage 0, stage 0->1, ..., last stage->client
    bottleneck_s: float
    throughput_per_s: float      # samples per second: microbatch / bottleneck
    latency_s: float
    bottleneck_at: str           # "stage 2", "link stage 1->stage 2" or "link ... (nic up of d)"
    microbatch: int
    violations: list[str] = field(default_factory=list)
    optimal: bool = False
    latency_optimal: bool = False
    lower_bound_s: float | None = None
    method: str = "evaluate"
    stats: dict[str, Any] = field(default_factory=dict)
    error: float = 0.0           # the chosen encodings' errors, summed (docs/planner.md)
    # the chosen encodings' top-1 disagreement (percent), summed; None when one was not measured
    disagreement: float | None = 0.0

    @property
    def encoded(self) -> bool:
        """Whether some link is not raw."""
        return any(k.encoding != ENCODINGS[0] for k in self.links)

    @property
    def feasible(self) -> bool:
        """True when every device holds its shard (memory) and options are respected."""
        return not self.violations

    @property
    def gap(self) -> float | None:
        """Relative distance to the proven lower bound: (B - LB) / B."""
        if self.lower_bound_s is None:
            return None
        if self.bottleneck_s <= 0:
            return 0.0
        return max(0.0, (self.bottleneck_s - self.lower_bound_s) / self.bottleneck_s)

    @property
    def num_devices(self) -> int:
        return sum(len(s.devices) for s in self.stages)

    @property
    def window(self) -> int:
        """Microbatches a client should keep in flight to keep this plan's bottleneck busy.

        Little's law: a pipeline that delivers one microbatch per ``bottleneck_s`` and holds
        each for ``latency_s`` (compute on every stage, every link's transfer) has
        latency / bottleneck microbatches in service.  That alone idles a station whenever the
        one before it is late, so each device gets two more, one waiting to be computed and one
        on its inbound link (what a station that runs ahead needs to stay busy), and the client
        two.  A window of twice the devices (no latency term) measured 29 % under the
        prediction on 16 emulated boards whose links take as long as the compute (docs/planner.md)."""
        depth = self.latency_s / self.bottleneck_s if 0 < self.bottleneck_s < math.inf else 0.0
        in_service = math.ceil(depth) if math.isfinite(depth) else 0
        return pipeline_window(self.num_devices, in_service)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary: figures, certificate, stages with their costs, and solver stats."""
        return {
            "method": self.method,
            "bottleneck_s": _finite(self.bottleneck_s),
            "throughput_per_s": _finite(self.throughput_per_s),
            "latency_s": _finite(self.latency_s),
            "bottleneck_at": self.bottleneck_at,
            "optimal": self.optimal,
            "latency_optimal": self.latency_optimal,
            "lower_bound_s": self.lower_bound_s,
            "gap": self.gap,
            "feasible": self.feasible,
            "violations": list(self.violations),
            "num_devices": self.num_devices,
            "error": self.error,
            "disagreement": self.disagreement,
            "stages": [
                {**s.to_dict(), "compute_s": c.compute_s, "memory_bytes": c.memory_bytes,
                 "memory_limit_bytes": c.memory_limit_bytes}
                for s, c in zip(self.stages, self.stage_costs)],
            "links": [{"src": k.src, "dst": k.dst, "bytes": k.bytes, "time_s": k.time_s,
                       "latency_s": k.latency_s, "pair_s": k.pair_s, "nic_up_s": k.nic_up_s,
                       "nic_down_s": k.nic_down_s, "bound_by": k.bound_by, "encoding": k.encoding}
                      for k in self.links],
            "stopped_by": self.stats.get("stopped_by"),
            # the solver's incumbent over time: (seconds, its bottleneck, the proven bound, nodes)
            "history": [{"time_s": t, "bottleneck_s": ub, "lower_bound_s": lb, "effort": n}
                        for t, ub, lb, n in self.stats.get("history", ())],
            "stats": dict(self.stats),
        }

    def table(self, problem: Problem) -> str:
        """The human table: one row per stage with the link into it; the bottleneck marked."""
        names = [u.name for u in problem.units]
        head: tuple[str, ...] = ("stage", "devices", "units", "compute s", "link in s", "memory used/limit")
        encoded = self.encoded
        if encoded:
            head = (*head, "encoding in")
        rows: list[tuple[str, ...]] = []
        for i, (s, c) in enumerate(zip(self.stages, self.stage_costs)):
            a, b = s.units
            span = names[a] if b - a == 1 else f"{names[a]}..{names[b - 1]}"
            link = self.links[i]
            rows.append((
                str(i), ",".join(s.devices), f"[{a},{b}) {span}",
                _mark(f"{c.compute_s:.4g}", self.bottleneck_at == f"stage {i}"),
                _mark(_link_cell(link), self.bottleneck_at == link.where),
                _bytes_pair(c.memory_bytes, c.memory_limit_bytes), *((link.encoding,) if encoded else ())))
        out = self.links[-1]
        rows.append(("->", CLIENT, "", "",
                     _mark(_link_cell(out), self.bottleneck_at == out.where), "",
                     *((out.encoding,) if encoded else ())))
        widths = [max(len(r[k]) for r in (head, *rows)) for k in range(len(head))]
        lines = ["  ".join(x.ljust(w) for x, w in zip(r, widths)).rstrip() for r in (head, *rows)]
        lines.insert(1, "  ".join("-" * w for w in widths))
        status = "optimal" if self.optimal else (
            f"gap {self.gap:.1%} (lower bound {self.lower_bound_s:.4g} s)" if self.lower_bound_s is not None
            else self.method)
        lines.append("")
        lines.append(f"bottleneck {self.bottleneck_s:.4g} s ({self.bottleneck_at}), throughput "
                     f"{self.throughput_per_s:.4g}/s, latency {self.latency_s:.4g} s, "
                     f"{self.num_devices} devices, {status}")
        if encoded:
            lines.append(f"encoded links: error {self.error:.4g} (sum of the encodings' rel_l2 at their cuts)"
                         + ("" if self.disagreement is None else
                            f", top-1 agreement >= {100 - self.disagreement:.4g} % (100 - the sum of their "
                            "disagreements)"))
        lines.extend(f"VIOLATION: {v}" for v in self.violations)
        return "\n".join(lines)


BYTE_UNITS = (("GB", 1e9), ("MB", 1e6), ("kB", 1e3), ("B", 1.0))


def format_bytes(x: float) -> str:
    """'1.3 GB', '512 kB', '20 B' (powers of ten)."""
    unit, scale = next((u, s) for u, s in BYTE_UNITS if abs(x) >= s or s == 1.0)
    return f"{x / scale:.3g} {unit}" if scale > 1 else f"{x:.0f} B"


def _bytes_pair(used: float, limit: float) -> str:
    """'1.34/2.15 GB': both in the unit that suits the limit."""
    unit, scale = next((u, s) for u, s in BYTE_UNITS if limit >= s or s == 1.0)
    return f"{used / scale:.3g}/{limit / scale:.3g} {unit}"


def _link_cell(link: LinkCost) -> str:
    """A link's time, with the NIC that sets it when one does ("5.1 (nic up of mb-1)")."""
    by = link.bound_by
    return f"{link.time_s:.4g}" + ("" if by == "pair" else f" ({by})")


def _mark(text: str, on: bool) -> str:
    return f"{text} {BOTTLENECK_MARK}" if on else text


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def stage_list(stages: Sequence[Any]) -> list[Stage]:
    """Accept Stage objects, ``{units, devices}`` dicts or ``((a, b), devices)`` pairs."""
    out = []
    for i, s in enumerate(stages):
        if isinstance(s, Stage):
            out.append(s)
        elif isinstance(s, dict):
            out.append(Stage(tuple(s["units"]), tuple(s.get("devices") or s.get("nodes") or ()),
                             s.get("encoding") or ENCODINGS[0], s.get("input_encoding") or ENCODINGS[0]))
        else:
            try:
                units, devs = s
                out.append(Stage(tuple(units), tuple(devs)))
            except (TypeError, ValueError):
                from .problem import PlanError
                raise PlanError(f"stages[{i}]: expected a Stage, a {{units, devices}} mapping "
                                f"or a (units, devices) pair, got {s!r}") from None
    return out
