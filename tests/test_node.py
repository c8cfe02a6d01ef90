"""node.py: the control protocol over a real REP socket, and the data path of one stage."""

from __future__ import annotations

import time

import msgpack
import numpy as np
import pytest
import zmq
from helpers import (
    KWARGS,
    MICROBATCH,
    MODEL,
    N_UNITS,
    batches,
    inproc_node,
    load_args,
    monolithic,
    stage_stats,
    stats_reply,
    wait_state,
)

from edgezmq.paths import checkpoints_dir
from edgezmq.protocol import control, wire
from edgezmq.transport import sockets
from edgezmq.transport.rpc import ControlClient

pytestmark = pytest.mark.slow  # every test here serves a node daemon (sockets, model loads)

RECV_MS = 20_000


@pytest.fixture
def node():
    with inproc_node() as n:
        yield n


@pytest.fixture
def cc(node):
    with ControlClient(node.control_endpoint, timeout=10, retries=0) as c:
        yield c


def test_ping_and_info(cc):
    r = cc.call("ping")
    assert r["state"] == "idle" and r["name"] == "t0"
    info = cc.call("info")["device"]
    assert info["cores"] >= 1 and info["memory_total"] > 0
    assert {"torch", "timm", "edgezmq"} <= set(info["versions"])


def test_bad_requests_get_error_replies_and_socket_keeps_working(node, socks):
    req = socks(zmq.REQ)
    req.connect(node.control_endpoint)
    for raw in [b"garbage\xc1", msgpack.packb([1]), msgpack.packb({"v": 1, "cmd": "format_disk"}),
                control.request("load", run="r"), control.request("start", connect=[]),
                control.request("ping", bogus=True), msgpack.packb({"v": 1, "cmd": 3})]:
        req.send(raw)
        reply = msgpack.unpackb(req.recv())
        assert reply["ok"] is False and reply["error"]["code"] in (
            control.BAD_REQUEST, control.UNKNOWN_COMMAND, control.BAD_ARGS, control.BAD_STATE)
    req.send(control.request("ping"))
    assert msgpack.unpackb(req.recv())["ok"] is True
    assert node.bad_requests == 7


@pytest.mark.parametrize(
    "over, text",
    [
        ({"model": "resnet50"}, "resnet50"),
        ({"model": "no_such_model_xyz"}, "no_such_model_xyz"),
        ({"units": [3, 99]}, "out of bounds"),
        ({"units": [4, 2]}, "out of bounds"),
        ({"checkpoint": "/nonexistent/x.safetensors"}, "outside this node's weights directories"),
        ({"checkpoint": "/etc/passwd"}, "outside this node's weights directories"),
        ({"checkpoint": str(checkpoints_dir() / ".." / ".." / "x.safetensors")}, "outside this node's weights"),
        ({"checkpoint": str(checkpoints_dir() / "no-such.safetensors")}, "not found"),
        ({"dtype": "int8"}, "dtype"),
        ({"microbatch": 0}, "microbatch"),
    ],
)
def test_load_refuses_bad_shards_clearly(cc, over, text):
    with pytest.raises(control.ControlError) as ei:
        cc.call("load", **load_args(**over))
    assert text in ei.value.message
    assert cc.call("ping")["state"] == "idle"  # nothing half-loaded


def test_load_refuses_a_shard_that_does_not_fit():
    with inproc_node(memory_limit=1000) as node, ControlClient(node.control_endpoint, timeout=10) as c:
        with pytest.raises(control.ControlError) as ei:
            c.call("load", **load_args())
        assert ei.value.code == control.LOAD_FAILED
        assert "needs" in ei.value.message and "available" in ei.value.message and "t0" in ei.value.message


