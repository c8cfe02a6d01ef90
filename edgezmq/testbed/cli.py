"""`edgezmq testbed up|down|status|set-link TESTBED.yaml`: the command line of the emulated testbed."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

from edgezmq.argtypes import float_in, seconds
from edgezmq.interrupts import Terminated, sigterm_interrupts

from .config import MIN_MBPS, SHAPED_MAX_MBPS, ConfigError
from .errors import PrerequisiteError, TestbedError

log = logging.getLogger("edgezmq.testbed")

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
DESCRIPTION = ("Emulated edge devices: one network namespace, CPU/memory cgroup and node daemon per device, "
               "htb-shaped links between them. Needs root and iproute2.")
EPILOG = """examples:
  sudo edgezmq testbed up plans/testbed-hetero.yaml
  sudo edgezmq testbed status plans/testbed-hetero.yaml
  sudo ip netns exec hetero-client edgezmq deploy plan.yaml     # clients run in the client namespace
  sudo edgezmq testbed set-link plans/testbed-hetero.yaml fast minnow-0 --mbps 5   # a pair, live
  sudo edgezmq testbed set-link plans/testbed-hetero.yaml minnow-1 --nic-up 2.5    # a NIC, live
  sudo edgezmq testbed down plans/testbed-hetero.yaml

