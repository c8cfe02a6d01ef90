"""Runs inside a testbed namespace for the host side: ``python -m edgezmq.testbed.agent ping ADDR...``."""

from __future__ import annotations

import json
import sys

PING_TIMEOUT_S = 2.0


def ping_all(addresses: list[str], timeout: float = PING_TIMEOUT_S) -> dict[str, dict]:
    """address -> {"ok": True, "state": ...} or {"ok": False, "error": ...}; one try each."""
    from edgezmq.protocol.control import ControlError
    from edgezmq.transport.nodeclient import NodeClient

    out: dict[str, dict] = {}
    for addr in addresses:
        with NodeClient(addr, timeout=timeout, retries=0) as c:
            try:
                r = c.ping()
                out[addr] = {"ok": True, "name": r.name, "state": r.state}
            except ControlError as e:
                out[addr] = {"ok": False, "error": str(e)}
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] != "ping":
        print("usage: python -m edgezmq.testbed.agent ping [--timeout S] ADDR...", file=sys.stderr)
        return 2
    args, timeout = argv[1:], PING_TIMEOUT_S
    if args[:1] == ["--timeout"]:
        timeout, args = float(args[1]), args[2:]
    print(json.dumps(ping_all(args, timeout)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
