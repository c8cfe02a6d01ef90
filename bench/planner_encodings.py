"""The planner's encoding decision on the example problems: raw vs --max-error, CPU and effort.

    python bench/planner_encodings.py [--budgets 0.01,0.02] [--json]

Each case is a plans/ problem with three candidates added (f16, int8, int4-ch-aciq; ratios of
the codecs at ViT shapes; errors per cut from bench/encoding_sum.py's vit_tiny figures, the
same at every cut; codec costs ~10x this machine's `bench/codecs.py`, for boards) and its
links slowed so that they matter: the home cluster with every link / 20, and the EdgePipe
ViT-Base board-to-board links / 10 (the client's kept), with and without replication.
CPU seconds are process time.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgezmq.planner import Problem, solve  # noqa: E402

ENCODINGS = {"f16": (0.5, 0.0002), "int8": (0.2513, 0.007), "int4-ch-aciq": (0.1263, 0.3)}
CODEC_MS_PER_MB = {"f16": (15, 7.5), "int8": (7, 1.8), "int4-ch-aciq": (12, 3)}
CASES = (("plans/home-vit-large-half.problem.yaml", 20.0, True, True),
         ("plans/edgepipe-vit-base-block.problem.yaml", 10.0, False, True),
         ("plans/edgepipe-vit-base-block.problem.yaml", 10.0, False, False))


def problem(path: str, factor: float, client_too: bool, replication: bool) -> Problem:
    d = yaml.safe_load((ROOT / path).read_text())
    n = len(d["model"]["units"])
    d["model"]["encodings"] = {e: {"ratio": r, "error": [err] * (n - 1)} for e, (r, err) in ENCODINGS.items()}
    for t in d["device_types"].values():
        t["codec_ms_per_mb"] = {e: {"encode": a, "decode": b} for e, (a, b) in CODEC_MS_PER_MB.items()}
    links = d["links"]
    base = links["default"]["mbps"]
    links["default"]["mbps"] = base / factor
    over = links.get("overrides") or []
    links["overrides"] = [o if ("client" in (o["a"], o["b"]) and not client_too) else
                          {**o, "mbps": o.get("mbps", base) / factor} for o in over]
    if not client_too:     # the client's links that took the default keep it
        links["overrides"] += [{"a": "client", "b": t, "mbps": base} for t in d["device_types"]
                               if not any("client" in (o["a"], o["b"]) and t in (o["a"], o["b"]) for o in over)]
    d.setdefault("options", {})["replication"] = replication
    return Problem.from_dict(d)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budgets", default="0.01,0.02")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    rows = []
    for path, factor, client_too, replication in CASES:
        p = problem(path, factor, client_too, replication)
        for e in [None, *(float(x) for x in args.budgets.split(","))]:
            t0 = time.process_time()
            plan = solve(p, max_error=e)
            row = {"problem": path, "links_divided_by": factor, "client_links_too": client_too,
                   "replication": replication, "max_error": e,
                   "bottleneck_s": plan.bottleneck_s, "optimal": plan.optimal, "lower_bound_s": plan.lower_bound_s,
                   "error": plan.error, "encodings": [s.encoding for s in plan.stages[:-1]],
                   "stages": [[*s.units, len(s.devices)] for s in plan.stages], "effort": plan.stats.get("effort"),
                   "decisions": plan.stats.get("decisions"), "stopped_by": plan.stats.get("stopped_by"),
                   "cpu_s": round(time.process_time() - t0, 2)}
            rows.append(row)
            if not args.json:
                print(json.dumps(row), flush=True)
    if args.json:
        print(json.dumps({"rows": rows}))


if __name__ == "__main__":
    main()
