"""The command line's exit-code policy: 0 done, 1 failed, 2 bad input, 130 interrupted; a bug keeps its traceback."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import yaml

from edgezmq.cli.main import main as cli_main
from edgezmq.errors import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK

CLI_TIMEOUT_S = 120.0  # a subprocess that imports torch on a loaded 2-core machine
UNREACHABLE = "tcp://127.0.0.1:1"  # nothing listens on port 1; nothing here connects to it either


@pytest.fixture
def files(tmp_path):
    """A plan (its nodes never contacted here), a .npy input, and a path that does not exist."""
    plan = tmp_path / "plan.yaml"
    plan.write_text(yaml.safe_dump({
        "model": {"name": "vit_tiny_patch16_224", "checkpoint": "/nodes/have/it.safetensors", "microbatch": 2},
        "stages": [{"units": [0, 14], "nodes": [UNREACHABLE]}]}))
    npy = tmp_path / "x.npy"
    np.save(npy, np.zeros((2, 3, 224, 224), dtype=np.float32))
    return {"plan": str(plan), "npy": str(npy), "missing": str(tmp_path / "missing.yaml"), "dir": tmp_path}


def _bad_inputs(f: dict) -> dict[str, list[str]]:
    """One bad input per command group, each past argparse, so the command itself refuses it."""
    return {
        "node": ["node", "--config", f["missing"]],
        "keys": ["keys", "generate", "--dir", str(f["dir"] / "keys"), "--name", "me"],  # the 2nd time
        "deploy": ["deploy", f["missing"]],
        "deploy --model on a plan": ["deploy", f["plan"], "--model", "vit_tiny_patch16_224"],
        "submit": ["submit", f["plan"], "--npy", f["missing"]],
        "run": ["run", f["missing"], "--model", "vit_tiny_patch16_224", "--random", "2"],
        "run, budget flags without a budget": ["run", f["missing"], "--model", "vit_tiny_patch16_224", "--random", "2",
                                               "--calibration-samples", "4"],
        "checkpoint": ["checkpoint", "--model", "vit_tiny_patch16_224", "--kwargs", "[1, 2]"],
        "profile": ["profile", "--model", "vit_tiny_patch16_224", "--keys", f["plan"]],
        "netprobe": ["netprobe", "--to", "board-1"],
        "pause": ["pause", "board-1"],
        "plan": ["plan", f["missing"]],
        "testbed": ["testbed", "status", f["missing"]],
        "status": ["status", f["missing"]],
        "trace": ["trace", f["plan"], "--batches", "2", "--out", str(f["dir"] / "t.jpg")],
        "install-service": ["install-service", "b/1", "--root", str(f["dir"] / "root"), "--dry-run"],
    }


def test_bad_input_exits_2_with_one_line_naming_the_command(files, capsys):
    assert cli_main(["keys", "generate", "--dir", str(files["dir"] / "keys"), "--name", "me"]) == EXIT_OK
    capsys.readouterr()
    for group, argv in _bad_inputs(files).items():
        code = cli_main(argv)
        out = capsys.readouterr()
        lines = out.err.strip().splitlines()
        assert code == EXIT_BAD_INPUT, (group, code, out.err)
        assert len(lines) == 1 and "Traceback" not in out.err, (group, out.err)
        assert lines[0].startswith(f"edgezmq {argv[0]}"), (group, lines[0])


def test_usage_errors_are_argparses_2(capsys):
    for argv in (["submit"], ["demo", "--nodes", "0"], ["netprobe", "--to", UNREACHABLE, "--bytes", "0"],
                 ["trace", "p.yaml", "--batches", "-1"], ["no-such-command"]):
        with pytest.raises(SystemExit) as ei:
            cli_main(argv)
        assert ei.value.code == EXIT_BAD_INPUT, argv
        assert "Traceback" not in capsys.readouterr().err


N1, N2, N3 = "tcp://127.0.0.1:1", "tcp://127.0.0.2:1", "tcp://127.0.0.3:1"  # refused before any is contacted


@pytest.mark.parametrize("argv, fragment", [
    (["--from", N1, "--to", N2, "--to", N3], "--to: several with --from: a node runs one netprobe job at a time"),
    (["--from", N1, "--from", N2, "--to", N2, "--to", N3], "--from/--to: several of both"),
    (["--to", N2, "--to", N2], f"--to: {N2!r} given twice"),
    (["--from", N1, "--from", N1, "--to", N2], f"--from: {N1!r} given twice"),
    (["--from", N1, "--from", N2, "--to", N2], f"--from: {N2!r} is also the --to node"),
])
def test_netprobe_refuses_what_one_job_per_node_cannot_measure(capsys, argv, fragment):
    assert cli_main(["netprobe", *argv]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip()
    assert err.startswith("edgezmq netprobe: ") and fragment in err and "\n" not in err, err


def test_a_failed_operation_exits_1(files, monkeypatch, capsys):
    from edgezmq.client import Client

    def timed_out(*a, **k):
        raise TimeoutError("no result for microbatch 0 within 1s (2 attempt(s))")

    monkeypatch.setattr(Client, "from_plan", timed_out)
    assert cli_main(["submit", files["plan"], "--npy", files["npy"], "-q"]) == EXIT_FAILED
    err = capsys.readouterr().err
    assert err == "edgezmq submit: no result for microbatch 0 within 1s (2 attempt(s))\n"


def test_a_bug_keeps_its_traceback(files, monkeypatch):
    from edgezmq.orchestrate import planfile

    for bug in (RuntimeError("a bug"), ValueError("a bug that happens to be a ValueError"), KeyError("k")):
        def load_plan(path, bug=bug):
            raise bug

        monkeypatch.setattr(planfile, "load_plan", load_plan)
        with pytest.raises(type(bug)):
            cli_main(["undeploy", files["plan"]])


def test_ctrl_c_exits_130(files, monkeypatch, capsys):
    from edgezmq.orchestrate import planfile

    def interrupted(path):
        raise KeyboardInterrupt

    monkeypatch.setattr(planfile, "load_plan", interrupted)
    assert cli_main(["undeploy", files["plan"]]) == EXIT_INTERRUPTED
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.slow
def test_entry_point_prints_one_line_for_bad_input_and_a_traceback_for_a_bug(files):
    r = subprocess.run([sys.executable, "-m", "edgezmq", "deploy", files["missing"]],
                       capture_output=True, text=True, timeout=CLI_TIMEOUT_S)
    assert r.returncode == EXIT_BAD_INPUT and r.stderr.count("\n") == 1 and "cannot read" in r.stderr
    bug = ("import sys\nfrom edgezmq.orchestrate import planfile\n"
           "def load_plan(path):\n    raise RuntimeError('a bug')\n"
           "planfile.load_plan = load_plan\n"
           "from edgezmq.cli.main import main\nsys.exit(main(['undeploy', sys.argv[1]]))\n")
    r = subprocess.run([sys.executable, "-c", bug, files["plan"]], capture_output=True, text=True,
                       timeout=CLI_TIMEOUT_S)
    assert r.returncode == 1 and "Traceback" in r.stderr and "RuntimeError: a bug" in r.stderr
