"""Board-side commands: `edgezmq node` (flags and --config FILE) and `edgezmq keys generate`."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

from edgezmq.argtypes import MAX_MEMORY_BYTES, int_in, port, threads
from edgezmq.cli.args import FMT, CommandFailed, UsageError
from edgezmq.node import config as nodeconfig

log = logging.getLogger(__name__)

EPILOG_NODE = """examples:
  edgezmq node --config /etc/edgezmq/board-1.yaml           # what the systemd unit runs (nodes/)
  edgezmq node --control tcp://127.0.0.1:5550 --name n0 --threads 2
  edgezmq node --control tcp://0.0.0.0:5550 --advertise 10.0.0.5 --name board-3
  edgezmq node --control tcp://0.0.0.0:5550 --name board-3 \
      --secret-key keys/board-3.key_secret --allow keys/   # CurveZMQ, see docs/security.md
"""
NODE_CONFIG_HELP = ("node config YAML (e.g. /etc/edgezmq/NAME.yaml, see nodes/example-node.yaml); "
                    "flags given here win over the file")
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")


# ---- edgezmq node --config ---------------------------------------------------
def add_node_options(p: argparse.ArgumentParser) -> None:
    """Add --config and the config-only settings to `edgezmq node` (its existing flags stay)."""
    p.add_argument("--config", metavar="FILE", help=NODE_CONFIG_HELP)
    p.add_argument("--metrics-port", type=port, help="serve Prometheus metrics on this port (0: any; needs edgezmq[metrics])")
    p.add_argument("--metrics-host", help=f"address the metrics endpoint binds (default {nodeconfig.DEFAULT_METRICS_HOST})")
    p.add_argument("--cache-dir", help="profiles and seeded checkpoints (default $EDGEZMQ_CACHE or ~/.cache/edgezmq)")
    p.add_argument("--weights-dir", dest="weights_dirs", action="append", metavar="DIR",
                   help="a directory `load` may read checkpoints from (repeatable; default: the cache's "
                        "checkpoints/); a peer cannot make the node read a file elsewhere (docs/security.md)")
    p.add_argument("--log-level", choices=nodeconfig.LOG_LEVELS, help="edgezmq log level (-v wins)")
    # a flag counts as given when it is not None, so the file can fill what the command line left out
    p.set_defaults(control=None)


def node_args_from(args: argparse.Namespace) -> dict[str, Any]:
    """`edgezmq node` settings: flags, then --config FILE, then defaults.  Also applies the
    process-wide ones (cache dir -> $EDGEZMQ_CACHE, log level).  NodeConfigError on a bad file."""
    opts = nodeconfig.resolve(args)
    nodeconfig.apply_process_settings(opts, verbose=getattr(args, "verbose", 0))
    return opts


def start_metrics(node: Any, opts: dict[str, Any]):
    """The node's metrics endpoint when ``metrics_port`` is set, else None; errors name the field."""
    if opts.get("metrics_port") is None:
        return None
    from edgezmq.node.metrics import MetricsUnavailable, serve_metrics

    try:
        return serve_metrics(node, opts["metrics_port"], opts.get("metrics_host") or nodeconfig.DEFAULT_METRICS_HOST)
    except (MetricsUnavailable, OSError) as e:
        raise nodeconfig.NodeConfigError(f"metrics_port: {e}") from None


# ---- node -------------------------------------------------------------
def cmd_node(args: argparse.Namespace) -> int:
    import zmq

    from edgezmq.node.daemon import READY_PREFIX, Node
    from edgezmq.transport import sockets

    args = argparse.Namespace(**{**vars(args), **node_args_from(args)})  # --config FILE under the flags
    keys = None
    if (args.secret_key is None) != (args.allow is None):
        raise UsageError("--secret-key and --allow go together (a secured node needs both)")
    if args.secret_key is not None:
        from edgezmq.transport.security import load_keypair, load_public_dir

        keys = load_keypair(args.secret_key)
        if not load_public_dir(args.allow):
            log.warning("allow-list %s holds no public keys: nobody can connect", args.allow)
    try:
        host = sockets.host_of(args.control)
    except ValueError as e:
        raise UsageError(f"--control: {e}") from None
    if keys is None and host not in LOOPBACK_HOSTS:
        log.warning("binding control to %s without encryption: anyone who can reach this "
                    "address can deploy to and read from this node", host)
    # import the heavy libraries before announcing readiness, so that the first
    # commands (info, load) answer within the control timeouts
    import timm  # noqa: F401
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        node = Node(args.control, name=args.name, threads=args.threads,
                    memory_limit=args.memory_limit, advertise=args.advertise, weights_dirs=args.weights_dirs,
                    keys=keys, allow_dir=args.allow)
    except zmq.ZMQError as e:  # e.g. the control address is taken
        raise CommandFailed(f"--control {args.control}: cannot bind ({e})") from None
    try:
        metrics = start_metrics(node, vars(args))  # None unless metrics_port is set
    except ValueError:
        node.close()
        raise
    print(f"{READY_PREFIX} name={node.name} control={node.control_endpoint}"
          + (f" metrics={metrics.url}" if metrics else ""), flush=True)
    try:
        code = node.serve()
    finally:
        if metrics:
            metrics.stop()
    # The node has drained its stage and closed its sockets; its job and loader threads are
    # daemons and the profile cache is written atomically.  End the process here: the
    # interpreter's own teardown (a full garbage collection over torch's and timm's objects)
    # took 2-5 s per idle node on this machine and over 15 s for the 16 nodes of a testbed
    # stopping at once, past which a supervisor (the testbed, systemd) kills the node.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def cmd_keys_generate(args: argparse.Namespace) -> int:
    from edgezmq.transport.security import generate

    pub, sec = generate(args.dir, args.name)
    print(f"public key: {pub}\nsecret key: {sec} (keep it on this machine; copy only the public key)")
    return 0


def add_cli(sub: argparse._SubParsersAction) -> None:
    """Register `node` and `keys` on the `edgezmq` subparsers."""
    n = sub.add_parser("node", help="run a stage node daemon", epilog=EPILOG_NODE, formatter_class=FMT)
    n.add_argument("--control", default="tcp://127.0.0.1:5550", help="REP control address to bind (port 0: any)")
    n.add_argument("--name", help="node name (default: the control address)")
    n.add_argument("--threads", type=threads, help="torch threads for compute")
    n.add_argument("--memory-limit", type=int_in(1, MAX_MEMORY_BYTES),
                   help="refuse shards that need more than this many bytes")
    n.add_argument("--advertise", help="host other nodes use to reach this node's data socket")
    n.add_argument("--secret-key", metavar="FILE", help="this node's NAME.key_secret: all sockets use CurveZMQ")
    n.add_argument("--allow", metavar="DIR", help="directory of public keys (*.key) allowed to connect")
    add_node_options(n)
    n.set_defaults(func=cmd_node)

    kg = sub.add_parser("keys", help="CurveZMQ key pairs (docs/security.md)", formatter_class=FMT,
                        epilog="examples:\n  edgezmq keys generate --dir /etc/edgezmq/keys --name board-1\n"
                               "  edgezmq keys generate --dir ~/.edgezmq --name client\n")
    kg_sub = kg.add_subparsers(dest="keys_command", required=True)
    kgg = kg_sub.add_parser("generate", help="write NAME.key (public) and NAME.key_secret (mode 0600)")
    kgg.add_argument("--dir", required=True, help="directory to write the key files into")
    kgg.add_argument("--name", default="client", help="key name (a node's: its --name)")
    kgg.set_defaults(func=cmd_keys_generate)
