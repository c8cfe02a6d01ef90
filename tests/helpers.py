"""Test helpers: a small model, its checkpoint, an in-process node, and the monolithic reference."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from edgezmq.model import chain as models
from edgezmq.node.daemon import Node
from edgezmq.transport import security
from edgezmq.transport.rpc import ControlClient

# Small enough for 2 cores: 64 px images, 16 px patches -> 17 tokens; 4 blocks.
MODEL = "vit_tiny_patch16_224"
KWARGS = {"img_size": 64, "depth": 4}
MICROBATCH = 2
N_UNITS = 6  # embed + 4 blocks + head

# tests that assert optimality limit the planner by effort alone (a wall-clock limit would make
# the answer depend on how busy the machine is)
NO_CLOCK = math.inf


def checkpoint() -> str:
    return str(models.cached_checkpoint(MODEL, seed=0, **KWARGS))


def batches(n: int, seed: int = 0, microbatch: int = MICROBATCH) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    shape = models.input_shape(MODEL, microbatch, **KWARGS)
    return [rng.standard_normal(shape, dtype=np.float32) for _ in range(n)]


def monolithic(xs: list[np.ndarray]) -> list[np.ndarray]:
    """timm's own forward on the whole model, same checkpoint."""
    import torch
    from safetensors.torch import load_file

    m = models.create_model(MODEL, **KWARGS)
    m.load_state_dict(load_file(checkpoint()))
    with torch.inference_mode():
        return [m(torch.from_numpy(x)).numpy() for x in xs]


def model_spec():
    """The test model with its checkpoint, as a deployment names it."""
    from edgezmq.orchestrate.planfile import ModelSpec

    return ModelSpec(name=MODEL, microbatch=MICROBATCH, checkpoint=checkpoint(), kwargs=KWARGS)


def load_args(run: str = "r1", units=(0, N_UNITS), stage: int = 0, last: bool = True, **over):
    args = dict(run=run, model=MODEL, units=list(units), stage=stage, last=last,
                microbatch=MICROBATCH, kwargs=KWARGS, checkpoint=checkpoint(), threads=1)
    args.update(over)
    return args


@contextmanager
def inproc_node(name: str = "t0", **kw):
    """A Node serving in a thread of this process; shut down at exit."""
    node = Node("tcp://127.0.0.1:0", name=name, **kw)
    th = threading.Thread(target=node.serve, daemon=True)
    th.start()
    try:
        yield node
    finally:
        with ControlClient(node.control_endpoint, timeout=5, retries=0) as c:
            try:
                c.call("shutdown")
            except Exception:
                pass
        th.join(30)
        assert not th.is_alive(), "node did not stop"


def wait_state(c: ControlClient, state: str, timeout: float = 60.0) -> dict:
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        r = c.call("ping")
        if r["state"] == state:
            return r
        if r["state"] == "failed" and state != "failed":
            raise AssertionError(f"load failed: {r['error']}")
        time.sleep(0.05)
    raise AssertionError(f"node not {state} after {timeout}s (state {r['state']})")


def stage_stats(**fields):
    """A node's ``stats.stage`` as a typed record: the given fields, every other counter 0."""
    from edgezmq.protocol import messages as m

    empty = {bool: False, str: "", int: 0, float: 0.0}
    zero = {f.name: empty.get(f.type, []) for f in m.StageStats.fields()}  # units: []
    return m.StageStats(**{**zero, **fields})


def stats_reply(state: str = "running", stage=None, **fields):
    """A typed ``stats`` reply of node t0 (``stage``: a StageStats, or None when nothing is loaded)."""
    from edgezmq.protocol import messages as m

    base = dict(name="t0", state=state, error=None, rss=0, peak_rss=0, requests=0, bad_requests=0)
    return m.StatsReply(**{**base, **fields}, stage=stage)


def make_keys(root: Path, nodes: list[str]) -> dict[str, Path]:
    """Key files of a secured cluster under ``root``: ``ring/`` every key pair (client and
    nodes), ``allow/`` every public key (each node's --allow), ``nodes/`` the nodes' public
    keys (a keys: section's ``nodes``), ``bad/`` an intruder's pair that nobody allows."""
    ring, allow, pubs, bad = root / "ring", root / "allow", root / "nodes", root / "bad"
    for name in ("client", *nodes):
        security.generate(ring, name)
    security.generate(bad, "intruder")
    for d, names in ((allow, ("client", *nodes)), (pubs, nodes)):
        d.mkdir()
        for name in names:
            shutil.copy(ring / f"{name}.key", d / f"{name}.key")
    return {"ring": ring, "allow": allow, "nodes": pubs, "bad": bad}


