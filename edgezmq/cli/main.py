"""Command line: `edgezmq node|deploy|submit|run|status|undeploy|profile|netprobe|pause|resume|demo|plan|testbed|trace|...`."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

log = logging.getLogger("edgezmq")

EPILOG_NODE = """examples:
  edgezmq node --config /etc/edgezmq/board-1.yaml           # what the systemd unit runs (nodes/)
  edgezmq node --control tcp://127.0.0.1:5550 --name n0 --threads 2
  edgezmq node --control tcp://0.0.0.0:5550 --advertise 10.0.0.5 --name board-3
  edgezmq node --control tcp://0.0.0.0:5550 --name board-3 \
      --secret-key keys/board-3.key_secret --allow keys/   # CurveZMQ, see docs/security.md
"""
EPILOG_DEPLOY = """examples:
  edgezmq deploy plans/local-3.yaml
  edgezmq deploy plans/local-3.yaml --json
  edgezmq deploy cluster.yaml --model vit_large_patch16_224 --dry-run --plan-out plan.yaml
  edgezmq deploy cluster.yaml --model vit_base_patch16_224 --checkpoint /data/vit_base.safetensors
"""
EPILOG_SUBMIT = """examples:
  edgezmq submit plans/local-3.yaml --random 64 --out logits.npy
  edgezmq submit plans/local-3.yaml --images ./photos --window 4
  edgezmq submit plans/local-3.yaml --npy batch.npy
"""
EPILOG_DEMO = """examples:
  edgezmq demo
  edgezmq demo --model vit_tiny_patch16_224 --nodes 2 --batches 8 --json
