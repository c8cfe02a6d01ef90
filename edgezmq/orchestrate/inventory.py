"""Cluster inventory (cluster.yaml): the nodes, what is known of them and of their links.

    nodes:
      - {name: board-1, control: "tcp://10.0.0.11:5550", type: rcc-ve, memory_bytes: 8e9, threads: 4}
      - {name: board-2, control: "tcp://10.0.0.12:5550"}
    client: {address: 10.0.0.2, results_port: 5560}   # where the client/bootstrapper sits
    links:                       # optional figures that replace measurement
      default: {mbps: 1000, latency_ms: 0.5}
      overrides:
        - {a: board-1, b: board-2, mbps: 5, latency_ms: 2}
    measure: {all_pairs_up_to: 8, seconds: 0.5, bytes_per_msg: 4194304, pings: 10}
    keys: {client: keys/client.key_secret, nodes: keys/nodes/}   # optional: CurveZMQ to every node

Documented in plans/README.md.  Parsing only: measuring and planning live in
``edgezmq.orchestrate.autodeploy``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgezmq.transport import security
from edgezmq.yamlfile import read_yaml

CLIENT = "client"  # the client's name in link tables (as in the planner's problem files)
DEFAULT_RESULTS_PORT = 5560
DEFAULT_ALL_PAIRS_UP_TO = 8  # beyond this many nodes, links are sampled per type pair
DEFAULT_PROBE_SECONDS = 0.5
DEFAULT_PROBE_BYTES = 4 * 1024 * 1024
DEFAULT_PINGS = 10


class ClusterError(ValueError):
    """A cluster inventory that cannot be used; the message carries the field path."""


@dataclass
class NodeEntry:
    name: str
    control: str
    type: str | None = None
    memory_bytes: int | None = None
    threads: int | None = None


@dataclass
class LinkFigure:
    mbps: float
    latency_ms: float = 0.0


@dataclass
class Cluster:
    nodes: list[NodeEntry]
    client_address: str = "127.0.0.1"
    results_port: int = DEFAULT_RESULTS_PORT
    client_namespace: str | None = None
    default_link: LinkFigure | None = None
    link_overrides: dict[frozenset, LinkFigure] = field(default_factory=dict)
    all_pairs_up_to: int = DEFAULT_ALL_PAIRS_UP_TO
    probe_seconds: float = DEFAULT_PROBE_SECONDS
    probe_bytes: int = DEFAULT_PROBE_BYTES
    pings: int = DEFAULT_PINGS
    source: str | None = None
    keyring: security.Keyring | None = None  # from the `keys:` section (as a plan's): CurveZMQ
    keys: dict | None = None  # that section, paths resolved; carried into the plans made from it

    def curve(self, name: str) -> security.Curve | None:
        """How to reach node ``name``: a CURVE client of its key, or plaintext."""
        return security.client_curve(self.keyring, name)

    def node(self, name: str) -> NodeEntry:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(name)

    def known_link(self, a: str, b: str) -> LinkFigure | None:
        """The configured figure for a pair, if any (an override, else the default)."""
        return self.link_overrides.get(frozenset((a, b)), self.default_link)

    @property
    def results(self) -> str:
        return f"tcp://{self.client_address}:{self.results_port}"


def _num(v: Any, path: str, *, positive: bool = True, integer: bool = False) -> Any:
    if isinstance(v, str):  # allow 8e9 / "2GB"
        v = _parse_size(v, path)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ClusterError(f"{path}: expected a number, got {v!r}")
    if not math.isfinite(v):
        raise ClusterError(f"{path}: expected a finite number, got {v!r}")
    if positive and not v > 0:
        raise ClusterError(f"{path}: must be > 0, got {v!r}")
    return int(v) if integer else float(v)


_UNITS = {"KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}


def _parse_size(s: str, path: str) -> float:
    t = s.strip().upper().replace(" ", "")
    for suffix in sorted(_UNITS, key=len, reverse=True):
        if t.endswith(suffix):
            try:
                return float(t[: -len(suffix)]) * _UNITS[suffix]
            except ValueError:
                break
    try:
        return float(t)
    except ValueError:
        raise ClusterError(f"{path}: expected a number or a size like '2GB', got {s!r}") from None


def _link(d: Any, path: str, payload_factor: float = 1.0) -> LinkFigure:
    if not isinstance(d, dict):
        raise ClusterError(f"{path}: expected {{mbps, latency_ms}}, got {d!r}")
    unknown = set(d) - {"mbps", "latency_ms", "a", "b"}
    if unknown:
        raise ClusterError(f"{path}: unknown field(s) {sorted(unknown, key=repr)}")
    if "mbps" not in d:
        raise ClusterError(f"{path}.mbps: missing")
    return LinkFigure(mbps=_num(d["mbps"], f"{path}.mbps") * payload_factor,
                      latency_ms=_num(d.get("latency_ms", 0.0), f"{path}.latency_ms", positive=False))


def parse_cluster(d: Any, source: str | None = None) -> Cluster:
    if not isinstance(d, dict):
        raise ClusterError(f"cluster: expected a mapping, got {type(d).__name__}")
    raw = d.get("nodes")
    if not isinstance(raw, list) or not raw:
        raise ClusterError("nodes: expected a non-empty list of {name, control, ...}")
    nodes: list[NodeEntry] = []
    seen: set[str] = set()
    for i, n in enumerate(raw):
        p = f"nodes[{i}]"
        if not isinstance(n, dict):
            raise ClusterError(f"{p}: expected a mapping, got {n!r}")
        unknown = set(n) - {"name", "control", "type", "memory_bytes", "threads", "cpu", "namespace", "address"}
        if unknown:
            raise ClusterError(f"{p}: unknown field(s) {sorted(unknown, key=repr)}")
        name, ctl = n.get("name"), n.get("control")
        if not isinstance(name, str) or not name or name == CLIENT:
            raise ClusterError(f"{p}.name: expected a name other than {CLIENT!r}, got {name!r}")
        if name in seen:
            raise ClusterError(f"{p}.name: duplicate node name {name!r}")
        seen.add(name)
        if not isinstance(ctl, str) or not ctl.startswith("tcp://"):
            raise ClusterError(f"{p}.control: expected tcp://HOST:PORT, got {ctl!r}")
        typ = n.get("type")
        if typ is not None and not isinstance(typ, str):
            raise ClusterError(f"{p}.type: expected a string, got {typ!r}")
        mem = _num(n["memory_bytes"], f"{p}.memory_bytes", integer=True) if n.get("memory_bytes") is not None else None
        thr = _num(n["threads"], f"{p}.threads", integer=True) if n.get("threads") is not None else None
        nodes.append(NodeEntry(name=name, control=ctl, type=typ, memory_bytes=mem, threads=thr))
    c = Cluster(nodes=nodes, source=source)
    client = d.get("client") or {}
    if not isinstance(client, dict):
        raise ClusterError(f"client: expected a mapping, got {client!r}")
    if "address" in client:
        if not isinstance(client["address"], str):
            raise ClusterError(f"client.address: expected a host, got {client['address']!r}")
        c.client_address = client["address"]
    if "results_port" in client:
        c.results_port = _num(client["results_port"], "client.results_port", integer=True)
    c.client_namespace = client.get("namespace")
    # a testbed's cluster.yaml gives configured link rates; TCP payload gets this fraction
    tb = d.get("testbed") or {}
    factor = _num(tb.get("tcp_payload_factor", 1.0), "testbed.tcp_payload_factor") if isinstance(tb, dict) else 1.0
    links = d.get("links") or {}
    if not isinstance(links, dict):
        raise ClusterError(f"links: expected a mapping, got {links!r}")
    if links.get("default") is not None:
        c.default_link = _link(links["default"], "links.default", factor)
    overrides = links.get("overrides") or []
    if not isinstance(overrides, list):
        raise ClusterError(f"links.overrides: expected a list, got {overrides!r}")
    for j, o in enumerate(overrides):
        p = f"links.overrides[{j}]"
        fig = _link(o, p, factor)
        a, b = o.get("a"), o.get("b")
        for end, v in (("a", a), ("b", b)):
            if v != CLIENT and (not isinstance(v, str) or v not in seen):
                raise ClusterError(f"{p}.{end}: unknown node {v!r} (known: {sorted(seen)} and {CLIENT!r})")
        if a == b:
            raise ClusterError(f"{p}: a link needs two different ends, got {a!r} twice")
        c.link_overrides[frozenset((a, b))] = fig
    m = d.get("measure") or {}
    if not isinstance(m, dict):
        raise ClusterError(f"measure: expected a mapping, got {m!r}")
    if "all_pairs_up_to" in m:
        c.all_pairs_up_to = _num(m["all_pairs_up_to"], "measure.all_pairs_up_to", integer=True)
    if "seconds" in m:
        c.probe_seconds = _num(m["seconds"], "measure.seconds")
    if "bytes_per_msg" in m:
        c.probe_bytes = _num(m["bytes_per_msg"], "measure.bytes_per_msg", integer=True)
    if "pings" in m:
        c.pings = _num(m["pings"], "measure.pings", integer=True)
    if d.get("keys") is not None:
        base = Path(source).parent if source is not None else Path.cwd()
        try:
            c.keys, c.keyring = security.parse_keys_section(d["keys"], [n.name for n in nodes], base)
        except security.KeyFileError as e:
            raise ClusterError(str(e)) from None
    return c


def load_cluster(path: str | Path) -> Cluster:
    return parse_cluster(read_yaml(path, ClusterError, "cluster file"), source=str(path))


def is_cluster_file(d: Any) -> bool:
    """A cluster inventory lists nodes and has no stages (a plan has stages)."""
    return isinstance(d, dict) and isinstance(d.get("nodes"), list) and "stages" not in d
