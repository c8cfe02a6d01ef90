"""Property tests (hypothesis): every parser of untrusted input fails only with its own error.

Inputs are arbitrary values and mutations of a valid document (a field replaced by any
YAML/msgpack-like value, deleted, or a key added), so most examples get past the first
check and reach the deeper ones. Each test is bounded (EXAMPLES, no deadline) to keep the
quick tier quick; `HYPOTHESIS_PROFILE=thorough` runs ten times as many.
"""

from __future__ import annotations

import copy
import os
from typing import Any

import msgpack
import numpy as np
import pytest
from helpers import SAMPLE_INVENTORY
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from edgezmq.node.config import NodeConfigError, parse_node_config
from edgezmq.orchestrate.inventory import ClusterError, parse_cluster
from edgezmq.orchestrate.planfile import PlanFileError, parse_plan
from edgezmq.planner import PlanError, Problem
from edgezmq.protocol import control, wire
from edgezmq.testbed.config import ConfigError, parse_config

EXAMPLES = 100
# derandomized: the quick tier and CI replay the same examples (a red run is reproducible)
settings.register_profile("quick", max_examples=EXAMPLES, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=10 * EXAMPLES, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "quick"))

# ---- strategies -------------------------------------------------------------------------------

# integers msgpack can carry, floats with nan/inf, short texts: what YAML or msgpack decodes to
ints = st.integers(-(2**63), 2**64 - 1)
scalars = st.none() | st.booleans() | ints | st.floats() | st.text(max_size=12)
keys = st.text(max_size=10) | st.integers(-3, 3) | st.none() | st.booleans()  # YAML and msgpack allow all


def trees(leaves: st.SearchStrategy) -> st.SearchStrategy:
    return st.recursive(leaves, lambda c: st.lists(c, max_size=4) | st.dictionaries(keys, c, max_size=4),
                        max_leaves=12)


yaml_values = trees(scalars)
msgpack_values = trees(scalars | st.binary(max_size=12))


def _slots(doc: Any, path: tuple = ()) -> list[tuple]:
    """Paths to every value inside `doc` (the root is the empty path)."""
    out = [path]
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += _slots(v, (*path, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += _slots(v, (*path, i))
    return out


@st.composite
def mutated(draw: st.DrawFn, doc: Any, values: st.SearchStrategy = yaml_values) -> Any:
    """`doc` with one to three edits: a value replaced, a key or item deleted, or a key added."""
    doc = copy.deepcopy(doc)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(_slots(doc)))
        if not path:
            doc = draw(values)
            continue
        parent = doc
        for p in path[:-1]:
            parent = parent[p]
        op = draw(st.sampled_from(["replace", "replace", "delete", "add"]))
        if op == "replace":
            parent[path[-1]] = draw(values)
        elif op == "delete":
            del parent[path[-1]]
        elif isinstance(parent, dict):
            parent[draw(keys)] = draw(values)
        else:
            parent.append(draw(values))
    return doc


def _frames(msg: wire.Message) -> list[bytes]:
    """What a receiver gets: every frame as bytes."""
    return [f if isinstance(f, bytes) else memoryview(f).tobytes() for f in wire.encode(msg)]


# ---- the wire decoder --------------------------------------------------------------------------

GOOD_MESSAGE = wire.Message("act", "r1", 3, 0, [np.zeros((2, 3), dtype=np.float32)], [[0, 1.0, 2.0]])
GOOD_HEADER = GOOD_MESSAGE.header()
GOOD_BUFFER = GOOD_MESSAGE.tensors[0].tobytes()


def _decodes_or_wire_error(frames: list) -> None:
    try:
        m = wire.decode(frames)
    except wire.WireError as e:
        assert e.code and isinstance(e, ValueError)
        return
    assert isinstance(m, wire.Message) and m.kind in wire.KINDS
    assert len(m.tensors) == len(frames) - 1


@given(st.lists(st.binary(max_size=64), max_size=4))
def test_any_frames_decode_or_raise_wire_error(frames):
    _decodes_or_wire_error(frames)


@given(mutated(GOOD_HEADER, msgpack_values), st.lists(st.just(GOOD_BUFFER) | st.binary(max_size=32), max_size=3))
def test_any_header_decodes_or_raises_wire_error(header, buffers):
    _decodes_or_wire_error([msgpack.packb(header, use_bin_type=True), *buffers])


@pytest.mark.parametrize("field, code", [("dtype", "bad_dtype"), ("enc", "bad_encoding")])
@pytest.mark.parametrize("value", [[], {}])
def test_unhashable_dtype_is_a_wire_error(field, code, value):  # found by hypothesis: it killed a stage's receive thread
    header = {**GOOD_HEADER, "tensors": [{"dtype": "float32", "shape": [2, 3], field: value}]}
    with pytest.raises(wire.WireError) as ei:
        wire.decode([msgpack.packb(header), GOOD_BUFFER])
    assert ei.value.code == code


dtypes = st.sampled_from(sorted(wire.DTYPES)).map(np.dtype)
arrays = dtypes.flatmap(lambda dt: hnp.arrays(dt, hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=4)))
timestamps = st.lists(st.lists(st.integers(-1, 64) | st.floats(allow_nan=False), max_size=5), max_size=4)