def test_load_counts_the_working_memory_the_planner_counts(tmp_path, monkeypatch):
    """Parameters + buffers fit, the working memory by the node's own profile does not: refused,
    naming that term; with a small working memory the same shard is admitted."""
    from edgezmq.model import profile_cache as cache
    from edgezmq.node import device

    monkeypatch.setenv("EDGEZMQ_CACHE", str(tmp_path))
    key = cache.profile_key(MODEL, granularity="block", microbatch=MICROBATCH, threads=1, kwargs=KWARGS)
    units = [{"name": f"u{i}", "work_bytes": 1000} for i in range(N_UNITS)]
    huge = 10**12  # far above the limit below, whatever this machine holds
    cache.put(key, {"units": [*units[:2], {**units[2], "work_bytes": huge}, *units[3:]]})
    limit = device.rss_bytes() + (1 << 30)  # 1 GiB over what the process holds: the shard's tensors fit
    with inproc_node(memory_limit=limit) as node, ControlClient(node.control_endpoint, timeout=30) as c:
        with pytest.raises(control.ControlError) as ei:
            c.call("load", **load_args())
        assert ei.value.code == control.LOAD_FAILED
        assert f"{huge / 1e6:.0f} MB working memory" in ei.value.message, ei.value.message
        assert c.call("ping")["state"] == "idle"
        cache.put(key, {"units": units})  # the same shard, a working memory that fits: admitted
        assert c.call("load", **load_args())["state"] == "loading"
        wait_state(c, "loaded")


def test_start_before_load_is_a_state_error(cc):
    with pytest.raises(control.ControlError) as ei:
        cc.call("start", connect=["tcp://127.0.0.1:1"])
    assert ei.value.code == control.BAD_STATE


def _one_stage(cc, socks, **over):
    """Load the whole model as one stage; return (push into it, pull of its results)."""
    r = cc.call("load", **load_args(**over))
    wait_state(cc, "loaded")
    out = socks(zmq.PULL)
    out_ep = sockets.bind(out, "tcp://127.0.0.1:0")
    cc.call("start", connect=[out_ep])
    push = socks(zmq.PUSH)
    push.connect(r["data"])
    return push, out


def _recv(sock):
    frames = sockets.recv_frames(sock, RECV_MS)
    assert frames is not None, "no message within the timeout"
    return wire.decode(frames)


def test_one_stage_equals_monolithic_and_counts(cc, socks):
    push, out = _one_stage(cc, socks)
    xs = batches(3)
    for i, x in enumerate(xs):
        sockets.send_message(push, wire.Message("act", "r1", i, -1, [x]))
    got = {m.seq: m for m in (_recv(out) for _ in xs)}
    ref = monolithic(xs)
    for i in range(3):
        assert got[i].kind == "result" and got[i].stage == 0
        np.testing.assert_array_equal(got[i].tensors[0], ref[i])
        assert len(got[i].t) == 1 and got[i].t[0][0] == 0  # this stage's timestamps
    st = cc.call("stats")["stage"]
    assert st["processed"] == 3 and st["samples"] == 3 * MICROBATCH and st["compute_s"] > 0
    # CPU accounting: the forwards' CPU is part of the process's, which also pays for the hops
    assert 0 < st["compute_cpu_s"] < st["cpu_s"]


def test_short_last_batch_is_accepted(cc, socks):
    push, out = _one_stage(cc, socks)
    x = batches(1, microbatch=1)[0]
    sockets.send_message(push, wire.Message("act", "r1", 0, -1, [x]))
    m = _recv(out)
    assert m.kind == "result" and m.tensors[0].shape == (1, 1000)


