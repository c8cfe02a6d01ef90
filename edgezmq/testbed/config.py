"""TESTBED.yaml: emulated devices and links, parsed and validated (pure: no I/O but reading the file)."""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from edgezmq.errors import EdgezmqError
from edgezmq.fields import Fields, safe_load
from edgezmq.planner.problem import Link
from edgezmq.terms import CLIENT, MAX_PORT, MAX_THREADS

__all__ = ["ConfigError", "DeviceSpec", "ClientSpec", "Link", "ShapedNic", "TestbedConfig",
           "parse_config", "load_config", "parse_bytes", "CLIENT"]

BRIDGE = "bridge"  # the namespace holding the bridge; reserved name
RESERVED_NAMES = (CLIENT, BRIDGE)
DEFAULT_SUBNET = "10.213.0.0/24"  # private; lives only inside the testbed's namespaces
DEFAULT_CONTROL_PORT = 5550
DEFAULT_THREADS = 1
MIN_MEMORY_BYTES = 64 << 20  # below this a "memory: 512" is a typo, not a device
MIN_MBPS = 0.01  # htb's rate is given in kbit/s: 10 kbit/s is the smallest we pass
SHAPED_MAX_MBPS = 10_000.0  # an unshaped veth moves ~10 Gbit/s here: above that shaping is moot
SHAPED_MAX_LATENCY_MS = 60_000.0
MAX_COUNT = 64
CPU_SHARE = "a number (fraction of a core)"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$")
TESTBED_NAME_RE = re.compile(r"^[a-z][a-z0-9-]{0,23}$")  # prefixes namespaces and cgroups


_TOP_KEYS = ("name", "subnet", "control_port", "client", "devices", "links")
_DEVICE_KEYS = ("name", "cpu", "threads", "memory", "type", "count", "nic_mbps")
_CLIENT_KEYS = ("cpu", "memory", "nic_mbps")
_NIC_KEYS = ("up", "down")
_LINK_KEYS = ("mbps", "latency_ms")
_OVERRIDE_KEYS = ("a", "b", "mbps", "latency_ms")


class ConfigError(EdgezmqError, ValueError):
    """A TESTBED.yaml problem; the message starts with the field path (``devices[2].cpu: ...``)."""

    __test__ = False  # not a pytest test class

    def __init__(self, path: str, message: str, file: str | None = None) -> None:
        text = f"{path}: {message}" if path else message
        super().__init__(f"{text} (in {file})" if file else text)
        self.path, self.message, self.file = path, message, file


@dataclass(frozen=True)
class ShapedNic:
    """A host's one network interface: its whole egress (up) and ingress (down), Mbit/s; None = unshaped."""

    up: float | None = None
    down: float | None = None

    def as_dict(self) -> dict[str, float]:
        """The given directions only, as cluster.yaml's ``nic_mbps`` (configured rates, not payload)."""
        return {k: v for k, v in (("up", self.up), ("down", self.down)) if v is not None}


@dataclass(frozen=True)
class DeviceSpec:
    name: str
    cpu: float  # fraction of one core (0.25 = a quarter); may exceed 1 up to the cores
    threads: int = DEFAULT_THREADS
    memory_bytes: int | None = None
    type: str | None = None
    nic: ShapedNic = ShapedNic()


@dataclass(frozen=True)
class ClientSpec:
    cpu: float | None = None  # None: the client is not CPU-limited
    memory_bytes: int | None = None
    nic: ShapedNic = ShapedNic()


