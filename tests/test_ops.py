"""Operations: node config files, the systemd unit, install-service, Prometheus metrics, status and traces."""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import time
import urllib.request
from dataclasses import replace
from pathlib import Path

import pytest
import yaml
from helpers import (
    KWARGS,
    MICROBATCH,
    MODEL,
    N_UNITS,
    batches,
    checkpoint,
    free_port,
    inproc_node,
    stage_stats,
    stats_reply,
)

from edgezmq.cli import node as node_cli
from edgezmq.cli import ops as ops_cli
from edgezmq.cli.main import main as cli_main
from edgezmq.client import Client
from edgezmq.node import config as nodeconfig
from edgezmq.node import daemon as node_mod
from edgezmq.node import stage as stage_mod
from edgezmq.node.config import NodeConfigError, load_node_config
from edgezmq.ops.status import status
from edgezmq.orchestrate.deploy import deploy, unload
from edgezmq.orchestrate.planfile import load_plan

REPO = Path(__file__).resolve().parent.parent
HTTP_TIMEOUT_S = 10.0
STATUS_TIMEOUT_S = 0.5  # for the dead node: status must come back about this fast


# ---- fixtures ------------------------------------------------------------------
def _dead_address() -> str:
    return f"tcp://127.0.0.1:{free_port()}"


@pytest.fixture(scope="module")
def deployed(tmp_path_factory):
    """Two in-process nodes serving a 2-stage plan; (plan file, plan, nodes)."""
    tmp = tmp_path_factory.mktemp("ops")
    with inproc_node("s0") as n0, inproc_node("s1") as n1:
        plan_d = {
            "model": {"name": MODEL, "checkpoint": checkpoint(), "microbatch": MICROBATCH, "kwargs": KWARGS},
            "nodes": {"s0": n0.control_endpoint, "s1": n1.control_endpoint},
            "stages": [{"units": [0, 3], "nodes": ["s0"], "threads": 1},
                       {"units": [3, N_UNITS], "nodes": ["s1"], "threads": 1}],
            "results": f"tcp://127.0.0.1:{free_port()}",
        }
        pf = tmp / "plan.yaml"
        pf.write_text(yaml.safe_dump(plan_d))
        plan = load_plan(pf)
        deploy(plan, load_timeout=120)
        try:
            yield pf, plan, (n0, n1)
        finally:
            unload(plan)


def _submit(plan, n: int, seed: int = 0) -> None:
    with Client.from_plan(plan, window=3, timeout=60) as c:
        assert len(list(c.stream(batches(n, seed=seed)))) == n


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgezmq")
    sub = p.add_subparsers(dest="command", required=True)
    ops_cli.add_cli(sub)
    return p


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    code = cli_main(argv)  # with the exit-code policy
    out = capsys.readouterr()
    return code, out.out, out.err


# ---- node config ------------------------------------------------------------------
FULL_CONFIG = """
control: tcp://0.0.0.0:5551
name: board-1
threads: 4
memory_limit: 6GB
advertise: 10.0.0.11
cache_dir: /var/cache/edgezmq/board-1
metrics_port: 9550
metrics_host: 0.0.0.0
log_level: INFO
keys: {secret_key_file: /etc/edgezmq/keys/b1.key_secret, public_key_file: /etc/edgezmq/keys/b1.key,
       allowed_clients_dir: /etc/edgezmq/keys/clients}
"""


def test_node_config_parses_every_field(tmp_path):
    f = tmp_path / "board-1.yaml"
    f.write_text(FULL_CONFIG)
    cfg = load_node_config(f)
    assert cfg["control"] == "tcp://0.0.0.0:5551" and cfg["name"] == "board-1" and cfg["threads"] == 4
    assert cfg["memory_limit"] == 6 * 10**9 and cfg["metrics_port"] == 9550 and cfg["log_level"] == "info"
    assert cfg["keys"]["allowed_clients_dir"] == "/etc/edgezmq/keys/clients"  # passed through
    assert load_node_config(REPO / "nodes" / "example-node.yaml")["name"] == "board-1"
    f.write_text("")
    assert load_node_config(f) == {}  # an empty file: all defaults


