"""Compressed links end to end: plan files and `start.encodings`, then real node processes (slow)."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import zmq
from helpers import KWARGS, MICROBATCH, MODEL, batches, checkpoint, monolithic, wait_for

from edgezmq.client import Client
from edgezmq.node.stage import THROTTLE_ENV, LoadSpec, StageRuntime
from edgezmq.orchestrate.address import NodeAddress
from edgezmq.orchestrate.deploy import deploy, unload
from edgezmq.orchestrate.local import LocalCluster
from edgezmq.orchestrate.planfile import DeployPlan, ModelSpec, PlanFileError, StagePlan, parse_plan
from edgezmq.protocol import codecs, control
from edgezmq.protocol import messages as m
from edgezmq.transport import sockets
from edgezmq.transport.rpc import ControlClient

TOL = 1e-5  # separate processes, same kernels and thread count: expect 0, allow float noise


def plan_dict(**stage0):
    return {"model": {"name": MODEL, "checkpoint": "/x.safetensors", "kwargs": KWARGS},
            "stages": [{"units": [0, 3], "nodes": ["tcp://127.0.0.1:1"], **stage0},
                       {"units": [3, 6], "nodes": ["tcp://127.0.0.1:2"]}]}


# ---------------------------------------------------------------- plan files and `start`


@pytest.mark.parametrize("given, rungs", [
    (None, None),
    ("int8", [["int8"]]),
    (["f16", "int8", "int4-ch-aciq"], [["f16"], ["int8"], ["int4-ch-aciq"]]),
    ([["f16", "f16"], "int8", ["int8", "f16"]], [["f16", "f16"], ["int8"], ["int8", "f16"]]),
])
def test_a_plan_gives_each_link_an_encoding_or_a_ladder(given, rungs):
    d = plan_dict(**({} if given is None else {"encoding": given}))
    plan = parse_plan(d)
    assert plan.stages[0].encodings == rungs and plan.stages[1].encodings is None
    again = parse_plan(plan.to_dict())  # what `plan -o` writes reads back the same
    assert again.stages[0].encodings == rungs
    assert ("encoding" in plan.to_dict()["stages"][0]) == (given is not None)


@pytest.mark.parametrize("given, message", [
    ("int3", r"stages\[0\]\.encoding\[0\]: expected one of raw, f16"),
    ([], "expected an encoding, or a list of 1..8 rungs"),
    (["f16"] * 9, "expected an encoding, or a list of 1..8 rungs"),
    ([["int8"] * 9], r"stages\[0\].encoding\[0\]: expected an encoding or a list of 1..8"),
    ([["int8", 5]], r"stages\[0\].encoding\[0\]\[1\]: expected one of"),
    ({"f16": 1}, "expected an encoding, or a list"),
    ([[]], r"stages\[0\].encoding\[0\]: expected an encoding or a list"),
])
def test_a_bad_encoding_in_a_plan_names_the_field(given, message):
    with pytest.raises(PlanFileError, match=message):
        parse_plan(plan_dict(encoding=given))


@pytest.mark.parametrize("given, ok", [(None, True), ("int8", True), ("f16", True), ("int3", False),
                                       (5, False), (["int8"], False)])
def test_a_plan_gives_the_inputs_encoding(given, ok):
    d = {**plan_dict(), **({} if given is None else {"input_encoding": given})}
    if not ok:
        with pytest.raises(PlanFileError, match="input_encoding"):
            parse_plan(d)
        return
    plan = parse_plan(d)
    assert plan.input_encoding == (given or "raw")
    assert parse_plan(plan.to_dict()).input_encoding == plan.input_encoding  # reads back the same
    assert ("input_encoding" in plan.to_dict()) == (given is not None)


def test_results_stay_raw():
    d = plan_dict()
    d["stages"][1]["encoding"] = "int8"
    with pytest.raises(PlanFileError, match=r"stages\[1\].encoding: the last stage sends results"):
        parse_plan(d)


@pytest.mark.parametrize("encodings, ok", [
    (None, True), ([["int8"]], True), ([["f16", "int8"], ["int4"]], True),
    ([["zstd"]], False), ([], False), ([[]], False), ([["int8"]] * 9, False), ([["int8"] * 9], False),
    ("int8", False), ([[1]], False),
])
def test_start_encodings_are_checked_when_parsed(encodings, ok):
    _check_start_field("encodings", encodings, ok)


def _check_start_field(name, value, ok):
    """A `start` carrying `name: value` (absent if None) parses, or is refused naming the field."""
    raw = control.request("start", connect=["tcp://127.0.0.1:1"], **({name: value} if value is not None else {}))
    if ok:
        req, _rid = control.parse_request(raw)
        assert isinstance(req, m.StartRequest)
        return req
    with pytest.raises(control.ControlError) as ei:
        control.parse_request(raw)
    assert ei.value.code == control.BAD_ARGS and f"start.{name}" in ei.value.message
    return None


def test_start_without_encodings_sends_no_new_field():
    """An older node, which refuses unknown fields, still takes a raw deployment's `start`."""
    payload = control.encode_request(m.StartRequest(connect=("tcp://127.0.0.1:1",)))
    assert b"encodings" not in payload