def test_garbage_is_counted_answered_downstream_and_node_keeps_serving(cc, socks):
    push, out = _one_stage(cc, socks)
    x = batches(1)[0]
    bad = [
        [b"not msgpack"],
        [msgpack.packb({"v": 1, "kind": "act", "run": "r1", "seq": 5, "stage": -1,
                        "tensors": [{"dtype": "float32", "shape": [2, 3, 64, 64]}]}), b"short"],
        wire.encode(wire.Message("act", "r1", 6, -1, [np.zeros((2, 3, 32, 32), np.float32)])),  # wrong shape
        wire.encode(wire.Message("act", "r1", 7, -1, [np.zeros((2, 3, 64, 64), np.float64)])),  # wrong dtype
        wire.encode(wire.Message("act", "r1", 8, -1, [x, x])),  # two tensors
        wire.encode(wire.Message("act", "r1", 9, -1, [np.zeros((3, 3, 64, 64), np.float32)])),  # > microbatch
        wire.encode(wire.Message("act", "other-run", 10, -1, [x])),
        wire.encode(wire.Message("result", "r1", 11, -1, [x])),
        wire.encode(wire.Message("act", "r1", 12, 4, [x])),  # from the wrong stage
    ]
    for frames in bad:
        sockets.send_frames(push, frames)
    errors = [_recv(out) for _ in bad]
    assert all(m.kind == "error" for m in errors)
    assert sorted(m.seq for m in errors) == [-1, 5, 6, 7, 8, 9, 10, 11, 12]
    codes = {m.seq: m.error["code"] for m in errors}
    assert codes[6] == "bad_shape" and codes[7] == "bad_dtype" and codes[8] == "bad_arity"
    assert codes[10] == "wrong_run" and codes[12] == "bad_stage"
    # still serving: a good message after all that garbage
    sockets.send_message(push, wire.Message("act", "r1", 100, -1, [x]))
    good = _recv(out)
    assert good.kind == "result" and good.seq == 100
    np.testing.assert_array_equal(good.tensors[0], monolithic([x])[0])
    st = cc.call("stats")["stage"]
    assert st["bad_messages"] == len(bad) and st["wrong_run"] == 1 and st["processed"] == 1


def test_upstream_errors_are_forwarded_untouched(cc, socks):
    push, out = _one_stage(cc, socks, stage=1)
    sockets.send_message(push, wire.error_message("r1", 3, 0, "compute_failed", "upstream broke"))
    m = _recv(out)
    assert m.kind == "error" and m.seq == 3 and m.error["message"] == "upstream broke"
    # an error of a stage not upstream (here: downstream) is refused like an activation of it
    sockets.send_message(push, wire.error_message("r1", 4, 5, "compute_failed", "not my upstream"))
    m = _recv(out)
    assert m.seq == 4 and m.error["code"] == "bad_stage" and m.stage == 1
    st = cc.call("stats")["stage"]
    assert st["forwarded_errors"] == 1 and st["bad_messages"] == 1


def test_a_client_cannot_forge_errors(cc, socks):
    # stage 0's upstream is the client (stage -1): errors come from stages only
    push, out = _one_stage(cc, socks)
    sockets.send_message(push, wire.error_message("r1", 3, -1, "compute_failed", "invented"))
    m = _recv(out)
    assert m.kind == "error" and m.seq == 3 and m.stage == 0
    assert m.error["code"] == "bad_kind" and "invented" not in m.error["message"]
    st = cc.call("stats")["stage"]
    assert st["forwarded_errors"] == 0 and st["bad_messages"] == 1


def _drop_reply(ctx, endpoint: str, payload: bytes) -> None:
    """Send a request and never read its reply: what a client whose timeout fired sees."""
    req = ctx.socket(zmq.REQ)
    req.setsockopt(zmq.LINGER, 1000)  # the request must leave before the socket closes
    req.connect(endpoint)
    req.send(payload)
    req.close()


def _raw_call(socks, endpoint: str, payload: bytes) -> dict:
    req = socks(zmq.REQ)
    req.connect(endpoint)
    req.send(payload)
    return msgpack.unpackb(req.recv())


def test_a_resent_load_gets_the_first_reply_not_bad_state(node, cc, socks, ctx):
    payload = control.request("load", rid="deploy-1-load", **load_args())
    _drop_reply(ctx, node.control_endpoint, payload)
    wait_state(cc, "loaded")  # the first request was executed
    again = _raw_call(socks, node.control_endpoint, payload)  # a second client resends it
    assert again["ok"] is True and again["state"] == "loading" and again["data"].startswith("tcp://")
    # the same load without the id: the current state's equivalent, same endpoint
    same = cc.call("load", **load_args())
    assert same["state"] == "loaded" and same["data"] == again["data"]
    # another load is still refused, and an id reused for another request is a client bug
    with pytest.raises(control.ControlError) as ei:
        cc.call("load", **load_args(run="r2"))
    assert ei.value.code == control.BAD_STATE
    reused = _raw_call(socks, node.control_endpoint, control.request("ping", rid="deploy-1-load"))
    assert reused["ok"] is False and reused["error"]["code"] == control.BAD_REQUEST


