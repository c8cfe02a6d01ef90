"""Measured gain of activation compression on a slow link, and the adaptive ladder under a live
4x bandwidth drop (`edgezmq testbed set-link`), on a 2-device testbed of the EdgePipe regime.

    sudo python bench/compression.py [--json] [--encodings raw,f16,bf16,int8,int4]
        [--ladder f16,int8,int4] [--drop 4] [--pre 20 --during 40 --post 30] [--window 32]
        [--no-planner] [--autotuned-buffers]

The testbed (derived from plans/testbed-edgepipe.derivation.json, as docs/testbed.md derives
the EdgePipe testbed): an RCC-VE-like device (0.1246 CPU) computes the first half of the digits
ViT (edgezmq.model.task, trained here) and sends its activation to a MinnowBoard-like device
(0.1004 CPU) over the MinnowBoard's scaled link, 1.949 Mbit/s; the client reaches the first
device at the RCC-VE's 5.846 Mbit/s. Links are pairs shaped at the sender. The cut is at a
block boundary (`--cut`, default 3: after blocks.1), microbatch 8, so a raw activation (98 kB)
takes 3x the image's time: the link between the stages sets the pace.

In one testbed run: the planner's two plans (below), every encoding fixed (throughput, the
pipeline's own top-1 on 448 test images), the adaptive ladder, then a timeline with the
ladder and with raw while the stages' link drops `--drop`x and comes back. Accuracy per
encoding at every block cut comes from bench/compression_accuracy.py's sweep
(edgezmq.model.accuracy) run with the wire codecs. The plans give each link's configured
rate (`link_mbps`: the data sockets' send buffers are sized from it, docs/compression.md);
`--autotuned-buffers` leaves it out (the kernel's autotuned buffers, as before).

The planner's choice, as `edgezmq deploy cluster.yaml --max-error E` makes it: the problem is
gathered from the testbed's nodes (edgezmq.orchestrate.autodeploy.gather: profiles on the
nodes, links, I/O costs), and the library adds the candidates' byte ratios, their measured
logit error and top-1 disagreement at every cut and their codec costs
(autodeploy.measure_encodings, edgezmq.orchestrate.compress; calibration batch: the digits test
images; codec costs measured on the client, scaled by each device's speed vs the client). The
1-point top-1 budget becomes the planner's error budget by measurement (`budget_for`). Solved
without and with it (`autodeploy.plan_problem`), each plan is built as autodeploy deploys it
(`autodeploy.to_deploy_plan`: ladders, link rates) and deployed and timed like the fixed rows;
the summary fields are these two plans.
`--testbed edgepipe`: only the planner's two plans, on the 16-board EdgePipe testbed
(plans/testbed-edgepipe.yaml, docs/testbed.md), under a 1-point top-1 budget given as
`--min-agreement 99` on the 448 test images (each encoded cut or input counts one flip more
than measured); the planner may encode the client's input too (docs/compression.md § The
client's input). Writes bench/results/compression-edgepipe.json.
Writes bench/results/compression.json and .png; `--json` prints one object (last line).
The client side runs inside the testbed's client namespace (``--inner``, started by the outer).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from common import BENCH_STATE, RESULTS, ROOT, need_root, pyplot, save, testbed

from edgezmq import argtypes as args_

NAME = "compression"
TESTBED = "compbench"  # the namespaces' prefix (the lead's benches use other names)
# --testbed: the 2-device pair (below), or the 16-board EdgePipe testbed (the planner's plans only)
TESTBEDS = {"pair": TESTBED, "edgepipe": "compbench16"}
EDGEPIPE_TESTBED = ROOT / "plans" / "testbed-edgepipe.yaml"
DERIVATION = ROOT / "plans" / "testbed-edgepipe.derivation.json"
RCC, MINNOW = "RCC-VE-C2000", "Minnowboard-E3845"
MICROBATCH = 8
CUT = 3
WINDOW = 32  # microbatches in flight: more than the ~100-200 kB a link's buffers hold (docs/compression.md)
BUDGET_POINTS = 1.0  # top-1 points an encoding may lose to count as "compressed" (the 1 %)
COOLDOWN = 8  # untimed microbatches after the timed ones: the pipeline is still full at the last one
POLL_S = 0.25  # stats polls of the timeline
ROLLING = 8  # results per point of the rolling throughput
RECOVERED = 0.8  # "recovered": rolling throughput within 20 % of the prediction
DEFAULT_ENCODINGS = "raw,f16,bf16,int8,int4"
DEFAULT_LADDER = "f16,int8,int4"


def testbed_config(d: dict[str, Any]) -> dict[str, Any]:
    """The 2-device slow-link testbed, every figure from the EdgePipe derivation."""
    nic = d["nic_mbps"]
    return {"devices": [{"name": "rcc", "cpu": round(d["cpu"][RCC], 4), "memory": "2GB", "type": RCC},
                        {"name": "minnow", "cpu": round(d["cpu"][MINNOW], 4), "memory": "2GB", "type": MINNOW}],
            "links": {"default": {"mbps": 1000},
                      "overrides": [{"a": "client", "b": "rcc", "mbps": round(nic[RCC], 3)},
                                    {"a": "rcc", "b": "minnow", "mbps": round(nic[MINNOW], 3)},
                                    {"a": "minnow", "b": "client", "mbps": round(nic[MINNOW], 3)}]}}


# ---------------------------------------------------------------- accuracy (outer, no network)
def accuracy(encodings: list[str]) -> tuple[float, list[dict], int]:
    """top-1 fp32, a row per encoding and block cut (compression_accuracy's sweep with the wire
    codecs) and the model's units."""
    import compression_accuracy as ca

    from edgezmq.model import accuracy as acc
    from edgezmq.model import chain, task

    ca.USE_CODECS = True
    model = task.load_task_model(task.cached_task_checkpoint())
    split = task.digits_split()
    sweep = acc.CutSweep(model, "block", split.x_test, MICROBATCH)
    fp32 = acc.score(sweep.reference, sweep.reference, split.y_test).top1
    encs = [e for e in encodings if e != "raw"]
    cuts = list(range(1, sweep.num_units))
    rows = ca.sweep_rows(sweep, cuts, encs, split.y_test, chain.unit_names(model, "block"), "task", True)
    for r in rows:
        r["top1_drop"] = round(fp32 - r["top1"], 4)
        r["shape"] = list(sweep.tensors(r["cut"])[0][0].shape)
    return fp32, rows, sweep.num_units


