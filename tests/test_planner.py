"""Planner: the cost model on hand-computed cases, problem validation, infeasible problems,
baselines, the deployable plan and the `edgezmq plan` command. Exactness vs brute force is
in test_planner_exact.py."""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import math
from pathlib import Path

import pytest
import yaml

from edgezmq.planner import (
    PlanError,
    Problem,
    Stage,
    add_cli,
    baseline,
    deployable,
    evaluate,
    load_problem,
    solve,
)

PLANS = Path(__file__).resolve().parents[1] / "plans"
EXAMPLES = sorted(PLANS.glob("*.problem.yaml"))
MBPS_1KB_PER_S = 0.008      # 1000 bytes take exactly 1 s on this link


def small() -> dict:
    """Three units, two fast devices and a slow one; links chosen so 1000 B take 1 s."""
    return {
        "model": {"name": "vit_tiny_patch16_224", "microbatch": 8, "input_bytes": 4000,
                  "granularity": "block", "kwargs": {"num_classes": 10},
                  "units": [{"name": "embed", "out_bytes": 1000, "param_bytes": 100, "work_bytes": 10},
                            {"name": "blocks.0", "out_bytes": 2000, "param_bytes": 200, "work_bytes": 20},
                            {"name": "head", "out_bytes": 500, "param_bytes": 50, "work_bytes": 5}]},
        "device_types": {
            "fast": {"memory_bytes": 20_000, "reserved_bytes": 1000, "unit_times_s": [1, 2, 3]},
            "slow": {"memory_bytes": 1_000_000, "reserved_bytes": 0, "unit_times_s": [2, 4, 6]},
        },
        "devices": [{"name": "a", "type": "fast", "control": "tcp://10.0.0.1:5550"},
                    {"name": "b", "type": "fast"}, {"name": "c", "type": "slow"}],
        "links": {"default": {"mbps": MBPS_1KB_PER_S, "latency_ms": 10},
                  "overrides": [{"a": "a", "b": "c", "mbps": MBPS_1KB_PER_S / 2, "latency_ms": 0}]},
        "options": {"replication": True, "buffers": 2},
    }


# --- the cost model -------------------------------------------------------------------------------

def test_receive_and_send_costs_add_to_stage_time():
    d = small()
    d["device_types"]["fast"]["recv_ms_per_mb"] = 500     # 4000 B in: 2 ms
    d["device_types"]["fast"]["send_ms_per_mb"] = 1000    # 2000 B out: 2 ms
    d["devices"][1]["send_ms_per_mb"] = 0                 # b overrides its type's send cost
    p = Problem.from_dict(d)
    plan = evaluate(p, [Stage((0, 2), ("a", "b")), Stage((2, 3), ("c",))])
    c0, c1 = plan.stage_costs
    assert c0.unreplicated_s == pytest.approx(3 + 0.002 + 0.002)   # a is the slower replica
    assert c0.compute_s == pytest.approx((3 + 0.004) / 2)
    assert c1.compute_s == pytest.approx(6)                         # slow: no costs given
    assert plan.latency_s == pytest.approx(sum(k.latency_s for k in plan.links) + 3.004 + 6)


@pytest.mark.parametrize("field", ["recv_ms_per_mb", "send_ms_per_mb"])
def test_bad_receive_send_costs_are_refused(field):
    d = small()
    d["device_types"]["slow"][field] = -1
    with pytest.raises(PlanError, match=rf"device_types\.slow\.{field}: expected a number in \[0, 1000000\]"):
        Problem.from_dict(d)
    d = small()
    d["devices"][2][field] = "fast"
    with pytest.raises(PlanError, match=rf"devices\[2\]\.{field}: expected a number"):
        Problem.from_dict(d)


