"""Cluster inventory (cluster.yaml): the nodes, what is known of them and of their links.

    nodes:
      - {name: board-1, control: "tcp://10.0.0.11:5550", type: rcc-ve, memory_bytes: 8e9, threads: 4,
         nic_mbps: 30}                                  # or {up: 30, down: 100}: its one interface
      - {name: board-2, control: "tcp://10.0.0.12:5550"}
    client: {address: 10.0.0.2, results_port: 5560, nic_mbps: 100}   # where the client/bootstrapper sits
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

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from edgezmq.errors import EdgezmqError
from edgezmq.fields import Fields, prefixed, read_yaml
from edgezmq.orchestrate.address import NodeAddress
from edgezmq.planner.problem import Link, Nic, read_nic
from edgezmq.protocol.messages import MAX_PINGS, MAX_STAGES, NETPROBE_MAX_SECONDS
from edgezmq.terms import CLIENT, MAX_LATENCY_MS, MAX_MBPS, MAX_PORT, MAX_THREADS
from edgezmq.transport import security

DEFAULT_RESULTS_PORT = 5560
DEFAULT_ALL_PAIRS_UP_TO = 8  # beyond this many nodes, links are sampled per type pair
DEFAULT_PROBE_SECONDS = 0.5
DEFAULT_PROBE_BYTES = 4 * 1024 * 1024
DEFAULT_PINGS = 10


class ClusterError(EdgezmqError, ValueError):
    """A cluster inventory that cannot be used; the message carries the field path."""


@dataclass(frozen=True)
class InventoryNode(NodeAddress):
    """A node's address and what the inventory says of it: its device type (nodes of one
    type share a profile), a cap on the memory it may use and its network interface's rates
    (payload rates: configured rates times the inventory's payload factor)."""

    type: str | None = None
    memory_bytes: int | None = None
    nic: Nic | None = None


@dataclass
class Cluster:
    nodes: list[InventoryNode]
    client_address: str = "127.0.0.1"
    results_port: int = DEFAULT_RESULTS_PORT
    client_namespace: str | None = None
    client_nic: Nic | None = None  # the client's network interface (payload rates), if given
    default_link: Link | None = None
    link_overrides: dict[frozenset, Link] = field(default_factory=dict)
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

    def node(self, name: str) -> InventoryNode:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(name)

    def without(self, names: set[str] | frozenset[str]) -> Cluster:
        """This cluster less the nodes `names` and the link figures that name them (a
        failover's survivors: the rest of the inventory as it is)."""
        return replace(self, nodes=[n for n in self.nodes if n.name not in names],
                       link_overrides={pair: fig for pair, fig in self.link_overrides.items() if not pair & names})

    def known_link(self, a: str, b: str) -> Link | None:
        """The configured figure for a pair, if any (an override, else the default)."""
        return self.link_overrides.get(frozenset((a, b)), self.default_link)

    @property
    def results(self) -> str:
        return f"tcp://{self.client_address}:{self.results_port}"


F = Fields(prefixed(ClusterError))
LINK_FIELDS = ("mbps", "latency_ms", "a", "b")
NODE_FIELDS = ("name", "control", "type", "memory_bytes", "threads", "cpu", "namespace", "address", "nic_mbps")


def _mbps(v: Any, path: str) -> float:
    """A rate > 0; YAML 1.1 reads 8e9 as text, so numeric strings count."""
    return F.number(v, path, lo=0, lo_open=True, hi=MAX_MBPS, strings=True)


def _count(v: Any, path: str, hi: int) -> int:
    return F.integer(v, path, lo=1, hi=hi, strings=True)


def _link(d: Any, path: str, payload_factor: float = 1.0) -> Link:
    d = F.mapping(d, path, LINK_FIELDS)
    return Link(mbps=_mbps(F.need(d, "mbps", (int, float, str), path), f"{path}.mbps") * payload_factor,
                latency_ms=F.number(d.get("latency_ms", 0.0), f"{path}.latency_ms", lo=0, hi=MAX_LATENCY_MS, strings=True))


def _nic(m: Any, path: str, payload_factor: float) -> Nic | None:
    """A section's optional ``nic_mbps`` (one rate, or ``{up, down}``), as payload rates."""
    v = m.get("nic_mbps")
    return None if v is None else read_nic(F, v, f"{path}.nic_mbps", payload_factor)


def parse_cluster(d: Any, source: str | None = None) -> Cluster:
    F.mapping(d, "cluster")
    # a testbed's cluster.yaml gives configured link (and NIC) rates; TCP payload gets this fraction
    tb = d.get("testbed") or {}
    factor = (F.number(tb.get("tcp_payload_factor", 1.0), "testbed.tcp_payload_factor", lo=0, hi=1, lo_open=True)
              if isinstance(tb, dict) else 1.0)
    raw = d.get("nodes")
    if not isinstance(raw, list) or not raw:
        raise ClusterError("nodes: expected a non-empty list of {name, control, ...}")
    nodes: list[InventoryNode] = []
    seen: set[str] = set()
    for i, n in enumerate(raw):
        p = f"nodes[{i}]"
        F.mapping(n, p, NODE_FIELDS)
        name, ctl = n.get("name"), n.get("control")
        if not isinstance(name, str) or not name or name == CLIENT:
            raise ClusterError(f"{p}.name: expected a name other than {CLIENT!r}, got {name!r}")
        if name in seen:
            raise ClusterError(f"{p}.name: duplicate node name {name!r}")
        seen.add(name)
        F.address(ctl, f"{p}.control")
        typ = n.get("type")
        if typ is not None:
            F.string(typ, f"{p}.type")
        mem = F.size(n["memory_bytes"], f"{p}.memory_bytes") if n.get("memory_bytes") is not None else None
        thr = _count(n["threads"], f"{p}.threads", MAX_THREADS) if n.get("threads") is not None else None
        nodes.append(InventoryNode(name=name, control=ctl, type=typ, memory_bytes=mem, threads=thr,
                                   nic=_nic(n, p, factor)))
    c = Cluster(nodes=nodes, source=source)
    client = d.get("client") or {}
    F.mapping(client, "client")
    if "address" in client:
        c.client_address = F.string(client["address"], "client.address")
    if "results_port" in client:
        c.results_port = F.integer(client["results_port"], "client.results_port", lo=1, hi=MAX_PORT)
    c.client_namespace = client.get("namespace")
    c.client_nic = _nic(client, "client", factor)
    links = d.get("links") or {}
    F.mapping(links, "links")
    if links.get("default") is not None:
        c.default_link = _link(links["default"], "links.default", factor)
    for j, o in enumerate(F.seq(links.get("overrides") or [], "links.overrides")):
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
    F.mapping(m, "measure")
    if "all_pairs_up_to" in m:
        c.all_pairs_up_to = _count(m["all_pairs_up_to"], "measure.all_pairs_up_to", MAX_STAGES)
    if "seconds" in m:
        c.probe_seconds = F.number(m["seconds"], "measure.seconds", lo=0, hi=NETPROBE_MAX_SECONDS, lo_open=True,
                                   strings=True)
    if "bytes_per_msg" in m:
        c.probe_bytes = F.size(m["bytes_per_msg"], "measure.bytes_per_msg")
    if "pings" in m:
        c.pings = _count(m["pings"], "measure.pings", MAX_PINGS)
    if d.get("keys") is not None:
        base = Path(source).parent if source is not None else Path.cwd()
        try:
            c.keys, c.keyring = security.parse_keys_section(d["keys"], [n.name for n in nodes], base)
        except security.KeyFileError as e:
            raise ClusterError(str(e)) from None
        c.nodes = [replace(n, curve=c.curve(n.name)) for n in nodes]  # each address carries how to reach it
    return c


def load_cluster(path: str | Path) -> Cluster:
    return parse_cluster(read_yaml(path, ClusterError, "cluster file"), source=str(path))


def is_cluster_file(d: Any) -> bool:
    """A cluster inventory lists nodes and has no stages (a plan has stages)."""
    return isinstance(d, dict) and isinstance(d.get("nodes"), list) and "stages" not in d