def budget_for(rows: list[dict], points: float) -> dict:
    """The planner's error budget (relative L2 of the logits) that stands for `points` of top-1,
    measured: the largest error E such that every single-cut encoding of the sweep with an
    error <= E lost at most `points`. When none lost more, E is the largest error measured
    (beyond it nothing was measured)."""
    over = [r["rel_l2"] for r in rows if r["top1_drop"] > points]
    within = [r["rel_l2"] for r in rows if r["top1_drop"] <= points and (not over or r["rel_l2"] < min(over))]
    e = max(within) if within else 0.0
    return {"max_error": e, "top1_points": points, "configurations": len(rows),
            "lost_more": len(over), "least_error_that_lost_more": min(over) if over else None,
            "worst_top1_drop_within": max((r["top1_drop"] for r in rows if r["rel_l2"] <= e), default=0.0)}


def planner_input(encodings: list[str], budget: dict) -> dict:
    """What the inner needs for the planner's plans: the candidates and the error budget."""
    return {"encodings": [e for e in encodings if e != "raw"], "max_error": budget["max_error"]}


# ---------------------------------------------------------------- the client side (inner)
class Inner:
    def __init__(self, args: argparse.Namespace) -> None:
        from edgezmq.model import chain, task
        from edgezmq.testbed import Testbed

        self.args = args
        name = TESTBEDS[args.testbed]
        self.tb = Testbed.from_yaml(BENCH_STATE / f"{name}.yaml", name=name)
        self.ckpt = str(task.cached_task_checkpoint())
        self.units = len(chain.unit_infos(task.TASK_MODEL, "block", **task.TASK_KWARGS))
        split = task.digits_split()
        n = min(args.batches, len(split.y_test) // MICROBATCH)
        self.xs = [split.x_test[i * MICROBATCH:(i + 1) * MICROBATCH].numpy().astype(np.float32) for i in range(n)]
        self.labels = split.y_test[:n * MICROBATCH].numpy()
        self.full = self.tb.config.link("rcc", "minnow").mbps if args.testbed == "pair" else None

    def plan(self, ladder: list[str] | None):
        from edgezmq.model import task
        from edgezmq.orchestrate.address import NodeAddress
        from edgezmq.orchestrate.planfile import DeployPlan, ModelSpec, StagePlan

        nodes = [NodeAddress(n, self.tb.control(n), 1) for n in ("rcc", "minnow")]
        enc = None if not ladder or ladder == ["raw"] else [[e] for e in ladder]
        # each link's configured rate, as `edgezmq plan -o` writes it: it sizes the send buffers
        rate = (None if self.args.autotuned_buffers else self.full,
                None if self.args.autotuned_buffers else self.tb.config.link("minnow", "client").mbps)
        return DeployPlan(model=ModelSpec(name=task.TASK_MODEL, microbatch=MICROBATCH, checkpoint=self.ckpt,
                                          kwargs=task.TASK_KWARGS),
                          stages=[StagePlan(units=(0, self.args.cut), nodes=[nodes[0]], encodings=enc, link_mbps=rate[0]),
                                  StagePlan(units=(self.args.cut, self.units), nodes=[nodes[1]], link_mbps=rate[1])],
                          results=f"tcp://{self.tb.client_address}:0")

    def stats(self, node: str) -> dict:
        from edgezmq.transport.rpc import ControlClient

        with ControlClient(self.tb.control(node), timeout=10, retries=2) as c:
            return c.call("stats")["stage"]

    def session(self, ladder: list[str] | None, body, plan=None):
        from edgezmq.client import Client
        from edgezmq.orchestrate.deploy import deploy, unload

        plan = plan if plan is not None else self.plan(ladder)
        with Client([], plan.results, run="", window=self.args.window, microbatch=MICROBATCH, timeout=600) as c:
            plan.results = c.results_endpoint
            dep = deploy(plan, load_timeout=600)
            try:
                c.attach(dep.entry, dep.run)
                c.input_encoding = dep.plan.input_encoding
                return body(c)
            finally:
                unload(plan)

    def fixed(self, ladder: list[str], plan=None) -> dict:
        """Warm-up, the test microbatches timed, a cool-down: steady-state samples/s, top-1.
        The warm-up is a window of microbatches, so that the timed ones are not the ones a
        full window had already pushed through the image link before the timing started.
        ``plan``: deploy that one instead of the 2-stage plan of ``ladder``."""
        warm = self.args.window
        timed = self.xs * self.args.repeat  # the test set, `--repeat` times: a fast plan is timed long enough
        xs = [self.xs[i % len(self.xs)] for i in range(warm)] + timed + self.xs[:COOLDOWN]

        def body(c):
            first = c.next_seq
            outs = list(c.stream(xs))
            arrivals = c.arrivals(first, len(xs))  # receive times, in arrival order
            dt = arrivals[warm + len(timed) - 1] - arrivals[warm - 1]
            logits = np.concatenate(outs[warm:warm + len(self.xs)])  # the test set's first pass
            used = [n.name for st in (plan.stages if plan is not None else []) for n in st.nodes] or ["rcc", "minnow"]
            return {"samples_per_s": len(timed) * MICROBATCH / dt, "seconds": dt,
                    "top1_pipeline": 100.0 * float((logits.argmax(1) == self.labels).mean()),
                    **{f"stage{i}": _brief(self.stats(n)) for i, n in enumerate(used)}}

        return self.session(ladder, body, plan)

    def planner(self) -> dict:
        """The planner's choice on this testbed, as autodeploy makes it: the problem gathered from
        the nodes (profiles, links), the candidates' ratios, per-cut errors and codec costs
        measured by the library (``autodeploy.measure_encodings``, on the test images: the set
        the budget was derived on), solved exact and under the budget; both plans deployed and timed."""
        from edgezmq.model import task
        from edgezmq.orchestrate.autodeploy import (
            EXACT,
            Budget,
            gather,
            measure_encodings,
            plan_problem,
            to_deploy_plan,
        )
        from edgezmq.orchestrate.inventory import load_cluster
        from edgezmq.orchestrate.planfile import ModelSpec

        spec = json.loads(Path(self.args.planner_input).read_text())
        cluster = load_cluster(self.tb.cluster_path)
        model = ModelSpec(name=task.TASK_MODEL, microbatch=MICROBATCH, checkpoint=self.ckpt, kwargs=task.TASK_KWARGS)

        def say(m: str) -> None:
            print(m, file=sys.stderr, flush=True)

        g = gather(cluster, model=model.name, microbatch=MICROBATCH, kwargs=model.kwargs, say=say)
        measure_encodings(g, cluster, model, encodings=spec["encodings"],
                          calibration=task.digits_split().x_test.numpy(), say=say)
        out: dict[str, Any] = {"problem": g.problem, "max_error": spec.get("max_error"),
                               "min_agreement": spec.get("min_agreement"),
                               "measured_encodings": g.encodings.to_dict()}
        given = Budget(max_error=spec.get("max_error"), min_agreement=spec.get("min_agreement"))
        for name, budget in (("exact", EXACT), ("compressed", given)):
            t0 = time.process_time()
            problem, planned = plan_problem(g.problem, budget=budget)
            plan = to_deploy_plan(cluster, planned, model=model, results=f"tcp://{self.tb.client_address}:0",
                                  problem=problem, budget=budget)
            if self.args.autotuned_buffers:
                for st in plan.stages:
                    st.link_mbps = None
            stages = [{"units": list(st.units), "nodes": [n.name for n in st.nodes],
                       **({"encoding": [r[0] for r in st.encodings]} if st.encodings else {}),
                       **({"link_mbps": st.link_mbps} if st.link_mbps is not None else {})} for st in plan.stages]
            print(f"planner {name}: {stages} input {plan.input_encoding}, predicted "
                  f"{planned.throughput_per_s:.2f} samples/s", file=sys.stderr, flush=True)
            out[name] = {"stages": stages, "input_encoding": plan.input_encoding,
                         "predicted_samples_per_s": planned.throughput_per_s,
                         "error": planned.error, "disagreement": planned.disagreement,
                         "bottleneck_s": planned.bottleneck_s, "optimal": planned.optimal,
                         "solve_cpu_s": round(time.process_time() - t0, 3),
                         "measured": self.fixed([], plan)}
        return out

    def timeline(self, ladder: list[str]) -> dict:
        """Stream without pause; drop the stages' link `drop`x at `pre` s, restore it `during` s
        later, stop `post` s after that; every result's arrival and the stage's rung over time."""
        a = self.args
        stop = threading.Event()
        arrivals: list[float] = []
        errors: list[str] = []

        def forever():
            i = 0
            while not stop.is_set():
                yield self.xs[i % len(self.xs)]
                i += 1

        def body(c):
            def feed():
                try:
                    for _ in c.stream(forever(), on_result=lambda i, y: arrivals.append(time.time())):
                        pass
                except Exception as e:  # reported in the result
                    errors.append(repr(e))

            th = threading.Thread(target=feed, daemon=True)
            t0 = time.time()
            th.start()
            polls, events = [], {}
            try:
                for phase, until, rate in (("pre", a.pre, None), ("drop", a.pre + a.during, self.full / a.drop),
                                           ("post", a.pre + a.during + a.post, self.full)):
                    if rate is not None:
                        events[phase] = time.time() - t0
                        self.tb.set_link("rcc", "minnow", mbps=rate)
                    while time.time() - t0 < until:
                        s = self.stats("rcc")
                        polls.append([round(time.time() - t0, 3), s["encoding"], s["sent"]])
                        time.sleep(POLL_S)  # the sampling period of the timeline, not a wait for an event
            finally:
                self.tb.set_link("rcc", "minnow", mbps=self.full)
                stop.set()
                th.join(120)
            return {"t": [round(x - t0, 3) for x in arrivals], "polls": polls, "events": events, "errors": errors,
                    "stage0": _brief(self.stats("rcc"))}

        return self.session(ladder, body)

    def run(self) -> dict:
        a = self.args
        out: dict[str, Any] = {"fixed": {}, "full_mbps": self.full}
        if a.planner_input:
            print("planner ...", file=sys.stderr, flush=True)
            out["planner"] = self.planner()
        if a.testbed != "pair":  # the fixed encodings and the live drop are the pair's (one cut, one link)
            return out
        for e in a.encodings:
            print(f"fixed {e} ...", file=sys.stderr, flush=True)
            out["fixed"][e] = self.fixed([e])
        print(f"ladder {a.ladder} ...", file=sys.stderr, flush=True)
        out["ladder"] = self.fixed(a.ladder)
        out["timeline"] = {}
        for name, ladder in (("ladder", a.ladder), ("raw", ["raw"])):
            print(f"timeline {name} ...", file=sys.stderr, flush=True)
            out["timeline"][name] = self.timeline(ladder)
        return out


def _brief(s: dict) -> dict:
    keep = ("processed", "compute_s", "sent", "bytes_in", "bytes_out", "received", "encoding", "enc_messages",
            "enc_switches", "wait_s", "send_s")
    return {k: s.get(k) for k in keep}


# ---------------------------------------------------------------- analysis (outer)
def predicted(fixed: dict, rates: dict[str, float], act_bytes: float) -> float:
    """samples/s of the slowest of: the image link, the stages' link at `act_bytes` a message,
    either stage's measured compute (payload rates: configured x TCP's payload share)."""
    from edgezmq.testbed.net import TCP_PAYLOAD_FACTOR as f

    s0, s1 = fixed["stage0"], fixed["stage1"]
    img = s0["bytes_in"] / s0["received"]
    times = [img * 8 / (rates["in"] * 1e6 * f), act_bytes * 8 / (rates["act"] * 1e6 * f),
             s0["compute_s"] / s0["processed"], s1["compute_s"] / s1["processed"]]
    return MICROBATCH / max(times)


def rolling(t: list[float]) -> list[tuple[float, float]]:
    """(time, samples/s over the last ROLLING results) per result."""
    return [(t[i], ROLLING * MICROBATCH / (t[i] - t[i - ROLLING])) for i in range(ROLLING, len(t)) if t[i] > t[i - ROLLING]]


def switches(polls: list, after: float) -> list[dict]:
    out, last = [], None
    for t, enc, _ in polls:
        if enc != last and last is not None and t >= after:
            out.append({"t": t, "from": last, "to": enc})
        last = enc
    return out


def recovery(tl: dict, target: float) -> dict:
    """When the rolling throughput got within 20 % of `target` after the drop, and stayed."""
    drop, back = tl["events"]["drop"], tl["events"]["post"]
    pts = [(t, r) for t, r in rolling(tl["t"]) if drop <= t < back]
    ok = [r >= RECOVERED * target for _, r in pts]
    first = next((t for (t, _), k in zip(pts, ok) if k), None)
    held = next((pts[i][0] for i in range(len(pts)) if all(ok[i:])), None) if pts else None
    tail = [r for t, r in pts if t >= (drop + back) / 2]
    during = [r for t, r in pts]
    return {"first_within_20pct_s": None if first is None else round(first - drop, 2),
            "stays_within_20pct_after_s": None if held is None else round(held - drop, 2),
            "samples_per_s_second_half": float(np.median(tail)) if tail else None,
            "samples_per_s_whole_drop": float(np.median(during)) if during else None}


def planner_summary(pl: dict, fp32: float, budget: dict) -> dict:
    """The planner's two plans as measured: the issue's summary fields and what each plan was."""
    ex, co = pl["exact"], pl["compressed"]

    def brief(p: dict) -> dict:
        m = p["measured"]
        return {"stages": p["stages"], "input_encoding": p.get("input_encoding", "raw"),
                "error": p.get("error"), "disagreement": p.get("disagreement"),
                "predicted_samples_per_s": p["predicted_samples_per_s"],
                "samples_per_s": m["samples_per_s"], "top1_pipeline": m["top1_pipeline"], "optimal": p["optimal"],
                "solve_cpu_s": p["solve_cpu_s"], **{k: v for k, v in m.items() if k.startswith("stage")}}

    encodings = {"0": co.get("input_encoding", "raw"),  # the client's input (cut 0), then each cut
                 **{str(st["units"][1]): (st.get("encoding") or ["raw"])[0] for st in co["stages"][:-1]}}
    return {"planner": {"budget": budget, "exact": brief(ex), "compressed": brief(co),
                        "ladders": {str(st["units"][1]): st.get("encoding") or ["raw"] for st in co["stages"][:-1]},
                        "gain": co["measured"]["samples_per_s"] / ex["measured"]["samples_per_s"],
                        "problem": pl["problem"]},
            "exact_samples_per_s": ex["measured"]["samples_per_s"],
            "compressed_samples_per_s": co["measured"]["samples_per_s"],
            "top1_fp32": fp32, "top1_exact": ex["measured"]["top1_pipeline"],
            "top1_compressed": co["measured"]["top1_pipeline"], "encodings": encodings}


def analyse(inner: dict, acc_rows: list[dict], fp32: float, args: argparse.Namespace, cfg: dict,
            budget: dict | None = None) -> dict:
    rates = {"in": cfg["links"]["overrides"][0]["mbps"], "act": inner["full_mbps"]}
    dropped = {**rates, "act": inner["full_mbps"] / args.drop}
    by_enc = {r["encoding"]: r for r in acc_rows}
    fixed = inner["fixed"]
    raw = fixed["raw"]["samples_per_s"] if "raw" in fixed else None
    rows = []
    for e, f in fixed.items():
        s0 = f["stage0"]
        act = s0["bytes_out"] / s0["sent"]
        a = by_enc.get(e, {})
        rows.append({"encoding": e, "samples_per_s": f["samples_per_s"], "gain_vs_raw": f["samples_per_s"] / raw if raw else None,
                     "message_bytes": round(act), "predicted_samples_per_s": predicted(f, rates, act),
                     "top1_pipeline": f["top1_pipeline"],
                     "top1_sweep": a.get("top1", fp32 if e == "raw" else None),
                     "top1_drop": a.get("top1_drop", 0.0 if e == "raw" else None),
                     "agreement": a.get("agreement", 100.0 if e == "raw" else None), "rel_l2": a.get("rel_l2", 0.0),
                     # the stages' counters over the session (where a rate off its prediction comes from)
                     "stage0": f["stage0"], "stage1": f["stage1"]})
    within = [r for r in rows if r["encoding"] != "raw" and r["top1_drop"] is not None and r["top1_drop"] <= BUDGET_POINTS]
    best = max(within, key=lambda r: r["samples_per_s"]) if within else None
    last = args.ladder[-1]
    tl = inner["timeline"]
    f_last = fixed.get(last) or inner["ladder"]
    target = predicted(f_last, dropped, f_last["stage0"]["bytes_out"] / f_last["stage0"]["sent"])
    raw_target = predicted(fixed["raw"], dropped, fixed["raw"]["stage0"]["bytes_out"] / fixed["raw"]["stage0"]["sent"]) \
        if "raw" in fixed else None
    timeline = {}
    for name, t in tl.items():
        timeline[name] = {"events": t["events"], "errors": t["errors"], "results": len(t["t"]),
                          "switches_after_drop": switches(t["polls"], t["events"]["drop"]),
                          "recovery": recovery(t, target if name == "ladder" else (raw_target or target)),
                          "arrivals_s": t["t"], "rung_polls": t["polls"]}
    sw = timeline["ladder"]["switches_after_drop"]
    down = next((s for s in sw if s["t"] < tl["ladder"]["events"]["post"]), None)
    up = next((s for s in sw if s["t"] >= tl["ladder"]["events"]["post"]), None)
    rec = timeline["ladder"]["recovery"]
    out = {
        "bench": NAME, "testbed": cfg, "send_buffers": "autotuned" if args.autotuned_buffers else "link_mbps", "derivation": str(DERIVATION.relative_to(ROOT)), "cut": args.cut,
        "microbatch": MICROBATCH, "window": args.window, "ladder": args.ladder, "rows": rows,
        "ladder_run": {"samples_per_s": inner["ladder"]["samples_per_s"], "top1_pipeline": inner["ladder"]["top1_pipeline"],
                       "enc_messages": inner["ladder"]["stage0"]["enc_messages"],
                       "gain_vs_raw": inner["ladder"]["samples_per_s"] / raw if raw else None},
        "timeline": timeline,
        "switch_down_after_s": None if down is None else round(down["t"] - tl["ladder"]["events"]["drop"], 2),
        "switch_up_after_s": None if up is None else round(up["t"] - tl["ladder"]["events"]["post"], 2),
        "predicted_after_drop": {"ladder": target, "raw": raw_target},
        # the best fixed encoding within the budget at --cut vs raw there (the 2-stage split as given)
        "fixed_best": {"raw_samples_per_s": raw, "samples_per_s": best["samples_per_s"] if best else None,
                       "top1": best["top1_sweep"] if best else None, "encoding": best["encoding"] if best else None},
        # the summary fields (below: the planner's plans when measured)
        "exact_samples_per_s": raw, "compressed_samples_per_s": best["samples_per_s"] if best else None,
        "top1_fp32": fp32, "top1_compressed": best["top1_sweep"] if best else None,
        "encodings": {str(args.cut): best["encoding"] if best else None},
        "adaptive": {"drop_factor": args.drop, "recovered_samples_per_s": rec["samples_per_s_second_half"],
                     "seconds_to_recover": rec["stays_within_20pct_after_s"]},
    }
    if inner.get("planner") and budget is not None:
        out.update(planner_summary(inner["planner"], fp32, budget))
    return out


def edgepipe(args: argparse.Namespace, t0: float) -> int:
    """The planner's exact and compressed plans on the 16-board EdgePipe testbed, both deployed
    and measured in one run; the budget is top-1 agreement with fp32 on the test images."""
    import torch

    from edgezmq.model import task

    model = task.load_task_model(task.cached_task_checkpoint())
    split = task.digits_split()
    with torch.inference_mode():
        fp32 = 100.0 * float((model(split.x_test).argmax(1) == split.y_test).float().mean())
    budget = {"min_agreement": 100 - BUDGET_POINTS, "top1_points": BUDGET_POINTS,
              "calibration": f"the {len(split.y_test)} test images"}
    name = TESTBEDS["edgepipe"]
    path = BENCH_STATE / f"{name}-planner.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"encodings": [e for e in args.encodings if e != "raw"],
                                "min_agreement": budget["min_agreement"]}))
    argv = [sys.executable, str(Path(__file__).resolve()), "--inner", "--testbed", "edgepipe",
            "--encodings", ",".join(args.encodings), "--window", str(args.window), "--batches", str(args.batches),
            "--repeat", str(args.repeat), "--planner-input", str(path)]
    try:
        with testbed(EDGEPIPE_TESTBED, name) as tb:
            r = tb.exec_in_client(argv, stdout=subprocess.PIPE, text=True, timeout=3600,
                                  env=dict(os.environ, PYTHONPATH=str(ROOT)))
    finally:
        path.unlink(missing_ok=True)
    if r.returncode != 0:
        raise SystemExit(f"the client side failed (exit {r.returncode})")
    inner = json.loads(r.stdout.strip().splitlines()[-1])
    result = {"bench": NAME, "testbed": str(EDGEPIPE_TESTBED.relative_to(ROOT)), "microbatch": MICROBATCH,
              "window": args.window, "repeat": args.repeat, **planner_summary(inner["planner"], fp32, budget),
              "wall_s": round(time.monotonic() - t0, 1)}
    save(f"{NAME}-edgepipe", result, args.json)
    if not args.json:
        p = result["planner"]
        print(f"top-1 fp32 {fp32:.2f}%; exact {result['exact_samples_per_s']:.2f} samples/s {p['exact']['stages']} "
              f"(top-1 {result['top1_exact']:.2f}); compressed {result['compressed_samples_per_s']:.2f} "
              f"{p['compressed']['stages']} input {p['compressed']['input_encoding']} ({p['gain']:.2f}x), top-1 "
              f"{result['top1_compressed']:.2f}")
    return 0