def secured_node_args(keys: dict[str, Path], names: list[str]) -> dict[str, list[str]]:
    """``LocalCluster(node_args=...)`` for nodes that run with their own key pair and the shared allow-list."""
    return {n: ["--secret-key", str(keys["ring"] / f"{n}.key_secret"), "--allow", str(keys["allow"])] for n in names}


def keys_section(keys: dict[str, Path], client: str = "client") -> dict[str, str]:
    """A plan's or inventory's keys: section; ``client="intruder"`` uses the key nobody allows."""
    secret = keys["bad" if client == "intruder" else "ring"] / f"{client}.key_secret"
    return {"client": str(secret), "nodes": str(keys["nodes"])}


# A valid cluster inventory touching every section (its nodes are never contacted)
SAMPLE_INVENTORY = {
    "nodes": [{"name": "a", "control": "tcp://127.0.0.1:5551", "type": "rpi", "memory_bytes": "2GB"},
              {"name": "b", "control": "tcp://127.0.0.1:5552", "threads": 2}],
    "client": {"address": "127.0.0.1", "results_port": 5999},
    "links": {"default": {"mbps": 100, "latency_ms": 1},
              "overrides": [{"a": "a", "b": "client", "mbps": 5, "latency_ms": 3}]},
    "measure": {"seconds": 0.1}}


class NodePool:
    """Node processes (``edgezmq node``, threads 1, named node0..) shared by tests.

    Starting a node costs ~7 CPU seconds (torch and timm imports) and stopping it ~2: a test
    that starts its own 4-node cluster spends more on that than on what it tests.  ``take(n)``
    lends the first ``n`` nodes, started when first needed (a LocalCluster-like view:
    ``.nodes``); when the block ends, every lent node that died, stopped answering or is not
    idle (a test killed it, or left it serving or paused) is replaced by a fresh process of
    the same name, so that each test starts from idle, live nodes as with a cluster of its own.
    """

    def __init__(self, n: int, log_dir: Path) -> None:
        self.n, self.log_dir = n, log_dir
        self._clusters: list = []  # every LocalCluster started, stopped at the end
        self.nodes: list = []  # the current node of each name, in name order
        self.replaced = 0

    def start(self, n: int | None = None) -> NodePool:
        """Start nodes until the pool has `n` (default: all): a run that needs two starts two."""
        from edgezmq.orchestrate.local import LocalCluster

        n = self.n if n is None else n
        have = len(self.nodes)
        if n > have:
            c = LocalCluster(n - have, threads=1, names=[f"node{i}" for i in range(have, n)], log_dir=self.log_dir)
            self._clusters.append(c.start())
            self.nodes += c.nodes
        return self

    @staticmethod
    def _idle(node) -> bool:
        if node.proc.poll() is not None:
            return False
        try:
            with ControlClient(node.control, timeout=5, retries=0) as c:
                return c.call("ping")["state"] == "idle"
        except Exception:
            return False

    def refresh(self, count: int | None = None) -> None:
        """Replace every node among the first `count` that is not live and idle (all at once)."""
        from edgezmq.orchestrate.local import LocalCluster

        stale = [i for i, nd in enumerate(self.nodes[:count]) if not self._idle(nd)]
        if not stale:
            return
        for i in stale:
            if self.nodes[i].proc.poll() is None:
                self.nodes[i].proc.kill()
            self.nodes[i].proc.wait(30)
        c = LocalCluster(len(stale), threads=1, names=[self.nodes[i].name for i in stale], log_dir=self.log_dir)
        self._clusters.append(c.start())
        for i, nd in zip(stale, c.nodes):
            self.nodes[i] = nd
        self.replaced += len(stale)

    @contextmanager
    def take(self, n: int):
        """``with pool.take(3) as local:`` the first 3 nodes, idle; checked and renewed after."""
        import types

        assert n <= self.n, f"the pool has {self.n} nodes, the test asks for {n}"
        self.start(n)
        try:
            yield types.SimpleNamespace(nodes=list(self.nodes[:n]))
        finally:
            self.refresh(n)

    def stop(self) -> None:
        import signal

        for nd in self.nodes:  # all at once: their exits overlap
            if nd.proc.poll() is None:
                nd.proc.send_signal(signal.SIGTERM)
        for c in self._clusters:
            c.stop()


# how long a test inventory probes each loopback link (measure.seconds): the tests need their
# links measured, not measured well, and a deployment probes ~20 times (links, I/O costs)
PROBE_S = 0.05



def inventory_dict(nodes, **extra) -> dict:
    """A cluster inventory (as parse_cluster reads it) of `nodes` (a LocalCluster or a pool's
    view), probing each link PROBE_S seconds with 1 MB messages; `extra`: more sections."""
    return {"nodes": [{"name": n.name, "control": n.control} for n in nodes.nodes],
            "measure": {"seconds": PROBE_S, "pings": 3, "bytes_per_msg": 1 << 20}, **extra}