def test_evaluate_hand_computed():
    p = Problem.from_dict(small())
    plan = evaluate(p, [Stage((0, 2), ("a", "b")), Stage((2, 3), ("c",))])
    c0, c1 = plan.stage_costs
    assert c0.compute_s == pytest.approx(1.5)          # (1 + 2) / 2 replicas
    assert c0.unreplicated_s == pytest.approx(3)
    assert c1.compute_s == pytest.approx(6)
    # params 300 + max work 20 + 2 buffers x (4000 in + 2000 out) + 1000 reserved
    assert c0.memory_bytes == 13_320 and c0.memory_limit_bytes == 20_000
    assert c1.memory_bytes == 50 + 5 + 2 * (2000 + 500)
    client_in, middle, client_out = plan.links
    assert client_in.time_s == pytest.approx(4 / 2)    # 4000 B = 4 s, client x 2 replicas
    assert client_in.latency_s == pytest.approx(4.01)
    assert middle.time_s == pytest.approx(4 / 2)       # worst pair a-c: 2000 B at half speed
    assert middle.latency_s == pytest.approx(4.0)      # a-c: 0 ms + 4 s beats b-c: 10 ms + 2 s
    assert middle.slowest_pair == ("a", "c")
    assert client_out.time_s == pytest.approx(0.5)
    assert plan.bottleneck_s == pytest.approx(6) and plan.bottleneck_at == "stage 1"
    assert plan.throughput_per_s == pytest.approx(8 / 6)
    assert plan.latency_s == pytest.approx(3 + 6 + 4.01 + 4.0 + 0.51)
    assert plan.feasible


def test_evaluate_mixed_replicas_and_link_bottleneck():
    d = small()
    d["links"]["overrides"].append({"a": "client", "b": "c", "mbps": MBPS_1KB_PER_S / 100})
    p = Problem.from_dict(d)
    plan = evaluate(p, [((0, 3), ["a", "c"])])
    assert plan.stage_costs[0].compute_s == pytest.approx(12 / 2)   # the slow replica rules
    assert plan.links[0].time_s == pytest.approx(400 / 2)           # 4000 B at 10 B/s to c
    assert plan.bottleneck_at == "link client->stage 0"
    assert plan.bottleneck_s == pytest.approx(200)


def test_evaluate_reports_memory_overrun():
    d = small()
    d["device_types"]["fast"]["memory_bytes"] = 13_000
    plan = evaluate(Problem.from_dict(d), [((0, 2), ["a"]), ((2, 3), ["b"])])
    assert not plan.feasible
    assert "a needs 13320 bytes" in plan.violations[0]
    assert plan.to_dict()["feasible"] is False


@pytest.mark.parametrize("stages, msg", [
    ([((0, 2), ["a"])], r"cover units \[0, 2\), expected \[0, 3\)"),
    ([((0, 1), ["a"]), ((2, 3), ["b"])], "expected to start at unit 1"),
    ([((0, 1), ["a"]), ((1, 3), ["a"])], "already used by stages"),
    ([((0, 3), ["zz"])], "unknown device 'zz'"),
    ([((0, 3), [])], "at least one device"),
    ([], "at least one stage"),
])
def test_evaluate_rejects_malformed_plans(stages, msg):
    with pytest.raises(PlanError, match=msg):
        evaluate(Problem.from_dict(small()), stages)


def test_evaluate_refuses_replicas_when_replication_is_off():
    d = small()
    d["options"]["replication"] = False
    with pytest.raises(PlanError, match="replication is false"):
        evaluate(Problem.from_dict(d), [((0, 3), ["a", "b"])])


# --- problems: parsing, links, errors -----------------------------------------------------------

def test_link_resolution_precedence():
    d = small()
    d["devices"].append({"name": "e", "type": "slow"})
    d["links"]["overrides"] = [
        {"a": "fast", "b": "slow", "mbps": 1},        # type-type
        {"a": "b", "b": "slow", "mbps": 2},           # device-type beats it
        {"a": "b", "b": "e", "mbps": 3, "latency_ms": 7},   # device-device beats both
        {"a": "client", "b": "fast", "mbps": 4},
    ]
    p = Problem.from_dict(d)
    assert p.link("a", "c").mbps == 1 and p.link("c", "a").mbps == 1
    assert p.link("b", "c").mbps == 2
    assert p.link("b", "e").mbps == 3 and p.link("b", "e").latency_ms == 7
    assert p.link("client", "a").mbps == 4
    assert p.link("c", "e").mbps == MBPS_1KB_PER_S            # default
    assert p.link("b", "c").latency_ms == 10                  # latency defaults to the default's


