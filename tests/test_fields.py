"""fields.py: the typed field readers every config parser uses, and the plan-file parser built on them."""

from __future__ import annotations

import math

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from edgezmq.fields import SIZE_UNITS, Fields, prefixed
from edgezmq.orchestrate.inventory import ClusterError, parse_cluster
from edgezmq.orchestrate.planfile import PlanFileError, parse_plan


class Oops(ValueError):
    pass


F = Fields(prefixed(Oops))


@pytest.mark.parametrize("call, text", [
    (lambda: F.number(math.inf, "a.b", lo=0, hi=9), "a.b: expected a number in [0, 9], got inf (not a finite number)"),
    (lambda: F.number(math.nan, "a.b", lo=0, hi=9), "a.b: expected a number in [0, 9], got nan (not a finite number)"),
    (lambda: F.number(True, "a.b", lo=0, hi=9), "a.b: expected a number, got bool True"),
    (lambda: F.number("8e9", "a.b", lo=0, hi=9), "a.b: expected a number, got str '8e9'"),  # only with strings=True
    (lambda: F.number(0, "a.b", lo=0, lo_open=True, hi=9), "a.b: expected a number in (0, 9], got 0"),
    (lambda: F.number(3, "a.b", lo=0, hi=2), "a.b: expected a number in [0, 2], got 3"),
    (lambda: F.number(2**64, "a.b", lo=0, hi=2), "a.b: expected a number in [0, 2], got 18446744073709551616"),
    (lambda: F.integer(1.5, "n", lo=0, hi=9), "n: expected an integer, got float 1.5"),
    (lambda: F.integer(70000, "port", lo=0, hi=65535), "port: expected an integer in [0, 65535], got 70000"),
    (lambda: F.size("2G", "m"), "m: unknown unit 'G'"),
    (lambda: F.size("lots", "m"), "m: expected bytes or a size like"),
    (lambda: F.size(math.inf, "m"), "m: expected bytes in [1, 1152921504606846976], got inf (not a finite number)"),
    (lambda: F.size(512, "m", lo=1 << 20), "m: expected bytes in [1048576, 1152921504606846976], got 512"),
    (lambda: F.size("2 EB", "m"), "m: unknown unit"),
    (lambda: F.need({"k": 1}, "j", int, "top"), "top.j: missing"),
    (lambda: F.need({"k": True}, "k", int, "top"), "top.k: expected int, got bool True"),
    (lambda: F.mapping({"x": 1}, "sec", ("y",)), "sec: unknown field(s) ['x'] (known: ['y'])"),
    (lambda: F.seq("ab", "l"), "l: expected a list, got str 'ab'"),
    (lambda: F.choice("z", "g", ("a", "b")), "g: expected one of a, b, got 'z'"),
    (lambda: F.address("10.0.0.1:5", "c"), "c: expected a tcp://HOST:PORT address, got '10.0.0.1:5'"),
])
def test_readers_name_the_field_and_what_was_expected(call, text):
    with pytest.raises(Oops) as ei:
        call()
    assert text in str(ei.value)


def test_readers_return_typed_values():
    assert F.number("8e9", "x", lo=0, hi=1e10, strings=True) == 8e9 and F.integer(4.0, "x", lo=0, hi=9) == 4
    assert F.size("2 GB", "x") == 2 * 10**9 and F.size("512MiB", "x") == 512 << 20 and F.size(6e9, "x") == 6 * 10**9
    assert F.need({}, "k", int, "p", 7) == 7 and F.need({"k": None}, "k", int, "p", 7) == 7


def test_an_error_class_that_takes_path_and_message_apart():
    class PathError(ValueError):
        def __init__(self, path: str, message: str) -> None:
            super().__init__(f"{path}: {message}")
            self.path = path

    with pytest.raises(PathError) as ei:
        Fields(PathError).integer(0, "devices[1].threads", lo=1, hi=9)
    assert ei.value.path == "devices[1].threads"