@given(st.sampled_from(["act", "result"]), st.text(max_size=20), st.integers(-1, 2**63 - 1),
       st.integers(-1, 2**63 - 1), st.lists(arrays, max_size=wire.MAX_TENSORS), timestamps)
def test_encode_decode_round_trip(kind, run, seq, stage, tensors, t):
    got = wire.decode(_frames(wire.Message(kind, run, seq, stage, tensors, t)))
    assert (got.kind, got.run, got.seq, got.stage, got.t, got.error) == (kind, run, seq, stage, t, None)
    assert len(got.tensors) == len(tensors)
    for a, b in zip(tensors, got.tensors):
        assert (b.dtype, b.shape) == (a.dtype, a.shape)
        assert b.tobytes() == a.tobytes()  # bit for bit: nan payloads and -0.0 included


@given(st.text(max_size=20), st.integers(-1, 2**63 - 1), st.integers(-1, 2**63 - 1),
       st.text(max_size=20), st.text(max_size=wire.MAX_TEXT + 10))
def test_error_message_round_trip(run, seq, stage, code, message):
    got = wire.decode(_frames(wire.error_message(run, seq, stage, code, message)))
    assert got.kind == "error" and got.tensors == []
    assert got.error == {"code": code, "message": message[:wire.MAX_TEXT]}


# ---- the control request parser ------------------------------------------------------------------

ARG_NAMES = sorted({f.name for c in control.COMMANDS.values() for f in c.request.fields()})
requests = st.dictionaries(st.sampled_from(ARG_NAMES) | st.text(max_size=10) | st.integers(-2**63, 2**63 - 1), msgpack_values,
                           max_size=6).flatmap(
    lambda args: st.fixed_dictionaries(
        {"v": st.just(control.VERSION) | msgpack_values,
         "cmd": st.sampled_from(sorted(control.COMMANDS)) | msgpack_values}).map(lambda h: {**args, **h}))


def _parses_or_control_error(raw: bytes) -> None:
    try:
        req, rid = control.parse_request(raw)
    except control.ControlError as e:
        assert e.code in (control.BAD_REQUEST, control.UNKNOWN_COMMAND, control.BAD_ARGS)
        return
    command = control.COMMANDS[req.CMD]
    assert type(req) is command.request
    assert rid is None or isinstance(rid, str)
    # what parsed is what a sender would write again: the typed request is the whole message
    assert control.parse_request(control.encode_request(req))[0] == req


@given(requests)
def test_any_request_map_parses_or_raises_control_error(req):
    _parses_or_control_error(msgpack.packb(req, use_bin_type=True))