def test_ambiguous_device_type_overrides_are_refused():
    d = small()
    d["links"]["overrides"] = [{"a": "a", "b": "slow", "mbps": 1}, {"a": "c", "b": "fast", "mbps": 2}]
    with pytest.raises(PlanError, match="both set the link 'a' <-> 'c'"):
        Problem.from_dict(d)


def test_speed_factor_and_own_times():
    d = small()
    d["devices"][1]["speed"] = 2
    d["devices"][2]["unit_times_s"] = [7, 8, 9]
    p = Problem.from_dict(d)
    assert p.device("b").unit_times_s == (0.5, 1, 1.5)
    assert p.device("c").unit_times_s == (7, 8, 9)


def test_yaml_exponent_strings_are_numbers(tmp_path):
    text = yaml.safe_dump(small()).replace("memory_bytes: 1000000", "memory_bytes: 1e6")
    assert "1e6" in text                   # PyYAML reads this back as the string '1e6'
    path = tmp_path / "p.yaml"
    path.write_text(text)
    assert load_problem(path).device_types["slow"].memory_bytes == 1_000_000


def _edit(path: str, value):
    d = small()
    target = d
    keys = path.split("/")
    for k in keys[:-1]:
        target = target[int(k)] if isinstance(target, list) else target[k]
    last = keys[-1]
    if value is KeyError:
        del target[last]
    elif isinstance(target, list):
        target[int(last)] = value
    else:
        target[last] = value
    return d


@pytest.mark.parametrize("path, value, msg", [
    ("devices/2/type", "rcc", r"devices\[2\]\.type: unknown type 'rcc' \(known: fast, slow\)"),
    ("devices/1/name", "a", r"devices\[1\]\.name: duplicate device name 'a' \(also devices\[0\]\)"),
    ("devices/1/name", "client", r"devices\[1\]\.name: 'client' is reserved"),
    ("devices/0/speed", 0, r"devices\[0\]\.speed: expected a number in \(0, 1000000\], got 0"),
    ("model/units/1/out_bytes", -5, r"model\.units\[1\]\.out_bytes: expected an integer in \[0, 1152921504606846976\], got -5"),
    ("model/units/1/param_bytes", 1.5, r"model\.units\[1\]\.param_bytes: expected an integer, got float 1.5"),
    ("model/units/2/name", "embed", r"model\.units\[2\]\.name: duplicate unit name 'embed'"),
    ("model/units/0/name", KeyError, r"model\.units\[0\]\.name: missing"),
    ("model/microbatch", 0, r"model\.microbatch: expected an integer in \[1, 4096\], got 0"),
    ("model/granularity", "layer", r"model\.granularity: expected one of block, half, sublayer"),
    ("model/units", [], r"model\.units: expected a non-empty list"),
    ("device_types/fast/unit_times_s", [1, 2], r"device_types\.fast\.unit_times_s: expected 3 values"),
    ("device_types/fast/unit_times_s", [1, "x", 2],
     r"device_types\.fast\.unit_times_s\[1\]: expected a number, got str 'x'"),
    ("device_types/slow/memory_bytes", KeyError, r"device_types\.slow\.memory_bytes: missing"),
    ("links/default/mbps", 0, r"links\.default\.mbps: expected a number in \(0, 10000000\], got 0"),
    ("links/overrides/0/a", "nope", r"links\.overrides\[0\]\.a: unknown device or type 'nope'"),
    ("links/overrides/0/b", "a", r"links\.overrides\[0\]: a link needs two different nodes"),
    ("options/replication", "yes", r"options\.replication: expected true or false, got str 'yes'"),
    ("options/buffers", -1, r"options\.buffers: expected an integer in \[0, 64\], got -1"),
    ("devices", [], r"devices: expected a non-empty list"),
    ("model", KeyError, r"^model: missing"),
    ("links", "fast", r"links: expected a mapping, got str 'fast'"),
])
def test_bad_problems_name_the_field(path, value, msg):
    with pytest.raises(PlanError, match=msg):
        Problem.from_dict(_edit(path, value))


