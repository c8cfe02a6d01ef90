"""The paper's regime, measured: ViT-Large on the scaled EdgePipe testbed (16 boards, per-device NICs).

    python bench/edgepipe.py [--points 1,2,4,8,12,16] [--batches N] [--json]

Needs root. Uses plans/testbed-edgepipe.yaml and plans/testbed-edgepipe-slowpairs.yaml
(written by plans/make_testbed_edgepipe.py, whose derivation docs/testbed.md gives), at the
microbatch they were derived for. In one run:

1. the speedup curve: our plan on 1, 2, 4, 8, 12, 16 of the devices (half RCC-VE-like, half
   MinnowBoard-like; 1 = one RCC-VE-like device), measured throughput and the planner's
   prediction; speedup over the one-device point;
2. the planners side by side at 16 devices: ours, even, PipeEdge-style, PipeDream-style,
   each deployed (with the deploy's calibration) and measured, on the plain testbed and on
   the slow-pairs variant;
3. the scaling checks: the emulated devices' measured ViT-Large time and link rates,
   times the derivation's time factor, against the boards' published figures.

Writes bench/results/edgepipe.json and edgepipe.png; ``--json`` prints one JSON object
(last line of stdout) with ``curve: [{devices, samples_per_s, speedup,
predicted_samples_per_s}]`` and ``planners: [{testbed, method, measured_samples_per_s,
predicted_samples_per_s}]``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from common import RESULTS, ROOT, DoesNotFit, measure, pyplot, save, testbed

from edgezmq import argtypes

MODEL = "vit_large_patch16_224"
GRANULARITY = "sublayer"  # PipeEdge's own partition units (4 per block)
TESTBEDS = {"edgepipe": ROOT / "plans" / "testbed-edgepipe.yaml",
            "edgepipe-slowpairs": ROOT / "plans" / "testbed-edgepipe-slowpairs.yaml"}
DERIVATION = ROOT / "plans" / "testbed-edgepipe.derivation.json"
METHODS = ("ours", "pipeedge", "pipedream", "even")  # the comparisons that matter most first
PER_TYPE = 8
ONE_DEVICE_BATCHES = 2  # ~30 s each on one emulated board: enough for a steady figure
PAYLOAD = 1448 / 1514  # what TCP carries of a shaped rate (the boards' tc limits had it too)
RCC, MINNOW = "RCC-VE-C2000", "Minnowboard-E3845"
BOARD_NIC = {"rcc": 30.0, "minnow": 10.0}  # Mbit/s, the paper's per-device tc limits


def subset(n: int) -> list[str]:
    """n devices: RCC-VE-like first, then alternating, so half of each kind (1: one RCC-VE)."""
    rcc = [f"rcc-{i}" for i in range((n + 1) // 2)]
    minnow = [f"minnow-{i}" for i in range(n // 2)]
    return rcc + minnow


def checks(run: dict[str, Any], derivation: dict[str, Any]) -> dict[str, Any]:
    """The emulation against the boards: the measured profiles x the time factor (the links:
    ``link_checks``)."""
    f = derivation["time_factor"]
    mb = derivation["microbatch"]
    problem = run["problem"]
    out: dict[str, Any] = {"time_factor": f}
    for tname, board in (("rcc-ve", RCC), ("minnowboard", MINNOW)):
        t = problem["device_types"].get(tname)
        if t is None:
            continue
        emulated = sum(t["unit_times_s"])  # one microbatch of mb images, summed over units
        as_board = emulated * f * 8 / mb  # board-seconds for 8 images
        published = derivation["board_s"][board]
        out[tname] = {"emulated_s": emulated, "as_board_s": as_board, "published_s": published,
                      "error": as_board / published - 1}
    return out


# the links measured for the scaling checks (item 2): each kind of pair and the client's uplink;
# low rates need long probes and big messages (docs/testbed.md: 3 s of 64 KiB under-read 1 Mbit/s)
LINK_PROBES = (("rcc-0", "rcc-1"), ("minnow-0", "rcc-1"), ("minnow-0", "minnow-1"), ("client", "rcc-0"))
PROBE_SECONDS, PROBE_BYTES = 12, 256 * 1024


def link_checks(tb, derivation: dict[str, Any]) -> dict[str, Any]:
    """Each kind of link measured with `edgezmq netprobe` on the testbed (from the first
    device, or the client, to the second), divided by the time factor, against the boards' tc
    limit (the slower NIC of the two ends) times what TCP carries of it."""
    f = derivation["time_factor"]
    control = {n["name"]: n["control"] for n in tb.cluster["nodes"]}
    out: dict[str, Any] = {}
    for a, b in LINK_PROBES:
        argv = [sys.executable, "-m", "edgezmq", "netprobe", "--to", control[b], "--seconds", str(PROBE_SECONDS),
                "--bytes", str(PROBE_BYTES), "--json"]
        if a != "client":
            argv += ["--from", control[a]]
        r = tb.exec_in_client(argv, capture_output=True, text=True, timeout=PROBE_SECONDS + 120,
                              env=dict(os.environ, PYTHONPATH=str(ROOT)))
        if r.returncode != 0:
            out[f"link {a} -> {b}"] = {"error": r.stderr.strip()[-500:]}
            continue
        measured = float(json.loads(r.stdout.strip().splitlines()[-1])["bandwidth_mbps"])
        nic = min(BOARD_NIC[_kind(x)] for x in (a, b))
        out[f"link {a} -> {b}"] = {"measured_mbps": round(measured, 4), "as_board_mbps": round(measured / f, 3),
                                   "published_payload_mbps": round(nic * PAYLOAD, 3),
                                   "error": round(measured / f / (nic * PAYLOAD) - 1, 4)}
    return out


def _kind(name: str) -> str:
    """A node or device-type name's board: rcc-3 and rcc-ve are RCC-VE; the client has an RCC-VE's NIC."""
    return "minnow" if name.startswith("minnow") else "rcc"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--points", default="1,2,4,8,12", help="device counts of the speedup curve (16: the "
                    "planners' run of ours on the plain testbed)")
    ap.add_argument("--batches", type=argtypes.count_or_zero, default=0,
                    help="timed microbatches per run (0: twice the run's devices, so that replicas' waves "
                         "average out; each run also streams one per device before and after, untimed)")
    ap.add_argument("--calibrate", type=argtypes.count_or_zero, default=8,
                    help="microbatches of each deploy's calibration (0: none)")
    ap.add_argument("--no-planners", action="store_true", help="only the speedup curve")
    ap.add_argument("--methods", default=",".join(METHODS), help="planners to compare (comma-separated)")
    ap.add_argument("--testbeds", default=",".join(TESTBEDS), help="testbeds of the comparison (comma-separated)")
    ap.add_argument("--merge", action="store_true",
                    help="add to bench/results/edgepipe.json (a re-run replaces its rows), e.g. a planner that failed")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    derivation = json.loads(DERIVATION.read_text())
    mb = derivation["microbatch"]
    points = [int(p) for p in args.points.split(",") if p]
    methods = [m for m in args.methods.split(",") if m]
    beds = [b for b in args.testbeds.split(",") if b]
    for m in methods:
        if m not in METHODS:
            raise SystemExit(f"--methods: unknown {m!r} (known: {', '.join(METHODS)})")
    for b in beds:
        if b not in TESTBEDS:
            raise SystemExit(f"--testbeds: unknown {b!r} (known: {', '.join(TESTBEDS)})")
    # profiles are the nodes' cached ones (the derivation's run made them); calibration
    # corrects each device type from its serving speed in every run
    common = {"model": MODEL, "granularity": GRANULARITY, "microbatch": mb, "time_limit": 60,
              "no_spot_check": True}
    t0 = time.time()
    curve: list[dict[str, Any]] = []
    planners: list[dict[str, Any]] = []
    box: dict[str, Any] = {"checks": None}  # the scaling checks, from the first run that has them
    if args.merge and (RESULTS / "edgepipe.json").exists():
        old = json.loads((RESULTS / "edgepipe.json").read_text())
        box["checks"] = old.get("checks")
        curve = [c for c in old["curve"] if c["devices"] not in points and c.get("from") is None]
        planners = [p for p in old["planners"]
                    if args.no_planners or not (p["testbed"] in beds and p["method"] in methods)]

    def say(msg: str) -> None:
        if not args.json:
            print(msg, flush=True)

    def result(partial: bool) -> dict[str, Any]:
        # the 16-device point of the curve is the planners' "ours" on the plain testbed (the
        # same run: all 16 devices, our plan, calibrated), unless the curve measured it itself
        ours16 = next((p for p in planners if p["testbed"] == "edgepipe" and p["method"] == "ours"
                       and "error" not in p), None)
        if ours16 is not None and not any(c["devices"] == 16 for c in curve):
            curve.append({"devices": 16, "samples_per_s": ours16["measured_samples_per_s"],
                          "from": "planners: edgepipe, ours",
                          **{k: v for k, v in ours16.items() if k not in ("testbed", "method",
                                                                          "measured_samples_per_s")}})
        base = next((c["samples_per_s"] for c in curve if c["devices"] == 1 and "error" not in c), None)
        for c in curve:
            if "error" not in c:
                c["speedup"] = round(c["samples_per_s"] / base, 3) if base else None
                c["predicted_speedup"] = round(c["predicted_samples_per_s"] / base, 3) if base else None
        ratios = {}
        for tbname in TESTBEDS:
            rows = {p["method"]: p for p in planners if p["testbed"] == tbname and "error" not in p}
            if "ours" in rows:
                ratios[tbname] = {m: round(rows["ours"]["measured_samples_per_s"] / p["measured_samples_per_s"], 3)
                                  for m, p in rows.items() if m != "ours"}
        return {"bench": "edgepipe", "model": MODEL, "granularity": GRANULARITY, "microbatch": mb,
                "derivation": derivation, "checks": box["checks"], "curve": curve, "planners": planners,
                "ours_over": ratios, "cpu_sum": derivation["cpu_sum"], "seconds": round(time.time() - t0),
                "partial": partial}

    def flush() -> None:  # after every run: a bench stopped half-way keeps what it measured
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "edgepipe.json").write_text(json.dumps(result(True), indent=1))

    if points or "edgepipe" in beds:
        _plain(points, beds, methods, curve, planners, common, args, say, flush, derivation, box)
    if not args.no_planners and "edgepipe-slowpairs" in beds:
        with testbed(TESTBEDS["edgepipe-slowpairs"], "edgepipe-slow") as tb:
            _planners(tb, "edgepipe-slowpairs", methods, common, args, say, planners, flush, derivation, box)
    final = result(False)
    save("edgepipe", final, args.json)
    say(json.dumps({"curve": [(c["devices"], c.get("speedup")) for c in curve], "ours_over": final["ours_over"]}))
    plot(final)
    return 0


def _plain(points, beds, methods, curve, planners, common, args, say, flush, derivation, box) -> None:
    """The speedup curve's points and the comparison on the plain testbed (one testbed up)."""
    with testbed(TESTBEDS["edgepipe"], "edgepipe") as tb:
        box["checks"] = {**(box.get("checks") or {}), **link_checks(tb, derivation)}
        say("links: " + ", ".join(f"{k}: {v.get('as_board_mbps')} board Mbit/s ({v.get('error', 0):+.1%})"
                                  if "error" in v and isinstance(v["error"], float) else f"{k}: {v}"
                                  for k, v in box["checks"].items() if k.startswith("link ")))
        flush()
        for n in points:
            one = n == 1
            try:
                r = measure(tb, **common, nodes=",".join(subset(n)),
                            batches=ONE_DEVICE_BATCHES if one else args.batches or 2 * n,
                            calibrate=0 if one else args.calibrate, method="ours")
            except RuntimeError as e:  # a failed point is reported, the others still run
                say(f"{n:>2} devices: failed: {str(e)[-600:]}")
                curve.append({"devices": n, "error": str(e)[-2000:]})
                flush()
                continue
            box["checks"] = {**checks(r, derivation), **(box.get("checks") or {})}
            curve.append(_row(r, devices=n))
            flush()
            say(f"{n:>2} devices: {curve[-1]['samples_per_s']:.4f} samples/s "
                f"(predicted {curve[-1]['predicted_samples_per_s']:.4f}), {len(r['stages'])} stages")
        if not args.no_planners and "edgepipe" in beds:
            _planners(tb, "edgepipe", methods, common, args, say, planners, flush, derivation, box)


