"""Parse and validate a planning problem (the `edgezmq plan PROBLEM.yaml` file).

A problem is a model's unit chain, the device types and devices that may run it, the
links between them (and to the client), and options. ``Problem.from_dict`` checks every
field and raises ``PlanError`` naming the field's path (``devices[3].type: unknown type
'rcc' (known: mb, rcc-ve)``). The format is documented in docs/planner.md.

Two extensions beyond the basic format, both optional:
- a device may carry its own ``unit_times_s``, a ``speed`` factor over its type's times
  (times are divided by it), its own ``memory_bytes`` / ``reserved_bytes`` /
  ``recv_ms_per_mb`` / ``send_ms_per_mb``, and a ``control`` address used by the
  deployable plan;
- a device type (or device) may say what moving activations costs its stage:
  ``recv_ms_per_mb`` / ``send_ms_per_mb``, milliseconds of the stage's time per MB (10^6
  bytes) it receives / sends (the CPU its receive and send path takes from compute, on a
  device that cannot overlap them); both default to 0;
- a link override may name a device type instead of a device on either end; the most
  specific rule wins: device-device, then device-type, then type-type, then default
  (a name that is both a device and a type means the device).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["PlanError", "Unit", "DeviceType", "Device", "Link", "ModelSpec", "Options",
           "Problem", "load_problem", "CLIENT", "GRANULARITIES"]

CLIENT = "client"
GRANULARITIES = ("block", "half", "sublayer")
DEFAULT_BUFFERS = 2
DEFAULT_DTYPE = "float32"
BITS_PER_BYTE = 8
BITS_PER_MEGABIT = 1e6
MS_PER_S = 1000.0
BYTES_PER_MB = 1e6


class PlanError(ValueError):
    """A problem file, a plan or a request the planner cannot accept (message says which field)."""


@dataclass(frozen=True)
class Unit:
    """One unit of the chain: bytes of one microbatch leaving it, its parameters, its peak work."""

    name: str
    out_bytes: int
    param_bytes: int
    work_bytes: int = 0


@dataclass(frozen=True)
class DeviceType:
    """A kind of device: usable memory and the time of every unit at the problem's microbatch."""

    name: str
    memory_bytes: int
    reserved_bytes: int
    unit_times_s: tuple[float, ...]
    recv_s_per_byte: float = 0.0
    send_s_per_byte: float = 0.0


@dataclass(frozen=True)
class Device:
    """One device, with its type's figures resolved (own times, speed factor, memory overrides)."""

    name: str
    type: str
    memory_bytes: int
    reserved_bytes: int
    unit_times_s: tuple[float, ...]
    control: str | None = None
    recv_s_per_byte: float = 0.0  # stage time per byte received (its input), on top of compute
    send_s_per_byte: float = 0.0  # ... and per byte sent (its output)

    def stage_time_s(self, a: int, b: int, in_bytes: int, out_bytes: int) -> float:
        """Time per microbatch of units [a, b) here: compute plus moving its input and output."""
        return (math.fsum(self.unit_times_s[a:b]) + in_bytes * self.recv_s_per_byte
                + out_bytes * self.send_s_per_byte)

    @property
    def capacity_bytes(self) -> int:
        """Memory a shard may use on this device: total minus what the runtime reserves."""
        return self.memory_bytes - self.reserved_bytes


@dataclass(frozen=True)
class Link:
    """A symmetric link: bandwidth in megabits per second and one-way latency in milliseconds."""

    mbps: float
    latency_ms: float = 0.0

    @property
    def s_per_byte(self) -> float:
        return BITS_PER_BYTE / (self.mbps * BITS_PER_MEGABIT)


@dataclass(frozen=True)
class ModelSpec:
    """The model section: name, microbatch, the unit chain, and what a deployment copies through."""

    name: str
    microbatch: int
    input_bytes: int
    units: tuple[Unit, ...]
    granularity: str | None = None
    dtype: str = DEFAULT_DTYPE
    checkpoint: str | None = None
    kwargs: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Options:
    """Planner options: whether stages may be replicated, and activation buffers per direction."""

    replication: bool = True
    buffers: int = DEFAULT_BUFFERS