"""


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr)


def _setup_logging(verbose: int) -> None:
    level = logging.WARNING - 10 * verbose
    logging.basicConfig(level=max(level, logging.DEBUG), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def progress_bar(total: int, label: str = "", stream=sys.stderr):
    """A callback(done, samples) that draws a one-line progress bar."""
    t0 = time.time()

    def update(done: int, samples: int) -> None:
        width = 30
        filled = int(width * done / max(total, 1))
        rate = samples / max(time.time() - t0, 1e-9)
        stream.write(f"\r{label}[{'#' * filled}{'.' * (width - filled)}] {done}/{total} "
                     f"batches  {rate:.1f} samples/s")
        if done >= total:
            stream.write("\n")
        stream.flush()

    return update


# ---- node -------------------------------------------------------------
def cmd_node(args: argparse.Namespace) -> int:
    from edgezmq.cli.ops import node_args_from, start_metrics
    from edgezmq.node.daemon import READY_PREFIX, Node
    from edgezmq.transport import sockets

    args = argparse.Namespace(**{**vars(args), **node_args_from(args)})  # --config FILE under the flags
    keys = None
    if (args.secret_key is None) != (args.allow is None):
        raise ValueError("--secret-key and --allow go together (a secured node needs both)")
    if args.secret_key is not None:
        from edgezmq.transport.security import load_keypair, load_public_dir

        keys = load_keypair(args.secret_key)
        if not load_public_dir(args.allow):
            log.warning("allow-list %s holds no public keys: nobody can connect", args.allow)
    host = sockets.host_of(args.control)
    if keys is None and host not in ("127.0.0.1", "localhost", "::1", "[::1]"):
        log.warning("binding control to %s without encryption: anyone who can reach this "
                    "address can deploy to and read from this node", host)
    # import the heavy libraries before announcing readiness, so that the first
    # commands (info, load) answer within the control timeouts
    import timm  # noqa: F401
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    node = Node(args.control, name=args.name, threads=args.threads,
                memory_limit=args.memory_limit, advertise=args.advertise,
                keys=keys, allow_dir=args.allow)
    try:
        metrics = start_metrics(node, vars(args))  # None unless metrics_port is set
    except ValueError:
        node.close()
        raise
    print(f"{READY_PREFIX} name={node.name} control={node.control_endpoint}"
          + (f" metrics={metrics.url}" if metrics else ""), flush=True)
    try:
        return node.serve()
    finally:
        if metrics:
            metrics.stop()


def cmd_keys_generate(args: argparse.Namespace) -> int:
    from edgezmq.transport.security import generate

    pub, sec = generate(args.dir, args.name)
    print(f"public key: {pub}\nsecret key: {sec} (keep it on this machine; copy only the public key)")
    return 0


# ---- deploy / undeploy / status -----------------------------------------
def _load_plan(path: str):
    from edgezmq.orchestrate.planfile import load_plan

    return load_plan(path)


def cmd_deploy(args: argparse.Namespace) -> int:
    from edgezmq.fields import read_yaml
    from edgezmq.orchestrate.inventory import is_cluster_file
    from edgezmq.orchestrate.planfile import PlanFileError

    d = read_yaml(args.file, PlanFileError)  # a bad file fails fast, before torch is imported
    if is_cluster_file(d):
        return _deploy_cluster(args, d)
    if args.model or args.dry_run or args.plan_out:
        raise SystemExit(f"edgezmq deploy: {args.file} is a plan; --model/--dry-run/--plan-out "
                         "apply to a cluster inventory")
    from edgezmq.orchestrate.planfile import parse_plan

    plan = parse_plan(d, source=args.file)
    t0 = time.time()
    from edgezmq.orchestrate.deploy import deploy

    dep = deploy(plan, load_timeout=args.timeout, progress=None if args.json else _stderr)
    _print_deployed(args, plan, dep, time.time() - t0)
    return 0


def _print_deployed(args: argparse.Namespace, plan, dep, seconds: float, extra: dict | None = None) -> None:
    from edgezmq.model import chain as models
    from edgezmq.orchestrate.deploy import stage_table

    if args.json:
        print(json.dumps({"run": dep.run if dep else None, "stages": [
            {"units": list(s.units), "nodes": [n.name for n in s.nodes],
             "data": dep.endpoints[i] if dep else None}
            for i, s in enumerate(plan.stages)], "results": plan.results,
            "seconds": round(seconds, 3), **(extra or {})}))
        return
    names = [u.name for u in models.unit_infos(plan.model.name, plan.model.granularity, **plan.model.kwargs)]
    if dep:
        print(f"deployed run {dep.run}: {plan.model.name} in {len(plan.stages)} stage(s), "
              f"results to {plan.results} ({seconds:.1f}s)")
    print(stage_table(plan, names, dep.endpoints if dep else None))


def _model_spec(args: argparse.Namespace):
    """The ModelSpec of --model/--kwargs/--checkpoint/--pretrained/--microbatch/--granularity;
    without weights given, the seeded checkpoint (which every node must have)."""
    from edgezmq.model import chain as models
    from edgezmq.orchestrate.planfile import ModelSpec

    kwargs = json.loads(args.kwargs) if args.kwargs else {}
    checkpoint = args.checkpoint
    if checkpoint is None and not args.pretrained:
        checkpoint = str(models.cached_checkpoint(args.model, **kwargs))
        _stderr(f"checkpoint: seeded {checkpoint} (every node must have this file; "
                "pass --checkpoint or --pretrained otherwise)")
    return ModelSpec(name=args.model, microbatch=args.microbatch, granularity=args.granularity,
                     checkpoint=checkpoint, pretrained=args.pretrained, kwargs=kwargs)


def _deploy_cluster(args: argparse.Namespace, d: dict) -> int:
    import yaml

    from edgezmq.orchestrate.autodeploy import autodeploy
    from edgezmq.orchestrate.inventory import parse_cluster

    cluster = parse_cluster(d, source=args.file)
    if not args.model:
        raise SystemExit(f"edgezmq deploy: {args.file} is a cluster inventory: give --model")
    spec = _model_spec(args)
    if args.calibrate is not None and args.calibrate < 0:
        raise SystemExit(f"edgezmq deploy: --calibrate: expected >= 0 microbatches, got {args.calibrate}")
    calibrate = {} if args.calibrate is None else {"calibrate": args.calibrate}
    t0 = time.time()
    dep, plan, problem, planned, g = autodeploy(
        cluster, spec, reprofile=args.reprofile, spot_check=not args.no_spot_check, dry_run=args.dry_run,
        time_limit_s=args.time_limit, say=_stderr, load_timeout=args.timeout, replication=not args.no_replication,
        **calibrate)
    predicted = {"throughput_per_s": planned.throughput_per_s, "bottleneck_s": planned.bottleneck_s,
                 "latency_s": planned.latency_s, "optimal": planned.optimal,
                 "bottleneck_at": planned.bottleneck_at}
    if args.plan_out:
        Path(args.plan_out).write_text(yaml.safe_dump(
            {**plan.to_dict(), "predicted": predicted, **_solved(g)}, sort_keys=False))
        _stderr(f"plan and problem written to {args.plan_out}")
    if not args.json:
        print(planned.table(problem))
        print(f"predicted: {planned.throughput_per_s:.2f} samples/s (bottleneck {planned.bottleneck_at}, "
              f"{planned.bottleneck_s * 1e3:.1f} ms per microbatch{', optimal' if planned.optimal else ''})")
    _print_deployed(args, plan, dep, time.time() - t0, {"predicted": predicted})
    return 0


def _solved(g) -> dict:
    """The problem the deployed plan solved (calibrated, when calibration corrected it) and
    what calibration measured."""
    cal = g.calibration
    if cal is None:
        return {"problem": g.problem}
    return {"problem": cal.problem, "calibration": cal.to_dict()}


def cmd_undeploy(args: argparse.Namespace) -> int:
    from edgezmq.orchestrate.deploy import unload

    plan = _load_plan(args.plan)
    code = 0
    for name, r in unload(plan).items():
        ok = not isinstance(r, Exception)
        code |= 0 if ok else 1
        print(f"{name}: {'unloaded' if ok else r}")
    return code


# ---- submit -------------------------------------------------------------
def _inputs(args: argparse.Namespace, model) -> tuple:
    """(N, C, H, W) float32 inputs from --random/--npy/--images for a ModelSpec, and names."""
    import numpy as np

    from edgezmq.model import chain as models

    if args.random is not None:
        shape = models.input_shape(model.name, args.random, **model.kwargs)
        return np.random.default_rng(args.seed).standard_normal(shape, dtype=np.float32), None
    if args.npy is not None:
        try:
            x = np.load(args.npy, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise SystemExit(f"--npy {args.npy}: cannot read ({e})") from None
        if x.ndim == 3:
            x = x[None]
        return np.ascontiguousarray(x, dtype=np.float32), None
    from edgezmq.model.images import load_images

    return load_images(args.images, model.name, **model.kwargs)


def _collect(args: argparse.Namespace, stream, n_batches: int, names) -> int:
    """Drain a result stream with a progress bar; write the logits; print top-5."""
    import numpy as np

    from edgezmq.model.images import top5

    bar = progress_bar(n_batches) if not args.quiet else None
    outs, samples = [], 0
    t0 = time.time()
    for y in stream:
        outs.append(y)
        samples += len(y)
        if bar:
            bar(len(outs), samples)
    dt = time.time() - t0
    logits = np.concatenate(outs)
    np.save(args.out, logits)
    print(f"{len(logits)} samples in {dt:.2f}s ({len(logits) / dt:.2f} samples/s); logits -> {args.out}")
    for i, row in enumerate(top5(logits)[: args.show]):
        label = names[i] if names else f"sample {i}"
        print(f"{label}: " + ", ".join(f"{cls} ({p:.3f})" for cls, p in row))
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from edgezmq.client import Client, split

    plan = _load_plan(args.plan)
    x, names = _inputs(args, plan.model)
    batches = split(x, plan.model.microbatch)
    with Client.from_plan(plan, window=args.window, timeout=args.timeout, retries=args.retries) as c:
        return _collect(args, c.stream(batches), len(batches), names)


def cmd_run(args: argparse.Namespace) -> int:
    """Deploy on a cluster inventory and run inputs through it, failing over on dead nodes."""
    from edgezmq.client import split
    from edgezmq.orchestrate.failover import ResilientPipeline
    from edgezmq.orchestrate.inventory import load_cluster

    cluster = load_cluster(args.cluster)
    spec = _model_spec(args)
    x, names = _inputs(args, spec)
    batches = split(x, spec.microbatch)
    with ResilientPipeline(cluster, spec, window=args.window, timeout=args.timeout, interval=args.heartbeat,
                           replication=not args.no_replication, say=_stderr, stall_floor=args.stall_floor,
                           stall_factor=args.stall_factor) as rp:
        code = _collect(args, rp.stream(batches), len(batches), names)
        if rp.failovers:
            dead = ", ".join(f"{n} ({rp.causes.get(n, 'dead')})" for n in sorted(rp.dead)) or "none"
            _stderr(f"{rp.failovers} failover(s); dead: {dead}; replayed {rp.client.replayed} microbatch(es)")
    return code


# ---- profile / netprobe ------------------------------------------------------
KEYS_HELP = ("plan or cluster inventory whose keys: section to use: CurveZMQ to its nodes, "
             "which may then be given by name (plans/README.md)")


def _node_arg(flag: str, value: str, keys_file: str | None):
    """A node given on the command line: a control address, or with ``--keys FILE`` a node of
    that plan or inventory (by name or address), reached with the file's keys."""
    from edgezmq.ops.status import targets
    from edgezmq.orchestrate.address import NodeAddress

    if keys_file is None:
        if not value.startswith("tcp://"):
            raise ValueError(f"{flag}: expected a tcp://HOST:PORT control address, got {value!r} "
                             "(a node name needs --keys PLAN_OR_CLUSTER.yaml)")
        return NodeAddress(value, value)
    _, nodes, _ = targets(keys_file)
    if not any(t.curve is not None for t in nodes):
        raise ValueError(f"--keys {keys_file}: the file has no keys: section (plans/README.md)")
    for t in nodes:
        if value in (t.name, t.control):
            return t
    raise ValueError(f"{flag}: {value!r} is not a node of {keys_file} "
                     f"(its nodes: {', '.join(f'{t.name} {t.control}' for t in nodes)})")


