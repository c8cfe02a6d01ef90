"""CurveZMQ end to end: secured nodes deploy and infer for allowed keys only; key files are private."""

from __future__ import annotations

import shutil
import stat
import threading
import time
from contextlib import contextmanager

import numpy as np
import pytest
import zmq
from helpers import (
    MICROBATCH,
    MODEL,
    N_UNITS,
    batches,
    checkpoint,
    make_keys,
    model_spec,
    monolithic,
)

from edgezmq.cli.main import main as cli_main
from edgezmq.client import Client
from edgezmq.node.daemon import Node
from edgezmq.orchestrate.address import NodeAddress
from edgezmq.orchestrate.deploy import DeployError, deploy, unload
from edgezmq.orchestrate.local import LocalCluster
from edgezmq.orchestrate.planfile import DeployPlan, StagePlan, load_plan
from edgezmq.protocol import control, wire
from edgezmq.transport import security, sockets
from edgezmq.transport.rpc import ControlClient

pytestmark = pytest.mark.slow
TOL = 1e-5
REFUSED_TIMEOUT_S = 1.5  # a refused handshake never answers: how long we wait to be sure
QUIET_S = 1.0  # how long a stage must stay silent after a refused data message


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    return make_keys(tmp_path_factory.mktemp("keys"), ["n0", "n1"])


def keyring(keys, secret) -> security.Keyring:
    return security.Keyring(own=security.load_keypair(secret), nodes=security.load_public_dir(keys["nodes"]))


@contextmanager
def secured_inproc_node(name, keys):
    node = Node("tcp://127.0.0.1:0", name=name, keys=security.load_keypair(keys["ring"] / f"{name}.key_secret"),
                allow_dir=str(keys["allow"]))
    th = threading.Thread(target=node.serve, daemon=True)
    th.start()
    try:
        yield node
    finally:
        node.request_exit()
        th.join(30)
        assert not th.is_alive(), "node did not stop"


@pytest.fixture(scope="module")
def nodes(keys, tmp_path_factory):
    """Stage 0: a node process started through the CLI flags; stage 1: a node in this process."""
    args = ["--secret-key", str(keys["ring"] / "n0.key_secret"), "--allow", str(keys["allow"])]
    with LocalCluster(1, threads=1, names=["n0"], extra_args=args, log_dir=tmp_path_factory.mktemp("logs")) as c, \
            secured_inproc_node("n1", keys) as n1:
        yield c.nodes[0], n1


def make_plan(nodes, ring) -> DeployPlan:
    n0, n1 = nodes
    return DeployPlan(model=model_spec(),
                stages=[StagePlan((0, 3), [NodeAddress("n0", n0.control, 1)]),
                        StagePlan((3, N_UNITS), [NodeAddress("n1", n1.control_endpoint, 1)])],
                results="tcp://127.0.0.1:0", keyring=ring)


def test_generate_writes_private_secret(tmp_path):
    assert cli_main(["keys", "generate", "--dir", str(tmp_path), "--name", "me"]) == 0
    sec = tmp_path / "me.key_secret"
    assert stat.S_IMODE(sec.stat().st_mode) == security.SECRET_MODE
    pair = security.load_keypair(sec)
    assert pair.public == security.load_public(tmp_path / "me.key")
    assert len(pair.public) == security.Z85_KEY_LEN
    assert cli_main(["keys", "generate", "--dir", str(tmp_path), "--name", "me"]) == 2  # never overwrites
    sec.chmod(0o644)
    with pytest.raises(security.KeyFileError, match="mode 644"):
        security.load_keypair(sec)


def test_plan_keys_section(keys, tmp_path):
    (tmp_path / "plan.yaml").write_text(
        f"model: {{name: {MODEL}, checkpoint: {checkpoint()}}}\n"
        f"nodes: {{n0: 'tcp://127.0.0.1:1', n1: 'tcp://127.0.0.1:2'}}\n"
        f"stages: [{{units: [0, 3], nodes: [n0]}}, {{units: [3, {N_UNITS}], nodes: [n1]}}]\n"
        f"keys: {{client: {keys['ring'] / 'client.key_secret'}, nodes: {keys['nodes']}}}\n")
    plan = load_plan(tmp_path / "plan.yaml")
    assert plan.keyring.node_key("n1") == security.load_public(keys["nodes"] / "n1.key")
    assert plan.curve(plan.stages[0].nodes[0]).server_key == security.load_public(keys["nodes"] / "n0.key")


def test_secured_pipeline_equals_monolithic(nodes, keys):
    ring = keyring(keys, keys["ring"] / "client.key_secret")
    plan = make_plan(nodes, ring)
    xs = batches(4)
    with Client([], "tcp://127.0.0.1:0", run="", microbatch=MICROBATCH, timeout=60, keyring=ring) as c:
        plan.results = c.results_endpoint
        dep = deploy(plan, load_timeout=120)
        try:
            c.attach(dep.entry, dep.run, dep.entry_keys)
            outs = list(c.stream(xs))
            assert c.pull.getsockopt(zmq.CURVE_SERVER) == 1
            n1 = nodes[1]
            assert n1.rep.getsockopt(zmq.CURVE_SERVER) == 1
            assert n1.runtime.pull.getsockopt(zmq.CURVE_SERVER) == 1
            assert n1.runtime.push.getsockopt(zmq.CURVE_SERVER) == 0  # a client of the results socket
            assert n1.runtime.push.getsockopt(zmq.MECHANISM) == zmq.CURVE
            with ControlClient(nodes[0].control, curve=plan.curve(plan.stages[0].nodes[0])) as cc:
                assert cc.call("info")["public_key"] == ring.node_key("n0").decode()
        finally:
            unload(plan)
    for a, b in zip(outs, monolithic(xs)):
        assert float(np.max(np.abs(a - b))) <= TOL


