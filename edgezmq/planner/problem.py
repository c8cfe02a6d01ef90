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
  (a name that is both a device and a type means the device);
- a device type, a device (replacing its type's) and the client (a top-level ``client:``
  section) may have a network interface of limited rate, ``nic_mbps``: one rate both
  ways, or ``{up: X, down: Y}`` (either omitted: unlimited), shared by all its links;
- the model may list lossy candidate encodings of the links between stages
  (``model.encodings: {int8: {ratio, error: [one per cut 1..L-1]}}``) and a device type
  (or device, replacing its type's) what each costs it: ``codec_ms_per_mb: {int8: {encode,
  decode}}``, ms per MB of float32 (raw) activations; a device without an encoding's entry
  cannot encode or decode it. ``raw`` is always a candidate (ratio 1, no cost, no error).
  An encoding may also carry ``input: {ratio, error, disagreement}``, measured with the
  client's input encoded so (cut 0): the plan may then encode the client's link into stage 0
  (the client encodes, stage 0's devices decode; the client's own cost is not priced; the
  solver offers it only when every device can decode it).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgezmq.errors import EdgezmqError
from edgezmq.fields import Fields, prefixed, read_yaml, shown
from edgezmq.terms import (
    CLIENT,
    ENCODINGS,
    GRANULARITIES,
    MAX_BYTES,
    MAX_FACTOR,
    MAX_LATENCY_MS,
    MAX_MBPS,
    MAX_MICROBATCH,
    MAX_SECONDS,
)

__all__ = ["PlanError", "Unit", "DeviceType", "Device", "Link", "Nic", "ModelChain", "Options",
           "Problem", "Encoding", "CodecPrice", "load_problem", "read_nic", "encoded_bytes", "CLIENT",
           "GRANULARITIES", "RAW"]

DEFAULT_BUFFERS = 2
MAX_BUFFERS = 64  # activation buffers each way per stage
DEFAULT_DTYPE = "float32"
BITS_PER_BYTE = 8
BITS_PER_MEGABIT = 1e6
MS_PER_S = 1000.0
BYTES_PER_MB = 1e6
RAW = ENCODINGS[0]  # the lossless encoding: always a candidate, ratio 1, no cost, no error
MAX_ERROR = 1e3     # an encoding's error contribution (relative L2 of the logits) at most
MAX_DISAGREEMENT = 100.0  # percent of samples whose top-1 class an encoding changes at a cut, at most


class PlanError(EdgezmqError, ValueError):
    """A problem file, a plan or a request the planner cannot accept (message says which field)."""


@dataclass(frozen=True)
class Unit:
    """One unit of the chain: bytes of one microbatch leaving it, its parameters, its peak work,
    and state it keeps between microbatches (a decoder layer's KV caches for the planned
    sequences: docs/generate.md)."""

    name: str
    out_bytes: int
    param_bytes: int
    work_bytes: int = 0
    cache_bytes: int = 0

    @property
    def resident_bytes(self) -> int:
        """What the unit holds while deployed: its parameters and its caches."""
        return self.param_bytes + self.cache_bytes


@dataclass(frozen=True)
class Nic:
    """A node's network interface: egress (up) and ingress (down) in megabits per second,
    shared by all of its links; ``math.inf`` is unlimited (no NIC given)."""

    up_mbps: float = math.inf
    down_mbps: float = math.inf

    @property
    def up_s_per_byte(self) -> float:
        """Seconds per byte sent through it (0.0 when unlimited)."""
        return BITS_PER_BYTE / (self.up_mbps * BITS_PER_MEGABIT)

    @property
    def down_s_per_byte(self) -> float:
        """Seconds per byte received through it (0.0 when unlimited)."""
        return BITS_PER_BYTE / (self.down_mbps * BITS_PER_MEGABIT)

    @property
    def limited(self) -> bool:
        return math.isfinite(self.up_mbps) or math.isfinite(self.down_mbps)

    def to_dict(self) -> dict[str, float]:
        """The ``nic_mbps`` mapping of a file: only the limited directions (empty: unlimited)."""
        return {k: v for k, v in (("up", self.up_mbps), ("down", self.down_mbps)) if math.isfinite(v)}