def cmd_profile(args: argparse.Namespace) -> int:
    from edgezmq.model.profiling import format_profile
    kwargs = json.loads(args.kwargs) if args.kwargs else {}

    def progress(p: list) -> None:  # on stderr, so --json output stays clean
        _stderr(f"unit {p[0]}/{p[1]} {p[2]}: {p[3] * 1e3:.1f} ms")

    if args.keys and not args.node:
        raise ValueError("--keys: applies to --node (profiling on this machine talks to no node)")
    if args.node:
        from edgezmq.orchestrate.autodeploy import PROFILE_TIMEOUT_S, wait_job
        from edgezmq.transport.rpc import ControlClient

        target = _node_arg("--node", args.node, args.keys)
        req = dict(model=args.model, microbatch=args.microbatch, granularity=args.granularity,
                   kwargs=kwargs, reprofile=args.reprofile, reps=args.reps)
        if args.threads:
            req["threads"] = args.threads
        with ControlClient(target.control, timeout=args.timeout, retries=0, name=target.name, curve=target.curve) as c:
            reply = c.call("profile", **req)
        if reply.get("cached"):
            _stderr(f"{target.name}: from the node's profile cache (--reprofile to measure again)")
        prof = wait_job(target, reply, PROFILE_TIMEOUT_S, progress, target.curve)
    else:
        from edgezmq.model.profiling import profile_units

        prof = profile_units(args.model, granularity=args.granularity, microbatch=args.microbatch,
                             threads=args.threads, reps=args.reps, kwargs=kwargs,
                             progress=lambda i, n, name, t: progress([i + 1, n, name, t]))
    print(json.dumps(prof) if args.json else format_profile(prof))
    return 0