@pytest.mark.parametrize("text, error", [
    ("threads: 0", "threads: expected an integer in [1, 256], got 0"),
    ("threads: four", "threads: expected an integer, got str 'four'"),
    ("metrics_port: 70000", "metrics_port: expected an integer in [0, 65535], got 70000"),
    ("control: 5550", "control: expected a tcp://HOST:PORT address, got 5550"),
    ("thread: 4", "unknown field(s) ['thread']"),
    ("memory_limit: lots", "memory_limit: expected bytes or a size like '6GB' or '512MiB', got 'lots'"),
    ("memory_limit: -1", "memory_limit: expected bytes in [1, 1152921504606846976], got -1"),
    ("log_level: loud", "log_level: expected one of"),
    ("name: a/b", "name: expected letters, digits"),
    ("keys: {secret: x}", "keys: unknown field(s) ['secret']"),
    ("keys: {secret_key_file: 3}", "keys.secret_key_file: expected a non-empty string, got int 3"),
    ("- a list", "expected a mapping at the top level, got list"),
    ("a: [unbalanced", "not valid YAML"),
])
def test_node_config_errors_name_file_and_field(tmp_path, text, error):
    f = tmp_path / "n.yaml"
    f.write_text(text)
    with pytest.raises(NodeConfigError) as ei:
        load_node_config(f)
    assert error in str(ei.value) and str(f) in str(ei.value)


def test_missing_node_config_is_a_clear_error(tmp_path):
    with pytest.raises(NodeConfigError, match="cannot read node config"):
        load_node_config(tmp_path / "nope.yaml")


def _node_parser() -> argparse.ArgumentParser:
    """`edgezmq node`'s flags as cli/node.py declares them, plus node_cli.add_node_options."""
    p = argparse.ArgumentParser()
    p.add_argument("-v", "--verbose", action="count", default=0)
    p.add_argument("--control", default="tcp://127.0.0.1:5550")
    p.add_argument("--name")
    p.add_argument("--threads", type=int)
    p.add_argument("--memory-limit", type=int)
    p.add_argument("--advertise")
    node_cli.add_node_options(p)
    return p


def test_command_line_flags_override_the_config_file(tmp_path, monkeypatch):
    monkeypatch.delenv("EDGEZMQ_CACHE", raising=False)
    f = tmp_path / "board-1.yaml"
    f.write_text(FULL_CONFIG.replace("/var/cache/edgezmq/board-1", str(tmp_path / "cache")))
    p = _node_parser()
    opts = node_cli.node_args_from(p.parse_args(["--config", str(f), "--threads", "2", "--control", "tcp://127.0.0.1:0"]))
    assert opts["threads"] == 2 and opts["control"] == "tcp://127.0.0.1:0"  # flags win
    assert opts["name"] == "board-1" and opts["memory_limit"] == 6 * 10**9  # the file fills the rest
    assert opts["keys"]["public_key_file"] == "/etc/edgezmq/keys/b1.key"
    import os
    assert os.environ["EDGEZMQ_CACHE"] == str(tmp_path / "cache")  # cache_dir reaches the cache code
    opts = node_cli.node_args_from(p.parse_args(["--config", str(f)]))
    assert opts["control"] == "tcp://0.0.0.0:5551" and opts["threads"] == 4
    opts = node_cli.node_args_from(p.parse_args([]))  # no file: the defaults, as before
    assert opts["control"] == nodeconfig.DEFAULT_CONTROL and opts["threads"] is None
    assert opts["metrics_port"] is None and opts["metrics_host"] == "127.0.0.1"
    # the CurveZMQ fields map onto `edgezmq node --secret-key / --allow`, flags winning
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", "/run/credentials/edgezmq-node@board-1.service")
    p.add_argument("--secret-key")
    p.add_argument("--allow")
    f.write_text("keys:\n  secret_key_file: ${CREDENTIALS_DIRECTORY}/node.key_secret\n  allowed_clients_dir: /k/c\n")
    opts = node_cli.node_args_from(p.parse_args(["--config", str(f)]))
    assert opts["secret_key"] == "/run/credentials/edgezmq-node@board-1.service/node.key_secret"
    assert opts["allow"] == "/k/c"
    opts = node_cli.node_args_from(p.parse_args(["--config", str(f), "--allow", "/mine"]))
    assert opts["allow"] == "/mine" and opts["secret_key"].endswith("node.key_secret")
    ns = argparse.Namespace(threads=8, name=None)
    nodeconfig.apply_to_args({"threads": 3, "name": "x"}, ns)
    assert ns.threads == 8 and ns.name == "x"