def test_load_problem_errors_carry_the_path(tmp_path):
    missing = tmp_path / "none.yaml"
    with pytest.raises(PlanError, match=f"{missing}: cannot read"):
        load_problem(missing)
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: [unclosed\n")
    with pytest.raises(PlanError, match=f"{broken}: not valid YAML"):
        load_problem(broken)
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(_edit("devices/2/type", "rcc")))
    with pytest.raises(PlanError, match=rf"{bad}: devices\[2\]\.type: unknown type 'rcc'"):
        load_problem(bad)
    assert issubclass(PlanError, ValueError)


# --- infeasible problems --------------------------------------------------------------------------

def test_unit_that_fits_no_device():
    d = small()
    d["model"]["units"][1]["param_bytes"] = 2_000_000
    with pytest.raises(PlanError, match=r"unit 1 \(blocks\.0\) needs 2 MB in any stage holding it .* the largest device "
                                        r"has 1 MB \(c: 1 MB minus 0 B reserved\)"):
        solve(Problem.from_dict(d))


def test_parameters_that_fit_no_cluster():
    d = small()
    for u in d["model"]["units"]:
        u["param_bytes"] = 600_000
    d["devices"] = [{"name": "c", "type": "slow"}]
    d["links"]["overrides"] = []
    with pytest.raises(PlanError, match=r"parameters need 1\.8 MB, all 1 devices together offer 1 MB"):
        solve(Problem.from_dict(d))


def test_no_split_fits():
    # every unit fits a device alone, the total fits the cluster, but without replication
    # two devices cannot hold three 600 kB units (they cannot share one)
    d = small()
    for u in d["model"]["units"]:
        u["param_bytes"] = 600_000
    d["device_types"]["fast"]["memory_bytes"] = 1_000_000
    d["devices"] = [{"name": "a", "type": "fast"}, {"name": "c", "type": "slow"}]
    d["links"]["overrides"] = []
    with pytest.raises(PlanError, match="no plan fits the devices' memory"):
        solve(Problem.from_dict(d))


# --- solve ----------------------------------------------------------------------------------------

def test_solve_small_by_hand():
    # one unit of 4 s on two identical devices, links free: two replicas halve it
    d = {"model": {"name": "m", "microbatch": 2, "input_bytes": 0,
                   "units": [{"name": "u", "out_bytes": 0, "param_bytes": 1}]},
         "device_types": {"t": {"memory_bytes": 10, "unit_times_s": [4]}},
         "devices": [{"name": "x", "type": "t"}, {"name": "y", "type": "t"}],
         "links": {"default": {"mbps": 1}}}
    plan = solve(Problem.from_dict(d))
    assert plan.optimal and plan.bottleneck_s == pytest.approx(2) and plan.throughput_per_s == pytest.approx(1)
    assert plan.stages == [Stage((0, 1), ("x", "y"))]
    d["options"] = {"replication": False}
    plan = solve(Problem.from_dict(d))
    assert plan.bottleneck_s == pytest.approx(4) and plan.num_devices == 1   # then fewer devices
    assert solve(Problem.from_dict({**d, "options": {}}), replication=False).num_devices == 1
    assert solve(Problem.from_dict(d), replication=True).bottleneck_s == pytest.approx(2)


def test_plan_to_dict_is_json():
    p = Problem.from_dict(small())
    out = json.loads(json.dumps(solve(p).to_dict(), allow_nan=False))   # strict JSON
    for key in ("bottleneck_s", "throughput_per_s", "latency_s", "optimal", "lower_bound_s", "stages"):
        assert key in out
    assert all(set(s) >= {"units", "devices"} for s in out["stages"])
    assert out["stages"][0]["units"][0] == 0 and out["stages"][-1]["units"][1] == 3