def cmd_netprobe(args: argparse.Namespace) -> int:
    from edgezmq.orchestrate.autodeploy import wait_job
    from edgezmq.transport import netprobe
    from edgezmq.transport.rpc import ControlClient

    to = _node_arg("--to", args.to, args.keys)
    with ControlClient(to.control, timeout=args.timeout, name=to.name, curve=to.curve) as c:
        peer = c.call("info")["probe"]
    opts = dict(seconds=args.seconds, bytes_per_msg=args.bytes, pings=args.pings)
    if args.src:
        src = _node_arg("--from", args.src, args.keys)
        if to.curve is not None:  # the measuring node connects to the peer's probe server as a CURVE client
            opts["peer_key"] = to.curve.server_key.decode()
        with ControlClient(src.control, timeout=args.timeout, retries=0, name=src.name, curve=src.curve) as c:
            reply = c.call("netprobe", peer=peer, **opts)
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
    from edgezmq.transport.rpc import ControlClient

    target = _node_arg("node", args.node, args.keys)
    with ControlClient(target.control, timeout=args.timeout, retries=0, name=target.name, curve=target.curve) as c:
        r = c.call(args.command)
    print(f"{r['name']}: stage {'paused' if r['paused'] else 'resumed'}")
    return 0


# ---- checkpoint ------------------------------------------------------------
def cmd_checkpoint(args: argparse.Namespace) -> int:
    from edgezmq.model import chain as models

    kwargs = json.loads(args.kwargs) if args.kwargs else {}
    out = Path(args.out).expanduser() if args.out else None
    path = (models.write_checkpoint(args.model, out, seed=args.seed, **kwargs) if out
            else models.cached_checkpoint(args.model, seed=args.seed, **kwargs))
    print(path)
    return 0