@dataclass(frozen=True)
class TestbedConfig:
    __test__ = False

    name: str
    devices: tuple[DeviceSpec, ...]
    default_link: Link
    overrides: dict[frozenset[str], Link] = field(default_factory=dict)
    subnet: ipaddress.IPv4Network = ipaddress.IPv4Network(DEFAULT_SUBNET)
    control_port: int = DEFAULT_CONTROL_PORT
    client: ClientSpec = ClientSpec()

    @property
    def hosts(self) -> list[str]:
        """Every namespace with a link: the client first, then the devices in file order."""
        return [CLIENT, *(d.name for d in self.devices)]

    def device(self, name: str) -> DeviceSpec:
        for d in self.devices:
            if d.name == name:
                return d
        raise KeyError(f"no device {name!r} in testbed {self.name!r} (devices: {[d.name for d in self.devices]})")

    def link(self, a: str, b: str) -> Link:
        return self.overrides.get(frozenset((a, b)), self.default_link)

    def nic(self, host: str) -> ShapedNic:
        """The NIC of `host` (the client or a device); ``ShapedNic()`` when it has none."""
        return self.client.nic if host == CLIENT else self.device(host).nic

    def address(self, host: str) -> str:
        """IPv4 address of a host: the client is the subnet's first host, devices follow in order."""
        i = self.hosts.index(host)
        return str(self.subnet.network_address + 1 + i)

    def with_link(self, a: str, b: str, mbps: Any) -> TestbedConfig:
        """This testbed with the pair `a`<->`b` at `mbps` (both directions; its latency kept)."""
        for end, h in (("a", a), ("b", b)):
            if h not in self.hosts:
                raise ConfigError(end, f"unknown host {h!r} (known: {self.hosts})")
        if a == b:
            raise ConfigError("b", f"a and b are both {a!r}: a link joins two different hosts")
        rate = F.number(mbps, "mbps", lo=MIN_MBPS, hi=SHAPED_MAX_MBPS, what="a rate in Mbit/s")
        link = Link(mbps=rate, latency_ms=self.link(a, b).latency_ms)
        return dataclasses.replace(self, overrides={**self.overrides, frozenset((a, b)): link})

    def with_nic(self, host: str, up: Any = None, down: Any = None) -> TestbedConfig:
        """This testbed with `host`'s NIC at new rates (None: that direction unchanged).  A NIC
        direction can change its rate, not appear or vanish: that would re-parent its htb classes."""
        if host not in self.hosts:
            raise ConfigError("host", f"unknown host {host!r} (known: {self.hosts})")
        if up is None and down is None:
            raise ConfigError("nic_mbps", "give up and/or down in Mbit/s (otherwise nothing changes)")
        nic = self.nic(host)
        rates = {}
        for k, v in (("up", up), ("down", down)):
            if v is None:
                rates[k] = getattr(nic, k)
                continue
            if getattr(nic, k) is None:
                raise ConfigError(f"nic_mbps.{k}", f"{host!r} has no NIC {k} in its TESTBED.yaml: a live change "
                                                  f"sets a NIC's rate, it cannot add one (give it nic_mbps.{k} and up again)")
            rates[k] = F.number(v, f"nic_mbps.{k}", lo=MIN_MBPS, hi=SHAPED_MAX_MBPS, what="a rate in Mbit/s")
        new = ShapedNic(rates["up"], rates["down"])
        if host == CLIENT:
            return dataclasses.replace(self, client=dataclasses.replace(self.client, nic=new))
        devices = tuple(dataclasses.replace(d, nic=new) if d.name == host else d for d in self.devices)
        return dataclasses.replace(self, devices=devices)

    def override_list(self) -> list[dict[str, Any]]:
        """The per-pair overrides in host order, as plain dicts (for cluster.yaml)."""
        order = {h: i for i, h in enumerate(self.hosts)}
        out = []
        for pair, link in self.overrides.items():
            a, b = sorted(pair, key=order.__getitem__)
            out.append({"a": a, "b": b, "mbps": link.mbps, "latency_ms": link.latency_ms})
        return sorted(out, key=lambda o: (order[o["a"]], order[o["b"]]))


# ---- field readers: each names the path it reads --------------------------
F = Fields(ConfigError)


def _name(v: Any, path: str) -> str:
    if not isinstance(v, str) or not NAME_RE.match(v):
        raise ConfigError(path, f"expected a name of letters, digits, '_', '.', '-' "
                                f"(at most 32, starting with a letter or digit), got {v!r}")
    return v


def parse_bytes(v: Any, path: str = "memory") -> int:
    """``1500000000``, ``"1.5GB"`` (decimal) or ``"512MiB"`` (binary) -> bytes, at least ``MIN_MEMORY_BYTES``."""
    return F.size(v, path, lo=MIN_MEMORY_BYTES)