def test_unknown_key_gets_nothing_deployed(nodes, keys):
    intruder = keyring(keys, keys["bad"] / "intruder.key_secret")
    with ControlClient(nodes[0].control, timeout=REFUSED_TIMEOUT_S, retries=0,
                       curve=intruder.client_of("n0")) as c, pytest.raises(control.ControlError) as e:
        c.call("ping")
    assert e.value.code == control.UNREACHABLE
    with pytest.raises(DeployError, match="unreachable"):
        deploy(make_plan(nodes, intruder), ping_timeout=REFUSED_TIMEOUT_S)
    good = keyring(keys, keys["ring"] / "client.key_secret")
    with ControlClient(nodes[0].control, timeout=5, curve=good.client_of("n0")) as c:
        assert c.call("ping")["state"] == "idle"


def test_start_server_keys_only_on_secured_nodes(keys):
    from helpers import inproc_node, load_args, wait_state

    with inproc_node("plain") as node, ControlClient(node.control_endpoint, timeout=10, retries=0) as c:
        c.call("load", **load_args())
        wait_state(c, "loaded")
        with pytest.raises(control.ControlError, match="no key pair") as e:
            c.call("start", connect=["tcp://127.0.0.1:9"], server_keys=["x" * security.Z85_KEY_LEN])
        assert e.value.code == control.BAD_ARGS


def test_plaintext_to_secured_node_fails(nodes):
    with ControlClient(nodes[1].control_endpoint, timeout=REFUSED_TIMEOUT_S, retries=0) as c, \
            pytest.raises(control.ControlError) as e:
        c.call("ping")
    assert e.value.code == control.UNREACHABLE


@pytest.mark.parametrize("who", ["plaintext", "intruder"])
def test_no_data_through_without_an_allowed_key(nodes, keys, who):
    good = keyring(keys, keys["ring"] / "client.key_secret")
    plan = make_plan(nodes, good)
    ctx = zmq.Context()
    with Client([], "tcp://127.0.0.1:0", run="", microbatch=MICROBATCH, timeout=60, keyring=good) as c:
        plan.results = c.results_endpoint
        dep = deploy(plan, load_timeout=120)
        curve = None
        if who == "intruder":
            curve = security.Curve(security.load_keypair(keys["bad"] / "intruder.key_secret"),
                                   server_key=good.node_key("n0"))
        push = sockets.make_socket(ctx, zmq.PUSH, sockets.DATA, curve=curve)
        try:
            push.connect(dep.entry[0])
            x = batches(1)[0]
            frames = wire.encode(wire.Message("act", dep.run, 0, -1, [x]))
            with pytest.raises(zmq.Again):  # IMMEDIATE: no completed handshake, nowhere to queue
                sockets.send_frames(push, frames)
            time.sleep(QUIET_S)
            assert sockets.recv_frames(c.pull, 0) is None
            with ControlClient(nodes[0].control, curve=good.client_of("n0")) as cc:
                assert cc.call("stats")["stage"]["received"] == 0
            c.attach(dep.entry, dep.run, dep.entry_keys)  # the allowed client still gets through
            assert c.infer(x).shape[0] == MICROBATCH
        finally:
            sockets.close_all(push)
            ctx.term()
            unload(plan)


def test_a_key_file_damaged_while_the_node_runs_shuts_out_only_itself(tmp_path, caplog):
    ks = make_keys(tmp_path, ["n0"])
    ctx = zmq.Context()
    auth = security.Authenticator(ctx, allow_dir=ks["allow"])
    try:
        client = security.load_keypair(ks["ring"] / "client.key_secret").public
        node = security.load_keypair(ks["ring"] / "n0.key_secret").public
        intruder = security.load_keypair(ks["bad"] / "intruder.key_secret").public
        assert auth.callback("*", client) and auth.callback("*", node) and not auth.callback("*", intruder)
        (ks["allow"] / "n0.key").write_text("not a key\n")  # damaged live
        with caplog.at_level("WARNING", logger="edgezmq.transport.security"):
            assert auth.callback("*", client)  # the other keys still let their holders in
            assert not auth.callback("*", node)  # the damaged one lets nobody in
            assert not auth.callback("*", node)
        said = [r.getMessage() for r in caplog.records if "n0.key" in r.getMessage()]
        assert len(said) == 1, said  # reported once, not on every handshake
        shutil.rmtree(ks["allow"])
        assert not auth.callback("*", client)  # the directory gone: nobody
    finally:
        auth.stop()
        ctx.term()