@dataclass(frozen=True, eq=False)
class Problem:
    """A validated planning problem, with the link matrix resolved for every pair of nodes.

    ``mbps``, ``spb`` and ``latency_s`` are (N+1) x (N+1) arrays over the nodes
    ``("client", *device names)``: bandwidth, seconds per byte and one-way latency in
    seconds of each link (diagonal NaN).
    """

    model: ModelSpec
    device_types: Mapping[str, DeviceType]
    devices: tuple[Device, ...]
    default_link: Link
    options: Options
    mbps: np.ndarray = field(repr=False)
    latency_s: np.ndarray = field(repr=False)
    spb: np.ndarray = field(init=False, repr=False)
    _index: Mapping[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "spb", BITS_PER_BYTE / (self.mbps * BITS_PER_MEGABIT))
        object.__setattr__(self, "_index", {name: i for i, name in enumerate(self.nodes)})

    @property
    def units(self) -> tuple[Unit, ...]:
        return self.model.units

    @property
    def num_units(self) -> int:
        return len(self.model.units)

    @property
    def nodes(self) -> tuple[str, ...]:
        """Node names in matrix order: the client first, then the devices in file order."""
        return (CLIENT, *(d.name for d in self.devices))

    def device(self, name: str) -> Device:
        i = self._index.get(name, 0)
        if i == 0:
            raise PlanError(f"unknown device {name!r} (known: {', '.join(d.name for d in self.devices)})")
        return self.devices[i - 1]

    def node_index(self, name: str) -> int:
        """Row of a node in ``mbps`` / ``spb`` / ``latency_s`` (0 is the client)."""
        try:
            return self._index[name]
        except KeyError:
            raise PlanError(f"unknown node {name!r}") from None

    def link(self, a: str, b: str) -> Link:
        """The resolved link between two distinct nodes (device names or "client")."""
        i, j = self.node_index(a), self.node_index(b)
        if i == j:
            raise PlanError(f"no link from {a!r} to itself")
        return Link(float(self.mbps[i, j]), float(self.latency_s[i, j] * MS_PER_S))

    @classmethod
    def from_dict(cls, d: Any) -> Problem:
        """Validate a parsed problem file; ``PlanError`` names the first bad field's path."""
        return _parse_problem(d)


def load_problem(path: str | Path) -> Problem:
    """Read a problem from a YAML (or JSON) file; errors are ``PlanError`` prefixed by the path."""
    import yaml  # deferred: parsing a dict needs no YAML

    from edgezmq import yamlfile

    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise PlanError(f"{p}: cannot read ({e.strerror or e})") from None
    try:
        data = yamlfile.safe_load(text)
    except yaml.YAMLError as e:
        raise PlanError(f"{p}: not valid YAML: {e}") from None
    try:
        return Problem.from_dict(data)
    except PlanError as e:
        raise PlanError(f"{p}: {e}") from None


# --- field validation -------------------------------------------------------------------------

def _kind(v: Any) -> str:
    return type(v).__name__


def _mapping(v: Any, path: str) -> Mapping[str, Any]:
    if not isinstance(v, Mapping):
        raise PlanError(f"{path}: expected a mapping, got {_kind(v)} {v!r}")
    return v


def _seq(v: Any, path: str, *, nonempty: bool = False) -> Sequence[Any]:
    if isinstance(v, (str, bytes)) or not isinstance(v, Sequence):
        raise PlanError(f"{path}: expected a list, got {_kind(v)} {v!r}")
    if nonempty and not v:
        raise PlanError(f"{path}: expected a non-empty list")
    return v


def _req(m: Mapping[str, Any], key: str, path: str) -> Any:
    if key not in m or m[key] is None:
        raise PlanError(f"{path}.{key}: required field missing" if path else f"{key}: required field missing")
    return m[key]


def _str(v: Any, path: str) -> str:
    if not isinstance(v, str) or not v:
        raise PlanError(f"{path}: expected a non-empty string, got {_kind(v)} {v!r}")
    return v


def _number(v: Any, path: str, *, minimum: float = 0.0, strict: bool = False) -> float:
    """A finite real >= minimum (> if strict). YAML 1.1 reads ``8e9`` as a string: accept that."""
    x = v
    if isinstance(v, str):
        try:
            x = float(v)
        except ValueError:
            raise PlanError(f"{path}: expected a number, got str {v!r}") from None
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        raise PlanError(f"{path}: expected a finite number, got {_kind(v)} {v!r}")
    if x < minimum or (strict and x == minimum):
        op = ">" if strict else ">="
        raise PlanError(f"{path}: expected a number {op} {minimum:g}, got {v!r}")
    return float(x)


def _int(v: Any, path: str, *, minimum: int = 0) -> int:
    x = _number(v, path, minimum=minimum)
    if x != int(x):
        raise PlanError(f"{path}: expected a whole number, got {v!r}")
    return int(x)