def _link(v: Any, path: str, base: Link | None) -> Link:
    keys = _OVERRIDE_KEYS if base is not None else _LINK_KEYS
    m = F.mapping(v, path, keys)
    if base is None and "mbps" not in m:
        raise ConfigError(f"{path}.mbps", "required (the link rate in Mbit/s)")
    if base is not None and "mbps" not in m and "latency_ms" not in m:
        raise ConfigError(path, "give mbps and/or latency_ms (otherwise the override changes nothing)")
    if "mbps" in m:
        mbps = F.number(m["mbps"], f"{path}.mbps", lo=MIN_MBPS, hi=SHAPED_MAX_MBPS)
    else:
        assert base is not None  # checked above: a default link names its rate
        mbps = base.mbps
    lat_default = base.latency_ms if base is not None else 0.0
    lat = (F.number(m["latency_ms"], f"{path}.latency_ms", lo=0.0, hi=SHAPED_MAX_LATENCY_MS)
           if "latency_ms" in m else lat_default)
    return Link(mbps=mbps, latency_ms=lat)


def _nic(v: Any, path: str) -> ShapedNic:
    """``nic_mbps``: one rate for both directions, or ``{up, down}`` (an omitted direction is unshaped)."""
    if not isinstance(v, dict):
        mbps = F.number(v, path, lo=MIN_MBPS, hi=SHAPED_MAX_MBPS, what="a rate in Mbit/s or {up, down}")
        return ShapedNic(mbps, mbps)
    m = F.mapping(v, path, _NIC_KEYS)
    if not any(m.get(k) is not None for k in _NIC_KEYS):
        raise ConfigError(path, "give up and/or down in Mbit/s (otherwise the NIC shapes nothing)")
    up, down = (F.number(m[k], f"{path}.{k}", lo=MIN_MBPS, hi=SHAPED_MAX_MBPS) if m.get(k) is not None else None
                for k in _NIC_KEYS)
    return ShapedNic(up, down)


def _devices(v: Any, cores: int) -> list[DeviceSpec]:
    if not isinstance(v, list) or not v:
        raise ConfigError("devices", f"expected a non-empty list of devices, got {v!r}")
    out: list[DeviceSpec] = []
    for i, d in enumerate(v):
        p = f"devices[{i}]"
        m = F.mapping(d, p, _DEVICE_KEYS)
        for req in ("name", "cpu"):
            if req not in m:
                raise ConfigError(f"{p}.{req}", "required")
        name = _name(m["name"], f"{p}.name")
        if name in RESERVED_NAMES:
            raise ConfigError(f"{p}.name", f"{name!r} is reserved (reserved: {list(RESERVED_NAMES)})")
        cpu = F.number(m["cpu"], f"{p}.cpu", lo=0.0, hi=cores, lo_open=True, what=CPU_SHARE)
        threads = F.integer(m.get("threads", DEFAULT_THREADS), f"{p}.threads", lo=1, hi=MAX_THREADS)
        mem = parse_bytes(m["memory"], f"{p}.memory") if m.get("memory") is not None else None
        typ = m.get("type")
        if typ is not None and not isinstance(typ, str):
            raise ConfigError(f"{p}.type", f"expected a string label, got {typ!r}")
        nic = _nic(m["nic_mbps"], f"{p}.nic_mbps") if m.get("nic_mbps") is not None else ShapedNic()
        count = F.integer(m.get("count", 1), f"{p}.count", lo=1, hi=MAX_COUNT)
        names = [name] if "count" not in m else [f"{name}-{k}" for k in range(count)]
        out += [DeviceSpec(n, cpu, threads, mem, typ, nic) for n in names]
    seen: dict[str, int] = {}
    for d in out:
        if d.name in seen:
            raise ConfigError("devices", f"device name {d.name!r} appears twice (names must be unique)")
        seen[d.name] = 1
    return out