@pytest.mark.parametrize("mbps, expected", [
    (None, None),  # no rate in the plan: the kernel's autotuning, as before
    (1.949, sockets.LINK_BUFFER_MIN),  # 12 kB of 50 ms: the floor
    (10.0, sockets.LINK_BUFFER_MIN),  # 62.5 kB: still the floor
    (20.0, 125_000),  # 50 ms of 20 Mbit/s
    (100.0, 625_000),
    (sockets.LINK_BUFFER_MAX * 8 / 1e6 / sockets.LINK_BUFFER_S, sockets.LINK_BUFFER_MAX),  # the largest bounded
    (1000.0, None),  # a fast link keeps the autotuned buffer (no throughput cost)
    (0.0, None), (-1.0, None), (float("nan"), None), (float("inf"), None),
])
def test_a_links_rate_sizes_its_send_buffer(mbps, expected):
    assert sockets.link_sndbuf(mbps) == expected


def test_the_send_buffer_holds_little_of_a_slow_link_and_never_less_than_the_floor():
    for mbps in (0.01, 0.5, 2.0, 5.0, 20.0, 80.0, 160.0):
        size = sockets.link_sndbuf(mbps)
        assert size is not None and size >= sockets.LINK_BUFFER_MIN
        # at most LINK_BUFFER_S of the link, unless the floor is above it
        assert size <= max(sockets.LINK_BUFFER_MIN, mbps * 1e6 / 8 * sockets.LINK_BUFFER_S)


def test_a_plan_gives_a_links_rate_and_it_reads_back():
    plan = parse_plan(plan_dict(link_mbps=1.949))
    assert plan.stages[0].link_mbps == 1.949 and plan.stages[1].link_mbps is None
    d = plan.to_dict()
    assert d["stages"][0]["link_mbps"] == 1.949 and "link_mbps" not in d["stages"][1]
    assert parse_plan(d).stages[0].link_mbps == 1.949
    assert "link_mbps" not in parse_plan(plan_dict()).to_dict()["stages"][0]


@pytest.mark.parametrize("given", [0, -2, "fast", 1e9, float("inf"), True])
def test_a_bad_link_rate_in_a_plan_names_the_field(given):
    with pytest.raises(PlanFileError, match=r"stages\[0\]\.link_mbps: expected"):
        parse_plan(plan_dict(link_mbps=given))


@pytest.mark.parametrize("mbps, ok", [(None, True), (1.949, True), (1e7, True), (0, False), (-1, False),
                                      (1e8, False), ("10", False)])
def test_start_link_mbps_is_checked_when_parsed(mbps, ok):
    req = _check_start_field("link_mbps", mbps, ok)
    assert req is None or req.link_mbps == mbps


def test_start_without_a_link_rate_sends_no_new_field():
    payload = control.encode_request(m.StartRequest(connect=("tcp://127.0.0.1:1",)))
    assert b"link_mbps" not in payload


@pytest.mark.parametrize("mbps", [None, 1.949, 50.0, 1000.0])
def test_a_stage_sets_its_data_sockets_send_buffer_from_the_links_rate(mbps):
    ctx = zmq.Context()
    pull = sockets.make_socket(ctx, zmq.PULL)
    pull.setsockopt(zmq.RCVTIMEO, 100)
    spec = LoadSpec(run="r", model=MODEL, start=0, end=3, stage=0, last=False, microbatch=MICROBATCH)
    rt = StageRuntime(ctx, spec, pull, "tcp://127.0.0.1:0")
    try:
        rt.start(["tcp://127.0.0.1:1"], link_mbps=mbps)  # nobody there: the socket is made, nothing is sent
        expected = sockets.link_sndbuf(mbps)
        assert rt.sndbuf == expected
        assert rt.push is not None and rt.push.getsockopt(zmq.SNDBUF) == (-1 if expected is None else expected)
    finally:
        rt.close()
        ctx.term()