def test_time_limited_solve_keeps_a_certificate():
    d = yaml.safe_load((PLANS / "edgepipe-vit-base-half.problem.yaml").read_text())
    d["devices"] = [{"name": f"r{i}", "type": "rcc-ve"} for i in range(48)] + \
                   [{"name": f"m{i}", "type": "minnowboard"} for i in range(48)]
    d["links"]["overrides"] += [{"a": "r1", "b": "m2", "mbps": 5}, {"a": "r3", "b": "r4", "mbps": 5}]
    p = Problem.from_dict(d)
    plan = solve(p, time_limit_s=0.5)
    assert plan.feasible
    assert 0 < plan.lower_bound_s <= plan.bottleneck_s
    if plan.optimal:
        assert plan.gap == 0
    else:
        assert plan.gap == pytest.approx((plan.bottleneck_s - plan.lower_bound_s) / plan.bottleneck_s)
    history = plan.stats["history"]
    assert all(lb <= (ub if ub is not None else math.inf) * (1 + 1e-9) for _, ub, lb in history)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_solve_optimally_and_beat_baselines(path):
    p = load_problem(path)
    plan = solve(p, time_limit_s=60)
    assert plan.optimal and plan.feasible
    assert plan.lower_bound_s == plan.bottleneck_s
    for name in ("even", "pipeedge", "pipedream"):
        b = baseline(p, name)
        if b.feasible:
            assert plan.bottleneck_s <= b.bottleneck_s * (1 + 1e-9), name


# --- baselines ------------------------------------------------------------------------------------

def test_even_baseline():
    d = small()
    d["model"]["units"] = d["model"]["units"] * 1 + [
        {"name": f"extra{i}", "out_bytes": 10, "param_bytes": 1} for i in range(4)]
    for i, t in enumerate(d["device_types"].values()):
        t["unit_times_s"] = [1 + i] * 7
    b = baseline(Problem.from_dict(d), "even")
    assert [s.units for s in b.stages] == [(0, 3), (3, 5), (5, 7)]
    assert [s.devices for s in b.stages] == [("a",), ("b",), ("c",)]
    assert b.method == "even"


def test_pipeedge_misses_a_slow_pair_we_avoid():
    # four identical devices in a chain of four units; one pair's link is slow. PipeEdge
    # sees one bandwidth per type, takes the devices in file order and hits the slow pair.
    d = {"model": {"name": "m", "microbatch": 1, "input_bytes": 1000,
                   "units": [{"name": f"u{i}", "out_bytes": 1000, "param_bytes": 1} for i in range(4)]},
         "device_types": {"t": {"memory_bytes": 10_000, "unit_times_s": [1, 1, 1, 1]}},
         "devices": [{"name": f"d{i}", "type": "t"} for i in range(4)],
         "links": {"default": {"mbps": 0.08},                              # 1000 B: 0.1 s
                   "overrides": [{"a": "d0", "b": "d1", "mbps": 0.002}]},  # 1000 B: 4 s
         "options": {"replication": False}}
    p = Problem.from_dict(d)
    ours, pe = solve(p), baseline(p, "pipeedge")
    assert ours.optimal and ours.bottleneck_s == pytest.approx(1)
    assert pe.bottleneck_s == pytest.approx(4)
    assert [s.devices for s in pe.stages][:2] == [("d0",), ("d1",)]
    assert all(len(s.devices) == 1 for s in pe.stages)


def test_pipedream_assumes_the_first_device_everywhere():
    d = small()
    d["devices"] = [{"name": "c", "type": "slow"}, {"name": "a", "type": "fast"}, {"name": "b", "type": "fast"}]
    d["device_types"]["fast"]["memory_bytes"] = 5_000
    p = Problem.from_dict(d)
    pd = baseline(p, "pipedream")
    assert pd.method == "pipedream"
    # costed under the real model: the fast boards could not hold what the first one could
    assert not pd.feasible or pd.bottleneck_s >= solve(p).bottleneck_s
    again = evaluate(p, pd.stages)
    assert again.bottleneck_s == pd.bottleneck_s and again.latency_s == pd.latency_s


def test_unknown_baseline():
    with pytest.raises(PlanError, match="unknown baseline 'x'"):
        baseline(Problem.from_dict(small()), "x")


# --- deployable plan and CLI ----------------------------------------------------------------------