UNLIMITED = Nic()


@dataclass(frozen=True)
class Encoding:
    """A lossy candidate for the links between stages: wire bytes per raw byte, and the
    measured error it adds at each cut (``error[c - 1]`` for cut c, 0 < c < L) and, when
    measured, the percent of samples whose top-1 class it changes there (``disagreement``)."""

    name: str
    ratio: float
    error: tuple[float, ...]
    disagreement: tuple[float, ...] | None = None
    # the client's input encoded so (cut 0), when measured: its ratio, error and disagreement
    input: InputFigures | None = None


@dataclass(frozen=True)
class InputFigures:
    """An encoding applied to the client's input (cut 0): wire bytes per raw byte, the error
    it adds to the logits, and (when measured) the percent of samples whose top-1 it changes."""

    ratio: float
    error: float
    disagreement: float | None = None


@dataclass(frozen=True)
class CodecPrice:
    """What an encoding costs a device: stage seconds per raw byte to encode (sending) and
    to decode (receiving)."""

    encode_s_per_byte: float
    decode_s_per_byte: float


NO_CODECS: Mapping[str, CodecPrice] = {}


def encoded_bytes(raw: int, ratio: float) -> int:
    """Bytes on the wire of ``raw`` bytes sent at ``ratio`` (rounded up; raw stays exact)."""
    return raw if ratio == 1.0 else math.ceil(raw * ratio)