# ---------------------------------------------------------------- real node processes


@pytest.fixture(scope="module")
def throttle(tmp_path_factory):
    path = tmp_path_factory.mktemp("throttle") / "links.json"
    path.write_text("{}")
    return path


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, throttle):
    mp = pytest.MonkeyPatch()
    mp.setenv(THROTTLE_ENV, str(throttle))  # the nodes inherit it; "{}": no link is slowed
    try:
        with LocalCluster(2, threads=1, log_dir=tmp_path_factory.mktemp("logs")) as c:
            yield c
    finally:
        mp.undo()


def make_plan(cluster, ranges, encodings=None, granularity="block"):
    stages = [StagePlan(units=r, nodes=[NodeAddress(n.name, n.control, 1)], encodings=(encodings if i == 0 else None))
              for i, (r, n) in enumerate(zip(ranges, cluster.nodes))]
    return DeployPlan(model=ModelSpec(name=MODEL, microbatch=MICROBATCH, granularity=granularity,
                                      checkpoint=checkpoint(), kwargs=KWARGS), stages=stages, results="tcp://127.0.0.1:0")


def stage_stats(node) -> dict:
    with ControlClient(node.control, timeout=5, retries=1) as c:
        return c.call("stats")["stage"]


def run_plan(cluster, plan, xs):
    with Client([], "tcp://127.0.0.1:0", run="", window=4, microbatch=MICROBATCH, timeout=60,
                input_encoding=plan.input_encoding) as c:
        plan.results = c.results_endpoint
        dep = deploy(plan, load_timeout=120)
        try:
            c.attach(dep.entry, dep.run)
            outs = list(c.stream(xs))
            return outs, stage_stats(cluster.nodes[0])
        finally:
            unload(plan)


def reference(xs, cut, names, granularity="block"):
    """What a pipeline cut at unit ``cut`` computes when its link carries codecs ``names`` (one per tensor)."""
    import torch

    from edgezmq.model import chain as models

    n = len(models.unit_infos(MODEL, granularity, **KWARGS))
    a = models.build_shard(MODEL, 0, cut, granularity=granularity, checkpoint=checkpoint(), **KWARGS)
    b = models.build_shard(MODEL, cut, n, granularity=granularity, checkpoint=checkpoint(), **KWARGS)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the nodes compute
    try:
        out = []
        with torch.inference_mode():
            for x in xs:
                mid = [t.numpy() for t in a(torch.from_numpy(x))]
                mid = [codecs.roundtrip(names[i] if len(names) > 1 else names[0], t) for i, t in enumerate(mid)]
                out.append(b(*[torch.from_numpy(t) for t in mid])[0].numpy())
        return out
    finally:
        torch.set_num_threads(threads)