def _times(v: Any, path: str, n_units: int) -> tuple[float, ...]:
    seq = _seq(v, path)
    if len(seq) != n_units:
        raise PlanError(f"{path}: expected {n_units} values (one per unit), got {len(seq)}")
    return tuple(_number(t, f"{path}[{i}]") for i, t in enumerate(seq))


# --- sections -----------------------------------------------------------------------------------

def _parse_problem(d: Any) -> Problem:
    top = _mapping(d, "problem")
    model = _parse_model(_mapping(_req(top, "model", ""), "model"))
    n = len(model.units)
    types = _parse_types(_mapping(_req(top, "device_types", ""), "device_types"), n)
    devices = _parse_devices(_seq(_req(top, "devices", ""), "devices", nonempty=True), types, n)
    options = _parse_options(_mapping(top.get("options") or {}, "options"))
    default, mbps, lat = _parse_links(_mapping(_req(top, "links", ""), "links"), devices, types)
    return Problem(model, types, devices, default, options, mbps, lat)


def _parse_model(m: Mapping[str, Any]) -> ModelSpec:
    units = []
    seen: dict[str, int] = {}
    for i, u in enumerate(_seq(_req(m, "units", "model"), "model.units", nonempty=True)):
        p = f"model.units[{i}]"
        u = _mapping(u, p)
        name = _str(_req(u, "name", p), f"{p}.name")
        if name in seen:
            raise PlanError(f"{p}.name: duplicate unit name {name!r} (also model.units[{seen[name]}])")
        seen[name] = i
        units.append(Unit(name, _int(_req(u, "out_bytes", p), f"{p}.out_bytes"),
                          _int(_req(u, "param_bytes", p), f"{p}.param_bytes"),
                          _int(u.get("work_bytes", 0), f"{p}.work_bytes")))
    gran = m.get("granularity")
    if gran is not None and gran not in GRANULARITIES:
        raise PlanError(f"model.granularity: expected one of {', '.join(GRANULARITIES)}, got {gran!r}")
    kwargs = m.get("kwargs") or {}
    _mapping(kwargs, "model.kwargs")
    ckpt = m.get("checkpoint")
    return ModelSpec(
        name=_str(_req(m, "name", "model"), "model.name"),
        microbatch=_int(_req(m, "microbatch", "model"), "model.microbatch", minimum=1),
        input_bytes=_int(_req(m, "input_bytes", "model"), "model.input_bytes"),
        units=tuple(units), granularity=gran,
        dtype=_str(m.get("dtype", DEFAULT_DTYPE), "model.dtype"),
        checkpoint=None if ckpt is None else _str(ckpt, "model.checkpoint"),
        kwargs=dict(kwargs))


def _parse_types(m: Mapping[str, Any], n_units: int) -> dict[str, DeviceType]:
    if not m:
        raise PlanError("device_types: expected at least one device type")
    types = {}
    for name, t in m.items():
        p = f"device_types.{name}"
        name = _str(name, p)
        t = _mapping(t, p)
        types[name] = DeviceType(
            name, _int(_req(t, "memory_bytes", p), f"{p}.memory_bytes"),
            _int(t.get("reserved_bytes", 0), f"{p}.reserved_bytes"),
            _times(_req(t, "unit_times_s", p), f"{p}.unit_times_s", n_units),
            *_io_costs(t, p, (0.0, 0.0)))
    return types


def _io_costs(m: Mapping[str, Any], path: str, fallback: tuple[float, float]) -> tuple[float, float]:
    """(recv, send) seconds per byte from optional ``recv_ms_per_mb`` / ``send_ms_per_mb``."""
    out = []
    for key, default in zip(("recv_ms_per_mb", "send_ms_per_mb"), fallback):
        out.append(_number(m[key], f"{path}.{key}") / MS_PER_S / BYTES_PER_MB if key in m else default)
    return out[0], out[1]


