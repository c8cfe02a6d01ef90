"""Network namespaces joined by a bridge, with per-destination htb shaping, via iproute2.

Topology: one namespace per host (the client and each device) with a single interface
``eth0``; its veth peer lives in a separate bridge namespace, enslaved to ``br0``.
Nothing is created in the root namespace except the namespace names themselves, and no
route leads out: the test subnet exists only on the bridge.

Shaping: each host's ``eth0`` egress has an htb root with one class per peer (rate =
ceil = that pair's link rate) chosen by a u32 filter on the destination address, plus a
default class at the default rate for anything else (ARP).  So every ordered pair is
its own link, enforced at the sender; the reverse direction is shaped by the peer.
"""

from __future__ import annotations

import ipaddress
import shlex
import subprocess
from pathlib import Path

from .errors import TestbedError

__all__ = ["run", "netns_exists", "netns_list", "add_netns", "del_netns", "netns_pids",
           "make_bridge", "attach", "shape", "htb_batch", "enter_argv", "TCP_PAYLOAD_FACTOR"]

IP, TC, NSENTER = "ip", "tc", "nsenter"
NETNS_DIR = Path("/var/run/netns")  # where iproute2 keeps named namespaces
BRIDGE_DEV = "br0"
HOST_DEV = "eth0"
CMD_TIMEOUT_S = 30.0
# htb: a bucket of 1 ms at the link rate keeps it exact up to 1 Gbit/s and more
# (measured: the default burst gives 0.926x at 1 Gbit/s, this 0.956x = the TCP payload share).
BURST_S = 0.001
MIN_BURST_BYTES = 4 * 1514
QUANTUM_BYTES = 60_000  # classes do not borrow from each other: only silences htb's warning
DEFAULT_CLASS = 1
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
    veth = f"v{port}"
    run([IP, "-n", bridge_ns, "link", "add", veth, "type", "veth", "peer", "name", HOST_DEV, "netns", host_ns])
    run([IP, "-n", bridge_ns, "link", "set", veth, "master", BRIDGE_DEV])
    run([IP, "-n", bridge_ns, "link", "set", veth, "up"])
    run([IP, "-n", host_ns, "addr", "add", f"{address}/{network.prefixlen}", "dev", HOST_DEV])
    run([IP, "-n", host_ns, "link", "set", HOST_DEV, "up"])


def _kbit(mbps: float) -> int:
    return max(1, round(mbps * 1000))


def _htb_class(classid: str, mbps: float) -> str:
    rate = _kbit(mbps)
    burst = max(MIN_BURST_BYTES, round(mbps * 1e6 / 8 * BURST_S))
    return (f"class add dev {HOST_DEV} parent 1: classid {classid} htb rate {rate}kbit ceil {rate}kbit "
            f"burst {burst} cburst {burst} quantum {QUANTUM_BYTES}")


def htb_batch(default_mbps: float, peers: list[tuple[str, float]]) -> str:
    """`tc -batch` lines shaping ``eth0``'s egress: `peers` is [(destination address, Mbit/s)]."""
    lines = [f"qdisc add dev {HOST_DEV} root handle 1: htb default {DEFAULT_CLASS:x}",
             _htb_class(f"1:{DEFAULT_CLASS:x}", default_mbps)]
    for i, (addr, mbps) in enumerate(peers):
        cid = f"1:{FIRST_PEER_CLASS + i:x}"
        lines.append(_htb_class(cid, mbps))
        lines.append(f"filter add dev {HOST_DEV} parent 1: protocol ip prio 1 u32 "
                     f"match ip dst {addr}/32 flowid {cid}")
    return "\n".join(lines) + "\n"


def shape(ns: str, default_mbps: float, peers: list[tuple[str, float]]) -> None:
    run([TC, "-n", ns, "-batch", "-"], input=htb_batch(default_mbps, peers))


def enter_argv(ns: str) -> list[str]:
    """Prefix that runs a command in namespace `ns` (same pid: nsenter execs).

    Unlike ``ip netns exec`` it does not remount /sys, so the command still sees
    /sys/fs/cgroup and can read its own CPU quota and memory limit.
    """
    return [NSENTER, f"--net={NETNS_DIR / ns}", "--"]
