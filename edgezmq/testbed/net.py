"""Network namespaces joined by a bridge, with per-destination and per-NIC htb shaping, via iproute2.

Topology: one namespace per host (the client and each device) with a single interface
``eth0``; its veth peer ``v<port>`` lives in a separate bridge namespace, enslaved to
``br0``.  Nothing is created in the root namespace except the namespace names themselves,
and no route leads out: the test subnet exists only on the bridge.

Pairs: each host's ``eth0`` egress has an htb root with one class per peer (rate = ceil =
that pair's link rate) chosen by a u32 filter on the destination address, plus a default
class at the default rate for anything else (ARP).  So every ordered pair is its own
link, enforced at the sender; the reverse direction is shaped by the peer.

NIC (optional, per host): a device has one interface, shared by all its peers.
- Up: under ``eth0``'s htb root a parent class at the NIC rate (rate = ceil); the peer
  classes and the default class become its children, each with ceil = min(pair, NIC) and a
  guaranteed rate that never oversubscribes the parent (see ``htb_batch``).  The host's
  whole egress is then <= NIC up, and each pair <= its pair rate.
- Down: the bridge-side veth ``v<port>`` transmits exactly what the host receives, so its
  egress is the host's ingress: the same tree there, at the NIC's down rate, with one
  class per sender (u32 on the source address).  This is
  simpler than an ifb device (which would need the ifb module, an ingress qdisc and a
  mirred redirect in the host namespace) and as exact: it is an ordinary egress qdisc, on
  the one path every packet to the host takes.  The senders' own pair classes still apply
  first, so a pair stays <= its rate while the senders together are held to NIC down.
  Unlike the sender's qdisc, this one is not local to the sending socket (TCP small
  queues do not hold the sender back): a class's queue fills and TCP backs off on drops,
  as in front of a real slow NIC; throughput stays at the rate.  A class per sender keeps
  one sender's backlog from delaying another's messages (this kernel has no sfq or
  fq_codel to do that per flow).

Live changes (``edgezmq testbed set-link``): the same trees regenerated with ``change=True``
give ``tc class change`` lines for every class (same ids, same parents, new rates): the
qdiscs, filters and queued packets stay, the nodes and their connections do not notice.
A NIC can change its rate, not appear or vanish (that would re-parent the classes).
"""

from __future__ import annotations

import ipaddress
import shlex
import subprocess
from pathlib import Path

from .errors import TestbedError

__all__ = ["run", "netns_exists", "netns_list", "add_netns", "del_netns", "netns_pids",
           "make_bridge", "attach", "shape", "htb_batch", "shape_ingress", "ingress_batch", "bridge_port",
           "enter_argv", "TCP_PAYLOAD_FACTOR"]

IP, TC, NSENTER = "ip", "tc", "nsenter"
NETNS_DIR = Path("/var/run/netns")  # where iproute2 keeps named namespaces
BRIDGE_DEV = "br0"
HOST_DEV = "eth0"
CMD_TIMEOUT_S = 30.0
# htb: a bucket of 1 ms at the link rate keeps it exact up to 1 Gbit/s and more
# (measured: the default burst gives 0.926x at 1 Gbit/s, this 0.956x = the TCP payload share).
BURST_S = 0.001
MIN_BURST_BYTES = 4 * 1514
# Without a NIC classes never borrow: the quantum only silences htb's warning.  Under a NIC
# class the children borrow from it in turns of one quantum each (deficit round robin):
# equal quanta share the NIC's spare rate equally among the busy peers.
QUANTUM_BYTES = 60_000
DEFAULT_CLASS = 1
NIC_CLASS = 2  # the parent of every class on eth0 when the host has a NIC up rate
FIRST_PEER_CLASS = 0x10
# What TCP delivers of a shaped Ethernet rate: 1448 payload bytes (MSS with timestamps)
# per 1514-byte frame = 0.956 (MEASURED.md: 100 Mbit/s -> 95.7 Mbit/s of payload).
TCP_PAYLOAD_FACTOR = 1448 / 1514