def parse_config(doc: Any, *, default_name: str | None = None, cores: int | None = None) -> TestbedConfig:
    """Validate a loaded TESTBED.yaml document; `cores` bounds each device's CPU share (default: this machine's)."""
    if cores is None:
        from edgezmq.node import device

        cores = device.cores()
    top = F.mapping(doc, "", _TOP_KEYS) if doc is not None else {}
    if "devices" not in top:
        raise ConfigError("devices", "required (a list of devices)")
    name = top.get("name", default_name)
    if name is None:
        raise ConfigError("name", "required (it prefixes the namespaces and cgroups)")
    if not isinstance(name, str) or not TESTBED_NAME_RE.match(name):
        raise ConfigError("name", f"expected lowercase letters, digits and '-', starting with a letter, "
                                  f"at most 24 characters, got {name!r}")
    devices = _devices(top["devices"], cores)

    subnet_v = top.get("subnet", DEFAULT_SUBNET)
    try:
        subnet = ipaddress.IPv4Network(subnet_v)
    except (ValueError, TypeError) as e:
        raise ConfigError("subnet", f"expected an IPv4 network like {DEFAULT_SUBNET!r}, got {subnet_v!r} ({e})") from None
    if not subnet.is_private or subnet.is_loopback or subnet.is_link_local:
        raise ConfigError("subnet", f"expected a private network (10/8, 172.16/12, 192.168/16), got {subnet_v!r}")
    need = len(devices) + 1
    if subnet.num_addresses - 2 < need:
        raise ConfigError("subnet", f"{subnet} has {max(subnet.num_addresses - 2, 0)} host addresses, "
                                    f"the testbed needs {need} (client + {len(devices)} devices)")
    port = F.integer(top.get("control_port", DEFAULT_CONTROL_PORT), "control_port", lo=1, hi=MAX_PORT)

    client_m = F.mapping(top.get("client") or {}, "client", _CLIENT_KEYS)
    client = ClientSpec(
        cpu=(F.number(client_m["cpu"], "client.cpu", lo=0.0, hi=cores, lo_open=True, what=CPU_SHARE)
             if client_m.get("cpu") is not None else None),
        memory_bytes=parse_bytes(client_m["memory"], "client.memory") if client_m.get("memory") is not None else None,
        nic=_nic(client_m["nic_mbps"], "client.nic_mbps") if client_m.get("nic_mbps") is not None else ShapedNic(),
    )

    links = F.mapping(top.get("links"), "links", ("default", "overrides")) if "links" in top else None
    if links is None or "default" not in links:
        raise ConfigError("links.default", "required ({mbps: ..., latency_ms: ...} for every pair not overridden)")
    default = _link(links["default"], "links.default", None)
    hosts = [CLIENT, *(d.name for d in devices)]
    overrides: dict[frozenset[str], Link] = {}
    ov = links.get("overrides") or []
    if not isinstance(ov, list):
        raise ConfigError("links.overrides", f"expected a list of {{a, b, mbps, latency_ms}}, got {ov!r}")
    for i, o in enumerate(ov):
        p = f"links.overrides[{i}]"
        m = F.mapping(o, p, _OVERRIDE_KEYS)
        for end in ("a", "b"):
            if end not in m:
                raise ConfigError(f"{p}.{end}", "required (a device name or 'client')")
            if m[end] not in hosts:
                raise ConfigError(f"{p}.{end}", f"unknown host {m[end]!r} (known: {hosts})")
        if m["a"] == m["b"]:
            raise ConfigError(p, f"a and b are both {m['a']!r}: a link joins two different hosts")
        pair = frozenset((m["a"], m["b"]))
        if pair in overrides:
            raise ConfigError(p, f"a second override for the pair {m['a']}-{m['b']}")
        overrides[pair] = _link(m, p, default)
    return TestbedConfig(name=name, devices=tuple(devices), default_link=default, overrides=overrides,
                         subnet=subnet, control_port=port, client=client)


def default_name_for(path: str | Path) -> str:
    """A testbed name from a file name: ``plans/testbed-hetero.yaml`` -> ``testbed-hetero``."""
    stem = re.sub(r"[^a-z0-9-]+", "-", Path(path).stem.lower()).strip("-")
    if not stem or not stem[0].isalpha():
        stem = f"tb-{stem}".rstrip("-")
    return stem[:24].rstrip("-")


def load_config(path: str | Path, *, name: str | None = None, cores: int | None = None) -> TestbedConfig:
    """Read and validate TESTBED.yaml; `name` overrides the file's `name:` (e.g. a per-test prefix)."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError("", f"cannot read testbed file: {e.strerror or e}", str(p)) from None
    try:
        doc = safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        what = " ".join(str(x) for x in (getattr(e, "context", None), getattr(e, "problem", None)) if x) or str(e)
        raise ConfigError("", f"not valid YAML{where}: {what}", str(p)) from None
    if name is not None:
        if doc is None:
            doc = {}
        if isinstance(doc, dict):
            doc = {**doc, "name": name}
    try:
        return parse_config(doc, default_name=default_name_for(p), cores=cores)
    except ConfigError as e:
        raise ConfigError(e.path, e.message, str(p)) from None