def test_every_command_is_safe_to_resend(node, cc, socks, ctx):
    assert cc.call("unload")["state"] == "idle" and cc.call("unload")["state"] == "idle"
    r = cc.call("load", **load_args())
    wait_state(cc, "loaded")
    out = socks(zmq.PULL)
    out_ep = sockets.bind(out, "tcp://127.0.0.1:0")
    start = control.request("start", rid="start-1", connect=[out_ep])
    _drop_reply(ctx, node.control_endpoint, start)
    assert _raw_call(socks, node.control_endpoint, start)["state"] == "running"
    assert cc.call("start", connect=[out_ep])["state"] == "running"  # same addresses: running
    with pytest.raises(control.ControlError) as ei:
        cc.call("start", connect=["tcp://127.0.0.1:1"])
    assert ei.value.code == control.BAD_STATE
    assert cc.call("pause")["paused"] is True and cc.call("pause")["paused"] is True
    assert cc.call("resume")["paused"] is False and cc.call("resume")["paused"] is False
    assert cc.call("ping")["data"] == r["data"]


def test_node_client_is_typed_and_retries_with_one_request_id(node):
    from edgezmq.protocol import messages as m
    from edgezmq.transport.nodeclient import NodeClient

    with NodeClient(node.control_endpoint, name="t0") as c:
        assert c.ping().state == "idle"
        assert c.info().device.cores >= 1
        d = c.describe(MODEL, kwargs=KWARGS, microbatch=MICROBATCH)
        assert d.n_units == 6 and [u.name for u in d.units][:2] == ["embed", "blocks.0"]
        assert d.units[0].inputs[0].shape == [MICROBATCH, 3, 64, 64] and d.output[0].shape == [MICROBATCH, 1000]
        with pytest.raises(control.ControlError) as ei:  # refused before it is sent
            c.load(m.LoadRequest(**{**load_args(), "units": (0, 6), "microbatch": 0}))
        assert ei.value.code == control.BAD_ARGS and node.requests == 3
        r = c.load(m.LoadRequest(**{**load_args(), "units": (0, 6)}))
        assert r.state == "loading" and r.param_bytes > 0
        assert c.load(m.LoadRequest(**{**load_args(), "units": (0, 6)})).data == r.data
        assert c.stats().stage is not None and c.stats().stage.model == MODEL
        assert c.unload().state == "idle" and c.stats().stage is None


def test_pause_holds_the_stage_while_control_answers(node, cc, socks, capsys):
    from edgezmq.cli.main import main as cli_main

    with pytest.raises(control.ControlError) as ei:
        cc.call("pause")
    assert ei.value.code == control.BAD_STATE and "needs a running stage" in ei.value.message
    push, out = _one_stage(cc, socks)
    assert cli_main(["pause", node.control_endpoint]) == 0
    assert "t0: stage paused" in capsys.readouterr().out
    xs = batches(2)
    for i, x in enumerate(xs):
        sockets.send_message(push, wire.Message("act", "r1", i, -1, [x]))
    st = _stage_stats_when(cc, lambda st: st["received"] == len(xs))
    assert st["paused"] and st["in_flight"] == 2 and st["processed"] == 0 and not st["backpressured"]
    assert sockets.recv_frames(out, 300) is None  # held: nothing comes out
    assert cc.call("ping")["state"] == "running"
    assert cc.call("resume")["paused"] is False
    assert sorted(_recv(out).seq for _ in xs) == [0, 1]
    st = _stage_stats_when(cc, lambda st: st["processed"] == len(xs))
    assert st["in_flight"] == 0 and not st["paused"]


def _stage_stats_when(cc, ok, timeout: float = 20.0) -> dict:
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        st = cc.call("stats")["stage"]
        if ok(st):
            return st
        time.sleep(0.05)
    raise AssertionError(f"stage stats never matched in {timeout}s: {st}")


def test_unload_then_load_again(cc, socks):
    _one_stage(cc, socks)
    assert cc.call("ping")["state"] == "running"
    cc.call("unload")
    assert cc.call("ping")["state"] == "idle"
    push, out = _one_stage(cc, socks, run="r2")
    x = batches(1)[0]
    sockets.send_message(push, wire.Message("act", "r2", 0, -1, [x]))
    assert _recv(out).kind == "result"