@given(st.integers(min_value=0, max_value=10**6), st.sampled_from(sorted(SIZE_UNITS)), st.booleans())
def test_sizes_read_back(n, unit, space):
    text = f"{n}{' ' if space else ''}{unit.upper() if n % 2 else unit}"
    assert F.size(text, "s", lo=0) == n * SIZE_UNITS[unit]


@given(st.floats(allow_nan=True, allow_infinity=True))
def test_numbers_are_finite_and_in_range_or_refused(x):
    try:
        got = F.number(x, "x", lo=0, hi=1)
    except Oops as e:
        assert str(e).startswith("x: expected a number in [0, 1], got ")
        assert not (math.isfinite(x) and 0 <= x <= 1)
    else:
        assert got == x and 0 <= got <= 1


def test_an_inventory_with_an_infinite_probe_fails_at_parse_time():
    d = yaml.safe_load("nodes: [{name: a, control: 'tcp://127.0.0.1:5550'}]\nmeasure: {seconds: .inf}\n")
    with pytest.raises(ClusterError, match=r"^measure\.seconds: .*got inf \(not a finite number\)"):
        parse_cluster(d)


PLAN = {"model": {"name": "vit_tiny_patch16_224", "checkpoint": "/x.safetensors"},
        "nodes": {"a": "tcp://127.0.0.1:5550"}, "stages": [{"units": [0, 6], "nodes": ["a"], "threads": 2}],
        "predicted": {"window": 6}}


@pytest.mark.parametrize("path, value, text", [
    ("model.microbatch", 0, "model.microbatch: expected an integer in [1, 4096], got 0"),
    ("model.microbatch", True, "model.microbatch: expected int, got bool True"),
    ("model.granularity", "layer", "model.granularity: expected one of block, half, sublayer, fine, got 'layer'"),
    ("nodes.a", "10.0.0.1:5550", "nodes.a: expected a tcp://HOST:PORT address"),
    ("stages.0.threads", 0, "stages[0].threads: expected an integer in [1, 256], got 0"),
    ("stages.0.units", "0-6", "stages[0].units: expected list, got str '0-6'"),
    ("predicted.window", 0, "predicted.window: expected an integer in [1, 4096], got 0"),
    ("predicted.window", 10**12, "predicted.window: expected an integer in [1, 4096], got 1000000000000"),
    ("predicted.window", 2.5, "predicted.window: expected int, got float 2.5"),
])
def test_bad_plan_files_name_the_field(path, value, text):
    import copy

    d = copy.deepcopy(PLAN)
    *parents, last = path.split(".")
    node = d
    for p in parents:
        node = node[int(p)] if p.isdigit() else node[p]
    node[last] = value
    with pytest.raises(PlanFileError) as ei:
        parse_plan(d)
    assert text in str(ei.value)


def test_a_good_plan_file_parses():
    plan = parse_plan(PLAN)
    assert plan.model.microbatch == 8 and plan.stages[0].nodes[0].threads == 2 and plan.window == 6
    assert plan.in_flight == 6  # the plan's own predicted.window
    bare = parse_plan({k: v for k, v in PLAN.items() if k != "predicted"})
    # without one: two per node and two for the client (the planner's rule without its latency term)
    assert bare.window is None and bare.in_flight == 2 * len(bare.all_nodes) + 2 > len(bare.stages) + 1
    assert plan.stages[0].nodes[0].control == "tcp://127.0.0.1:5550" and plan.stages[0].nodes[0].curve is None


def test_int_list_flag_parses_sorted_unique_and_refuses_out_of_range(capsys):
    import argparse

    from edgezmq import argtypes

    ap = argparse.ArgumentParser(prog="x")
    ap.add_argument("--devices", type=argtypes.int_list(1, 8), default=[1])
    assert ap.parse_args(["--devices", "8, 1,4,1"]).devices == [1, 4, 8]
    assert ap.parse_args(["--devices", ""]).devices == []
    for bad in ("0", "1,9", "2,x", "1e3"):
        with pytest.raises(SystemExit) as e:
            ap.parse_args(["--devices", bad])
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith("x: error: argument --devices:"), err