def run(cmd: list[str], *, input: str | None = None) -> str:  # noqa: A002 - subprocess's name
    """Run a command; raise TestbedError naming it, its exit code and its stderr when it fails."""
    try:
        p = subprocess.run(cmd, input=input, capture_output=True, text=True, timeout=CMD_TIMEOUT_S)
    except FileNotFoundError:
        raise TestbedError(f"`{shlex.join(cmd)}`: {cmd[0]} not found on PATH") from None
    except subprocess.TimeoutExpired:
        raise TestbedError(f"`{shlex.join(cmd)}` did not finish within {CMD_TIMEOUT_S:g}s") from None
    if p.returncode != 0:
        fed = f"\nits input was:\n{input}" if input else ""
        raise TestbedError(f"`{shlex.join(cmd)}` failed (exit {p.returncode}): "
                           f"{(p.stderr or p.stdout).strip()}{fed}")
    return p.stdout


def netns_exists(name: str) -> bool:
    return (NETNS_DIR / name).exists()


def netns_list() -> list[str]:
    try:
        return sorted(p.name for p in NETNS_DIR.iterdir())
    except FileNotFoundError:
        return []


def add_netns(name: str) -> None:
    run([IP, "netns", "add", name])
    run([IP, "-n", name, "link", "set", "lo", "up"])


def del_netns(name: str) -> None:
    if netns_exists(name):
        run([IP, "netns", "del", name])


def netns_pids(name: str) -> set[int]:
    """Every process whose network namespace is `name` (none if it does not exist)."""
    if not netns_exists(name):
        return set()
    return {int(x) for x in run([IP, "netns", "pids", name]).split()}


def make_bridge(ns: str) -> None:
    run([IP, "-n", ns, "link", "add", BRIDGE_DEV, "type", "bridge"])
    run([IP, "-n", ns, "link", "set", BRIDGE_DEV, "up"])


def attach(bridge_ns: str, port: int, host_ns: str, address: str, network: ipaddress.IPv4Network) -> None:
    """A veth pair: ``v<port>`` on the bridge, ``eth0`` with `address` in `host_ns`."""
    veth = bridge_port(port)
    run([IP, "-n", bridge_ns, "link", "add", veth, "type", "veth", "peer", "name", HOST_DEV, "netns", host_ns])
    run([IP, "-n", bridge_ns, "link", "set", veth, "master", BRIDGE_DEV])
    run([IP, "-n", bridge_ns, "link", "set", veth, "up"])
    run([IP, "-n", host_ns, "addr", "add", f"{address}/{network.prefixlen}", "dev", HOST_DEV])
    run([IP, "-n", host_ns, "link", "set", HOST_DEV, "up"])


def _kbit(mbps: float) -> int:
    return max(1, round(mbps * 1000))


def _burst(mbps: float) -> int:
    return max(MIN_BURST_BYTES, round(mbps * 1e6 / 8 * BURST_S))


def _htb_class(classid: str, mbps: float, dev: str = HOST_DEV, verb: str = "add") -> str:
    rate = _kbit(mbps)
    burst = _burst(mbps)
    return (f"class {verb} dev {dev} parent 1: classid {classid} htb rate {rate}kbit ceil {rate}kbit "
            f"burst {burst} cburst {burst} quantum {QUANTUM_BYTES}")


def _nic_child(dev: str, classid: str, guaranteed_bit: int, ceil_mbps: float, verb: str = "add") -> str:
    return (f"class {verb} dev {dev} parent 1:{NIC_CLASS:x} classid {classid} htb rate {guaranteed_bit}bit "
            f"ceil {_kbit(ceil_mbps)}kbit burst {_burst(guaranteed_bit / 1e6)} cburst {_burst(ceil_mbps)} "
            f"quantum {QUANTUM_BYTES}")