def test_unload_abandons_a_load_still_building_and_answers(node, cc, monkeypatch, caplog):
    """An unload of a shard still loading stops the build at its next tensor (it does not wait
    for the whole shard, which on a slow device takes minutes and holds the control loop)."""
    import threading

    from edgezmq.model import chain as models

    real, building, held = models.build_shard, threading.Event(), []

    def gated_build(*a, check, **kw):
        def gate() -> None:  # the build holds at its first tensor until the node abandons it
            building.set()
            deadline = time.time() + 60
            while time.time() < deadline:
                check()
                time.sleep(0.01)
            held.append("never abandoned")
        return real(*a, check=gate, **kw)

    monkeypatch.setattr(models, "build_shard", gated_build)
    assert cc.call("load", **load_args())["state"] == "loading"
    assert building.wait(60)
    with caplog.at_level("INFO", logger="edgezmq.node.daemon"):
        assert cc.call("unload")["state"] == "idle"
    assert not held and node._loader is None
    assert not [t for t in threading.enumerate() if t.name == "loader"]
    assert "abandoned by unload" in caplog.text
    monkeypatch.setattr(models, "build_shard", real)
    assert cc.call("load", **load_args())["state"] == "loading"  # the node takes a new load
    wait_state(cc, "loaded")


def test_unload_hands_memory_back_after_dropping_the_shard(node, cc, socks, monkeypatch):
    """release_memory (malloc_trim) must run when nothing holds the shard any more: run while
    unload still held it, it gave back nothing of the shard (a minnow-like node kept 1.3 GB
    after unloading, and the next plan's load was refused)."""
    import gc

    from edgezmq.model.chain import Shard
    from edgezmq.node import daemon

    alive_at_release = []

    def release() -> None:
        gc.collect()
        alive_at_release.append(sum(type(o) is Shard for o in gc.get_objects()))

    _one_stage(cc, socks)
    monkeypatch.setattr(daemon.device, "release_memory", release)
    cc.call("unload")
    assert alive_at_release == [0]


def test_a_build_stops_when_its_check_raises():
    from edgezmq.model import chain as models

    calls = []

    def check() -> None:
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        models.build_shard(MODEL, 0, N_UNITS, granularity="block", check=check, **KWARGS)
    assert len(calls) == 3


def test_load_failure_while_building_is_reported(cc, tmp_path):
    from safetensors.numpy import save_file

    bad = checkpoints_dir() / f"wrong-{tmp_path.name}.safetensors"  # where the node reads weights
    save_file({"unrelated": np.zeros(3, np.float32)}, str(bad))
    try:
        cc.call("load", **load_args(checkpoint=str(bad)))
        r = wait_state(cc, "failed")
    finally:
        bad.unlink()
    assert "t0" in r["error"] and "lacks 56 tensor(s)" in r["error"]


def test_model_kwargs_reach_the_shard(cc):
    # same model name, other kwargs: the unit range check follows the kwargs (depth 4 -> 6 units)
    with pytest.raises(control.ControlError, match="6 units"):
        cc.call("load", **load_args(units=[0, 7]))
    assert MODEL and KWARGS["depth"] == 4


def _job(cc, r, timeout=120.0):
    if r.get("job") is None:
        return r
    deadline = time.time() + timeout
    while time.time() < deadline:
        j = cc.call("job", id=r["job"])
        if j["state"] != "running":
            return j
        time.sleep(0.05)
    raise AssertionError(f"job {r['job']} still running after {timeout}s")


