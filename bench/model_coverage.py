"""Which timm architectures become exact unit chains: trace -> units -> chain, for every model timm can build.

For each name in `timm.list_models()` (or `--models`): build it with a seeded random init
(shrunk when it has more than --max-params parameters: `depth=2`, said so in its row), cut it
at `block` and at `fine` granularity (edgezmq.model.chain, traced graph; a timm ViT at `block`
uses its hand-written chain), run the units one after another on one random image, and
compare with the model's own forward: max |chain(x) - model(x)|, equal bit for bit or not.

    python bench/model_coverage.py                     # all, resumable: rows go to a JSONL file
    python bench/model_coverage.py --models resnet50 convnext_tiny --json

A model's row: name, status (ok | mismatch | few_units | untraceable | error | no_build | too_large),
units per granularity,
widest cut (tensors), max abs difference, seconds. The summary (bench/results/model_coverage.json,
the README table): of the models that build and trace, how many give >= 4 units and equal
output bit for bit at both granularities; the failures by cause.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import gc
import json
import random
import signal
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import timm  # noqa: E402
import torch  # noqa: E402

from edgezmq.model import chain  # noqa: E402

RESULTS = ROOT / "bench" / "results"
ROWS = RESULTS / "model_coverage.jsonl"
SUMMARY = RESULTS / "model_coverage.json"
MIN_UNITS = 4
HARD_MAX_PARAMS = 400e6  # larger ones, unshrinkable, are listed as too large for this machine
SEED = 0
SHRINK = ({"depth": 2}, "depths", "layers")  # kwargs that shrink: transformers; staged families (1 block per stage)
GRANULARITIES = ("block", "fine")


class Timeout(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: int):
    def handler(signum, frame):
        raise Timeout(f"over {seconds} s")
    old = signal.signal(signal.SIGALRM, handler)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _params(name: str, kwargs: dict) -> int:
    m = chain.create_model(name, device="meta", **kwargs)
    return sum(p.numel() for p in m.parameters())


class TooLarge(Exception):
    pass


def _shrunk(name: str, full: int, max_params: int) -> tuple[dict, int]:
    """The first shrinking kwargs the model accepts (if it still has more than HARD_MAX_PARAMS,
    the next), else none if the whole model is under HARD_MAX_PARAMS."""
    meta = chain.create_model(name, device="meta")
    stages = next((len(getattr(meta, a)) for a in ("stages", "layers", "levels") if hasattr(meta, a)
                   and hasattr(getattr(meta, a), "__len__")), 4)
    for s in SHRINK:
        kw = s if isinstance(s, dict) else {s: [1] * stages}
        try:
            n = _params(name, kw)
        except Exception:
            continue
        if n < full and n <= HARD_MAX_PARAMS:
            return kw, n
    if full <= HARD_MAX_PARAMS:
        return {}, full
    raise TooLarge(f"{full / 1e6:.0f} M parameters and no shrinking kwargs ({', '.join(map(str, SHRINK))}) it accepts")


def _cause(e: BaseException) -> str:
    text = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    return text[:300]


def check(name: str, max_params: int) -> dict[str, Any]:
    """One model's row."""
    t0 = time.perf_counter()
    row: dict[str, Any] = {"model": name, "kwargs": {}}
    try:
        n = _params(name, {})
        if n > max_params:
            row["params_full"] = n
            row["kwargs"], n = _shrunk(name, n, max_params)
        row["params"] = n
        torch.manual_seed(SEED)
        model = chain.create_model(name, **row["kwargs"])
    except TooLarge as e:
        row.update(status="too_large", cause=str(e))
        return row
    except Exception as e:
        row.update(status="no_build", cause=_cause(e))
        return row
    try:
        shape = chain.input_shape(name, 1, **row["kwargs"])
        x = torch.randn(shape, generator=torch.Generator().manual_seed(SEED))
        with torch.no_grad():
            ref = model(x)
    except Exception as e:
        row.update(status="no_build", cause="forward: " + _cause(e))
        return row
    if not isinstance(ref, torch.Tensor):
        row.update(status="no_build", cause=f"forward returns {type(ref).__name__}, not a tensor")
        return row
    row["units"], row["diff"], row["widest"], row["equal"] = {}, {}, {}, {}
    for g in GRANULARITIES:
        try:
            names = chain.unit_names(model, g)
            with torch.no_grad():
                ts: tuple[torch.Tensor, ...] = (x,)
                widest = 1
                for u in range(len(names)):
                    ts = chain.run_units(model, g, *ts, start=u, end=u + 1)
                    widest = max(widest, len(ts))
        except chain.ModelError as e:
            status = "untraceable" if "cannot trace" in str(e) else "error"
            row.update(status=status, cause=f"{g}: " + _cause(e), seconds=round(time.perf_counter() - t0, 2))
            return row
        except Exception as e:
            row.update(status="error", cause=f"{g}: " + _cause(e), seconds=round(time.perf_counter() - t0, 2))
            return row
        out = ts[0]
        row["units"][g] = len(names)
        row["widest"][g] = widest
        row["equal"][g] = bool(out.shape == ref.shape and torch.equal(out, ref))
        row["diff"][g] = float((out - ref).abs().max()) if out.shape == ref.shape else None
    ok = all(row["equal"].values()) and row["units"]["block"] >= MIN_UNITS
    row.update(status="ok" if ok else "mismatch" if not all(row["equal"].values()) else "few_units",
               seconds=round(time.perf_counter() - t0, 2))
    return row


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    by = collections.Counter(r["status"] for r in rows)
    traced = [r for r in rows if r["status"] in ("ok", "mismatch", "few_units", "error")]  # built, traced
    ok = [r for r in traced if r["status"] == "ok"]
    causes: dict[str, list[str]] = collections.defaultdict(list)
    for r in rows:
        if r["status"] != "ok":
            causes[f"{r['status']}: {r.get('cause', '')[:120]}"].append(r["model"])
    return {
        "timm": timm.__version__, "torch": torch.__version__, "models": len(rows), "status": dict(by),
        "traced": len(traced), "ok": len(ok), "ok_percent": round(100 * len(ok) / max(1, len(traced)), 2),
        "shrunk": sorted(r["model"] for r in rows if r.get("kwargs")),
        "median_units": {g: sorted(r["units"][g] for r in ok)[len(ok) // 2] if ok else 0 for g in GRANULARITIES},
        "multi_tensor_cuts": sorted(r["model"] for r in ok if r["widest"]["block"] > 1 or r["widest"]["fine"] > 1)[:50],
        "failures": {k: sorted(v) for k, v in sorted(causes.items(), key=lambda kv: -len(kv[1]))},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*", help="these models only (default: every name timm lists)")
    ap.add_argument("--max-params", type=float, default=60e6, help="shrink models with more parameters")
    ap.add_argument("--shard", default="0/1", help="K/N: every N-th model from the K-th (parallel runs)")
    ap.add_argument("--timeout", type=int, default=300, help="seconds per model before it counts as an error")
    ap.add_argument("--fresh", action="store_true", help="start over (default: resume the JSONL file)")
    ap.add_argument("--json", action="store_true", help="print the summary as one JSON object (last line)")
    ap.add_argument("--merge", action="store_true", help="only summarise the rows the shards wrote")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    names = args.models or timm.list_models()
    k, n_shards = (int(v) for v in args.shard.split("/"))
    RESULTS.mkdir(parents=True, exist_ok=True)
    rows_file = ROWS if not args.models else RESULTS / "model_coverage-selected.jsonl"
    if not args.models:  # a seeded order: rows done so far are a uniform sample of the list
        random.Random(SEED).shuffle(names)
    if n_shards > 1:
        names = names[k::n_shards]
        rows_file = rows_file.with_suffix(f".{k}of{n_shards}.jsonl")
    done: dict[str, dict] = {}
    sources = sorted(RESULTS.glob("model_coverage.*of*.jsonl")) if args.merge else [rows_file]
    for src in sources:
        if src.exists() and (args.merge or not args.fresh):
            for line in src.read_text().splitlines():
                r = json.loads(line)
                done[r["model"]] = r
    if args.merge:
        names = [n for n in timm.list_models() if n in done]
        if not args.json:
            print(f"{len(names)} of {len(timm.list_models())} models run so far")
    with (contextlib.nullcontext() if args.merge else rows_file.open("a" if done else "w")) as f:
        for i, name in enumerate(names):
            if name in done:
                continue
            try:
                with time_limit(args.timeout):
                    row = check(name, int(args.max_params))
            except Timeout as e:
                row = {"model": name, "status": "error", "cause": f"timeout: {e}"}
            done[name] = row
            f.write(json.dumps(row) + "\n")
            f.flush()
            if not args.json:
                print(f"[{i + 1}/{len(names)}] {name}: {row['status']} {row.get('units', '')} "
                      f"{row.get('cause', '')[:100]}", flush=True)
            gc.collect()
    rows = [done[n] for n in names if n in done]
    summary = summarise(rows)
    if not args.models and (n_shards == 1 or args.merge):
        SUMMARY.write_text(json.dumps(summary, indent=1) + "\n")
    if args.json:
        print(json.dumps(summary))
    else:
        print(json.dumps({k: v for k, v in summary.items() if k != "failures"}, indent=1))
        for cause, models in list(summary["failures"].items())[:30]:
            print(f"{len(models):4d}  {cause}  e.g. {', '.join(models[:4])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