# ---- demo -----------------------------------------------------------------
def cmd_demo(args: argparse.Namespace) -> int:
    from edgezmq.orchestrate.demo import run_demo

    return run_demo(args)


def _add_io_args(p: argparse.ArgumentParser) -> None:
    """Inputs, outputs and flow control shared by `submit` and `run`."""
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", help="directory of JPEG/PNG images (timm preprocessing)")
    src.add_argument("--npy", help=".npy file of shape (N, C, H, W)")
    src.add_argument("--random", type=int, metavar="N", help="N random images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="logits.npy", help="where to write the logits")
    p.add_argument("--window", type=int, default=4, help="microbatches in flight")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per microbatch before retry/failure")
    p.add_argument("--show", type=int, default=5, help="print top-5 classes of this many samples")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    from edgezmq.cli.ops import add_cli as add_ops_cli
    from edgezmq.cli.ops import add_node_options
    from edgezmq.orchestrate.failover import HEARTBEAT_S, LIVENESS, STALL_FACTOR, STALL_FLOOR_S
    from edgezmq.planner import add_cli as add_plan_cli
    from edgezmq.testbed import add_cli as add_testbed_cli

    p = argparse.ArgumentParser(prog="edgezmq", description=__doc__)
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    sub = p.add_subparsers(dest="command", required=True)
    fmt = argparse.RawDescriptionHelpFormatter

    n = sub.add_parser("node", help="run a stage node daemon", epilog=EPILOG_NODE, formatter_class=fmt)
    n.add_argument("--control", default="tcp://127.0.0.1:5550", help="REP control address to bind (port 0: any)")
    n.add_argument("--name", help="node name (default: the control address)")
    n.add_argument("--threads", type=int, help="torch threads for compute")
    n.add_argument("--memory-limit", type=int, help="refuse shards that need more than this many bytes")
    n.add_argument("--advertise", help="host other nodes use to reach this node's data socket")
    n.add_argument("--secret-key", metavar="FILE", help="this node's NAME.key_secret: all sockets use CurveZMQ")
    n.add_argument("--allow", metavar="DIR", help="directory of public keys (*.key) allowed to connect")
    add_node_options(n)
    n.set_defaults(func=cmd_node)

    d = sub.add_parser("deploy", help="deploy a plan, or measure + plan + deploy a cluster inventory",
                       epilog=EPILOG_DEPLOY, formatter_class=fmt)
    d.add_argument("file", help="plan YAML, or cluster inventory YAML with --model (see plans/README.md)")
    d.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for every shard to load")
    d.add_argument("--json", action="store_true")
    g = d.add_argument_group("cluster inventory")
    g.add_argument("--model", help="timm model name")
    g.add_argument("--checkpoint", help="safetensors file present on every node (default: the seeded one)")
    g.add_argument("--pretrained", action="store_true", help="timm pretrained weights (needs a hub)")
    g.add_argument("--microbatch", type=int, default=8)
    g.add_argument("--granularity", default="block", choices=("block", "half", "sublayer"))
    g.add_argument("--kwargs", help="timm.create_model kwargs as JSON")
    g.add_argument("--reprofile", action="store_true", help="ignore cached profiles")
    g.add_argument("--no-spot-check", action="store_true",
                   help="use cached profiles as they are (default: time one window again on each "
                        "device type and rescale a profile the device has drifted from)")
    g.add_argument("--calibrate", type=int, default=None, metavar="N",
                   help="after deploying, time N microbatches of random input through the pipeline and "
                        "re-plan with the devices' serving speeds (default 8; 0: not)")
    g.add_argument("--dry-run", action="store_true", help="stop after planning")
    g.add_argument("--no-replication", action="store_true", help="one node per stage")
    g.add_argument("--plan-out", help="write the plan (with its problem and prediction) here")
    g.add_argument("--time-limit", type=float, default=20.0, help="planner time limit, seconds")
    d.set_defaults(func=cmd_deploy)

    u = sub.add_parser("undeploy", help="unload every node of a plan", formatter_class=fmt,
                       epilog="examples:\n  edgezmq undeploy plans/local-3.yaml\n")
    u.add_argument("plan")
    u.set_defaults(func=cmd_undeploy)

    s = sub.add_parser("submit", help="run inputs through a deployed plan", epilog=EPILOG_SUBMIT, formatter_class=fmt)
    s.add_argument("plan")
    _add_io_args(s)
    s.add_argument("--retries", type=int, default=1)
    s.set_defaults(func=cmd_submit)

    rn = sub.add_parser("run", help="deploy on a cluster inventory and run inputs, failing over on dead nodes",
                        epilog="examples:\n  edgezmq run cluster.yaml --model vit_base_patch16_224 --random 256\n"
                               "  edgezmq run cluster.yaml --model vit_base_patch16_224 --random 256 --stall-floor 10\n"
                               "  edgezmq run cluster.yaml --model vit_small_patch16_224 --images ./photos --heartbeat 0.5\n",
                        formatter_class=fmt)
    rn.add_argument("cluster", help="cluster inventory YAML (plans/README.md)")
    rn.add_argument("--model", required=True)
    rn.add_argument("--checkpoint")
    rn.add_argument("--pretrained", action="store_true")
    rn.add_argument("--microbatch", type=int, default=8)
    rn.add_argument("--granularity", default="block", choices=("block", "half", "sublayer"))
    rn.add_argument("--kwargs", help="timm.create_model kwargs as JSON")
    rn.add_argument("--no-replication", action="store_true")
    rn.add_argument("--heartbeat", type=float, default=HEARTBEAT_S,
                    help=f"seconds between heartbeats ({LIVENESS} missed: dead; default {HEARTBEAT_S:g})")
    rn.add_argument("--stall-floor", type=float, default=STALL_FLOOR_S, metavar="SECONDS",
                    help="a stage that holds microbatches but finishes none for max(this, --stall-factor x its "
                         f"predicted time per microbatch) is declared dead (default {STALL_FLOOR_S:g})")
    rn.add_argument("--stall-factor", type=float, default=STALL_FACTOR, metavar="K",
                    help=f"see --stall-floor (default {STALL_FACTOR:g})")
    _add_io_args(rn)
    rn.set_defaults(func=cmd_run)

    pr = sub.add_parser("profile", help="time every unit of a model on a node (or here)",
                        epilog="examples:\n  edgezmq profile --node tcp://10.0.0.11:5550 --model vit_large_patch16_224 --microbatch 8\n"
                               "  edgezmq profile --node board-1 --keys cluster.yaml --model vit_base_patch16_224\n"
                               "  edgezmq profile --model vit_tiny_patch16_224 --threads 1\n",
                        formatter_class=fmt)
    pr.add_argument("--node", help="control address of the node to profile (default: this machine); "
                    "a node name with --keys")
    pr.add_argument("--keys", metavar="PLAN_OR_CLUSTER.yaml", help=KEYS_HELP)
    pr.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the node's reply (default 60)")
    pr.add_argument("--model", required=True)
    pr.add_argument("--microbatch", type=int, default=8)
    pr.add_argument("--granularity", default="block", choices=("block", "half", "sublayer"))
    pr.add_argument("--kwargs", help="timm.create_model kwargs as JSON")
    pr.add_argument("--threads", type=int)
    pr.add_argument("--reps", type=int, default=3)
    pr.add_argument("--reprofile", action="store_true", help="ignore the node's cache")
    pr.add_argument("--json", action="store_true")
    pr.set_defaults(func=cmd_profile)

    npb = sub.add_parser("netprobe", help="measure bandwidth and latency to a node",
                         epilog="examples:\n  edgezmq netprobe --to tcp://10.0.0.12:5550\n"
                                "  edgezmq netprobe --from tcp://10.0.0.11:5550 --to tcp://10.0.0.12:5550\n"
                                "  edgezmq netprobe --from board-1 --to board-2 --keys cluster.yaml   # CurveZMQ\n",
                         formatter_class=fmt)
    npb.add_argument("--to", required=True, help="control address of the node measured to")
    npb.add_argument("--from", dest="src", help="control address of the node measuring (default: here)")
    npb.add_argument("--keys", metavar="PLAN_OR_CLUSTER.yaml", help=KEYS_HELP)
    npb.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for each node's reply (default 10)")
    npb.add_argument("--seconds", type=float, default=1.0)
    npb.add_argument("--bytes", type=int, default=4 * 1024 * 1024, help="bulk message size")
    npb.add_argument("--pings", type=int, default=20)
    npb.add_argument("--json", action="store_true")
    npb.set_defaults(func=cmd_netprobe)

    for verb, text in (("pause", "hold a running node's stage: it computes nothing, its control "
                                 "socket keeps answering (a running `edgezmq run` then fails over without it)"),
                       ("resume", "let a paused node's stage go on")):
        pz = sub.add_parser(verb, help=text, description=text, formatter_class=fmt,
                            epilog=f"examples:\n  edgezmq {verb} tcp://10.0.0.12:5550\n"
                                   f"  edgezmq {verb} board-2 --keys cluster.yaml\n")
        pz.add_argument("node", help="control address of the node (a node name with --keys)")
        pz.add_argument("--keys", metavar="PLAN_OR_CLUSTER.yaml", help=KEYS_HELP)
        pz.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the reply (default 5)")
        pz.set_defaults(func=cmd_pause)

    ck = sub.add_parser("checkpoint", help="write a seeded safetensors checkpoint (no hub needed)",
                        epilog="examples:\n  edgezmq checkpoint --model vit_small_patch16_224 "
                               "--out ~/.cache/edgezmq/checkpoints/vit_small_patch16_224.safetensors\n",
                        formatter_class=fmt)
    ck.add_argument("--model", required=True)
    ck.add_argument("--out", help="file to write (default: the cache, path printed)")
    ck.add_argument("--seed", type=int, default=0)
    ck.add_argument("--kwargs", help='timm.create_model kwargs as JSON, e.g. \'{"img_size": 64}\'')
    ck.set_defaults(func=cmd_checkpoint)

    m = sub.add_parser("demo", help="local pipeline on N node processes, verified against the whole model",
                       epilog=EPILOG_DEMO, formatter_class=fmt)
    m.add_argument("--model", default="vit_small_patch16_224")
    m.add_argument("--nodes", type=int, default=3)
    m.add_argument("--microbatch", type=int, default=8)
    m.add_argument("--batches", type=int, default=16)
    m.add_argument("--threads", type=int, help="torch threads per node (default: cores // nodes, at least 1)")
    m.add_argument("--granularity", default="block", choices=("block", "half", "sublayer"))
    m.add_argument("--split", default="planner", choices=("planner", "even"),
                   help="how to cut the model: profile + plan (default), or equal unit counts")
    m.add_argument("--replication", action="store_true",
                   help="let the planner replicate stages (on identical local nodes it then "
                        "prefers whole-model replicas: data parallelism, not a pipeline)")
    m.add_argument("--window", type=int, help="microbatches in flight (default: nodes + 1)")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--json", action="store_true", help="print one JSON object")
    m.set_defaults(func=cmd_demo)

    kg = sub.add_parser("keys", help="CurveZMQ key pairs (docs/security.md)", formatter_class=fmt,
                        epilog="examples:\n  edgezmq keys generate --dir /etc/edgezmq/keys --name board-1\n"
                               "  edgezmq keys generate --dir ~/.edgezmq --name client\n")
    kg_sub = kg.add_subparsers(dest="keys_command", required=True)
    kgg = kg_sub.add_parser("generate", help="write NAME.key (public) and NAME.key_secret (mode 0600)")
    kgg.add_argument("--dir", required=True, help="directory to write the key files into")
    kgg.add_argument("--name", default="client", help="key name (a node's: its --name)")
    kgg.set_defaults(func=cmd_keys_generate)


    add_plan_cli(sub)
    add_testbed_cli(sub)
    add_ops_cli(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    from edgezmq import client
    from edgezmq.orchestrate import deploy as bootstrap
    from edgezmq.orchestrate import planfile
    from edgezmq.protocol import control  # light modules: no torch for a quick error

    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    try:
        return int(args.func(args) or 0)
    except (planfile.PlanFileError, bootstrap.DeployError, control.ControlError,
            client.PipelineError, TimeoutError, FileNotFoundError, ValueError) as e:
        # ValueError covers model.ModelError, wire.WireError and the planner's PlanError
        print(f"edgezmq {args.command}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
