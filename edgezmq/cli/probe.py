"""Commands that measure or poke one node: profile, netprobe, pause, resume."""

from __future__ import annotations

import argparse
import json

from edgezmq.argtypes import float_in, int_in, seconds, threads
from edgezmq.cli.args import (
    FMT,
    KEYS_HELP,
    UsageError,
    add_model_args,
    model_kwargs,
    node_arg,
    node_failures,
    stderr,
)


@node_failures
def cmd_profile(args: argparse.Namespace) -> int:
    from edgezmq.model.profiling import format_profile

    kwargs = model_kwargs(args.kwargs)

    def progress(p: list) -> None:  # on stderr, so --json output stays clean
        stderr(f"unit {p[0]}/{p[1]} {p[2]}: {p[3] * 1e3:.1f} ms")

    if args.keys and not args.node:
        raise UsageError("--keys: applies to --node (profiling on this machine talks to no node)")
    if args.node:
        from edgezmq.orchestrate.autodeploy import PROFILE_TIMEOUT_S, wait_job
        from edgezmq.protocol.messages import ProfileRequest
        from edgezmq.transport.nodeclient import NodeClient

        target = node_arg("--node", args.node, args.keys)
        req = ProfileRequest(model=args.model, microbatch=args.microbatch, granularity=args.granularity,
                             kwargs=kwargs, reprofile=args.reprofile, reps=args.reps, threads=args.threads or None)
        with NodeClient(target.control, timeout=args.timeout, retries=0, name=target.name, curve=target.curve) as c:
            reply = c.profile(req)
        if reply.cached:
            stderr(f"{target.name}: from the node's profile cache (--reprofile to measure again)")
        prof = wait_job(target, reply, PROFILE_TIMEOUT_S, progress, target.curve)
    else:
        from edgezmq.model.profiling import profile_units

        prof = profile_units(args.model, granularity=args.granularity, microbatch=args.microbatch,
                             threads=args.threads, reps=args.reps, kwargs=kwargs,
                             progress=lambda i, n, name, t: progress([i + 1, n, name, t]))
    print(json.dumps(prof) if args.json else format_profile(prof))
    return 0


@node_failures
def cmd_netprobe(args: argparse.Namespace) -> int:
    from edgezmq.orchestrate.autodeploy import wait_job
    from edgezmq.protocol.messages import NetprobeRequest
    from edgezmq.transport import netprobe
    from edgezmq.transport.nodeclient import NodeClient

    to = node_arg("--to", args.to, args.keys)
    with NodeClient(to.control, timeout=args.timeout, name=to.name, curve=to.curve) as c:
        peer = c.info().probe
    opts = dict(seconds=args.seconds, bytes_per_msg=args.bytes, pings=args.pings)
    if args.src:
        src = node_arg("--from", args.src, args.keys)
        if to.curve is not None:  # the measuring node connects to the peer's probe server as a CURVE client
            opts["peer_key"] = to.curve.server_key.decode()
        with NodeClient(src.control, timeout=args.timeout, retries=0, name=src.name, curve=src.curve) as c:
            reply = c.netprobe(NetprobeRequest(peer=peer, **opts))
        r = wait_job(src, reply, 60.0 + args.seconds, curve=src.curve)
    else:
        r = netprobe.probe(peer, curve=to.curve, **opts)
    if args.json:
        print(json.dumps(r))
    else:
        print(f"{src.name if args.src else 'here'} -> {to.name}: {r['bandwidth_mbps']:.1f} Mbit/s, "
              f"latency {r['latency_ms']:.3f} ms (rtt p50 {r['rtt_ms_p50']:.3f} ms, p90 {r['rtt_ms_p90']:.3f} ms)")
    return 0


def cmd_pause(args: argparse.Namespace) -> int:
    """`pause` or `resume` one node's stage (its control socket keeps answering)."""
    from edgezmq.transport.nodeclient import NodeClient

    target = node_arg("node", args.node, args.keys)
    with NodeClient(target.control, timeout=args.timeout, retries=0, name=target.name, curve=target.curve) as c:
        r = c.pause() if args.command == "pause" else c.resume()
    print(f"{r.name}: stage {'paused' if r.paused else 'resumed'}")
    return 0