def rel_l2(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.slow
def test_without_an_encoding_every_link_stays_raw_and_exact(cluster):
    xs = batches(4, seed=1)
    outs, st = run_plan(cluster, make_plan(cluster, [(0, 3), (3, 6)]), xs)
    assert st["encoding"] == "raw" and st["enc_messages"] == {} and st["goodput_bps"] is None
    for y, ref in zip(outs, monolithic(xs)):
        assert float(np.max(np.abs(y - ref))) <= TOL


@pytest.mark.slow
@pytest.mark.parametrize("name", ["int8", "int4-ch", "bf16"])
def test_a_compressed_link_computes_the_decoded_activation(cluster, name):
    xs = batches(4, seed=2)
    outs, st = run_plan(cluster, make_plan(cluster, [(0, 3), (3, 6)], [[name]]), xs)
    assert st["encoding"] == name and st["enc_messages"] == {name: len(xs)} and st["enc_switches"] == 0
    exact = monolithic(xs)
    for y, ref, ex in zip(outs, reference(xs, 3, [name]), exact):
        assert float(np.max(np.abs(y - ref))) <= TOL  # exactly the rest of the model on the decoded activation
        assert rel_l2(y, ex) < {"int8": 0.05, "bf16": 0.05, "int4-ch": 0.5}[name]
    assert any(float(np.max(np.abs(y - ex))) > 0 for y, ex in zip(outs, exact))  # it did compress


@pytest.mark.slow
def test_an_encoded_input_is_decoded_by_the_first_stage(cluster):
    """A plan's input_encoding: the client sends int8 inputs, stage 0 decodes them (the wire
    header says so), and the pipeline computes the model on the decoded input, exactly."""
    xs = batches(4, seed=5)
    plan = make_plan(cluster, [(0, 3), (3, 6)])
    plan.input_encoding = "int8"
    outs, _ = run_plan(cluster, plan, xs)
    want = monolithic([codecs.roundtrip("int8", x) for x in xs])
    exact = monolithic(xs)
    for y, ref, ex in zip(outs, want, exact):
        assert float(np.max(np.abs(y - ref))) <= TOL
        assert rel_l2(y, ex) < 0.05
    assert any(float(np.max(np.abs(y - ex))) > 0 for y, ex in zip(outs, exact))  # it did encode


@pytest.mark.slow
def test_each_tensor_of_a_two_tensor_cut_has_its_own_encoding(cluster):
    xs = batches(3, seed=3)
    rung = ["int8", "f16"]  # sublayer cut after blocks.0.attn: two tensors
    outs, st = run_plan(cluster, make_plan(cluster, [(0, 2), (2, 18)], [rung], granularity="sublayer"), xs)
    assert st["encoding"] == "int8+f16" and st["enc_messages"] == {"int8+f16": len(xs)}
    for y, ref in zip(outs, reference(xs, 2, rung, granularity="sublayer")):
        assert float(np.max(np.abs(y - ref))) <= TOL


@pytest.mark.slow
def test_a_slowed_link_steps_down_and_back_up_without_a_redeploy(cluster, throttle):
    xs = batches(4, seed=4)
    exact = monolithic(xs)
    plan = make_plan(cluster, [(0, 3), (3, 6)], [["f16"], ["int8"]])
    stop, errors, results = threading.Event(), [], []

    def feed():
        def forever():
            i = 0
            while not stop.is_set():
                yield xs[i % len(xs)]
                i += 1
        try:
            for i, y in enumerate(c.stream(forever())):
                results.append(rel_l2(y, exact[i % len(xs)]))
        except Exception as e:  # the assertions below report it
            errors.append(e)

    node = cluster.nodes[0]
    with Client([], "tcp://127.0.0.1:0", run="", window=16, microbatch=MICROBATCH, timeout=60) as c:
        plan.results = c.results_endpoint
        dep = deploy(plan, load_timeout=120)
        th = threading.Thread(target=feed, daemon=True)
        try:
            c.attach(dep.entry, dep.run)
            th.start()
            wait_for("f16 traffic", lambda: stage_stats(node)["enc_messages"].get("f16", 0) >= 20)
            assert stage_stats(node)["encoding"] == "f16"
            # 1 Mbit/s: an f16 message (13 kB) takes ~0.1 s, many times the stage's compute
            throttle.write_text(json.dumps({"0": 1.0}))
            down = wait_for("the step down to int8", lambda: (s := stage_stats(node))["encoding"] == "int8" and s)
            assert down["enc_switches"] >= 1 and down["goodput_bps"] is not None
            int8_then = down["enc_messages"].get("int8", 0)  # the switch may precede the first int8 send
            wait_for("int8 traffic", lambda: stage_stats(node)["enc_messages"].get("int8", 0) >= int8_then + 10)
            throttle.write_text("{}")  # the bandwidth returns
            up = wait_for("the step back up to f16", lambda: (s := stage_stats(node))["encoding"] == "f16"
                          and s["enc_messages"]["f16"] > down["enc_messages"]["f16"] + 20 and s)
            assert up["enc_switches"] >= 2 and up["bad_messages"] == 0
            print(f"\nmessages per rung {up['enc_messages']}, {up['enc_switches']} switches")
        finally:
            throttle.write_text("{}")
            stop.set()
            th.join(60)
            unload(plan)
    assert not errors, errors
    assert len(results) > 50 and max(results) < 0.05  # every result within int8's error of the exact one