def _parse_devices(seq: Sequence[Any], types: Mapping[str, DeviceType], n_units: int) -> tuple[Device, ...]:
    out: list[Device] = []
    seen: dict[str, int] = {}
    for i, d in enumerate(seq):
        p = f"devices[{i}]"
        d = _mapping(d, p)
        name = _str(_req(d, "name", p), f"{p}.name")
        if name == CLIENT:
            raise PlanError(f"{p}.name: {CLIENT!r} is reserved for the client node")
        if name in seen:
            raise PlanError(f"{p}.name: duplicate device name {name!r} (also devices[{seen[name]}])")
        seen[name] = i
        tname = _str(_req(d, "type", p), f"{p}.type")
        if tname not in types:
            raise PlanError(f"{p}.type: unknown type {tname!r} (known: {', '.join(types)})")
        t = types[tname]
        times = t.unit_times_s
        if "unit_times_s" in d:
            times = _times(d["unit_times_s"], f"{p}.unit_times_s", n_units)
        if "speed" in d:
            speed = _number(d["speed"], f"{p}.speed", strict=True)
            times = tuple(x / speed for x in times)
        control = d.get("control")
        out.append(Device(
            name, tname,
            _int(d.get("memory_bytes", t.memory_bytes), f"{p}.memory_bytes"),
            _int(d.get("reserved_bytes", t.reserved_bytes), f"{p}.reserved_bytes"),
            times, None if control is None else _str(control, f"{p}.control"),
            *_io_costs(d, p, (t.recv_s_per_byte, t.send_s_per_byte))))
    return tuple(out)


def _parse_options(m: Mapping[str, Any]) -> Options:
    rep = m.get("replication", True)
    if not isinstance(rep, bool):
        raise PlanError(f"options.replication: expected true or false, got {_kind(rep)} {rep!r}")
    return Options(rep, _int(m.get("buffers", DEFAULT_BUFFERS), "options.buffers"))


def _parse_link(m: Any, path: str, fallback: Link | None) -> Link:
    m = _mapping(m, path)
    if fallback is None:
        mbps = _number(_req(m, "mbps", path), f"{path}.mbps", strict=True)
    else:
        mbps = _number(m.get("mbps", fallback.mbps), f"{path}.mbps", strict=True)
    lat_default = 0.0 if fallback is None else fallback.latency_ms
    return Link(mbps, _number(m.get("latency_ms", lat_default), f"{path}.latency_ms"))


def _parse_links(m: Mapping[str, Any], devices: tuple[Device, ...],
                 types: Mapping[str, DeviceType]) -> tuple[Link, np.ndarray, np.ndarray]:
    default = _parse_link(_req(m, "default", "links"), "links.default", None)
    names = {d.name for d in devices} | {CLIENT}
    # specificity: 2 = both ends named nodes, 1 = a node and a type, 0 = two types
    rules: list[dict[frozenset[str], tuple[Link, str]]] = [{}, {}, {}]
    for i, o in enumerate(_seq(m.get("overrides") or [], "links.overrides")):
        p = f"links.overrides[{i}]"
        o = _mapping(o, p)
        ends = []
        for key in ("a", "b"):
            e = _str(_req(o, key, p), f"{p}.{key}")
            if e not in names and e not in types:
                raise PlanError(f"{p}.{key}: unknown device or type {e!r}")
            ends.append(e)
        a, b = ends
        if a == b and a in names:
            raise PlanError(f"{p}: a link needs two different nodes, got {a!r} twice")
        level = sum(e in names for e in ends)
        key = frozenset((a, b)) if level != 1 else frozenset((f"n:{a if a in names else b}",
                                                                 f"t:{b if a in names else a}"))
        if key in rules[level]:
            raise PlanError(f"{p}: duplicate override for {a!r} <-> {b!r} (also {rules[level][key][1]})")
        rules[level][key] = (_parse_link(o, p, default), p)

    nodes = [(CLIENT, None)] + [(d.name, d.type) for d in devices]
    n = len(nodes)
    mbps = np.full((n, n), np.nan)
    lat = np.full((n, n), np.nan)
    for i in range(n):
        for j in range(i + 1, n):
            link = _resolve(nodes[i], nodes[j], rules, default)
            mbps[i, j] = mbps[j, i] = link.mbps
            lat[i, j] = lat[j, i] = link.latency_ms / MS_PER_S
    return default, mbps, lat


def _resolve(x: tuple[str, str | None], y: tuple[str, str | None],
             rules: list[dict[frozenset[str], tuple[Link, str]]], default: Link) -> Link:
    (xn, xt), (yn, yt) = x, y
    hit = rules[2].get(frozenset((xn, yn)))
    if hit:
        return hit[0]
    cands = [rules[1].get(frozenset((f"n:{a}", f"t:{t}"))) for a, t in ((xn, yt), (yn, xt)) if t]
    cands = [c for c in cands if c]
    if len(cands) == 2 and cands[0][0] != cands[1][0]:
        raise PlanError(f"{cands[0][1]} and {cands[1][1]} both set the link {xn!r} <-> {yn!r} "
                        f"differently; add a device-device override for it")
    if cands:
        return cands[0][0]
    if xt and yt:
        hit = rules[0].get(frozenset((xt, yt)))
        if hit:
            return hit[0]
    return default