@dataclass(frozen=True)
class DeviceType:
    """A kind of device: usable memory and the time of every unit at the problem's microbatch."""

    name: str
    memory_bytes: int
    reserved_bytes: int
    unit_times_s: tuple[float, ...]
    recv_s_per_byte: float = 0.0
    send_s_per_byte: float = 0.0
    nic: Nic = UNLIMITED
    codecs: Mapping[str, CodecPrice] = field(default_factory=dict, hash=False)


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
    nic: Nic = UNLIMITED  # its network interface (its own, else its type's)
    codecs: Mapping[str, CodecPrice] = field(default_factory=dict, hash=False)  # its own, else its type's

    def stage_time_s(self, a: int, b: int, in_bytes: int, out_bytes: int, codec_s: float = 0.0) -> float:
        """Time per microbatch of units [a, b) here: compute plus moving its input and output
        (wire bytes), plus ``codec_s`` decoding its input and encoding its output."""
        return (math.fsum(self.unit_times_s[a:b]) + in_bytes * self.recv_s_per_byte
                + out_bytes * self.send_s_per_byte + codec_s)

    def codec_s_per_byte(self, name: str, encode: bool) -> float:
        """Seconds per raw byte to encode (or decode) ``name`` here; ``inf`` when this device
        has no cost for it (it cannot), 0 for raw."""
        if name == RAW:
            return 0.0
        c = self.codecs.get(name)
        if c is None:
            return math.inf
        return c.encode_s_per_byte if encode else c.decode_s_per_byte

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
class ModelChain:
    """The model section: name, microbatch, the unit chain, and what a deployment copies through."""

    name: str
    microbatch: int
    input_bytes: int
    units: tuple[Unit, ...]
    granularity: str | None = None
    dtype: str = DEFAULT_DTYPE
    checkpoint: str | None = None
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    encodings: Mapping[str, Encoding] = field(default_factory=dict)  # lossy candidates (raw is implied)


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
    seconds of each link (diagonal NaN). ``client_nic`` is the client's network interface
    (each device's is on the device).
    """

    model: ModelChain
    device_types: Mapping[str, DeviceType]
    devices: tuple[Device, ...]
    default_link: Link
    options: Options
    mbps: np.ndarray = field(repr=False)
    latency_s: np.ndarray = field(repr=False)
    client_nic: Nic = UNLIMITED
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

    def nic(self, name: str) -> Nic:
        """The network interface of a node (a device name or "client")."""
        i = self.node_index(name)
        return self.client_nic if i == 0 else self.devices[i - 1].nic

    @property
    def has_nic(self) -> bool:
        """Whether any node's interface is limited (else links are priced per pair alone)."""
        return self.client_nic.limited or any(d.nic.limited for d in self.devices)

    @property
    def encodings(self) -> Mapping[str, Encoding]:
        """The model's lossy candidate encodings (empty: every link is raw)."""
        return self.model.encodings

    @property
    def input_encodings(self) -> tuple[str, ...]:
        """The lossy encodings measured on the client's input (cut 0), in the problem's order."""
        return tuple(n for n, e in self.model.encodings.items() if e.input is not None)

    def _input(self, name: str) -> InputFigures:
        e = self.model.encodings[name].input
        if e is None:
            raise PlanError(f"model.encodings.{name}.input: the client's input encoded {name} was not measured")
        return e

    def cut_error(self, name: str, cut: int) -> float:
        """Error ``name`` adds at cut c (0 < c < L; 0: the client's input); 0 for raw."""
        if name == RAW:
            return 0.0
        return self._input(name).error if cut == 0 else self.model.encodings[name].error[cut - 1]

    def cut_disagreement(self, name: str, cut: int) -> float:
        """Percent of samples whose top-1 class ``name`` changes at ``cut`` alone (0 for raw);
        ``PlanError`` when the problem did not measure it."""
        if name == RAW:
            return 0.0
        d = self._input(name).disagreement if cut == 0 else self.model.encodings[name].disagreement
        if d is None:
            where = "input.disagreement" if cut == 0 else "disagreement"
            raise PlanError(f"model.encodings.{name}.{where}: needed by a top-1 agreement budget "
                            "(--min-agreement), got none")
        return d if isinstance(d, float) else d[cut - 1]

    def cut_ratio(self, name: str, cut: int = 1) -> float:
        """Wire bytes per raw byte of ``name`` at ``cut`` (0: the client's input)."""
        if name == RAW:
            return 1.0
        return self._input(name).ratio if cut == 0 else self.model.encodings[name].ratio

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
    p = Path(path)
    data = read_yaml(p, PlanError, "problem file")
    try:
        return Problem.from_dict(data)
    except PlanError as e:
        raise PlanError(f"{p}: {e}") from None


# --- field validation (edgezmq.fields) ---------------------------------------------------------
# YAML 1.1 reads 8e9 as text: figures accept numeric strings
F = Fields(prefixed(PlanError))


NIC_FIELDS = ("up", "down")


def read_nic(fields: Fields, v: Any, path: str, factor: float = 1.0) -> Nic:
    """A ``nic_mbps`` value: one rate for both directions, or ``{up: X, down: Y}`` with
    either omitted (unlimited); rates in (0, MAX_MBPS], then multiplied by ``factor`` (an
    inventory's TCP payload factor). Errors through ``fields``, naming ``path``."""
    def rate(x: Any, where: str) -> float:
        if x is None:
            return math.inf
        return fields.number(x, where, lo=0, lo_open=True, hi=MAX_MBPS, strings=True) * factor

    if isinstance(v, Mapping):
        fields.mapping(v, path, NIC_FIELDS)
        return Nic(rate(v.get("up"), f"{path}.up"), rate(v.get("down"), f"{path}.down"))
    if isinstance(v, bool) or not isinstance(v, (int, float, str)):
        fields.fail(path, f"expected a number or a mapping {{up, down}}, got {type(v).__name__} {shown(v)}")
    both = rate(v, path)
    return Nic(both, both)


def _nic(m: Mapping[str, Any], path: str, fallback: Nic) -> Nic:
    """The optional ``nic_mbps`` of a section (absent or null: ``fallback``)."""
    v = m.get("nic_mbps")
    return fallback if v is None else read_nic(F, v, f"{path}.nic_mbps")


def _times(v: Any, path: str, n_units: int) -> tuple[float, ...]:
    seq = F.seq(v, path)
    if len(seq) != n_units:
        raise PlanError(f"{path}: expected {n_units} values (one per unit), got {len(seq)}")
    return tuple(F.number(t, f"{path}[{i}]", lo=0, hi=MAX_SECONDS, strings=True) for i, t in enumerate(seq))


# --- sections -----------------------------------------------------------------------------------

def _parse_problem(d: Any) -> Problem:
    top = F.mapping(d, "problem")
    model = _parse_model(F.mapping(F.need(top, "model", object, ""), "model"))
    n = len(model.units)
    types = _parse_types(F.mapping(F.need(top, "device_types", object, ""), "device_types"), n)
    devices = _parse_devices(F.seq(F.need(top, "devices", object, ""), "devices", nonempty=True), types, n)
    options = _parse_options(F.mapping(top.get("options") or {}, "options"))
    default, mbps, lat = _parse_links(F.mapping(F.need(top, "links", object, ""), "links"), devices, types)
    client = _nic(F.mapping(top.get("client") or {}, "client"), "client", UNLIMITED)
    return Problem(model, types, devices, default, options, mbps, lat, client)


def _parse_model(m: Mapping[str, Any]) -> ModelChain:
    units = []
    seen: dict[str, int] = {}
    for i, u in enumerate(F.seq(F.need(m, "units", object, "model"), "model.units", nonempty=True)):
        p = f"model.units[{i}]"
        u = F.mapping(u, p)
        name = F.string(F.need(u, "name", object, p), f"{p}.name")
        if name in seen:
            raise PlanError(f"{p}.name: duplicate unit name {name!r} (also model.units[{seen[name]}])")
        seen[name] = i
        units.append(Unit(name, F.integer(F.need(u, "out_bytes", object, p), f"{p}.out_bytes", lo=0, hi=MAX_BYTES, strings=True),
                          F.integer(F.need(u, "param_bytes", object, p), f"{p}.param_bytes", lo=0, hi=MAX_BYTES, strings=True),
                          F.integer(u.get("work_bytes", 0), f"{p}.work_bytes", lo=0, hi=MAX_BYTES, strings=True),
                          F.integer(u.get("cache_bytes", 0), f"{p}.cache_bytes", lo=0, hi=MAX_BYTES, strings=True)))
    gran = m.get("granularity")
    if gran is not None:
        F.choice(gran, "model.granularity", GRANULARITIES)
    kwargs = m.get("kwargs") or {}
    F.mapping(kwargs, "model.kwargs")
    ckpt = m.get("checkpoint")
    encodings = _parse_encodings(F.mapping(m.get("encodings") or {}, "model.encodings"), len(units))
    return ModelChain(
        name=F.string(F.need(m, "name", object, "model"), "model.name"),
        microbatch=F.integer(F.need(m, "microbatch", object, "model"), "model.microbatch", lo=1, hi=MAX_MICROBATCH, strings=True),
        input_bytes=F.integer(F.need(m, "input_bytes", object, "model"), "model.input_bytes", lo=0, hi=MAX_BYTES, strings=True),
        units=tuple(units), granularity=gran,
        dtype=F.string(m.get("dtype", DEFAULT_DTYPE), "model.dtype"),
        checkpoint=None if ckpt is None else F.string(ckpt, "model.checkpoint"),
        kwargs=dict(kwargs), encodings=encodings)


ENCODING_FIELDS = ("ratio", "error", "disagreement", "input")
INPUT_FIELDS = ("ratio", "error", "disagreement")
CODEC_FIELDS = ("encode", "decode")


def _parse_encodings(m: Mapping[str, Any], n_units: int) -> dict[str, Encoding]:
    """``model.encodings``: {name: {ratio in (0, 1], error: one value per cut 1..L-1,
    disagreement (optional): one percent in [0, 100] per cut, input (optional): {ratio, error,
    disagreement (optional)} of the client's input encoded so}}."""
    out = {}
    for name, e in m.items():
        p = f"model.encodings.{name}"
        _lossy_name(name, p)
        e = F.mapping(e, p, ENCODING_FIELDS)
        ratio = F.number(F.need(e, "ratio", object, p), f"{p}.ratio", lo=0, lo_open=True, hi=1, strings=True)
        errs = F.seq(F.need(e, "error", object, p), f"{p}.error")
        if len(errs) != n_units - 1:
            raise PlanError(f"{p}.error: expected {n_units - 1} values (one per cut 1..{n_units - 1} between "
                            f"units), got {len(errs)}")
        dis = None
        if e.get("disagreement") is not None:
            ds = F.seq(e["disagreement"], f"{p}.disagreement")
            if len(ds) != n_units - 1:
                raise PlanError(f"{p}.disagreement: expected {n_units - 1} values (one per cut 1..{n_units - 1} "
                                f"between units), got {len(ds)}")
            dis = tuple(F.number(x, f"{p}.disagreement[{i}]", lo=0, hi=MAX_DISAGREEMENT, strings=True)
                        for i, x in enumerate(ds))
        inp = None
        if e.get("input") is not None:
            q = f"{p}.input"
            i_ = F.mapping(e["input"], q, INPUT_FIELDS)
            i_dis = i_.get("disagreement")
            inp = InputFigures(
                F.number(F.need(i_, "ratio", object, q), f"{q}.ratio", lo=0, lo_open=True, hi=1, strings=True),
                F.number(F.need(i_, "error", object, q), f"{q}.error", lo=0, hi=MAX_ERROR, strings=True),
                None if i_dis is None else F.number(i_dis, f"{q}.disagreement", lo=0, hi=MAX_DISAGREEMENT,
                                                    strings=True))
        out[name] = Encoding(name, ratio, tuple(F.number(x, f"{p}.error[{i}]", lo=0, hi=MAX_ERROR, strings=True)
                                                for i, x in enumerate(errs)), dis, inp)
    return out


def _lossy_name(name: Any, path: str) -> str:
    name = F.string(name, path)
    if name not in ENCODINGS or name == RAW:
        raise PlanError(f"{path}: expected a lossy encoding ({', '.join(ENCODINGS[1:])}), got {name!r}")
    return name


def _codecs(m: Mapping[str, Any], path: str, fallback: Mapping[str, CodecPrice]) -> Mapping[str, CodecPrice]:
    """The optional ``codec_ms_per_mb`` of a section: {name: {encode, decode}} in ms per MB of
    raw activations (absent: ``fallback``, its type's)."""
    v = m.get("codec_ms_per_mb")
    if v is None:
        return fallback
    path = f"{path}.codec_ms_per_mb"
    out = {}
    for name, c in F.mapping(v, path).items():
        p = f"{path}.{name}"
        _lossy_name(name, p)
        c = F.mapping(c, p, CODEC_FIELDS)
        enc, dec = (F.number(F.need(c, k, object, p), f"{p}.{k}", lo=0, hi=MAX_FACTOR, strings=True)
                    / MS_PER_S / BYTES_PER_MB for k in CODEC_FIELDS)
        out[name] = CodecPrice(enc, dec)
    return out


def _parse_types(m: Mapping[str, Any], n_units: int) -> dict[str, DeviceType]:
    if not m:
        raise PlanError("device_types: expected at least one device type")
    types = {}
    for name, t in m.items():
        p = f"device_types.{name}"
        name = F.string(name, p)
        t = F.mapping(t, p)
        types[name] = DeviceType(
            name, F.integer(F.need(t, "memory_bytes", object, p), f"{p}.memory_bytes", lo=0, hi=MAX_BYTES, strings=True),
            F.integer(t.get("reserved_bytes", 0), f"{p}.reserved_bytes", lo=0, hi=MAX_BYTES, strings=True),
            _times(F.need(t, "unit_times_s", object, p), f"{p}.unit_times_s", n_units),
            *_io_costs(t, p, (0.0, 0.0)), _nic(t, p, UNLIMITED), _codecs(t, p, NO_CODECS))
    return types


def _io_costs(m: Mapping[str, Any], path: str, fallback: tuple[float, float]) -> tuple[float, float]:
    """(recv, send) seconds per byte from optional ``recv_ms_per_mb`` / ``send_ms_per_mb``."""
    out = []
    for key, default in zip(("recv_ms_per_mb", "send_ms_per_mb"), fallback):
        out.append(F.number(m[key], f"{path}.{key}", lo=0, hi=MAX_FACTOR, strings=True) / MS_PER_S / BYTES_PER_MB if key in m else default)
    return out[0], out[1]


def _parse_devices(seq: Sequence[Any], types: Mapping[str, DeviceType], n_units: int) -> tuple[Device, ...]:
    out: list[Device] = []
    seen: dict[str, int] = {}
    for i, d in enumerate(seq):
        p = f"devices[{i}]"
        d = F.mapping(d, p)
        name = F.string(F.need(d, "name", object, p), f"{p}.name")
        if name == CLIENT:
            raise PlanError(f"{p}.name: {CLIENT!r} is reserved for the client node")
        if name in seen:
            raise PlanError(f"{p}.name: duplicate device name {name!r} (also devices[{seen[name]}])")
        seen[name] = i
        tname = F.string(F.need(d, "type", object, p), f"{p}.type")
        if tname not in types:
            raise PlanError(f"{p}.type: unknown type {tname!r} (known: {', '.join(types)})")
        t = types[tname]
        times = t.unit_times_s
        if "unit_times_s" in d:
            times = _times(d["unit_times_s"], f"{p}.unit_times_s", n_units)
        if "speed" in d:
            speed = F.number(d["speed"], f"{p}.speed", lo=0, lo_open=True, hi=MAX_FACTOR, strings=True)
            times = tuple(x / speed for x in times)
        control = d.get("control")
        out.append(Device(
            name, tname,
            F.integer(d.get("memory_bytes", t.memory_bytes), f"{p}.memory_bytes", lo=0, hi=MAX_BYTES, strings=True),
            F.integer(d.get("reserved_bytes", t.reserved_bytes), f"{p}.reserved_bytes", lo=0, hi=MAX_BYTES, strings=True),
            times, None if control is None else F.string(control, f"{p}.control"),
            *_io_costs(d, p, (t.recv_s_per_byte, t.send_s_per_byte)), _nic(d, p, t.nic),
            _codecs(d, p, t.codecs)))
    return tuple(out)


def _parse_options(m: Mapping[str, Any]) -> Options:
    return Options(F.boolean(m.get("replication", True), "options.replication"),
                   F.integer(m.get("buffers", DEFAULT_BUFFERS), "options.buffers", lo=0, hi=MAX_BUFFERS, strings=True))


def _parse_link(m: Any, path: str, fallback: Link | None) -> Link:
    m = F.mapping(m, path)
    if fallback is None:
        mbps = F.number(F.need(m, "mbps", object, path), f"{path}.mbps", lo=0, lo_open=True, hi=MAX_MBPS, strings=True)
    else:
        mbps = F.number(m.get("mbps", fallback.mbps), f"{path}.mbps", lo=0, lo_open=True, hi=MAX_MBPS, strings=True)
    lat_default = 0.0 if fallback is None else fallback.latency_ms
    return Link(mbps, F.number(m.get("latency_ms", lat_default), f"{path}.latency_ms", lo=0, hi=MAX_LATENCY_MS, strings=True))


def _parse_links(m: Mapping[str, Any], devices: tuple[Device, ...],
                 types: Mapping[str, DeviceType]) -> tuple[Link, np.ndarray, np.ndarray]:
    default = _parse_link(F.need(m, "default", object, "links"), "links.default", None)
    names = {d.name for d in devices} | {CLIENT}
    # specificity: 2 = both ends named nodes, 1 = a node and a type, 0 = two types
    rules: list[dict[frozenset[str], tuple[Link, str]]] = [{}, {}, {}]
    for i, o in enumerate(F.seq(m.get("overrides") or [], "links.overrides")):
        p = f"links.overrides[{i}]"
        o = F.mapping(o, p)
        ends = []
        for key in ("a", "b"):
            e = F.string(F.need(o, key, object, p), f"{p}.{key}")
            if e not in names and e not in types:
                raise PlanError(f"{p}.{key}: unknown device or type {e!r}")
            ends.append(e)
        a, b = ends
        if a == b and a in names:
            raise PlanError(f"{p}: a link needs two different nodes, got {a!r} twice")
        level = sum(e in names for e in ends)
        pair = frozenset((a, b)) if level != 1 else frozenset((f"n:{a if a in names else b}",
                                                                  f"t:{b if a in names else a}"))
        if pair in rules[level]:
            raise PlanError(f"{p}: duplicate override for {a!r} <-> {b!r} (also {rules[level][pair][1]})")
        rules[level][pair] = (_parse_link(o, p, default), p)

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
    found = (rules[1].get(frozenset((f"n:{a}", f"t:{t}"))) for a, t in ((xn, yt), (yn, xt)) if t)
    cands = [c for c in found if c]
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
