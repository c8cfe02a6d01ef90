"""Controller commands that place and use a model: deploy, undeploy, submit, run, checkpoint."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from edgezmq.argtypes import count_or_zero, float_in, int_in, seconds, seed
from edgezmq.cli.args import (
    FMT,
    UsageError,
    add_io_args,
    add_model_args,
    collect,
    inputs,
    model_kwargs,
    node_failures,
    stderr,
)
from edgezmq.terms import MAX_CONTEXT

EPILOG_DEPLOY = """examples:
  edgezmq deploy plans/local-3.yaml
  edgezmq deploy plans/local-3.yaml --json
  edgezmq deploy cluster.yaml --model vit_large_patch16_224 --dry-run --plan-out plan.yaml
  edgezmq deploy cluster.yaml --model vit_base_patch16_224 --checkpoint /data/vit_base.safetensors
  edgezmq deploy cluster.yaml --model vit_base_patch16_224 --max-error 0.01 --min-agreement 99 --calibration-npy val.npy
"""
EPILOG_SUBMIT = """examples:
  edgezmq submit plans/local-3.yaml --random 64 --out logits.npy
  edgezmq submit plans/local-3.yaml --images ./photos --window 4
  edgezmq submit plans/local-3.yaml --npy batch.npy
"""


def _load_plan(path: str):
    from edgezmq.orchestrate.planfile import load_plan

    return load_plan(path)


# ---- deploy / undeploy ------------------------------------------------------
def cmd_deploy(args: argparse.Namespace) -> int:
    from edgezmq.fields import read_yaml
    from edgezmq.orchestrate.inventory import is_cluster_file
    from edgezmq.orchestrate.planfile import PlanFileError

    d = read_yaml(args.file, PlanFileError)  # a bad file fails fast, before torch is imported
    if is_cluster_file(d):
        return _deploy_cluster(args, d)
    if (args.model or args.dry_run or args.plan_out or args.max_error is not None or args.min_agreement is not None
            or args.encodings or args.calibration_npy or args.calibration_samples):
        raise UsageError(f"{args.file} is a plan; --model/--dry-run/--plan-out/--max-error/--min-agreement/"
                         "--encodings/--calibration-* apply to a cluster inventory")
    from edgezmq.orchestrate.planfile import parse_plan

    plan = parse_plan(d, source=args.file)
    t0 = time.time()
    from edgezmq.orchestrate.deploy import deploy

    dep = deploy(plan, load_timeout=args.timeout, progress=None if args.json else stderr)
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

    kwargs = model_kwargs(args.kwargs)
    checkpoint = args.checkpoint
    if checkpoint is None and not args.pretrained:
        checkpoint = str(models.cached_checkpoint(args.model, **kwargs))
        stderr(f"checkpoint: seeded {checkpoint} (every node must have this file; "
               "pass --checkpoint or --pretrained otherwise)")
    return ModelSpec(name=args.model, microbatch=args.microbatch, granularity=args.granularity,
                     checkpoint=checkpoint, pretrained=args.pretrained, kwargs=kwargs)


def budget_of(args: argparse.Namespace, generate: bool = False):
    """The Budget of `add_budget_args`' flags, checked together (one-line usage errors)."""
    from edgezmq.orchestrate.autodeploy import Budget

    budget = Budget(max_error=args.max_error, min_agreement=args.min_agreement)
    if not budget.given and (args.encodings or args.calibration_npy or args.calibration_samples):
        raise UsageError("--encodings/--calibration-npy/--calibration-samples: give a budget (--max-error or "
                         "--min-agreement)")
    if args.calibration_npy and args.calibration_samples:
        raise UsageError("--calibration-npy and --calibration-samples: give one")
    if budget.given and generate:
        raise UsageError("--max-error/--min-agreement: not with --generate (encodings are measured on images)")
    return budget


