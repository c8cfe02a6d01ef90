"""Hostile input: thousands of random and mutated messages at a node process's data and control sockets."""

from __future__ import annotations

import os
import pathlib
import re
import threading
import time

import msgpack
import numpy as np
import pytest
import zmq
from helpers import MICROBATCH, N_UNITS, batches, model_spec, monolithic

from edgezmq.orchestrate.address import NodeAddress
from edgezmq.orchestrate.deploy import deploy, unload
from edgezmq.orchestrate.planfile import DeployPlan, StagePlan
from edgezmq.protocol import codecs, control, wire
from edgezmq.transport import netprobe, sockets
from edgezmq.transport.rpc import ControlClient

pytestmark = pytest.mark.slow
N_MESSAGES = int(os.environ.get("EDGEZMQ_FUZZ_N", "10000"))  # per socket
SEED = 6
TOL = 1e-5
REPLY_TIMEOUT_MS = 5000  # every control request is answered within this, or the test fails
DRAIN_TIMEOUT_S = 60.0  # every data message has its downstream answer by then
FUZZ_HWM = 1000  # the fuzzer's own queue; the node's RCVHWM still paces it
GOOD_BATCHES = 3
OVERSIZE = sockets.CONTROL_MAXMSGSIZE + 1024  # over the control socket's MAXMSGSIZE


@pytest.fixture(scope="module")
def stage(node_pool):
    """One node process (the session's pool's) serving the whole model; results come to the collector."""
    ctx = zmq.Context()
    with node_pool.take(1) as c:
        # the collector's thread binds a port of its own choosing and owns the socket: a port
        # bound here, closed and bound again there raced libzmq's asynchronous close (EADDRINUSE)
        collector = Collector(ctx, "tcp://127.0.0.1:0")
        plan = DeployPlan(model=model_spec(), stages=[StagePlan((0, N_UNITS), [NodeAddress("n0", c.nodes[0].control, 1)])],
                          results=collector.endpoint)
        dep = deploy(plan, load_timeout=120)
        try:
            yield {"node": c.nodes[0], "dep": dep, "ctx": ctx, "collector": collector}
        finally:
            unload(plan)
            collector.stop()
            ctx.term()


class Collector:
    """Counts what comes out of the stage, in a thread that owns the results socket."""

    def __init__(self, ctx: zmq.Context, endpoint: str) -> None:
        self.ctx, self.endpoint = ctx, endpoint
        self.results: dict[int, np.ndarray] = {}
        self.errors = 0
        self.codes: dict[str, int] = {}
        self.undecodable = 0
        self.undecodable_why: list[str] = []
        self._stop = threading.Event()
        self._bound = threading.Event()
        self._th = threading.Thread(target=self._run, daemon=True)
        self._th.start()
        assert self._bound.wait(120), "collector did not bind"

    @property
    def total(self) -> int:
        return len(self.results) + self.errors + self.undecodable

    def _run(self) -> None:
        pull = sockets.make_socket(self.ctx, zmq.PULL, sockets.DATA)
        self.endpoint = sockets.bind(pull, self.endpoint)  # the port it got, when asked for port 0
        self._bound.set()
        try:
            while not self._stop.is_set():
                frames = sockets.recv_frames(pull, 50)
                if frames is None:
                    continue
                try:
                    msg = wire.decode(frames)
                except wire.WireError as e:
                    self.undecodable += 1
                    self.undecodable_why.append(f"{e} {bytes(frames[0])[:120]!r}")
                    continue
                if msg.kind == "error":
                    self.errors += 1
                    code = (msg.error or {}).get("code", "?")
                    self.codes[code] = self.codes.get(code, 0) + 1
                else:
                    self.results[msg.seq] = msg.tensors[0].copy()
        finally:
            pull.close(linger=0)

    def wait_total(self, n: int, timeout: float = DRAIN_TIMEOUT_S) -> None:
        deadline = time.time() + timeout
        while self.total < n and time.time() < deadline:
            time.sleep(0.05)
        assert self.total == n, f"{self.total} message(s) came out of the stage, expected {n}"

    def stop(self) -> None:
        self._stop.set()
        self._th.join(5)


def stats(node) -> dict:
    with ControlClient(node.control, timeout=5, retries=0) as c:
        return c.call("stats")


def good_traffic(stage, push, first_seq: int) -> None:
    """Valid microbatches in, results equal to the monolithic model out."""
    col, run = stage["collector"], stage["dep"].run
    xs = batches(GOOD_BATCHES, seed=first_seq)
    before = col.total
    for i, x in enumerate(xs):
        send(push, wire.encode(wire.Message("act", run, first_seq + i, -1, [x])))
    col.wait_total(before + GOOD_BATCHES)
    for i, ref in enumerate(monolithic(xs)):
        assert float(np.max(np.abs(col.results[first_seq + i] - ref))) <= TOL


