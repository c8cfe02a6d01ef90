"""CurveZMQ from a cluster inventory's keys: section: measure, plan, deploy, probe, status and
profile over secured nodes; a wrong key gets a clear error, never a hang."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from helpers import (
    KWARGS,
    MICROBATCH,
    MODEL,
    PROBE_S,
    batches,
    checkpoint,
    keys_section,
    make_keys,
    model_spec,
    monolithic,
    secured_node_args,
)

from edgezmq.cli.main import main as cli_main
from edgezmq.client import Client
from edgezmq.orchestrate.autodeploy import autodeploy, gather
from edgezmq.orchestrate.deploy import DeployError, unload
from edgezmq.orchestrate.inventory import ClusterError, load_cluster, parse_cluster
from edgezmq.orchestrate.local import LocalCluster
from edgezmq.orchestrate.planfile import load_plan
from edgezmq.protocol import control
from edgezmq.protocol.messages import NetprobeRequest
from edgezmq.transport import security
from edgezmq.transport.nodeclient import NodeClient
from edgezmq.transport.rpc import ControlClient

pytestmark = pytest.mark.slow
NAMES = ["n0", "n1", "n2"]
REFUSED_TIMEOUT_S = 1.0  # a refused handshake never answers: how long we wait to be sure
MEASURE = {"seconds": PROBE_S, "pings": 3, "bytes_per_msg": 1 << 16}


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    return make_keys(tmp_path_factory.mktemp("keys"), NAMES)


@pytest.fixture(scope="module")
def secured(keys, tmp_path_factory):
    with LocalCluster(3, threads=1, names=NAMES, node_args=secured_node_args(keys, NAMES),
                      log_dir=tmp_path_factory.mktemp("logs")) as c:
        yield c


def inventory(local: LocalCluster, keys, client: str = "client") -> dict:
    return {"nodes": [{"name": n.name, "control": n.control} for n in local.nodes],
            "measure": MEASURE, "keys": keys_section(keys, client)}


def write(tmp_path, d: dict, name: str = "cluster.yaml") -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(d))
    return str(path)


def test_inventory_keys_section_paths_are_relative_to_the_file(keys, tmp_path):
    (tmp_path / "k").symlink_to(keys["ring"].parent)
    d = {"nodes": [{"name": n, "control": f"tcp://127.0.0.1:{5550 + i}"} for i, n in enumerate(NAMES)],
         "keys": {"client": "k/ring/client.key_secret", "nodes": "k/nodes"}}
    c = load_cluster(write(tmp_path, d))
    assert c.keyring.node_key("n1") == security.load_public(keys["nodes"] / "n1.key")
    assert c.curve("n2").server_key == c.keyring.node_key("n2")
    assert c.keys["nodes"] == str((tmp_path / "k" / "nodes").resolve())
    assert parse_cluster({"nodes": d["nodes"]}).curve("n0") is None  # no keys: plaintext


@pytest.mark.parametrize("keys_field, text", [
    ({"client": "ring/client.key_secret"}, "keys: needs client"),
    ({"client": "ring/client.key_secret", "nodes": "nodes", "secret": "x"}, "keys: unknown field(s) ['secret']"),
    ({"client": 3, "nodes": "nodes"}, "keys.client: expected str, got int 3"),
    ({"client": "ring/n0.key", "nodes": "nodes"}, "holds no secret key"),
    ({"client": "ring/client.key_secret", "nodes": "allow-less"}, "not a directory of public keys"),
    ("ring", "keys: expected a mapping"),
])
def test_bad_inventory_keys_name_the_field(keys, keys_field, text):
    d = {"nodes": [{"name": "n0", "control": "tcp://127.0.0.1:1"}], "keys": keys_field}
    with pytest.raises(ClusterError) as ei:
        parse_cluster(d, source=str(keys["ring"].parent / "cluster.yaml"))
    assert text in str(ei.value)


def test_inventory_keys_must_cover_every_node(keys, tmp_path):
    d = {"nodes": [{"name": "n0", "control": "tcp://127.0.0.1:1"}, {"name": "board-9", "control": "tcp://127.0.0.1:2"}],
         "keys": keys_section(keys)}
    with pytest.raises(ClusterError, match=r"keys.nodes: no public key for node\(s\) \['board-9'\]"):
        parse_cluster(d)


def test_gather_measures_every_link_over_curve(secured, keys):
    g = gather(parse_cluster(inventory(secured, keys)), model=MODEL, microbatch=MICROBATCH, kwargs=KWARGS)
    # node <-> node probes (each node a CURVE client of its peer's probe server) and the client's own
    assert set(g.links) == {("n0", "n1"), ("n0", "n2"), ("n1", "n2"), ("client", "n0"), ("client", "n1"),
                            ("client", "n2")}
    assert all(r["bandwidth_mbps"] > 0 and r["messages"] >= 2 for r in g.links.values())
    assert {n: i["public_key"] for n, i in g.infos.items()} == {
        n: security.load_public(keys["nodes"] / f"{n}.key").decode() for n in NAMES}


def test_secured_inventory_deploys_and_equals_monolithic(secured, keys):
    cluster = parse_cluster(inventory(secured, keys))
    xs = batches(4, seed=5)
    with Client([], "tcp://127.0.0.1:0", run="", window=4, microbatch=MICROBATCH, timeout=60,
                keyring=cluster.keyring) as c:
        dep, plan, _, _, _ = autodeploy(cluster, model_spec(), results=c.results_endpoint, replication=False,
                                        client=c)
        try:
            assert plan.keyring is cluster.keyring and len(plan.stages) >= 2
            c.attach(dep.entry, dep.run, dep.entry_keys)
            outs = list(c.stream(xs))
        finally:
            unload(plan)
    for a, b in zip(outs, monolithic(xs)):
        assert float(np.max(np.abs(a - b))) <= 1e-5


def test_cli_plan_out_of_a_secured_inventory_carries_its_keys(secured, keys, tmp_path, capsys):
    inv = write(tmp_path, inventory(secured, keys))
    out = tmp_path / "plan.yaml"
    code = cli_main(["deploy", inv, "--model", MODEL, "--kwargs", json.dumps(KWARGS), "--microbatch", str(MICROBATCH),
                     "--checkpoint", checkpoint(), "--dry-run", "--plan-out", str(out)])
    assert code == 0, capsys.readouterr().err
    assert yaml.safe_load(out.read_text())["keys"] == load_cluster(inv).keys
    plan = load_plan(out)
    assert plan.keyring is not None
    for _, ref in plan.all_nodes:  # the written plan reaches its nodes over CurveZMQ
        with ControlClient(ref.control, timeout=5, curve=plan.curve(ref)) as cc:
            assert cc.call("ping")["state"] == "idle"


def test_cli_status_profile_netprobe_with_the_inventory_keys(secured, keys, tmp_path, capsys):
    inv = write(tmp_path, inventory(secured, keys))
    capsys.readouterr()
    assert cli_main(["status", inv, "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["up"] == 3 and rep["down"] == 0
    assert cli_main(["profile", "--node", "n0", "--keys", inv, "--model", MODEL, "--kwargs", json.dumps(KWARGS),
                     "--microbatch", str(MICROBATCH), "--reps", "1", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["units"]) == 6
    n2 = secured.nodes[2].control  # by address too, when the file lists it
    assert cli_main(["netprobe", "--from", "n1", "--to", n2, "--keys", inv, "--seconds", "0.1",
                     "--bytes", str(1 << 16), "--pings", "3", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["bandwidth_mbps"] > 0
    assert cli_main(["netprobe", "--to", "n0", "--keys", inv, "--seconds", "0.1", "--bytes", str(1 << 16)]) == 0
    assert "here -> n0:" in capsys.readouterr().out


def test_cli_node_names_need_keys_and_a_listed_node(secured, keys, tmp_path, capsys):
    inv = write(tmp_path, inventory(secured, keys))
    plain = write(tmp_path, {"nodes": inventory(secured, keys)["nodes"]}, "plain.yaml")
    for argv, text in [
        (["netprobe", "--to", "n0"], "--to: expected a tcp://HOST:PORT control address, got 'n0'"),
        (["netprobe", "--to", "ghost", "--keys", inv], "--to: 'ghost' is not a node of"),
        (["netprobe", "--to", "n0", "--keys", plain], "has no keys: section"),
        (["profile", "--model", MODEL, "--keys", inv], "--keys: applies to --node"),
    ]:
        assert cli_main(argv) == 2
        assert text in capsys.readouterr().err


def test_a_wrong_client_key_is_refused_clearly(secured, keys, tmp_path, capsys):
    bad = parse_cluster(inventory(secured, keys, client="intruder"))
    with pytest.raises(DeployError) as ei:
        gather(bad, model=MODEL, microbatch=MICROBATCH, kwargs=KWARGS, info_timeout=REFUSED_TIMEOUT_S)
    assert set(ei.value.errors) == set(NAMES)
    assert "unreachable node(s)" in str(ei.value) and "does not allow our public key" in str(ei.value)
    inv = write(tmp_path, inventory(secured, keys, client="intruder"))
    capsys.readouterr()
    t = str(REFUSED_TIMEOUT_S)
    for argv in (["netprobe", "--to", "n0", "--keys", inv, "--timeout", t],
                 ["profile", "--node", "n1", "--keys", inv, "--model", MODEL, "--timeout", t]):
        assert cli_main(argv) == 1  # the node refused us: the operation failed
        err = capsys.readouterr().err
        assert "did not answer" in err and "does not allow our public key" in err
    assert cli_main(["status", inv, "--timeout", t, "--json"]) == 1
    rep = json.loads(capsys.readouterr().out)
    assert rep["down"] == 3 and all("does not allow our public key" in r["error"] for r in rep["nodes"])


def test_node_probe_with_a_wrong_peer_key_fails_clearly(secured, keys):
    from edgezmq.orchestrate.autodeploy import wait_job

    cluster = parse_cluster(inventory(secured, keys))
    n0, n1 = cluster.nodes[0], cluster.nodes[1]
    with ControlClient(n1.control, timeout=5, curve=cluster.curve("n1")) as c:
        peer = c.call("info")["probe"]
    with NodeClient(n0.control, timeout=5, curve=cluster.curve("n0")) as nc:
        with pytest.raises(control.ControlError, match="peer_key: this node is secured"):
            nc.netprobe(NetprobeRequest(peer=peer), retries=0)
        # n2's key for n1's probe server: n1 cannot prove it holds that key, the handshake never completes
        reply = nc.netprobe(NetprobeRequest(peer=peer, peer_key=cluster.keyring.node_key("n2").decode(),
                                            seconds=0.1, pings=1), retries=0)
    with pytest.raises(DeployError) as ei:  # within the probe's own timeout (netprobe.DEFAULT_TIMEOUT_S)
        wait_job(n0, reply, 30.0, curve=cluster.curve("n0"))
    assert "node n0: TimeoutError: netprobe:" in str(ei.value) and "does not hold the key we expect" in str(ei.value)


def test_cli_run_on_a_secured_inventory(secured, keys, tmp_path, capsys):
    from edgezmq.client import split
    from edgezmq.model import chain as models

    inv = write(tmp_path, inventory(secured, keys))
    out = tmp_path / "y.npy"
    code = cli_main(["run", inv, "--model", MODEL, "--kwargs", json.dumps(KWARGS), "--microbatch", str(MICROBATCH),
                     "--checkpoint", checkpoint(), "--random", "5", "--seed", "7", "--out", str(out), "-q"])
    assert code == 0, capsys.readouterr().err
    x = np.random.default_rng(7).standard_normal(models.input_shape(MODEL, 5, **KWARGS), dtype=np.float32)
    want = np.concatenate(monolithic(split(x, MICROBATCH)))
    assert float(np.max(np.abs(np.load(out) - want))) <= 1e-5
    for n in secured.nodes:  # run unloads when done
        with ControlClient(n.control, timeout=5, curve=load_cluster(inv).curve(n.name)) as c:
            assert c.call("ping")["state"] == "idle"