def _row(r: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {**extra, "samples_per_s": round(r["measured_samples_per_s"], 5),
            "predicted_samples_per_s": round(r["predicted_samples_per_s"], 5),
            "predicted_uncalibrated_samples_per_s": round(r["predicted_uncalibrated_samples_per_s"], 5),
            # per stage, what the nodes measured per microbatch (where a misprediction comes from)
            "stages": [{"units": s["units"], "devices": s["devices"],
                        "predicted_compute_s": round(s["predicted_compute_s"], 3),
                        "measured_compute_s": {d: v and round(v, 3) for d, v in s["measured_compute_s"].items()},
                        "measured_cpu_s": s["measured_cpu_s"]} for s in r["stages"]],
            "node_stats": r["node_stats"],
            # the timed interval alone: per node, microbatches, compute/wait/send seconds, busy
            # share; per microbatch its timestamps at every hop (where a shortfall comes from)
            "timed_node_stats": r.get("timed_node_stats"), "timestamps": r.get("timestamps"),
            "calibration": r.get("calibration"),
            "bottleneck_at": r["bottleneck_at"], "optimal": r["optimal"], "window": r.get("window"),
            "batches": r.get("batches"), "slope_samples_per_s": r.get("measured_slope_samples_per_s"),
            "arrivals_s": r.get("arrivals_s"),
            # where the run's time went (the bench's budget): gathering profiles and links, the
            # first deploy (shard loads), the calibration (bursts and redeploys), all of it
            "gather_seconds": round(r["gather_seconds"]), "deploy_seconds": round(r["deploy_seconds"]),
            "calibration_seconds": round((r.get("calibration") or {}).get("seconds") or 0),
            "seconds": round(r["total_seconds"])}


def _planners(tb, name: str, methods: list[str], common: dict[str, Any], args, say,
              rows: list[dict[str, Any]], flush, derivation: dict[str, Any], box: dict[str, Any]) -> None:
    for method in methods:
        try:
            r = measure(tb, **common, batches=args.batches or 2 * 2 * PER_TYPE, calibrate=args.calibrate,
                        method=method)
        except DoesNotFit as e:  # not deployed: the nodes would refuse it
            say(f"{name} {method:<10} does not fit: {str(e)[:600]}")
            rows.append({"testbed": name, "method": method, "error": "plan does not fit the devices",
                         "violations": e.result["violations"], "stages": e.result["stages"],
                         "predicted_samples_per_s": e.result["predicted_samples_per_s"]})
            flush()
            continue
        except RuntimeError as e:  # e.g. a baseline's plan that overruns a board: reported, not fatal
            say(f"{name} {method:<10} failed: {str(e)[-600:]}")
            rows.append({"testbed": name, "method": method, "error": str(e)[-2000:]})
            flush()
            continue
        if name == "edgepipe":  # the plain testbed's links and both kinds of device: the checks
            box["checks"] = {**(box.get("checks") or {}), **checks(r, derivation)}
        row = _row(r, testbed=name, method=method)
        row["measured_samples_per_s"] = row.pop("samples_per_s")
        rows.append(row)
        flush()
        say(f"{name} {method:<10} measured {row['measured_samples_per_s']:.4f} samples/s, "
            f"predicted {row['predicted_samples_per_s']:.4f}")


def plot(result: dict[str, Any]) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    c = [x for x in result["curve"] if "error" not in x and x.get("speedup") is not None]
    a.plot([x["devices"] for x in c], [x["speedup"] for x in c], "o-", label="measured")
    a.plot([x["devices"] for x in c], [x["predicted_speedup"] for x in c], "s--", label="planner's prediction")
    a.plot([1, 16], [1, 16], ":", color="grey", label="linear")
    a.axhline(10.59, color="red", lw=0.8, label="EdgePipe paper, 16 boards (10.59x)")
    a.set_xlabel("devices")
    a.set_ylabel("speedup over one RCC-VE-like device")
    a.set_title(f"{result['model']}, microbatch {result['microbatch']}")
    a.legend(fontsize=8)
    rows = [r for r in result["planners"] if "error" not in r]
    labels = [f"{r['method']}\n{'slow' if 'slow' in r['testbed'] else 'plain'}" for r in rows]
    x = range(len(rows))
    b.bar([i - 0.2 for i in x], [r["predicted_samples_per_s"] for r in rows], 0.4, label="predicted")
    b.bar([i + 0.2 for i in x], [r["measured_samples_per_s"] for r in rows], 0.4, label="measured")
    b.set_xticks(list(x), labels, fontsize=7)
    b.set_ylabel("samples/s")
    b.set_title("planners at 16 devices")
    b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / "edgepipe.png", dpi=100)


if __name__ == "__main__":
    sys.exit(main())