def slow_link_inventory(nodes, factor: float, client_factor: float | None = None) -> dict:
    """Links between nodes slow enough that a raw activation takes `factor` x the fastest node's
    time for the whole model (measured: a first gather, whose profiles the nodes cache; the
    deployments then use them without a spot check, so that a busy machine does not move them),
    the client's links fast (or, with `client_factor`, as slow for the input as that): encoding
    pays only where compressing the activation makes a second stage worth it."""
    from edgezmq.orchestrate.autodeploy import gather
    from edgezmq.orchestrate.inventory import parse_cluster

    warm = gather(parse_cluster(inventory_dict(nodes, links={"default": {"mbps": 1000, "latency_ms": 0.1}})),
                  model=MODEL, microbatch=MICROBATCH, kwargs=KWARGS)
    whole = min(sum(t["unit_times_s"]) for t in warm.problem["device_types"].values())
    act = warm.problem["model"]["units"][1]["out_bytes"]
    mbps = act * 8 / (factor * whole) / 1e6
    client = 1000.0 if client_factor is None else warm.problem["model"]["input_bytes"] * 8 / (client_factor * whole) / 1e6
    overrides = [{"a": "client", "b": n.name, "mbps": client} for n in nodes.nodes]
    return inventory_dict(nodes, links={"default": {"mbps": mbps, "latency_ms": 0.1}, "overrides": overrides})


WAIT_S = 120.0  # every condition a slow test waits for holds by then, or the test fails


def wait_for(what, check, timeout=WAIT_S, detail=None):
    """Poll ``check()`` until it returns something true (returned); after ``timeout`` fail,
    naming ``what`` and, if given, ``detail()`` (the state that did not change)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        v = check()
        if v:
            return v
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:g}s waiting for {what}" + (f": {detail()}" if detail else ""))


RATE_TRIES = 3  # probes of a shaped link before its rate is judged


def shaped_rate(what, probe, rate, expected: float, tolerance: float, tries: int = RATE_TRIES):
    """The probe (``probe()``, its rate ``rate(result)``) of a link shaped to ``expected``, to
    assert on. A shaper caps a rate, and a busy machine (a sender or receiver short of CPU) can
    only lower a measurement, never raise it: so a probe over ``expected`` x (1 + tolerance)
    is returned at once (the shaping is wrong), and one under x (1 - tolerance) is probed again,
    up to ``tries`` probes in all, the fastest returned. Too fast fails at once; too slow fails
    only when every probe was."""
    best = None
    for attempt in range(1, tries + 1):
        r = probe()
        if rate(r) > expected * (1 + tolerance):
            return r
        if best is None or rate(r) > rate(best):
            best = r
        if rate(best) >= expected * (1 - tolerance) or attempt == tries:
            break
        print(f"{what}: probe {attempt} of {tries} measured {rate(r):.2f} against {expected:.2f}: probing again")
    return best


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (bound, then released)."""
    import zmq

    with zmq.Context() as ctx:
        s = ctx.socket(zmq.PULL)
        port = s.bind_to_random_port("tcp://127.0.0.1")
        s.close(linger=0)
    return port


def run_cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """`python -m edgezmq ARGS` in a subprocess, its output captured as text."""
    return subprocess.run([sys.executable, "-m", "edgezmq", *args], capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ))


def run_cli_here(capsys, *args: str) -> subprocess.CompletedProcess:
    """`edgezmq ARGS` run in this process, as `run_cli` runs it in a new one, without the new
    interpreter's torch imports (~8 CPU s on this machine when busy): the same `main` and
    exit-code policy (an argparse usage error is its exit code 2), stdout and stderr as text
    from pytest's ``capsys``, log warnings on that stderr as the command's own logging setup
    puts them there; torch's thread count, which a command may set for its process, restored.
    A bug (an exception the policy does not turn into a code) propagates and fails the test.
    `python -m edgezmq` itself, the entry point, runs as a subprocess in test_cli, test_pipeline
    and test_cluster."""
    import logging

    import torch

    from edgezmq.cli.main import main

    capsys.readouterr()  # what the test printed before is not the command's output
    log = logging.StreamHandler(sys.stderr)  # capsys's stderr, now
    log.setLevel(logging.WARNING)
    log.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(log)
    threads = torch.get_num_threads()
    try:
        code = main(list(args))
    except SystemExit as e:  # argparse's usage errors
        code = 0 if e.code is None else e.code if isinstance(e.code, int) else 1
    finally:
        logging.getLogger().removeHandler(log)
        torch.set_num_threads(threads)
    out = capsys.readouterr()
    return subprocess.CompletedProcess(["edgezmq", *args], code, out.out, out.err)