def test_non_string_argument_names_are_bad_args():  # found by hypothesis
    with pytest.raises(control.ControlError) as ei:
        control.parse_request(msgpack.packb({"v": control.VERSION, "cmd": "ping", 1: 2, "x": 3}))
    assert ei.value.code == control.BAD_ARGS


@given(st.binary(max_size=64) | msgpack_values.map(lambda v: msgpack.packb(v, use_bin_type=True)))
def test_any_request_bytes_parse_or_raise_control_error(raw):
    _parses_or_control_error(raw)


# ---- the YAML parsers: plan, inventory, node config, planner problem, testbed -------------------

PLAN = {"model": {"name": "vit_small_patch16_224", "checkpoint": "/ckpt/vit.safetensors", "microbatch": 8,
                  "granularity": "block", "dtype": "float32", "kwargs": {"num_classes": 10}},
        "nodes": {"n1": "tcp://127.0.0.1:5551", "n2": "tcp://127.0.0.1:5552"},
        "stages": [{"units": [0, 5], "nodes": ["n1"]}, {"units": [5, 14], "nodes": ["n2"], "threads": 2}],
        "results": "tcp://127.0.0.1:5560", "run": "r1"}
INVENTORY = SAMPLE_INVENTORY
NODE_CONFIG = {"control": "tcp://0.0.0.0:5550", "name": "board-1", "advertise": "10.0.0.11", "threads": 4,
               "memory_limit": "6GB", "metrics_port": 9550, "metrics_host": "0.0.0.0", "log_level": "info"}
PROBLEM = {
    "model": {"name": "vit_tiny_patch16_224", "microbatch": 8, "input_bytes": 4000, "granularity": "block",
              "units": [{"name": "embed", "out_bytes": 1000, "param_bytes": 100, "work_bytes": 10},
                        {"name": "head", "out_bytes": 500, "param_bytes": 50, "work_bytes": 5}]},
    "device_types": {"fast": {"memory_bytes": 20_000, "reserved_bytes": 1000, "unit_times_s": [1, 2],
                              "recv_ms_per_mb": 5},
                     "slow": {"memory_bytes": 1_000_000, "reserved_bytes": 0, "unit_times_s": [2, 4]}},
    "devices": [{"name": "a", "type": "fast", "control": "tcp://10.0.0.1:5550"},
                {"name": "b", "type": "slow", "speed": 2.0}],
    "links": {"default": {"mbps": 8, "latency_ms": 10},
              "overrides": [{"a": "a", "b": "slow", "mbps": 4}, {"a": "fast", "b": "client", "mbps": 2}]},
    "options": {"replication": True, "buffers": 2},
}
TESTBED = {"name": "tb2",
           "devices": [{"name": "big", "cpu": 1.0, "threads": 1, "memory": "2GB", "type": "big"},
                       {"name": "small", "cpu": 0.25, "memory": "1GiB", "count": 2}],
           "links": {"default": {"mbps": 1000, "latency_ms": 0.5},
                     "overrides": [{"a": "client", "b": "small-0", "mbps": 100, "latency_ms": 5}]}}

PARSERS = {
    "plan": (lambda d: parse_plan(d), PLAN, PlanFileError),
    "inventory": (lambda d: parse_cluster(d), INVENTORY, ClusterError),
    "node config": (lambda d: parse_node_config(d), NODE_CONFIG, NodeConfigError),
    "problem": (Problem.from_dict, PROBLEM, PlanError),
    "testbed": (lambda d: parse_config(d, cores=2), TESTBED, ConfigError),
}


@pytest.mark.parametrize("kind", sorted(PARSERS))
def test_the_valid_documents_parse(kind):
    parse, doc, _ = PARSERS[kind]
    parse(copy.deepcopy(doc))


@pytest.mark.parametrize("kind", sorted(PARSERS))
@given(data=st.data())
def test_any_document_parses_or_raises_the_parsers_error(kind, data):
    parse, doc, error = PARSERS[kind]
    d = data.draw(mutated(doc) | yaml_values, label="document")
    try:
        parse(d)
    except error as e:
        assert str(e)