def send(push: zmq.Socket, frames: list) -> None:
    deadline = time.time() + DRAIN_TIMEOUT_S
    while True:
        try:
            sockets.send_frames(push, frames)
            return
        except zmq.Again:
            assert time.time() < deadline, "the stage stopped taking input"


# ---- generators of bad data messages ----------------------------------------
def _flip(rng, b: bytes, n: int) -> bytes:
    a = bytearray(b)
    for _ in range(n):
        i = int(rng.integers(len(a)))
        a[i] ^= 1 << int(rng.integers(8))
    return bytes(a)


def _header(run: str, /, **over) -> bytes:
    h = {"v": wire.VERSION, "kind": "act", "run": run, "seq": 1, "stage": -1,
         "tensors": [{"dtype": "float32", "shape": [MICROBATCH, 3, 64, 64], "enc": "raw"}], "t": []}
    h.update(over)
    return msgpack.packb(h, use_bin_type=True)


def bad_data_messages(rng, run: str, x: np.ndarray):
    """Endless bad messages, cycling through kinds of damage."""
    valid = [bytes(f) if not isinstance(f, np.ndarray) else f.tobytes()
             for f in wire.encode(wire.Message("act", run, 1, -1, [x]))]
    head, buf = valid
    small = b"\0" * 16
    wrong_types = [{"run": 5}, {"seq": "1"}, {"stage": 1.5}, {"tensors": {}}, {"tensors": [[1]]},
                   {"t": "x"}, {"kind": None}, {"seq": True}, {"seq": 2**64 - 1}, {"seq": -5}, {"t": [1, 2]}]
    huge = [[2**30, 2**30], [2**31 - 1] * 8, [-1, 3], [1.5], list(range(1, 10)), [MICROBATCH + 1, 3, 64, 64],
            [MICROBATCH, 3, 64, 65], [MICROBATCH, 4, 64, 64], [MICROBATCH * 3 * 64 * 64], [2**31 - 1] * 7 + [0]]
    # encoded (docs/wire.md, Encodings): valid ones to damage, and hostile scale frames
    encoded = {}
    for name in ("int8", "int4-ch", "f16"):
        e = codecs.encode(name, x)
        encoded[name] = [bytes(memoryview(f)) for f in wire.encode(wire.Message("act", run, 1, -1, [x]), [e])]
    h8, q8, s8 = encoded["int8"]
    h4, q4, s4 = encoded["int4-ch"]
    q_specs = [{"dtype": "float32", "shape": [MICROBATCH, 3, 64, 64], "enc": "int8", "scale": s}
               for s in ("row", None, 7, ["token"], "channel")] + [
              {"dtype": "float32", "shape": huge[int(rng.integers(len(huge)))], "enc": "int4", "scale": "token"},
              {"dtype": "int64", "shape": [MICROBATCH, 3, 64, 64], "enc": "f16"}]
    bad_scales = [np.full(len(s8) // 4, v, np.float32).tobytes() for v in (np.nan, np.inf, -1.0)]
    makers = [
        lambda: [rng.bytes(int(rng.integers(0, 256)))],
        lambda: [rng.bytes(int(rng.integers(0, 64))) for _ in range(int(rng.integers(2, 5)))],
        lambda: [_flip(rng, head, int(rng.integers(1, 4))), small],
        lambda: [head[: int(rng.integers(0, len(head)))], small],
        lambda: [head, buf[: int(rng.integers(0, len(buf)))]],  # truncated buffer
        lambda: [head, small, small],  # extra frame
        lambda: [head],  # missing frame
        lambda: [_header(run, v=[0, 2, "1", None][int(rng.integers(4))]), small],
        lambda: [_header(run, tensors=[{"dtype": "float32", "shape": huge[int(rng.integers(len(huge)))],
                                        "enc": "raw"}]), small],
        lambda: [_header(run + "x"), buf],  # another run
        lambda: [_header("\u00e9" * (wire.MAX_TEXT // 2)), buf],  # another run, as long as allowed
        lambda: [_header(run, stage=3), buf],
        lambda: [_header(run, kind="result"), buf],
        lambda: [_header(run, tensors=[{"dtype": ["int64", "float16", "object", "<f8"][int(rng.integers(4))],
                                        "shape": [2], "enc": "raw"}]), small],
        lambda: [_header(run, **wrong_types[int(rng.integers(len(wrong_types)))]), small],
        lambda: [_header(run, tensors=[{"dtype": "float32", "shape": [2], "enc": "zstd"}]), b"\0" * 8],
        lambda: [msgpack.packb([1, 2, 3]), small],
        lambda: [b"", b""],
        lambda: [_flip(rng, h8, int(rng.integers(1, 4))), q8, s8],
        lambda: [h8, q8, s8[: int(rng.integers(0, len(s8)))]],  # scales frame cut short
        lambda: [h8, q8, s8 + b"\0" * 4 * int(rng.integers(1, 4))],  # scales too many
        lambda: [h8, q8],  # scales frame missing
        lambda: [h8, q8, s8, small],
        lambda: [h8, q8, bad_scales[int(rng.integers(len(bad_scales)))]],  # NaN, inf, negative scales
        lambda: [h4, q4[: int(rng.integers(0, len(q4)))], s4],  # packed payload cut short
        lambda: [h4, q4 + b"\0", s4],
        lambda: [_header(run, tensors=[q_specs[int(rng.integers(len(q_specs)))]]), q8, s8],
        lambda: [encoded["f16"][0], encoded["f16"][1][:-2]],
    ]
    while True:
        for make in makers:
            yield make()


def test_data_socket_fuzz(stage):
    node, run, ctx, col = stage["node"], stage["dep"].run, stage["ctx"], stage["collector"]
    push = sockets.make_socket(ctx, zmq.PUSH, sockets.DATA)
    push.setsockopt(zmq.SNDHWM, FUZZ_HWM)
    push.connect(stage["dep"].entry[0])
    try:
        good_traffic(stage, push, 1000)
        before, out_before = stats(node)["stage"], col.total
        gen = bad_data_messages(np.random.default_rng(SEED), run, batches(1)[0])
        t0 = time.time()
        for _ in range(N_MESSAGES):
            send(push, next(gen))
        col.wait_total(out_before + N_MESSAGES)
        elapsed = time.time() - t0
        after = stats(node)["stage"]
        d = {k: after[k] - before[k] for k in ("received", "bad_messages", "wrong_run", "processed",
                                               "compute_errors", "forwarded_errors", "sent")}
        assert d["received"] == N_MESSAGES, d
        # every message is accounted for, exactly once; a mutation may rarely still be valid
        assert d["bad_messages"] + d["forwarded_errors"] + d["processed"] + d["compute_errors"] == N_MESSAGES, d
        assert d["bad_messages"] >= N_MESSAGES * 0.99, d
        assert d["wrong_run"] > 0 and d["sent"] == N_MESSAGES, d
        assert col.undecodable == 0, col.undecodable_why[:5]
        good_traffic(stage, push, 2000)
        assert node.proc.poll() is None, "node process died"
        print(f"\n{N_MESSAGES} bad data messages in {elapsed:.1f}s: {d}; codes {col.codes}")
    finally:
        push.close(linger=0)


# ---- control ------------------------------------------------------------------
def _wrong_value(rng, types: tuple):
    choices = [1, 1.5, "x", True, None, [1], {"a": 1}, b"\x00"]
    bad = [v for v in choices if not isinstance(v, types) or (isinstance(v, bool) and bool not in types)]
    return bad[int(rng.integers(len(bad)))]


def bad_control_requests(rng):
    """Endless single-frame requests the control protocol must refuse."""
    names = sorted(control.COMMANDS)
    valid = [control.request("ping"), control.request("job", id="x"), control.request("start", connect=["tcp://a:1"])]

    def wrong_type():
        cmd = names[int(rng.integers(len(names)))]
        fields = control.COMMANDS[cmd].request.fields()
        if not fields:
            return msgpack.packb({"v": 1, "cmd": cmd, "extra": 1})
        arg = fields[int(rng.integers(len(fields)))]
        # any value: expected_code says what the node must answer (a wrong type, a range, a missing argument)
        return msgpack.packb({"v": 1, "cmd": cmd, arg.name: _wrong_value(rng, ())}, use_bin_type=True)

    makers = [
        lambda: rng.bytes(int(rng.integers(0, 128))),
        lambda: msgpack.packb([1, "ping"]),
        lambda: msgpack.packb("ping"),
        lambda: msgpack.packb({"v": [2, 0, "1", None][int(rng.integers(4))], "cmd": "ping"}),
        lambda: msgpack.packb({"v": 1, "cmd": rng.bytes(8).hex()}),
        lambda: msgpack.packb({"v": 1, "cmd": [1, 2.5, None, ["ping"]][int(rng.integers(4))]}),
        lambda: msgpack.packb({"v": 1}),
        wrong_type,
        lambda: msgpack.packb({"v": 1, "cmd": "load", "run": "r"}),  # missing required args
        lambda: _flip(rng, valid[int(rng.integers(len(valid)))], int(rng.integers(1, 4))),
        lambda: valid[int(rng.integers(len(valid)))][: int(rng.integers(0, 10))],
        lambda: msgpack.packb({"v": 1, "cmd": "ping", 1: 2}),
    ]
    while True:
        for make in makers:
            yield make()


def expected_code(raw: bytes) -> str | None:
    """The error code the node must answer with, or None if the request is valid after all."""
    try:
        control.parse_request(raw)
    except control.ControlError as e:
        return e.code
    return None


def test_control_socket_fuzz(stage):
    node, ctx = stage["node"], stage["ctx"]
    before = stats(node)
    gen = bad_control_requests(np.random.default_rng(SEED))
    req = sockets.make_socket(ctx, zmq.REQ, sockets.CONTROL)
    req.connect(node.control)
    sent = 0
    codes: dict[str, int] = {}
    t0 = time.time()
    try:
        while sent < N_MESSAGES:
            multipart = sent % 100 == 99
            if multipart:
                frames, want = [control.request("ping"), b"x"], control.BAD_REQUEST
            else:
                raw = next(gen)
                want = expected_code(raw)
                if want is None:  # a mutation that is a valid request: never send it (it may be shutdown)
                    continue
                frames = [raw]
            req.send_multipart(frames)
            assert req.poll(REPLY_TIMEOUT_MS, zmq.POLLIN), f"no reply to bad request {sent}: {frames!r:.200}"
            reply = msgpack.unpackb(req.recv(), raw=False)
            assert reply["ok"] is False and reply["error"]["code"] == want, (frames, reply)
            codes[want] = codes.get(want, 0) + 1
            sent += 1
    finally:
        req.close(linger=0)
    elapsed = time.time() - t0
    after = stats(node)
    assert after["bad_requests"] - before["bad_requests"] == N_MESSAGES
    assert after["requests"] - before["requests"] == N_MESSAGES + 1  # + this stats request
    assert node.proc.poll() is None and after["state"] == "running"
    print(f"\n{N_MESSAGES} bad control requests in {elapsed:.1f}s: {codes}")
    with ControlClient(node.control, timeout=5, retries=0) as c:  # an oversized request: dropped, not fatal
        c._socket().send(b"\0" * OVERSIZE)
    good_traffic(stage, _pusher(stage), 3000)


def _pusher(stage) -> zmq.Socket:
    push = sockets.make_socket(stage["ctx"], zmq.PUSH, sockets.DATA)
    push.connect(stage["dep"].entry[0])
    stage.setdefault("extra", []).append(push)
    return push


@pytest.fixture(autouse=True, scope="module")
def _close_extra(stage):
    yield
    sockets.close_all(*stage.get("extra", []))


# ---- MAXMSGSIZE everywhere ------------------------------------------------------
def test_every_socket_has_maxmsgsize(ctx):
    for spec in (sockets.DATA, sockets.CONTROL, netprobe.PROBE_SOCKET):
        for kind in (zmq.PUSH, zmq.PULL, zmq.REQ, zmq.REP, zmq.ROUTER, zmq.DEALER):
            s = sockets.make_socket(ctx, kind, spec)
            try:
                assert s.getsockopt(zmq.MAXMSGSIZE) == spec.maxmsgsize > 0
            finally:
                s.close(linger=0)


def test_sockets_are_made_only_in_sockets_py():
    pkg = pathlib.Path(sockets.__file__).parent
    made = re.compile(r"\.socket\(")
    offenders = [str(p.relative_to(pkg)) for p in pkg.rglob("*.py")
                 if p.name != "sockets.py" and made.search(p.read_text())]
    assert offenders == [], f"sockets made outside sockets.make_socket (no MAXMSGSIZE): {offenders}"


def test_live_node_sockets_have_maxmsgsize(monkeypatch):
    """Every socket a node, its probe server and a control client open comes with MAXMSGSIZE."""
    from helpers import inproc_node, load_args, wait_state

    seen: list[tuple[int, int]] = []
    real = sockets.make_socket

    def spy(*a, **kw):
        s = real(*a, **kw)
        seen.append((s.getsockopt(zmq.TYPE), s.getsockopt(zmq.MAXMSGSIZE)))
        return s

    monkeypatch.setattr(sockets, "make_socket", spy)
    with inproc_node("m0") as node, ControlClient(node.control_endpoint, timeout=10, retries=0) as c:
        c.call("load", **load_args())
        wait_state(c, "loaded")
        c.call("start", connect=["tcp://127.0.0.1:9"])
        time.sleep(0.3)  # the probe server's thread has made its socket
    kinds = {k for k, _ in seen}
    assert {zmq.REP, zmq.ROUTER, zmq.PULL, zmq.PUSH, zmq.REQ} <= kinds, kinds
    assert all(m > 0 for _, m in seen), seen