def plot(r: dict) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(14, 4.6), gridspec_kw={"width_ratios": [1, 2]})
    rows = r["rows"]
    ax0.bar([x["encoding"] for x in rows], [x["samples_per_s"] for x in rows], color="tab:blue", label="measured")
    ax0.plot([x["encoding"] for x in rows], [x["predicted_samples_per_s"] for x in rows], "k_", ms=20, label="link model")
    for i, x in enumerate(rows):
        ax0.annotate(f"top-1 {x['top1_sweep']:.2f}", (i, x["samples_per_s"]), ha="center", va="bottom", fontsize=7)
    ax0.set_ylabel("samples/s")
    ax0.set_title(f"digits ViT, cut {r['cut']}, fixed encodings")
    ax0.legend(fontsize=7)
    for name, tl in r["timeline"].items():
        pts = rolling(tl["arrivals_s"])
        ax1.plot([p[0] for p in pts], [p[1] for p in pts], label=f"{name} ({'+'.join(r['ladder']) if name == 'ladder' else 'raw'})")
    ev = r["timeline"]["ladder"]["events"]
    ax1.axvspan(ev["drop"], ev["post"], color="0.9", label=f"link / {r['adaptive']['drop_factor']:g}")
    polls = r["timeline"]["ladder"]["rung_polls"]
    rungs = list(dict.fromkeys([*r["ladder"]]))
    ax2 = ax1.twinx()
    ax2.step([p[0] for p in polls], [rungs.index(p[1]) if p[1] in rungs else -1 for p in polls], "g:", where="post")
    ax2.set_yticks(range(len(rungs)), rungs)
    ax2.set_ylabel("the ladder's rung", color="g")
    ax1.set_xlabel("seconds")
    ax1.set_ylabel(f"samples/s (rolling, {ROLLING} results)")
    ax1.set_title("live 4x drop of the stages' link")
    ax1.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(RESULTS / f"{NAME}.png", dpi=100)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true", help="print the result as one JSON object (last line)")
    ap.add_argument("--encodings", default=DEFAULT_ENCODINGS, help="fixed encodings to measure (raw first)")
    ap.add_argument("--ladder", default=DEFAULT_LADDER, help="the adaptive ladder, largest rung first")
    ap.add_argument("--cut", type=args_.int_in(1, 5), default=CUT, help="units on the first device (of 6)")
    ap.add_argument("--drop", type=args_.float_in(1, 100, lo_open=True), default=4.0, help="the live drop factor")
    ap.add_argument("--pre", type=args_.seconds, default=20.0, help="seconds before the drop")
    ap.add_argument("--during", type=args_.seconds, default=40.0, help="seconds of the drop")
    ap.add_argument("--post", type=args_.seconds, default=30.0, help="seconds after the return")
    ap.add_argument("--window", type=args_.window, default=WINDOW, help="microbatches in flight")
    ap.add_argument("--batches", type=args_.int_in(COOLDOWN, 56), default=56,
                    help="timed microbatches of 8 test images per fixed encoding (56: all 448)")
    ap.add_argument("--no-planner", action="store_true",
                    help="skip the planner's plans (exact vs the 1-point budget, gathered and solved on the testbed)")
    ap.add_argument("--autotuned-buffers", action="store_true",
                    help="plans without link rates: the kernel's autotuned send buffers (the behaviour before them)")
    ap.add_argument("--testbed", choices=sorted(TESTBEDS), default="pair",
                    help="pair: the 2-device testbed, every part; edgepipe: the 16-board EdgePipe testbed "
                         "(plans/testbed-edgepipe.yaml), the planner's exact and compressed plans only, under a "
                         f"{BUDGET_POINTS:g}-point top-1 budget (--min-agreement {100 - BUDGET_POINTS:g} on the "
                         "test images)")
    ap.add_argument("--repeat", type=args_.int_in(1, 100), default=1,
                    help="timed passes over the test images per measured plan (a fast plan needs several)")
    ap.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--planner-input", help=argparse.SUPPRESS)
    ap.add_argument("--plot-only", action="store_true", help="redraw the PNG from the saved JSON")
    args = ap.parse_args()
    args.encodings = [e.strip() for e in args.encodings.split(",") if e.strip()]
    args.ladder = [e.strip() for e in args.ladder.split(",") if e.strip()]
    from edgezmq.protocol import codecs

    for e in [*args.encodings, *args.ladder]:
        if e not in codecs.NAMES:
            ap.error(f"encoding {e!r}: expected one of {', '.join(codecs.NAMES)}")
    if "raw" not in args.encodings:
        ap.error("--encodings: raw is the reference: include it")
    if args.plot_only:
        plot(json.loads((RESULTS / f"{NAME}.json").read_text()))
        return 0
    if args.inner:
        print(json.dumps(Inner(args).run()))
        return 0
    need_root()
    t0 = time.monotonic()
    if args.testbed == "edgepipe":
        return edgepipe(args, t0)
    fp32, sweep_rows, units = accuracy(args.encodings)
    acc_rows = [r for r in sweep_rows if r["cut"] == args.cut]
    budget = budget_for(sweep_rows, BUDGET_POINTS)
    print(f"budget: {BUDGET_POINTS:g} point(s) of top-1 -> max_error {budget['max_error']:.4g} ({budget})",
          file=sys.stderr, flush=True)
    cfg = testbed_config(json.loads(DERIVATION.read_text()))
    argv = [sys.executable, str(Path(__file__).resolve()), "--inner", "--encodings", ",".join(args.encodings),
            "--ladder", ",".join(args.ladder), "--cut", str(args.cut), "--drop", str(args.drop),
            "--pre", str(args.pre), "--during", str(args.during), "--post", str(args.post), "--window", str(args.window),
            "--batches", str(args.batches), *(["--autotuned-buffers"] if args.autotuned_buffers else [])]
    if not args.no_planner:
        path = BENCH_STATE / f"{TESTBED}-planner.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(planner_input(args.encodings, budget)))
        argv += ["--planner-input", str(path)]
    try:
        with testbed(cfg, TESTBED) as tb:
            r = tb.exec_in_client(argv, stdout=subprocess.PIPE, text=True, timeout=3600,
                                  env=dict(os.environ, PYTHONPATH=str(ROOT)))
    finally:
        (BENCH_STATE / f"{TESTBED}-planner.json").unlink(missing_ok=True)
    if r.returncode != 0:
        raise SystemExit(f"the client side failed (exit {r.returncode})")
    result = analyse(json.loads(r.stdout.strip().splitlines()[-1]), acc_rows, fp32, args, cfg, budget)
    result["wall_s"] = round(time.monotonic() - t0, 1)
    save(NAME, result, args.json)
    plot(result)
    if not args.json:
        print(f"top-1 fp32 {fp32:.2f}%; cut {args.cut}; link {cfg['links']['overrides'][1]['mbps']} Mbit/s")
        for x in result["rows"]:
            print(f"  {x['encoding']:<6} {x['samples_per_s']:7.2f} samples/s ({x['gain_vs_raw']:.2f}x raw; link model "
                  f"{x['predicted_samples_per_s']:.2f})  top-1 {x['top1_sweep']:.2f} (pipeline {x['top1_pipeline']:.2f})")
        print(f"  ladder {'+'.join(args.ladder)}: {result['ladder_run']['samples_per_s']:.2f} samples/s")
        if "planner" in result:
            p = result["planner"]
            print(f"  planner (max_error {p['budget']['max_error']:.4g} for {BUDGET_POINTS:g} point): exact "
                  f"{result['exact_samples_per_s']:.2f} samples/s {p['exact']['stages']}; compressed "
                  f"{result['compressed_samples_per_s']:.2f} {p['compressed']['stages']} ({p['gain']:.2f}x), top-1 "
                  f"{result['top1_exact']:.2f} / {result['top1_compressed']:.2f}")
        print(f"  drop {args.drop:g}x: down after {result['switch_down_after_s']} s, up after {result['switch_up_after_s']} s "
              f"of the return; adaptive {result['adaptive']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