def _htb_tree(dev: str, match: str, default_mbps: float, peers: list[tuple[str, float]],
              nic_mbps: float | None, change: bool = False) -> str:
    """htb on `dev`'s egress: a class per peer (u32 on the peer as ip `match`: dst or src) and a
    default class, each at its own rate; with `nic_mbps`, all of them under one NIC class.
    `change`: only the classes, as ``class change`` of the tree already there (live rates)."""
    verb = "change" if change else "add"
    lines = [] if change else [f"qdisc add dev {dev} root handle 1: htb default {DEFAULT_CLASS:x}"]
    every = [(f"1:{DEFAULT_CLASS:x}", default_mbps),
             *((f"1:{FIRST_PEER_CLASS + i:x}", mbps) for i, (_, mbps) in enumerate(peers))]
    if nic_mbps is None:
        classes = [_htb_class(cid, mbps, dev, verb) for cid, mbps in every]
    else:
        # A child sending within its own `rate` does not ask its parent: htb charges the parent
        # for those bytes but never holds them back.  So the children's rates must add up to no
        # more than the NIC, or together they would exceed it; above its rate a child borrows
        # from the NIC class, which lends only what its own rate has left.  Each child gets an
        # equal guaranteed share (floored to whole bit/s, so the sum stays <= NIC) and ceil =
        # min(pair, NIC): the NIC total and every pair limit are then both exact, and a busy
        # peer gets at least 1/n of the NIC however many others are busy.
        share_bit = max(1, int(nic_mbps * 1e6) // len(every))
        lines.append(_htb_class(f"1:{NIC_CLASS:x}", nic_mbps, dev, verb))
        classes = [_nic_child(dev, cid, min(share_bit, _kbit(min(mbps, nic_mbps)) * 1000), min(mbps, nic_mbps), verb)
                   for cid, mbps in every]
    lines.append(classes[0])
    for (addr, _), (cid, _), cls in zip(peers, every[1:], classes[1:], strict=True):
        lines.append(cls)
        if not change:
            lines.append(f"filter add dev {dev} parent 1: protocol ip prio 1 u32 match ip {match} {addr}/32 flowid {cid}")
    return "\n".join(lines) + "\n"


def htb_batch(default_mbps: float, peers: list[tuple[str, float]], nic_up: float | None = None,
              *, change: bool = False) -> str:
    """`tc -batch` lines shaping ``eth0``'s egress: `peers` is [(destination address, Mbit/s)];
    `nic_up` (Mbit/s) caps the host's whole egress, shared by the peers; `change`: new rates
    for the tree made before with the same peers (module doc)."""
    return _htb_tree(HOST_DEV, "dst", default_mbps, peers, nic_up, change)


def shape(ns: str, default_mbps: float, peers: list[tuple[str, float]], nic_up: float | None = None,
          *, change: bool = False) -> None:
    run([TC, "-n", ns, "-batch", "-"], input=htb_batch(default_mbps, peers, nic_up, change=change))


def bridge_port(port: int) -> str:
    """The bridge-side veth of the host attached as `port`: its egress is that host's ingress."""
    return f"v{port}"


def ingress_batch(port: int, nic_down: float, default_mbps: float, peers: list[tuple[str, float]],
                  *, change: bool = False) -> str:
    """`tc -batch` lines holding everything sent to host `port` to `nic_down` Mbit/s (module
    doc): a class per sender, `peers` [(source address, Mbit/s)], so that each sender queues
    apart (a control message waits behind its own sender's data only) and busy senders share
    the NIC in turns, as the peers do on the up side; `change`: new rates, as in htb_batch."""
    return _htb_tree(bridge_port(port), "src", default_mbps, peers, nic_down, change)


def shape_ingress(bridge_ns: str, port: int, nic_down: float, default_mbps: float,
                  peers: list[tuple[str, float]], *, change: bool = False) -> None:
    run([TC, "-n", bridge_ns, "-batch", "-"], input=ingress_batch(port, nic_down, default_mbps, peers, change=change))


def enter_argv(ns: str) -> list[str]:
    """Prefix that runs a command in namespace `ns` (same pid: nsenter execs).

    Unlike ``ip netns exec`` it does not remount /sys, so the command still sees
    /sys/fs/cgroup and can read its own CPU quota and memory limit.
    """
    return [NSENTER, f"--net={NETNS_DIR / ns}", "--"]