def add_cli(sub: argparse._SubParsersAction) -> None:
    """Register `profile`, `netprobe`, `pause` and `resume` on the `edgezmq` subparsers."""
    from edgezmq.protocol.messages import MAX_PINGS, NETPROBE_MAX_SECONDS
    from edgezmq.transport.netprobe import MAX_MSG_BYTES

    pr = sub.add_parser("profile", help="time every unit of a model on a node (or here)",
                        epilog="examples:\n  edgezmq profile --node tcp://10.0.0.11:5550 --model vit_large_patch16_224 --microbatch 8\n"
                               "  edgezmq profile --node board-1 --keys cluster.yaml --model vit_base_patch16_224\n"
                               "  edgezmq profile --model vit_tiny_patch16_224 --threads 1\n",
                        formatter_class=FMT)
    pr.add_argument("--node", help="control address of the node to profile (default: this machine); "
                    "a node name with --keys")
    pr.add_argument("--keys", metavar="PLAN_OR_CLUSTER.yaml", help=KEYS_HELP)
    pr.add_argument("--timeout", type=seconds, default=60.0,
                    help="seconds to wait for the node's reply (default 60)")
    add_model_args(pr)
    pr.add_argument("--threads", type=threads)
    pr.add_argument("--reps", type=int_in(1, 1000), default=3, help="timed rounds per unit (1..1000)")
    pr.add_argument("--reprofile", action="store_true", help="ignore the node's cache")
    pr.add_argument("--json", action="store_true")
    pr.set_defaults(func=cmd_profile)

    npb = sub.add_parser("netprobe", help="measure bandwidth and latency to a node",
                         epilog="examples:\n  edgezmq netprobe --to tcp://10.0.0.12:5550\n"
                                "  edgezmq netprobe --from tcp://10.0.0.11:5550 --to tcp://10.0.0.12:5550\n"
                                "  edgezmq netprobe --from board-1 --to board-2 --keys cluster.yaml   # CurveZMQ\n",
                         formatter_class=FMT)
    npb.add_argument("--to", required=True, help="control address of the node measured to")
    npb.add_argument("--from", dest="src", help="control address of the node measuring (default: here)")
    npb.add_argument("--keys", metavar="PLAN_OR_CLUSTER.yaml", help=KEYS_HELP)
    npb.add_argument("--timeout", type=seconds, default=10.0,
                     help="seconds to wait for each node's reply (default 10)")
    npb.add_argument("--seconds", type=float_in(0, NETPROBE_MAX_SECONDS, lo_open=True), default=1.0,
                     help=f"bulk transfer duration (up to {NETPROBE_MAX_SECONDS:g})")
    npb.add_argument("--bytes", type=int_in(1, MAX_MSG_BYTES), default=4 * 1024 * 1024, help="bulk message size")
    npb.add_argument("--pings", type=int_in(1, MAX_PINGS), default=20, help=f"round trips timed (1..{MAX_PINGS})")
    npb.add_argument("--json", action="store_true")
    npb.set_defaults(func=cmd_netprobe)

    for verb, text in (("pause", "hold a running node's stage: it computes nothing, its control "
                                 "socket keeps answering (a running `edgezmq run` then fails over without it)"),
                       ("resume", "let a paused node's stage go on")):
        pz = sub.add_parser(verb, help=text, description=text, formatter_class=FMT,
                            epilog=f"examples:\n  edgezmq {verb} tcp://10.0.0.12:5550\n"
                                   f"  edgezmq {verb} board-2 --keys cluster.yaml\n")
        pz.add_argument("node", help="control address of the node (a node name with --keys)")
        pz.add_argument("--keys", metavar="PLAN_OR_CLUSTER.yaml", help=KEYS_HELP)
        pz.add_argument("--timeout", type=seconds, default=5.0,
                        help="seconds to wait for the reply (default 5)")
        pz.set_defaults(func=cmd_pause)