def _calibration(args: argparse.Namespace):
    """The --calibration-npy samples (None: the seeded batch)."""
    if not args.calibration_npy:
        return None
    import numpy as np

    try:
        return np.load(args.calibration_npy, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise UsageError(f"--calibration-npy {args.calibration_npy}: expected a .npy image array ({e})") from None


def _deploy_cluster(args: argparse.Namespace, d: dict) -> int:
    import yaml

    from edgezmq.orchestrate.autodeploy import autodeploy
    from edgezmq.orchestrate.inventory import parse_cluster

    cluster = parse_cluster(d, source=args.file)
    if not args.model:
        raise UsageError(f"{args.file} is a cluster inventory: give --model")
    spec = _model_spec(args)
    calibrate = {} if args.calibrate is None else {"calibrate": args.calibrate}
    generation = None
    if args.generate:
        from edgezmq.model import text
        from edgezmq.orchestrate.autodeploy import Generation

        if not text.is_decoder(spec.name):
            raise UsageError(f"--generate: {spec.name} is not a decoder language model")
        generation = Generation(context=args.context, sequences=args.sequences)
    t0 = time.time()
    budget = budget_of(args, generate=generation is not None)
    dep, plan, problem, planned, g = autodeploy(
        cluster, spec, reprofile=args.reprofile, spot_check=not args.no_spot_check, dry_run=args.dry_run,
        time_limit_s=args.time_limit, say=stderr, load_timeout=args.timeout, replication=not args.no_replication,
        generation=generation, budget=budget, encodings=args.encodings, calibration=_calibration(args),
        calibration_samples=args.calibration_samples, **calibrate)
    predicted = {"throughput_per_s": planned.throughput_per_s, "bottleneck_s": planned.bottleneck_s,
                 "latency_s": planned.latency_s, "window": planned.window, "optimal": planned.optimal,
                 "bottleneck_at": planned.bottleneck_at, "error": planned.error,
                 "disagreement": planned.disagreement,
                 "encodings": [s.encodings[0][0] if s.encodings else "raw" for s in plan.stages[:-1]],
                 "input_encoding": plan.input_encoding}
    if args.plan_out:
        Path(args.plan_out).write_text(yaml.safe_dump(
            {**plan.to_dict(), "predicted": predicted, **_solved(g)}, sort_keys=False))
        stderr(f"plan and problem written to {args.plan_out}")
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
    """Unload every node of a plan, or of a cluster inventory (whatever run they serve)."""
    from edgezmq.fields import read_yaml
    from edgezmq.orchestrate.deploy import unload, unload_nodes
    from edgezmq.orchestrate.inventory import is_cluster_file, parse_cluster
    from edgezmq.orchestrate.planfile import PlanFileError

    d = read_yaml(args.plan, PlanFileError, "plan or cluster file")
    if is_cluster_file(d):
        outcome = unload_nodes(list(parse_cluster(d, source=args.plan).nodes))
    else:
        outcome = unload(_load_plan(args.plan))
    code = 0
    for name, r in outcome.items():
        ok = not isinstance(r, Exception)
        code |= 0 if ok else 1
        print(f"{name}: {'unloaded' if ok else r}")
    return code


# ---- submit / run -------------------------------------------------------------
@node_failures
def cmd_submit(args: argparse.Namespace) -> int:
    from edgezmq.client import Client, split

    plan = _load_plan(args.plan)
    x, names = inputs(args, plan.model)
    batches = split(x, plan.model.microbatch)
    with Client.from_plan(plan, window=args.window, timeout=args.timeout, retries=args.retries) as c:
        return collect(args, c.stream(batches), len(batches), names)


@node_failures
def cmd_run(args: argparse.Namespace) -> int:
    """Deploy on a cluster inventory and run inputs through it, failing over on dead nodes."""
    from edgezmq.client import split
    from edgezmq.orchestrate.failover import ResilientPipeline
    from edgezmq.orchestrate.inventory import load_cluster

    budget = budget_of(args)
    cluster = load_cluster(args.cluster)
    spec = _model_spec(args)
    x, names = inputs(args, spec)
    batches = split(x, spec.microbatch)
    with ResilientPipeline(cluster, spec, window=args.window, timeout=args.timeout, interval=args.heartbeat,
                           replication=not args.no_replication, say=stderr, stall_floor=args.stall_floor,
                           stall_factor=args.stall_factor, budget=budget, encodings=args.encodings,
                           calibration=_calibration(args), calibration_samples=args.calibration_samples) as rp:
        code = collect(args, rp.stream(batches), len(batches), names)
        if rp.failovers and rp.client is not None:
            dead = ", ".join(f"{n} ({rp.causes.get(n, 'dead')})" for n in sorted(rp.dead)) or "none"
            stderr(f"{rp.failovers} failover(s); dead: {dead}; replayed {rp.client.replayed} microbatch(es)")
    return code


# ---- checkpoint ------------------------------------------------------------
def cmd_checkpoint(args: argparse.Namespace) -> int:
    from edgezmq.model import chain as models

    kwargs = model_kwargs(args.kwargs)
    out = Path(args.out).expanduser() if args.out else None
    if out is not None and (out.is_dir() or not out.parent.is_dir()):
        raise UsageError(f"--out {args.out}: expected a file path in an existing directory"
                         f"{' (it is a directory)' if out.is_dir() else ''}")
    path = (models.write_checkpoint(args.model, out, seed=args.seed, **kwargs) if out
            else models.cached_checkpoint(args.model, seed=args.seed, **kwargs))
    print(path)
    return 0


def encoding_list(text: str) -> list[str]:
    """An argparse type: comma-separated lossy encoding names."""
    from edgezmq.terms import ENCODINGS

    names = [e.strip() for e in text.split(",") if e.strip()]
    bad = [e for e in names if e not in ENCODINGS or e == ENCODINGS[0]]
    if not names or bad:
        raise argparse.ArgumentTypeError(f"expected lossy encodings ({', '.join(ENCODINGS[1:])}) separated "
                                         f"by commas, got {text!r}")
    return names


def add_budget_args(g: Any) -> None:
    """The accuracy-budget flags of `deploy` and `run` (docs/compression.md); `budget_of` reads them."""
    from edgezmq.orchestrate.compress import (
        CALIBRATION_SAMPLES,
        DEFAULT_ENCODINGS,
        MAX_CALIBRATION_SAMPLES,
    )
    from edgezmq.planner.problem import MAX_DISAGREEMENT, MAX_ERROR

    g.add_argument("--max-error", type=float_in(0, MAX_ERROR), metavar="E",
                   help="let the planner compress links between stages: the encodings' measured logit errors "
                        f"(relative L2 vs fp32) at the used cuts summing to at most E (0..{MAX_ERROR:g}; "
                        "default: every link raw, exact; docs/compression.md)")
    g.add_argument("--min-agreement", type=float_in(0, MAX_DISAGREEMENT), metavar="A",
                   help="let the planner compress links keeping top-1 agreement with fp32 at least A percent "
                        "(0..100) on the calibration batch (the union bound: 100 - the summed disagreements)")
    g.add_argument("--encodings", type=encoding_list, metavar="E1,E2,..",
                   help="candidate encodings to measure with a budget (default: "
                        f"{','.join(DEFAULT_ENCODINGS)}; each costs a forward per cut on the calibration batch)")
    g.add_argument("--calibration-npy", metavar="FILE",
                   help="images (N, C, H, W float32 .npy) to measure the encodings' error on (default: "
                        "--calibration-samples seeded standard-normal images)")
    g.add_argument("--calibration-samples", type=int_in(1, MAX_CALIBRATION_SAMPLES), metavar="N",
                   help=f"seeded images to measure the encodings on (default {CALIBRATION_SAMPLES}); each encoded "
                        "cut counts one sample more than it flipped, so A percent agreement needs N >= 100 / (100 - A) "
                        "per encoded cut")


def add_cli(sub: argparse._SubParsersAction) -> None:
    """Register `deploy`, `undeploy`, `submit`, `run` and `checkpoint` on the `edgezmq` subparsers."""
    from edgezmq.orchestrate.failover import HEARTBEAT_S, LIVENESS, STALL_FACTOR, STALL_FLOOR_S

    d = sub.add_parser("deploy", help="deploy a plan, or measure + plan + deploy a cluster inventory",
                       epilog=EPILOG_DEPLOY, formatter_class=FMT)
    d.add_argument("file", help="plan YAML, or cluster inventory YAML with --model (see plans/README.md)")
    d.add_argument("--timeout", type=seconds, default=600.0, help="seconds to wait for every shard to load")
    d.add_argument("--json", action="store_true")
    g = d.add_argument_group("cluster inventory")
    add_model_args(g, model_required=False)
    g.add_argument("--checkpoint", help="safetensors file present on every node (default: the seeded one)")
    g.add_argument("--pretrained", action="store_true", help="timm pretrained weights (needs a hub)")
    g.add_argument("--reprofile", action="store_true", help="ignore cached profiles")
    g.add_argument("--no-spot-check", action="store_true",
                   help="use cached profiles as they are (default: time one window again on each "
                        "device type and rescale a profile the device has drifted from)")
    g.add_argument("--calibrate", type=count_or_zero, default=None, metavar="N",
                   help="after deploying, time N microbatches of random input through the pipeline and "
                        "re-plan with the devices' serving speeds (default 8; 0: not)")
    g.add_argument("--dry-run", action="store_true", help="stop after planning")
    g.add_argument("--no-replication", action="store_true", help="one node per stage")
    g.add_argument("--plan-out", help="write the plan (with its problem and prediction) here")
    g.add_argument("--generate", action="store_true",
                   help="plan a decoder for generation (docs/generate.md): units timed on decode steps of "
                        "--microbatch sequences, stages holding the KV caches of --sequences sequences of up to "
                        "--context tokens, no replication")
    g.add_argument("--context", type=int_in(1, MAX_CONTEXT), default=256,
                   help="with --generate: the most tokens a sequence holds (prompt + generated)")
    g.add_argument("--sequences", type=int_in(1, MAX_CONTEXT), default=64,
                   help="with --generate: sequences live at once (every stage holds their caches)")
    g.add_argument("--time-limit", type=seconds, default=20.0, help="planner time limit, seconds")
    add_budget_args(g)
    d.set_defaults(func=cmd_deploy)

    u = sub.add_parser("undeploy", help="unload every node of a plan or a cluster inventory", formatter_class=FMT,
                       epilog="examples:\n  edgezmq undeploy plans/local-3.yaml\n"
                              "  edgezmq undeploy plans/cluster-local.yaml   # every node, whatever run it serves\n")
    u.add_argument("plan", metavar="PLAN_OR_CLUSTER.yaml")
    u.set_defaults(func=cmd_undeploy)

    s = sub.add_parser("submit", help="run inputs through a deployed plan", epilog=EPILOG_SUBMIT, formatter_class=FMT)
    s.add_argument("plan")
    add_io_args(s)
    s.add_argument("--retries", type=int_in(0, 100), default=1, help="resends of a microbatch (0..100)")
    s.set_defaults(func=cmd_submit)

    rn = sub.add_parser("run", help="deploy on a cluster inventory and run inputs, failing over on dead nodes",
                        epilog="examples:\n  edgezmq run cluster.yaml --model vit_base_patch16_224 --random 256\n"
                               "  edgezmq run cluster.yaml --model vit_base_patch16_224 --random 256 --stall-floor 10\n"
                               "  edgezmq run cluster.yaml --model vit_small_patch16_224 --images ./photos --heartbeat 0.5\n",
                        formatter_class=FMT)
    rn.add_argument("cluster", help="cluster inventory YAML (plans/README.md)")
    add_model_args(rn)
    rn.add_argument("--checkpoint")
    rn.add_argument("--pretrained", action="store_true")
    rn.add_argument("--no-replication", action="store_true")
    rn.add_argument("--heartbeat", type=seconds, default=HEARTBEAT_S,
                    help=f"seconds between heartbeats ({LIVENESS} missed: dead; default {HEARTBEAT_S:g})")
    rn.add_argument("--stall-floor", type=seconds, default=STALL_FLOOR_S, metavar="SECONDS",
                    help="a stage that holds microbatches but finishes none for max(this, --stall-factor x its "
                         f"predicted time per microbatch) is declared dead (default {STALL_FLOOR_S:g})")
    rn.add_argument("--stall-factor", type=float_in(0, 1000), default=STALL_FACTOR, metavar="K",
                    help=f"see --stall-floor (default {STALL_FACTOR:g})")
    add_budget_args(rn.add_argument_group("accuracy budget (every deployment, the failovers' too)"))
    add_io_args(rn)
    rn.set_defaults(func=cmd_run)

    ck = sub.add_parser("checkpoint", help="write a seeded safetensors checkpoint (no hub needed)",
                        epilog="examples:\n  edgezmq checkpoint --model vit_small_patch16_224 "
                               "--out ~/.cache/edgezmq/checkpoints/vit_small_patch16_224.safetensors\n",
                        formatter_class=FMT)
    ck.add_argument("--model", required=True)
    ck.add_argument("--out", help="file to write (default: the cache, path printed)")
    ck.add_argument("--seed", type=seed, default=0)
    ck.add_argument("--kwargs", help='architecture arguments of timm.create_model as JSON, e.g. \'{"img_size": 64}\' (allowed: docs/security.md)')
    ck.set_defaults(func=cmd_checkpoint)
