"""`edgezmq demo`: a real pipeline on N local node processes, verified against timm's whole model.

Steps: write (once, cached) a seeded safetensors checkpoint; start N node
processes on loopback; split the model (by default the planner, on each node's own
profile of the model and measured links, as `edgezmq deploy cluster.yaml` does; or an
even split); deploy over the control channel; stream the batches; then run timm's own
monolithic forward on the same checkpoint and inputs and compare every output.

Speedup is pipeline throughput over the monolithic model on one device of the same
size as one node (the same torch thread count), which is what the paper measures
(N devices vs one).  The monolithic model on every core of this machine is reported
beside it, so the single-box picture is honest too.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import numpy as np

from edgezmq.client import Batch, Client, split
from edgezmq.model import chain as models
from edgezmq.node import device
from edgezmq.orchestrate.address import NodeAddress
from edgezmq.orchestrate.autodeploy import autodeploy
from edgezmq.orchestrate.deploy import deploy, stage_table, unload
from edgezmq.orchestrate.inventory import Cluster, InventoryNode
from edgezmq.orchestrate.local import LocalCluster
from edgezmq.orchestrate.planfile import DeployPlan, ModelSpec, StagePlan

MAX_ABS_DIFF = 1e-4  # the demo fails above this (float32 kernels agree far tighter)
PROBE_SECONDS = 0.2  # loopback links: a short probe is plenty


def even_split(n_units: int, n_stages: int) -> list[tuple[int, int]]:
    """Contiguous ranges of near-equal unit counts (earlier stages take the remainder)."""
    if not 1 <= n_stages <= n_units:
        raise ValueError(f"cannot split {n_units} units into {n_stages} stages")
    base, extra = divmod(n_units, n_stages)
    out, a = [], 0
    for s in range(n_stages):
        b = a + base + (1 if s < extra else 0)
        out.append((a, b))
        a = b
    return out


def _tensors(x: Batch) -> list[Any]:
    import torch

    return [torch.from_numpy(a) for a in (x if isinstance(x, (tuple, list)) else [x])]


def monolithic(name: str, checkpoint: str, batches: list[Batch], threads: int) -> tuple[list[np.ndarray], float]:
    """The model's own forward (timm's; a text model's transformers forward) on the whole
    model: outputs and samples/s (after one warm-up batch)."""
    import torch
    from safetensors.torch import load_file

    torch.set_num_threads(threads)
    m = models.create_model(name)
    m.load_state_dict(load_file(checkpoint))
    with torch.inference_mode():
        models.reference_forward(m, *_tensors(batches[0]))  # warm-up: first-call allocations
        t0 = time.perf_counter()
        outs = [models.reference_forward(m, *_tensors(x)).numpy().copy() for x in batches]
        dt = time.perf_counter() - t0
    return outs, sum(len(_tensors(x)[0]) for x in batches) / dt


def _quiet(_: str) -> None:
    pass


def run_demo(args: argparse.Namespace) -> int:
    say = (lambda *a: print(*a, file=sys.stderr)) if args.json else print
    threads = args.threads or max(1, device.cores() // args.nodes)
    infos = models.unit_infos(args.model, args.granularity)
    say(f"checkpoint: seeded {args.model} (seed {args.seed}) ...")
    ckpt = str(models.cached_checkpoint(args.model, seed=args.seed))
    batches = split(models.random_inputs(args.model, args.batches * args.microbatch, args.seed), args.microbatch)

    say(f"starting {args.nodes} node processes ({threads} thread(s) each) ...")
    spec = ModelSpec(name=args.model, microbatch=args.microbatch, granularity=args.granularity, checkpoint=ckpt)
    predicted = None
    with LocalCluster(args.nodes, threads=threads) as cluster, \
            Client([], "tcp://127.0.0.1:0", run="", window=args.window or 1, microbatch=args.microbatch) as client:
        t0 = time.perf_counter()
        if args.split == "planner":
            inventory = Cluster(nodes=[InventoryNode(n.name, n.control, threads=threads) for n in cluster.nodes],
                                probe_seconds=PROBE_SECONDS)
            dep, plan, problem, planned, _ = autodeploy(
                inventory, spec, results=client.results_endpoint, replication=args.replication,
                say=say if not args.json else _quiet, client=client)
            assert dep is not None  # not a dry run
            predicted = planned.throughput_per_s
            say(planned.table(problem))
        else:
            plan = DeployPlan(model=spec, results=client.results_endpoint,
                        stages=[StagePlan(units=r, nodes=[NodeAddress(n.name, n.control, threads)])
                                for r, n in zip(even_split(len(infos), args.nodes), cluster.nodes)])
            dep = deploy(plan)
        client.window = window = args.window or plan.in_flight  # the plan's, as any client of it (Client.from_plan)
        say(f"deployed in {time.perf_counter() - t0:.1f}s:")
        say(stage_table(plan, [u.name for u in infos], dep.endpoints))
        client.attach(dep.entry, dep.run)
        client.infer(batches[0])  # warm-up: fills caches and first-call allocations on every stage
        t0 = time.perf_counter()
        outs = list(client.stream(batches))
        dt = time.perf_counter() - t0
        pipe_sps = args.batches * args.microbatch / dt
        say(f"pipeline: {pipe_sps:.2f} samples/s over {args.batches} batches of {args.microbatch}, {window} in flight")
        unload(plan)  # free the nodes' cores and memory for the monolithic run

    say(f"monolithic timm forward ({threads} thread(s)) ...")
    ref, mono_sps = monolithic(args.model, ckpt, batches, threads)
    all_cores = device.cores()
    mono_all = mono_sps
    if all_cores != threads:
        _, mono_all = monolithic(args.model, ckpt, batches, all_cores)
    diff = max(float(np.max(np.abs(a - b))) for a, b in zip(outs, ref))
    result: dict[str, Any] = {
        "model": args.model, "nodes": args.nodes, "microbatch": args.microbatch,
        "batches": args.batches, "granularity": args.granularity, "threads_per_node": threads, "window": window,
        "pipeline_samples_per_s": round(pipe_sps, 3),
        "monolithic_samples_per_s": round(mono_sps, 3),
        "speedup": round(pipe_sps / mono_sps, 3),
        "monolithic_all_cores_samples_per_s": round(mono_all, 3),
        "speedup_vs_all_cores": round(pipe_sps / mono_all, 3),
        "machine_cores": all_cores,
        "max_abs_diff": diff,
        "split": args.split,
        "predicted_samples_per_s": round(predicted, 3) if predicted else None,
        "stages": [{"node": ",".join(n.name for n in st.nodes), "nodes": [n.name for n in st.nodes],
                    "units": list(st.units)} for st in plan.stages],
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(f"monolithic: {mono_sps:.2f} samples/s on {threads} thread(s); "
              f"{mono_all:.2f} samples/s on all {all_cores} cores")
        print(f"speedup over one node-sized device: {result['speedup']:.2f}x "
              f"(over the whole machine: {result['speedup_vs_all_cores']:.2f}x)")
        print(f"max |pipeline - monolithic| = {diff:.3g} "
              f"({'OK' if diff <= MAX_ABS_DIFF else 'MISMATCH'}, limit {MAX_ABS_DIFF:g})")
    return 0 if diff <= MAX_ABS_DIFF else 1