exit codes: 0 ok; 1 the operation failed (status: not up); 2 bad file, not root, or no iproute2
"""


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.0f}Mi"


def _nic(host: dict[str, Any]) -> str:
    nic = host.get("nic_mbps") or {}
    return "/".join(f"{nic[k]:g}" if k in nic else "-" for k in ("up", "down"))


def _print_up(c: dict[str, Any], out: Any = None) -> None:
    out = out or sys.stdout
    rows: list[tuple[str, ...]] = [("node", "control", "cpu", "threads", "memory", "type")]
    rows += [(n["name"], n["control"], f"{n['cpu']:g}", str(n["threads"]), _mib(n.get("memory_bytes")),
              n.get("type") or "-") for n in c["nodes"]]
    if any("nic_mbps" in h for h in (*c["nodes"], c["client"])):  # a column only where a NIC is shaped
        rows = [(*rows[0], "nic up/down Mbit/s"), *((*r, _nic(n)) for r, n in zip(rows[1:], c["nodes"], strict=True))]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip(), file=out)
    d = c["links"]["default"]
    print(f"links: {d['mbps']:g} Mbit/s, {d['latency_ms']:g} ms by default"
          + "".join(f"; {o['a']}<->{o['b']} {o['mbps']:g} Mbit/s {o['latency_ms']:g} ms"
                    for o in c["links"]["overrides"]), file=out)
    if "nic_mbps" in c["client"]:
        print(f"client NIC: {_nic(c['client'])} Mbit/s up/down", file=out)
    print("(rates enforced by htb; latency recorded in cluster.yaml, not enforced: no netem)", file=out)
    tb = c["testbed"]
    print(f"cluster: {tb['state_dir']}/cluster.yaml", file=out)
    print(f"client:  {c['client']['address']} in namespace {c['client']['namespace']}: "
          f"ip netns exec {c['client']['namespace']} COMMAND", file=out)


def _print_status(s: dict[str, Any], out: Any = None) -> None:
    out = out or sys.stdout
    print(f"testbed {s['name']}: {'up' if s['up'] else 'NOT up'} (phase {s['phase']}, state {s['state_dir']})",
          file=out)
    for name, n in s["nodes"].items():
        u = n["usage"]
        mem = f" mem {_mib(u.get('memory_bytes'))} peak {_mib(u.get('memory_peak_bytes'))}" if u else ""
        answer = f"answers ({n['state']})" if n["answers"] else f"silent ({n['error']})"
        print(f"  {name:<16} {n['control']:<22} pid {n['pid'] or '-':<7} {answer}{mem}", file=out)
    missing_ns = [k for k, v in s["namespaces"].items() if not v]
    present_cg = [k for k, v in s["cgroups"].items() if v]
    print(f"  namespaces: {sum(s['namespaces'].values())}/{len(s['namespaces'])} present"
          + (f" (missing {missing_ns})" if missing_ns and len(missing_ns) < len(s["namespaces"]) else ""), file=out)
    print(f"  cgroups: {len(present_cg)} present", file=out)


def run_cli(args: argparse.Namespace) -> int:
    """Handler of `edgezmq testbed ...`: returns the exit code, never a traceback for expected failures."""
    from .core import Testbed

    what = args.testbed_command
    try:
        tb = Testbed.from_yaml(args.testbed, name=args.name, state_dir=args.state_dir,
                               **({"start_timeout": args.timeout} if getattr(args, "timeout", None) else {}))
        if what == "up":
            with sigterm_interrupts():  # SIGTERM removes what up made, as Ctrl-C does
                cluster = tb.up(reclaim=args.reclaim)
            if args.json:
                print(json.dumps(cluster, indent=1))
            else:
                _print_up(cluster)
            return EXIT_OK
        if what == "set-link":
            r = tb.set_link(args.host, args.peer, mbps=args.mbps,
                            nic_up=args.nic_up if args.nic_up is not None else args.nic,
                            nic_down=args.nic_down if args.nic_down is not None else args.nic)
            if args.json:
                print(json.dumps(r, indent=1))
            else:
                ch = r["change"]
                print(f"testbed {r['name']}: {ch['a']}<->{ch['b']} now {ch['mbps']:g} Mbit/s" if "a" in ch else
                      f"testbed {r['name']}: {ch['host']} NIC now {_nic({'nic_mbps': r['nic_mbps'][ch['host']]})} Mbit/s up/down")
            return EXIT_OK
        if what == "down":
            r = tb.down()
            if args.json:
                print(json.dumps(r, indent=1))
            else:
                print(f"testbed {r['name']} down: stopped {len(r['stopped'])} process(es), removed "
                      f"{len(r['namespaces'])} namespace(s) and {len(r['cgroups'])} cgroup(s)")
            return EXIT_OK
        s = tb.status()
        if args.json:
            print(json.dumps(s, indent=1))
        else:
            _print_status(s)
        return EXIT_OK if s["up"] else EXIT_FAILED
    except (ConfigError, PrerequisiteError) as e:
        print(f"edgezmq testbed {what}: {e}", file=sys.stderr)
        return EXIT_USAGE
    except TestbedError as e:
        print(f"edgezmq testbed {what}: {e}", file=sys.stderr)
        return EXIT_FAILED
    except Terminated as e:  # up() has already cleaned up after itself
        print(f"edgezmq testbed {what}: terminated", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:  # up() has already cleaned up after itself
        print(f"edgezmq testbed {what}: interrupted", file=sys.stderr)
        return 130


def _add_commands(parent: argparse.ArgumentParser) -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    ts = parent.add_subparsers(dest="testbed_command", required=True, metavar="{up,down,status,set-link}")
    helps = {"up": "create namespaces, links, cgroups; start a node per device; write cluster.yaml",
             "down": "stop the nodes; remove every namespace and cgroup the testbed made",
             "status": "which namespaces/cgroups exist and which nodes answer ping",
             "set-link": "change a pair's rate (HOST PEER --mbps) or a NIC's (HOST --nic...) on the running "
                         "testbed, without restarting anything (tc class change)"}
    for cmd, h in helps.items():
        p = ts.add_parser(cmd, help=h, description=h, epilog=EPILOG, formatter_class=fmt)
        p.add_argument("testbed", metavar="TESTBED.yaml", help="the testbed file (see docs/testbed.md)")
        p.add_argument("--state-dir", help="where state.json, cluster.yaml and node logs go "
                                           "(default: /run/edgezmq/testbed/NAME)")
        p.add_argument("--name", help="override the file's name: (the namespace and cgroup prefix)")
        p.add_argument("--json", action="store_true", help="print one JSON object")
        if cmd == "set-link":
            rate = float_in(MIN_MBPS, SHAPED_MAX_MBPS)
            p.add_argument("host", help="a device, or client")
            p.add_argument("peer", nargs="?", help="the other end of the pair (with --mbps)")
            p.add_argument("--mbps", type=rate, help="the pair's new rate, both directions (Mbit/s)")
            p.add_argument("--nic", type=rate, help="HOST's NIC, up and down (Mbit/s)")
            p.add_argument("--nic-up", type=rate, help="HOST's NIC up only (Mbit/s)")
            p.add_argument("--nic-down", type=rate, help="HOST's NIC down only (Mbit/s)")
        if cmd == "up":
            p.add_argument("--timeout", type=seconds, help="seconds for every node to be ready (default 90 + 15 per node)")
            p.add_argument("--reclaim", action="store_true",
                           help="a testbed of this name is (half) up: take it down first instead of failing "
                                "(not one a running process brought up and holds: a bench's)")
    parent.set_defaults(func=run_cli)


def add_cli(subparsers: Any) -> argparse.ArgumentParser:
    """Register `testbed up|down|status|set-link TESTBED.yaml [--state-dir DIR]` on an argparse subparsers object."""
    t = subparsers.add_parser("testbed", help="emulated edge devices on this machine (namespaces, tc, cgroups; root)",
                              description=DESCRIPTION, epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_commands(t)
    return t


def main(argv: list[str] | None = None) -> int:
    """`python -m edgezmq.testbed up|down|status|set-link ...` (the same as `edgezmq testbed ...`)."""
    p = argparse.ArgumentParser(prog="python -m edgezmq.testbed", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    _add_commands(p)
    args = p.parse_args(argv)
    logging.basicConfig(level=max(logging.WARNING - 10 * args.verbose, logging.DEBUG), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return args.func(args)