# ---- systemd unit and install-service ----------------------------------------------------
def test_unit_in_repo_is_the_rendered_template_and_hardened():
    text = (REPO / "nodes" / "edgezmq-node@.service").read_text()
    assert text == nodeconfig.render_unit()  # one source: install-service writes the same file
    for line in ("ExecStart=/opt/edgezmq/bin/edgezmq node --config /etc/edgezmq/%i.yaml",
                 "Restart=on-failure", "DynamicUser=yes", "ProtectSystem=strict", "NoNewPrivileges=yes",
                 "PrivateTmp=yes", "MemoryAccounting=yes", "CPUAccounting=yes", "KillSignal=SIGTERM",
                 "CacheDirectory=edgezmq/%i", "StandardError=journal"):
        assert line in text.splitlines(), line
    stop = int(re.search(r"^TimeoutStopSec=(\d+)$", text, re.M).group(1))
    assert stop > stage_mod.DRAIN_TIMEOUT_S  # systemd waits for the drain before SIGKILL


def test_unit_passes_systemd_analyze_verify(tmp_path):
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze not installed")
    # verify checks that ExecStart exists: point it at this installation's script
    exe = ops_cli.default_exec()
    assert Path(exe).is_file(), f"no edgezmq script to point ExecStart at (looked for {exe}): is edgezmq installed?"
    unit = tmp_path / "edgezmq-node@t1.service"
    unit.write_text(nodeconfig.render_unit(exe))
    r = subprocess.run([tool, "verify", "--man=no", str(unit)], capture_output=True, text=True,
                       timeout=60, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    complaints = [ln for ln in (r.stdout + r.stderr).splitlines() if unit.name in ln]
    assert not complaints, complaints  # unknown keys are only warnings: fail on them too


def test_install_script_is_valid_bash():
    r = subprocess.run(["bash", "-n", str(REPO / "nodes" / "install.sh")], capture_output=True, text=True, timeout=10)
    assert r.returncode == 0, r.stderr


def test_install_service_writes_unit_and_config_under_root(tmp_path, capsys):
    cfg = tmp_path / "b1.yaml"
    cfg.write_text("name: b1\ncontrol: tcp://0.0.0.0:5550\nthreads: 2\n")
    root = tmp_path / "root"
    code, out, err = _run(["install-service", "b1", "--config", str(cfg), "--root", str(root),
                           "--exec", "/opt/x/bin/edgezmq"], capsys)
    assert code == 0, err
    unit = root / "etc/systemd/system/edgezmq-node@.service"
    assert "ExecStart=/opt/x/bin/edgezmq node --config /etc/edgezmq/%i.yaml" in unit.read_text()
    assert (root / "etc/edgezmq/b1.yaml").read_text() == cfg.read_text()
    assert "systemctl enable --now edgezmq-node@b1.service" in out and "not started" in out
    # again with a different config: refused unless --force
    cfg.write_text("name: b1\nthreads: 3\n")
    code, _, err = _run(["install-service", "b1", "--config", str(cfg), "--root", str(root)], capsys)
    assert code == 2 and "--force" in err
    code, _, err = _run(["install-service", "b1", "--config", str(cfg), "--root", str(root), "--force"], capsys)
    assert code == 0 and "threads: 3" in (root / "etc/edgezmq/b1.yaml").read_text()


def test_install_service_dry_run_and_bad_input(tmp_path, capsys):
    root = tmp_path / "root"
    code, out, _ = _run(["install-service", "b2", "--root", str(root), "--dry-run"], capsys)
    assert code == 0 and not root.exists()
    assert "[Service]" in out and "name: b2" in out and "systemctl daemon-reload" in out
    code, _, err = _run(["install-service", "b/2", "--root", str(root)], capsys)
    assert code == 2 and "instance name" in err and "Traceback" not in err
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: other\n")
    code, _, err = _run(["install-service", "b2", "--config", str(bad), "--root", str(root)], capsys)
    assert code == 2 and "differs from the instance name" in err
    bad.write_text("threads: zero\n")
    code, _, err = _run(["install-service", "b2", "--config", str(bad), "--root", str(root)], capsys)
    assert code == 2 and "threads: expected an integer" in err and not root.exists()


def test_every_ops_command_has_help_with_examples(capsys):
    for cmd in ("status", "trace", "install-service"):
        with pytest.raises(SystemExit) as ei:
            _parser().parse_args([cmd, "--help"])
        assert ei.value.code == 0
        assert "examples:" in capsys.readouterr().out


# ---- metrics -------------------------------------------------------------------
def _scrape(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_S) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


@pytest.mark.slow
def test_metrics_endpoint_serves_counters_that_move_with_traffic(deployed):
    from edgezmq.node.metrics import serve_metrics

    _, plan, (n0, _) = deployed
    h = serve_metrics(n0, 0)
    try:
        before = _scrape(h.url)
        for name in ('edgezmq_node_state{node="s0",state="running"}', "edgezmq_samples_processed_total",
                     'edgezmq_phase_seconds_total{phase="compute"}', 'edgezmq_phase_seconds_total{phase="send"}',
                     'edgezmq_queue_depth{queue="in"}', 'edgezmq_errors_total{kind="bad_message"}',
                     "edgezmq_received_bytes_total", "edgezmq_sent_bytes_total",
                     "edgezmq_resident_memory_bytes", 'edgezmq_microbatches_total{event="processed"}'):
            assert name in before, name
        assert before["edgezmq_resident_memory_bytes"] > 0
        _submit(plan, 3, seed=1)
        key = 'edgezmq_microbatch_phase_seconds_count{phase="compute"}'
        deadline = time.time() + HTTP_TIMEOUT_S  # the send thread observes just after its send
        while (after := _scrape(h.url)).get(key, 0) < 3 and time.time() < deadline:
            time.sleep(0.05)
        d = {k: after[k] - before.get(k, 0.0) for k in after}
        assert d['edgezmq_microbatches_total{event="processed"}'] == 3
        assert d["edgezmq_samples_processed_total"] == 3 * MICROBATCH
        assert d['edgezmq_phase_seconds_total{phase="compute"}'] > 0
        assert d["edgezmq_received_bytes_total"] >= 3 * MICROBATCH * 3 * 64 * 64 * 4  # the input images
        assert d["edgezmq_sent_bytes_total"] > 0
        assert d['edgezmq_microbatch_phase_seconds_count{phase="compute"}'] == 3  # one sample per microbatch
        assert after['edgezmq_microbatch_phase_seconds_bucket{le="+Inf",phase="compute"}'] >= 3
    finally:
        h.stop()
    assert n0.observers == []  # unhooked
    with pytest.raises(OSError):
        urllib.request.urlopen(h.url, timeout=2)


@pytest.mark.slow
def test_metrics_port_in_use_is_a_config_error(deployed):
    _, _, (n0, _) = deployed
    h = node_cli.start_metrics(n0, {"metrics_port": 0, "metrics_host": "127.0.0.1"})
    try:
        with pytest.raises(NodeConfigError, match="metrics_port: .*cannot listen"):
            node_cli.start_metrics(n0, {"metrics_port": h.port, "metrics_host": "127.0.0.1"})
    finally:
        h.stop()
    assert node_cli.start_metrics(n0, {"metrics_port": None}) is None


# ---- status --------------------------------------------------------------------------
@pytest.mark.slow
def test_status_of_a_running_plan(deployed, capsys):
    pf, plan, _ = deployed
    _submit(plan, 4, seed=2)
    code, out, err = _run(["status", str(pf)], capsys)
    assert code == 0, err
    lines = out.splitlines()
    assert "2 up, 0 down" in lines[0]
    rows = {ln.split()[2] if ln.startswith("*") else ln.split()[1]: ln for ln in lines[2:4]}
    assert set(rows) == {"s0", "s1"} and all("running" in r for r in rows.values())
    assert "[0, 3)" in rows["s0"] and "[3, 6)" in rows["s1"]
    assert sum(ln.startswith("*") for ln in lines[2:4]) == 1 and "bottleneck: stage" in out

    code, out, _ = _run(["status", str(pf), "--json"], capsys)
    rep = json.loads(out)
    assert code == 0 and rep["kind"] == "plan" and rep["up"] == 2 and rep["down"] == 0
    n = {r["name"]: r for r in rep["nodes"]}
    assert n["s0"]["stage"] == 0 and n["s1"]["units"] == [3, N_UNITS]
    assert n["s0"]["processed"] >= 4 and n["s0"]["samples_per_s"] > 0 and n["s1"]["errors"] == 0
    assert set(n["s0"]["split"]) == {"compute", "recv", "wait", "send"}
    assert all(0 <= v <= 1 for v in n["s0"]["split"].values()) and n["s0"]["rss"] > 0
    assert rep["bottleneck_stage"] in (0, 1) and sum(r["bottleneck"] for r in rep["nodes"]) == 1


@pytest.mark.slow
def test_status_shows_a_dead_node_as_down_without_hanging(deployed, tmp_path, capsys):
    pf, _, (n0, n1) = deployed
    d = yaml.safe_load(pf.read_text())
    d["nodes"]["ghost"] = _dead_address()
    d["stages"][1]["nodes"] = ["ghost"]
    bad = tmp_path / "ghost.yaml"
    bad.write_text(yaml.safe_dump(d))
    t0 = time.time()
    code, out, _ = _run(["status", str(bad), "--json", "--timeout", str(STATUS_TIMEOUT_S)], capsys)
    assert time.time() - t0 < 5 * STATUS_TIMEOUT_S + 2
    rep = json.loads(out)
    assert code == 1 and rep["up"] == 1 and rep["down"] == 1
    ghost = next(r for r in rep["nodes"] if r["name"] == "ghost")
    assert ghost["state"] == "down" and not ghost["up"] and "did not answer" in ghost["error"]
    code, out, _ = _run(["status", str(bad), "--timeout", str(STATUS_TIMEOUT_S)], capsys)
    assert code == 1 and "ghost: down: " in out and re.search(r"ghost\s+down", out)

    # a cluster inventory: the same nodes, shards read from the nodes themselves
    inv = tmp_path / "cluster.yaml"
    inv.write_text(yaml.safe_dump({"nodes": [{"name": "s0", "control": n0.control_endpoint},
                                             {"name": "s1", "control": n1.control_endpoint},
                                             {"name": "ghost", "control": d["nodes"]["ghost"]}]}))
    code, out, _ = _run(["status", str(inv), "--json", "--timeout", str(STATUS_TIMEOUT_S)], capsys)
    rep = json.loads(out)
    assert code == 1 and rep["kind"] == "cluster"
    assert [(r["name"], r["state"], r["stage"]) for r in rep["nodes"]] == [
        ("s0", "running", 0), ("s1", "running", 1), ("ghost", "down", None)]


@pytest.mark.slow
def test_status_watch_refreshes_count_times_with_rates_over_the_refresh(deployed, capsys):
    pf, _, _ = deployed
    code, out, _ = _run(["status", str(pf), "--watch", "--interval", "0.2", "--count", "2", "--json"], capsys)
    reps = [json.loads(ln) for ln in out.splitlines()]
    assert code == 0 and len(reps) == 2
    assert not reps[0]["refreshed"] and reps[1]["refreshed"]
    assert all(0 < r["window_s"] < 5 for r in reps[1]["nodes"])  # rates over the last refresh
    code, out, _ = _run(["status", str(pf), "--watch", "--interval", "0.1", "--count", "2"], capsys)
    assert code == 0 and out.count("2 up, 0 down") == 2


def test_status_bad_input_is_exit_2_without_traceback(tmp_path, capsys):
    code, _, err = _run(["status", str(tmp_path / "missing.yaml")], capsys)
    assert code == 2 and "cannot read" in err
    f = tmp_path / "x.yaml"
    f.write_text("just: text\n")
    code, _, err = _run(["status", str(f)], capsys)
    assert code == 2 and "expected a plan" in err
    with pytest.raises(SystemExit) as e:  # argparse: the flag's range
        cli_main(["status", str(f), "--interval", "0"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "argument --interval" in err and "Traceback" not in err


def test_status_notes_a_paused_stage():
    from edgezmq.ops.status import format_report, report
    from edgezmq.orchestrate.address import NodeAddress

    stage = stage_stats(stage=0, units=[0, N_UNITS], run="r", uptime_s=1.0, paused=True, in_flight=2)
    rep = report("plan", "p.yaml", [NodeAddress("n0", "tcp://127.0.0.1:1")], [stats_reply("running", stage)])
    assert rep["nodes"][0]["paused"] is True
    assert "n0: stage paused (edgezmq resume)" in format_report(rep)
    stage = replace(stage, paused=False)
    rep = report("plan", "p.yaml", [NodeAddress("n0", "tcp://127.0.0.1:1")], [stats_reply("running", stage)])
    assert "paused" not in format_report(rep)


@pytest.mark.slow
def test_status_function_with_a_stream(deployed):
    import io

    pf, _, _ = deployed
    buf = io.StringIO()
    assert status(str(pf), json=True, out=buf) == 0
    assert json.loads(buf.getvalue())["up"] == 2


# ---- trace ---------------------------------------------------------------------------
@pytest.mark.slow
def test_trace_intervals_are_ordered_and_the_timeline_is_drawn(deployed, tmp_path, capsys):
    pf, _, _ = deployed
    png = tmp_path / "t.png"
    code, out, err = _run(["trace", str(pf), "--batches", "6", "--out", str(png), "--json"], capsys)
    assert code == 0, err
    summary = json.loads(out)
    assert summary["samples"] == 6 * MICROBATCH and summary["bottleneck_stage"] in (0, 1)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    trace = json.loads((tmp_path / "t.json").read_text())
    assert [mb["seq"] for mb in trace["microbatches"]] == list(range(6))
    # one host, one clock: nothing may be subtracted, and the order must hold exactly
    assert all(v == 0.0 for v in trace["clock"]["subtracted_s"].values())
    assert all(o["offset_s"] is not None and abs(o["offset_s"]) <= o["rtt_s"] / 2
               for o in trace["clock"]["offsets"].values())
    for mb in trace["microbatches"]:
        hops = mb["stages"]
        assert [h["stage"] for h in hops] == [0, 1]
        assert mb["submit"] <= hops[0]["recv"]
        for h in hops:
            assert h["recv"] <= h["start"] <= h["end"] <= h["send"], h
        for a, b in zip(hops, hops[1:]):
            assert a["send"] <= b["recv"]  # stage k+1 receives after stage k sends
        assert hops[-1]["send"] <= mb["result"]
    s = trace["summary"]
    assert [x["stage"] for x in s] == [0, 1] and all(x["compute_s"] > 0 for x in s)


def test_draw_timeline_lanes_for_overlapping_replicas(tmp_path):
    from edgezmq.ops.trace import _lanes, draw_timeline

    assert _lanes([(0, 2, 0), (1, 3, 1), (2, 4, 2)]) == {0: 0, 1: 1, 2: 0}
    t = 1000.0
    mbs = [{"seq": i, "submit": t + i, "result": t + i + 5,
            "stages": [{"stage": 0, "recv": t + i + 0.1, "start": t + i + 0.2, "end": t + i + 2.2, "send": t + i + 2.3}]}
           for i in range(4)]  # computes overlap: two replicas
    trace = {"microbatches": mbs, "t0": t, "stages": [{"index": 0, "units": [0, 6], "nodes": ["a", "b"]}],
             "model": MODEL, "batches": 4, "microbatch": 2, "window": 4, "samples_per_s": 1.0,
             "bottleneck_stage": 0, "summary": [{"compute_s": 2.0}]}
    p = draw_timeline(trace, tmp_path / "r.png")
    assert p.read_bytes()[:4] == b"\x89PNG"


def test_idle_splits_each_stage_span_into_compute_fill_drain_and_gaps():
    from edgezmq.ops.trace import idle

    # two stages, three microbatches submitted at 0; stage 0 computes [0,2) [2,4) [5,7),
    # stage 1 [2,3) [4,5) [7,8); results at 3.5, 5.5, 10 (span 10 s); no stage 2
    def mb(seq: int, s0: tuple[float, float], s1: tuple[float, float], result: float) -> dict:
        return {"seq": seq, "submit": 0.0, "result": result,
                "stages": [{"stage": 0, "recv": 0.0, "start": s0[0], "end": s0[1], "send": s0[1]},
                           {"stage": 1, "recv": s0[1], "start": s1[0], "end": s1[1], "send": s1[1]}]}

    mbs = [mb(0, (0, 2), (2, 3), 3.5), mb(1, (2, 4), (4, 5), 5.5), mb(2, (5, 7), (7, 8), 10.0)]
    s0, s1, s2 = idle(mbs, 3)
    assert s0 == {"compute": 0.6, "fill": 0.0, "drain": 0.3, "gaps": 0.1}
    assert s1 == {"compute": 0.3, "fill": 0.2, "drain": 0.2, "gaps": 0.3}
    assert s2 is None
    assert idle([], 2) == [None, None]


def test_trace_of_an_undeployed_plan_is_a_clear_error(tmp_path, capsys):
    d = {"model": {"name": MODEL, "checkpoint": checkpoint(), "microbatch": MICROBATCH, "kwargs": KWARGS},
         "stages": [{"units": [0, N_UNITS], "nodes": [_dead_address()]}]}
    f = tmp_path / "p.yaml"
    f.write_text(yaml.safe_dump(d))
    code, _, err = _run(["trace", str(f), "--batches", "2", "--out", str(tmp_path / "x.png")], capsys)
    assert code == 1 and "did not answer" in err and "Traceback" not in err  # a node unreachable: failed
    code, _, err = _run(["trace", str(f), "--batches", "2", "--out", str(tmp_path / "x.jpg")], capsys)
    assert code == 2 and "--out: expected a .png" in err


# ---- `edgezmq node --config` ---------------------------------------------------------------
@pytest.mark.slow
def test_node_process_reads_its_config_and_serves_metrics(tmp_path):
    import os
    import signal
    import sys
    import threading

    cfg = tmp_path / "n1.yaml"
    cfg.write_text(f"control: tcp://127.0.0.1:0\nname: from-config\nthreads: 1\nmetrics_port: 0\n"
                   f"cache_dir: {tmp_path / 'cache'}\n")
    p = subprocess.Popen([sys.executable, "-m", "edgezmq", "node", "--config", str(cfg)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        line: list[str] = []
        reader = threading.Thread(target=lambda: line.append(p.stdout.readline()), daemon=True)
        reader.start()
        reader.join(60)
        assert line and line[0].startswith(node_mod.READY_PREFIX), (line, p.poll())
        fields = dict(kv.split("=", 1) for kv in line[0].split()[1:])
        assert fields["name"] == "from-config"
        metrics = _scrape(fields["metrics"])
        assert metrics['edgezmq_node_state{node="from-config",state="idle"}'] == 1
        p.send_signal(signal.SIGTERM)
        assert p.wait(30) == 0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(10)
        p.stdout.close()
        p.stderr.close()