def test_deployable_plan():
    p = Problem.from_dict(small())
    plan = solve(p)
    doc = deployable(p, plan, checkpoint="ckpt.safetensors", results="tcp://10.0.0.9:5560")
    assert doc["model"] == {"name": "vit_tiny_patch16_224", "granularity": "block", "microbatch": 8,
                            "dtype": "float32", "checkpoint": "ckpt.safetensors",
                            "kwargs": {"num_classes": 10}}
    used = {d for s in plan.stages for d in s.devices}
    assert doc["nodes"] == ({"a": "tcp://10.0.0.1:5550"} if "a" in used else {})
    assert doc["stages"] == [{"units": list(s.units), "nodes": list(s.devices)} for s in plan.stages]
    assert doc["predicted"]["bottleneck_s"] == plan.bottleneck_s
    assert doc["results"] == "tcp://10.0.0.9:5560"
    bad = evaluate(p, [((0, 3), ["a"])])
    bad.violations.append("x")
    with pytest.raises(PlanError, match="does not fit"):
        deployable(p, bad)


def _cli(argv, capsys):
    parser = argparse.ArgumentParser(prog="edgezmq")
    add_cli(parser.add_subparsers(dest="cmd", required=True))
    args = parser.parse_args(argv)
    code = args.func(args)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def problem_file(tmp_path):
    path = tmp_path / "small.problem.yaml"
    path.write_text(yaml.safe_dump(small()))
    return path


def test_cli_table(problem_file, capsys):
    code, out, err = _cli(["plan", str(problem_file)], capsys)
    assert code == 0 and not err
    assert "embed" in out and "<-" in out and "optimal" in out
    assert "compute s" in out and "memory used/limit" in out


def test_cli_json_and_output(problem_file, tmp_path, capsys):
    dest = tmp_path / "plan.yaml"
    code, out, err = _cli(["plan", str(problem_file), "--json", "-o", str(dest), "--time-limit", "5"], capsys)
    assert code == 0
    doc = json.loads(out)
    assert doc["optimal"] is True and doc["bottleneck_s"] > 0
    written = yaml.safe_load(dest.read_text())
    assert written["stages"] == [{"units": s["units"], "nodes": s["devices"]} for s in doc["stages"]]
    assert written["predicted"]["throughput_per_s"] == pytest.approx(doc["throughput_per_s"])


def test_cli_baseline_and_no_replication(problem_file, capsys):
    code, out, _ = _cli(["plan", str(problem_file), "--baseline", "even", "--json"], capsys)
    assert code == 0 and json.loads(out)["method"] == "even"
    code, out, _ = _cli(["plan", str(problem_file), "--no-replication", "--json"], capsys)
    assert code == 0 and all(len(s["devices"]) == 1 for s in json.loads(out)["stages"])


@pytest.mark.parametrize("edit, msg", [
    (lambda d: d["devices"][2].update(type="rcc"), r"devices\[2\]\.type: unknown type 'rcc'"),
    (lambda d: d["model"]["units"][1].update(param_bytes=10**9), "unit 1 .blocks.0. needs"),
])
def test_cli_bad_files_exit_2_without_traceback(tmp_path, capsys, edit, msg):
    d = copy.deepcopy(small())
    edit(d)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(d))
    code, out, err = _cli(["plan", str(path)], capsys)
    assert code == 2 and not out
    assert "Traceback" not in err
    assert err.startswith("edgezmq plan: error: ")
    assert len(err.strip().splitlines()) == 1
    import re
    assert re.search(msg, err)


def test_cli_refuses_to_write_an_oom_plan(problem_file, tmp_path, capsys):
    d = small()
    d["device_types"]["fast"]["memory_bytes"] = 1000     # too small for anything
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(d))
    code, _, err = _cli(["plan", str(path), "--baseline", "even", "-o", str(tmp_path / "o.yaml")], capsys)
    assert code == 1 and "not writing" in err
    assert not (tmp_path / "o.yaml").exists()


def test_examples_are_current(tmp_path):
    """The committed example problems parse, and match their generator's output."""
    assert len(EXAMPLES) >= 4
    for path in EXAMPLES:
        p = load_problem(path)
        assert p.units[0].name == "embed" and p.units[-1].name == "head"
        assert all(len(d.unit_times_s) == p.num_units for d in p.devices)
    spec = importlib.util.spec_from_file_location("make_problems", PLANS / "make_problems.py")
    make = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make)
    assert make.main(["--out", str(tmp_path)]) == 0
    for path in EXAMPLES:
        assert (tmp_path / path.name).read_text() == path.read_text(), f"{path.name}: rerun make_problems.py"
