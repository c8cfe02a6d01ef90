"""Shared plumbing of the testbed benches: bring a testbed up, run measure.py inside its
client namespace, write the JSON result and the PNG plot."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
BENCH_STATE = Path("/run/edgezmq/bench")  # testbed files of running benches
sys.path.insert(0, str(ROOT))

from edgezmq.interrupts import sigterm_interrupts  # noqa: E402
from edgezmq.testbed import Testbed  # noqa: E402


def need_root() -> None:
    if os.geteuid() != 0:
        raise SystemExit("this bench builds an emulated testbed (network namespaces, cgroups): run it as root")


@contextlib.contextmanager
def testbed(config: dict | str | Path, name: str):
    """A testbed that is up inside the block and removed after it, whatever happens."""
    need_root()
    # the file and the state stay in the testbed's default state directory, so that a bench
    # killed mid-run can be cleaned with `edgezmq testbed down BENCH_DIR/testbed.yaml`
    tb = Testbed.from_yaml(_config_file(config, name), name=name)
    with sigterm_interrupts():  # `timeout` and CI stop benches with SIGTERM: clean up as after Ctrl-C
        try:
            tb.up(reclaim=True)  # a testbed of this bench's name is a killed run's leftover
            yield tb
        finally:
            tb.down()


def result_name(text: str) -> str:
    """An argparse type: a results file's name, letters, digits, '-' and '_'."""
    import argparse
    import re

    if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", text):
        raise argparse.ArgumentTypeError(f"expected 1..64 letters, digits, '-' or '_', got {text!r}")
    return text


def _config_file(config: dict | str | Path, name: str) -> Path:
    path = BENCH_STATE / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config) if isinstance(config, dict) else Path(config).read_text())
    return path


class DoesNotFit(RuntimeError):
    """The method's plan overruns a device (e.g. PipeDream's, made for copies of the first
    device): measure.py does not deploy it."""

    def __init__(self, result: dict[str, Any]):
        super().__init__("plan does not fit the devices: " + "; ".join(result["violations"]))
        self.result = result


def measure(tb: Testbed, *, timeout: float = 3600, **kw: Any) -> dict[str, Any]:
    """Run bench/measure.py in the testbed's client namespace; its JSON result (DoesNotFit
    when the plan overruns a device)."""
    argv = [sys.executable, str(ROOT / "bench" / "measure.py"), "--cluster", str(tb.cluster_path)]
    for k, v in kw.items():
        flag = "--" + k.replace("_", "-")
        if v is True:
            argv.append(flag)
        elif v is not None and v is not False:  # (not `v not in (None, False)`: 0 == False dropped `--calibrate 0`)
            argv += [flag, json.dumps(v) if isinstance(v, dict) else str(v)]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = tb.exec_in_client(argv, capture_output=True, text=True, timeout=timeout, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"measure.py failed ({r.returncode}):\n{r.stderr[-4000:]}")
    out = json.loads(r.stdout.strip().splitlines()[-1])
    if out.get("violations"):
        raise DoesNotFit(out)
    return out


def save(name: str, result: dict[str, Any], as_json: bool) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{name}.json"
    out.write_text(json.dumps(result, indent=1))
    if as_json:
        print(json.dumps(result))
    return out


def pyplot():
    try:
        import matplotlib
    except ImportError:
        print("matplotlib missing (pip install -e '.[bench]'): no plot", file=sys.stderr)
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def bars(labels: list[str], predicted: list[float], measured: list[float], title: str, path: Path) -> None:
    """Predicted vs measured samples/s side by side, one pair per label."""
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    x = range(len(labels))
    ax.bar([i - 0.2 for i in x], predicted, 0.4, label="predicted")
    ax.bar([i + 0.2 for i in x], measured, 0.4, label="measured")
    ax.set_xticks(list(x), labels)
    ax.set_ylabel("samples/s")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)

