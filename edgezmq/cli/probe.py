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


SEVERAL_PINGS = 1  # round trips per flow when several run at once (cmd_netprobe says why)


@node_failures
def cmd_netprobe(args: argparse.Namespace) -> int:
    """One link, or several at once: from here to several nodes (this host's uplink), or from
    several nodes to one (that node's downlink).  A node runs one netprobe job at a time, so
    one node's uplink to several peers can only be measured on that node itself, from here."""
    from edgezmq.orchestrate.autodeploy import wait_job
    from edgezmq.protocol.messages import NetprobeRequest
    from edgezmq.transport import netprobe
    from edgezmq.transport.nodeclient import NodeClient

    tos, srcs = args.to, args.src or []
    if len(srcs) > 1 and len(tos) > 1:
        raise UsageError("--from/--to: several of both; give several --to (from here) or several --from "
                         "(towards one --to)")
    if len(srcs) == 1 and len(tos) > 1:
        raise UsageError("--to: several with --from: a node runs one netprobe job at a time, so its uplink "
                         "to several peers at once cannot be measured from elsewhere; run `edgezmq netprobe "
                         "--to A --to B ...` on that node itself")
    for flag, given in (("--to", tos), ("--from", srcs)):
        twice = sorted({v for v in given if given.count(v) > 1})
        if twice:
            raise UsageError(f"{flag}: {twice[0]!r} given twice (each link once)")
    targets = [node_arg("--to", t, args.keys) for t in tos]
    sources = [node_arg("--from", f, args.keys) for f in srcs]
    if len(sources) > 1 and targets[0].name in [s.name for s in sources]:
        raise UsageError(f"--from: {targets[0].name!r} is also the --to node (a node does not probe itself)")
    peers = []
    for to in targets:
        with NodeClient(to.control, timeout=args.timeout, name=to.name, curve=to.curve) as c:
            peers.append(c.info().probe)
    several = len(targets) > 1 or len(sources) > 1
    # several at once: a later flow's pings queue behind the earlier flows' bulk data (tens of
    # ms each through a shaped NIC), so 20 of them would start its timed phase seconds late
    pings = args.pings if args.pings is not None else (SEVERAL_PINGS if several else netprobe.DEFAULT_PINGS)
    opts = dict(seconds=args.seconds, bytes_per_msg=args.bytes, pings=pings)
    to = targets[0]
    if sources:
        if to.curve is not None:  # the measuring node connects to the peer's probe server as a CURVE client
            opts["peer_key"] = to.curve.server_key.decode()
        replies = []
        for src in sources:  # start every job, then wait: they run at once
            with NodeClient(src.control, timeout=args.timeout, retries=0, name=src.name, curve=src.curve) as c:
                replies.append(c.netprobe(NetprobeRequest(peer=peers[0], **opts)))
        results = [wait_job(src, reply, 60.0 + args.seconds, curve=src.curve)
                   for src, reply in zip(sources, replies)]
        links = [(src.name, to.name) for src in sources]
    else:
        if len(targets) == 1:
            results = [netprobe.probe(peers[0], curve=to.curve, **opts)]
        else:
            results = netprobe.probe_many(peers, curves=[t.curve for t in targets], **opts)
        links = [("here", t.name) for t in targets]
    if len(results) == 1:
        r = results[0]
        print(json.dumps(r) if args.json else
              f"{links[0][0]} -> {links[0][1]}: {r['bandwidth_mbps']:.1f} Mbit/s, latency {r['latency_ms']:.3f} ms "
              f"(rtt p50 {r['rtt_ms_p50']:.3f} ms, p90 {r['rtt_ms_p90']:.3f} ms)")
        return 0
    together = netprobe.aggregate(results)
    if args.json:
        print(json.dumps({"flows": [{"from": a, "to": b, **r} for (a, b), r in zip(links, results)],
                          "together": together}))
        return 0
    for (a, b), r in zip(links, results):
        print(f"{a} -> {b}: {r['bandwidth_mbps']:.1f} Mbit/s (at the same time as the others)")
    shared = "this host's uplink" if not sources else f"{to.name}'s downlink"
    print(f"together ({len(results)} at once, {shared}): {together['bandwidth_mbps']:.1f} Mbit/s over "
          f"{together['seconds']:.2f} s (sum of the rates {together['sum_of_rates_mbps']:.1f}, "
          f"all running {together['overlap']:.0%} of the time)")
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
    from edgezmq.transport.netprobe import DEFAULT_PINGS, MAX_MSG_BYTES

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
                                "  edgezmq netprobe --from board-1 --to board-2 --keys cluster.yaml   # CurveZMQ\n"
                                "  edgezmq netprobe --to board-2 --to board-3 --to board-4 --keys cluster.yaml"
                                "   # at once: this host's uplink\n"
                                "  edgezmq netprobe --from board-2 --from board-3 --to board-1 --keys cluster.yaml"
                                "   # at once: board-1's downlink\n",
                         formatter_class=FMT)
    npb.add_argument("--to", required=True, action="append",
                     help="control address of the node measured to; repeat to measure from here to "
                          "several nodes at once (this host's uplink, shared)")
    npb.add_argument("--from", dest="src", action="append",
                     help="control address of the node measuring (default: here); repeat, with one --to, "
                          "to measure from several nodes at once (the --to node's downlink, shared)")
    npb.add_argument("--keys", metavar="PLAN_OR_CLUSTER.yaml", help=KEYS_HELP)
    npb.add_argument("--timeout", type=seconds, default=10.0,
                     help="seconds to wait for each node's reply (default 10)")
    npb.add_argument("--seconds", type=float_in(0, NETPROBE_MAX_SECONDS, lo_open=True), default=1.0,
                     help=f"bulk transfer duration (up to {NETPROBE_MAX_SECONDS:g})")
    npb.add_argument("--bytes", type=int_in(1, MAX_MSG_BYTES), default=4 * 1024 * 1024, help="bulk message size")
    npb.add_argument("--pings", type=int_in(1, MAX_PINGS), default=None,
                     help=f"round trips timed (1..{MAX_PINGS}; default {DEFAULT_PINGS}, {SEVERAL_PINGS} when "
                          "measuring several links at once, so that they start together)")
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