def test_profile_command_runs_as_a_job_and_is_cached(cc, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEZMQ_CACHE", str(tmp_path))
    args = dict(model=MODEL, microbatch=MICROBATCH, kwargs=KWARGS, threads=1, reps=1)
    first = cc.call("profile", **args)
    assert first["cached"] is False and first["state"] == "running"
    j = _job(cc, first)
    assert j["state"] == "done", j["error"]
    units = j["result"]["units"]
    assert [u["name"] for u in units] == ["embed", "blocks.0", "blocks.1", "blocks.2", "blocks.3", "head"]
    assert all(u["time_s"] > 0 for u in units)
    assert j["progress"][:2] == [6, 6]
    again = cc.call("profile", **args)
    assert again["cached"] is True and again["result"]["units"] == units
    # another thread count is another device, as far as the cache is concerned
    assert cc.call("profile", **{**args, "threads": 2})["cached"] is False


def test_profile_check_rescales_a_cached_profile_the_device_has_drifted_from(cc, tmp_path, monkeypatch):
    from edgezmq.model import profile_cache as cache

    monkeypatch.setenv("EDGEZMQ_CACHE", str(tmp_path))
    args = dict(model=MODEL, microbatch=MICROBATCH, kwargs=KWARGS, threads=1, reps=1)
    j = _job(cc, cc.call("profile", **args))
    assert j["state"] == "done", j["error"]
    prof = j["result"]
    key = cache.profile_key(MODEL, granularity="block", microbatch=MICROBATCH, threads=1, kwargs=KWARGS)
    assert cache.get(key) == prof
    # the cache says the device was 20x slower than it is: a spot check sees it and rescales
    slow = {**prof, "units": [{**u, "time_s": u["time_s"] * 20, "times_s": [t * 20 for t in u["times_s"]]}
                              for u in prof["units"]],
            "chain": {**prof["chain"], "time_s": prof["chain"]["time_s"] * 20}}
    cache.put(key, slow)
    r = cc.call("profile", **args, check=True)
    assert r["cached"] is True and r["state"] == "running"
    j = _job(cc, r)
    assert j["state"] == "done" and j["kind"] == "spot-check", j["error"]
    got = j["result"]
    sc = got["spot_check"]
    assert sc["units"] == prof["chain"]["units"] and sc["cached_time_s"] == slow["chain"]["time_s"]
    assert sc["ratio"] < 0.5 and sc["rescaled"] is True
    assert [u["time_s"] for u in got["units"]] == pytest.approx([u["time_s"] * sc["ratio"] for u in slow["units"]])
    assert cache.get(key) == got  # the cache now holds the device's current level
    # without `check` a hit is returned as it is, at once
    plain = cc.call("profile", **args)
    assert plain["cached"] is True and plain["job"] is None and plain["result"] == got


def test_profile_refuses_bad_args_and_busy_states(cc, socks):
    with pytest.raises(control.ControlError, match="no_such"):
        cc.call("profile", model="no_such_vit", microbatch=2)
    with pytest.raises(control.ControlError, match="microbatch"):
        cc.call("profile", model=MODEL, microbatch=0)
    with pytest.raises(control.ControlError, match="no job"):
        cc.call("job", id="profile-99")
    _one_stage(cc, socks)
    with pytest.raises(control.ControlError) as ei:
        cc.call("profile", model=MODEL, microbatch=2, kwargs=KWARGS)
    assert ei.value.code == control.BAD_STATE


def test_netprobe_between_two_nodes(cc):
    with inproc_node("t1") as other, ControlClient(other.control_endpoint, timeout=10) as oc:
        peer = oc.call("info")["probe"]
        j = _job(cc, cc.call("netprobe", peer=peer, seconds=0.3, bytes_per_msg=1 << 20, pings=5))
    assert j["state"] == "done", j["error"]
    assert j["result"]["bandwidth_mbps"] > 0 and j["result"]["latency_ms"] > 0


def test_netprobe_to_nowhere_fails_as_a_job_not_a_node(cc):
    j = _job(cc, cc.call("netprobe", peer="tcp://127.0.0.1:1", seconds=0.2, pings=2))
    assert j["state"] == "failed" and "t0" in j["error"]
    assert cc.call("ping")["state"] == "idle"


def test_a_profile_past_its_deadline_fails_and_frees_the_node(cc, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEZMQ_CACHE", str(tmp_path))
    # 1000 rounds of >= one CFS period per unit: minutes of work, stopped by a 1 s deadline
    r = cc.call("profile", model=MODEL, microbatch=MICROBATCH, kwargs=KWARGS, threads=1, reps=1000,
                deadline=1.0)
    j = _job(cc, r, timeout=120)
    assert j["state"] == "failed" and "deadline" in j["error"] and "t0" in j["error"], j
    assert j["result"] is None
    # the node takes the next job
    probe = cc.call("netprobe", peer="tcp://127.0.0.1:1", seconds=0.2, pings=2)
    assert _job(cc, probe)["state"] == "failed"


def test_a_wait_that_gives_up_cancels_its_job(node, tmp_path, monkeypatch):
    from edgezmq.protocol import messages as m
    from edgezmq.transport.nodeclient import JobTimeout, NodeClient

    monkeypatch.setenv("EDGEZMQ_CACHE", str(tmp_path))
    with NodeClient(node.control_endpoint, name="t0") as c:
        r = c.profile(m.ProfileRequest(model=MODEL, microbatch=MICROBATCH, kwargs=KWARGS, threads=1, reps=1000))
        assert r.job is not None
        with pytest.raises(JobTimeout):
            c.wait_job(r.job, 0.5)
        # the node was told: the job ends as `cancelled`, not after its hour-long deadline
        end = time.monotonic() + 120
        while (j := c.job(r.job)).state == "running" and time.monotonic() < end:
            time.sleep(0.05)
        assert j.state == "cancelled" and j.error is not None and "cancelled" in j.error
        assert c.cancel(r.job).state == "cancelled"  # safe to resend


def test_status_counts_each_bad_message_once():
    from edgezmq.ops.status import node_row
    from edgezmq.orchestrate.address import NodeAddress

    # three refused messages, one of them of another run, and one failed forward: 4 errors
    stage = stage_stats(stage=0, units=[0, 6], run="r1", bad_messages=3, wrong_run=1, compute_errors=1,
                        uptime_s=1.0)
    row = node_row(NodeAddress("t0", "tcp://127.0.0.1:1"), stats_reply("running", stage))
    assert row["errors"] == 4


def test_a_symlink_out_of_the_weights_directory_is_refused(cc, tmp_path):
    link = checkpoints_dir() / f"escape-{tmp_path.name}.safetensors"
    link.symlink_to(checkpoint_outside := tmp_path / "elsewhere.safetensors")
    checkpoint_outside.write_bytes(b"")
    try:
        with pytest.raises(control.ControlError, match="outside this node's weights directories") as e:
            cc.call("load", **load_args(checkpoint=str(link)))
        assert e.value.code == control.LOAD_FAILED
    finally:
        link.unlink()


def test_weights_directories_are_the_nodes_to_choose(tmp_path):
    from safetensors.numpy import save_file

    mine = tmp_path / "weights"
    mine.mkdir()
    ckpt = mine / "other.safetensors"
    save_file({"unrelated": np.zeros(3, np.float32)}, str(ckpt))
    with inproc_node(weights_dirs=[str(mine)]) as node, ControlClient(node.control_endpoint, timeout=30) as c:
        c.call("load", **load_args(checkpoint=str(ckpt)))  # accepted: read (and found wanting) later
        assert wait_state(c, "failed")["state"] == "failed"
        with pytest.raises(control.ControlError, match="outside"):  # the cache is no longer a weights dir
            c.call("load", **load_args())


def test_messages_larger_than_the_stages_input_are_dropped_by_libzmq(cc, socks):
    """The data socket's MAXMSGSIZE is the stage's own input plus a header, not 1 GiB: an oversized
    message never reaches Python (not counted, no memory), and the stage goes on serving."""
    push, out = _one_stage(cc, socks)
    x = batches(1)[0]
    big = np.zeros((MICROBATCH * 64, *x.shape[1:]), np.float32)  # 64x the input the stage takes (cap: 2x)
    sockets.send_message(push, wire.Message("act", "r1", 0, -1, [big]))
    again = socks(zmq.PUSH)  # libzmq closed the oversized sender's connection
    again.connect(cc.call("ping")["data"])
    sockets.send_message(again, wire.Message("act", "r1", 1, -1, [x]))
    m = _recv(out)
    assert m.kind == "result" and m.seq == 1
    st = cc.call("stats")["stage"]
    assert st["received"] == 1 and st["bad_messages"] == 0 and st["bytes_in"] < big.nbytes
