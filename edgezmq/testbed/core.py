"""The testbed: stand up namespaces, shaped links, cgroups and one node per device; tear them down."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from edgezmq import fields
from edgezmq.node.daemon import READY_PREFIX

from . import cgroups, net
from .config import BRIDGE, CLIENT, ConfigError, TestbedConfig, load_config
from .errors import PrerequisiteError, TestbedError

log = logging.getLogger("edgezmq.testbed")

DEFAULT_STATE_ROOT = Path("/run/edgezmq/testbed")  # tmpfs: gone after a reboot, like the namespaces
STATE_FILE = "state.json"
CLUSTER_FILE = "cluster.yaml"
LOG_DIR = "logs"
STATE_VERSION = 1
# A node imports torch + timm before READY: ~5 s of CPU each, all at once, on a machine that
# may be busy (16 nodes on 2 shared cores took over 90 s): the wait grows with the nodes.
START_TIMEOUT_S = 90.0
START_S_PER_NODE = 15.0
STOP_TIMEOUT_S = 15.0  # SIGTERM: a node drains for up to 10 s
KILL_TIMEOUT_S = 5.0
STOP_ROUNDS = 3
IDLE_NODE_BYTES = 420 << 20  # measured: a node that imported torch + timm, before any load
POLL_S = 0.05
AGENT_TIMEOUT_S = 30.0  # the ping agent: python start-up + one ping per node
LOG_TAIL_BYTES = 2000
REQUIRED_TOOLS = (net.IP, net.TC, net.NSENTER)
# Joins the cgroups named before "--" (their cgroup.procs files), then execs the rest:
# the process is limited before it imports anything.
JOIN_CGROUPS_SH = 'while [ "$1" != -- ]; do echo $$ > "$1"; shift; done; shift; exec "$@"'


def check_prerequisites() -> dict[str, cgroups.Controller]:
    """Root, iproute2 (`ip`, `tc`), `nsenter` and the cpu+memory cgroup controllers, or PrerequisiteError."""
    if os.geteuid() != 0:
        raise PrerequisiteError("edgezmq testbed needs root (it creates network namespaces, tc qdiscs "
                                f"and cgroups); running as uid {os.geteuid()}: try sudo")
    missing = [t for t in REQUIRED_TOOLS if shutil.which(t) is None]
    if missing:
        raise PrerequisiteError(f"edgezmq testbed needs iproute2 (ip, tc) and util-linux (nsenter) on PATH; "
                                f"missing: {missing}")
    return cgroups.detect()


def _alive(pid: int) -> bool:
    """True while `pid` runs (a zombie counts as gone; our own zombies are reaped)."""
    try:
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    except ChildProcessError:
        pass
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def _signal_all(pids: set[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _wait_gone(pids: set[int], timeout: float) -> set[int]:
    deadline = time.monotonic() + timeout
    left = {p for p in pids if _alive(p)}
    while left and time.monotonic() < deadline:
        time.sleep(POLL_S)
        left = {p for p in left if _alive(p)}
    return left


def _live_change(a: str, b: str | None, mbps: float | None, nic_up: float | None,
                 nic_down: float | None) -> dict[str, Any]:
    """One set_link request as the state file keeps it: {a, b, mbps} or {host, up, down}."""
    if b is not None:
        if nic_up is not None or nic_down is not None:
            raise ConfigError("nic_mbps", "a pair (two hosts) takes --mbps; a NIC's rates go with one host")
        if mbps is None:
            raise ConfigError("mbps", f"required: the new rate of the pair {a}<->{b} in Mbit/s")
        return {"a": a, "b": b, "mbps": mbps}
    if mbps is not None:
        raise ConfigError("mbps", f"a pair's rate needs two hosts (A B); for {a}'s NIC give nic up and/or down")
    return {"host": a, "up": nic_up, "down": nic_down}


def _apply_change(config: TestbedConfig, change: dict[str, Any]) -> TestbedConfig:
    if "host" in change:
        return config.with_nic(change["host"], change["up"], change["down"])
    return config.with_link(change["a"], change["b"], change["mbps"])


def _tail(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - LOG_TAIL_BYTES))
            return f.read().decode(errors="replace").strip()
    except OSError:
        return ""


def _process_start(pid: int) -> int | None:
    """When process `pid` started (clock ticks since boot, /proc/PID/stat field 22); None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


class Testbed:
    """Emulated edge devices on this machine.

        with Testbed.from_yaml("plans/testbed-hetero.yaml") as tb:   # up() on enter, down() on exit
            cluster = tb.cluster                                       # what cluster.yaml holds
            tb.exec_in_client(["edgezmq", "deploy", "plan.yaml"], check=True)

    Names: namespaces ``<name>-<host>`` (+ ``<name>-bridge``), cgroups
    ``edgezmq-<name>/<host>`` per controller; everything made is logged to
    ``<state_dir>/state.json`` before it is made, so ``down`` cleans a half-made testbed.
    """

    __test__ = False  # not a pytest test class

    def __init__(self, config: TestbedConfig, *, state_dir: str | Path | None = None,
                 source: str | Path | None = None, python: str = sys.executable,
                 start_timeout: float | None = None, throttle_start: bool = False) -> None:
        self.config = config
        self.name = config.name
        self.state_dir = Path(state_dir) if state_dir else DEFAULT_STATE_ROOT / config.name
        self.source = str(Path(source).resolve()) if source else None
        self.python = python
        self.start_timeout = (start_timeout if start_timeout is not None
                              else START_TIMEOUT_S + START_S_PER_NODE * len(config.devices))
        # A node imports torch and timm before it is ready: ~5 s of CPU, 20 s at 0.25 CPU.
        # By default the CPU quota is written once every node is ready (memory caps hold
        # from the first instruction); throttle_start=True limits the start-up too.
        self.throttle_start = throttle_start
        self.cluster: dict[str, Any] | None = None
        self._ctrls: dict[str, cgroups.Controller] | None = None
        self._procs: dict[str, subprocess.Popen] = {}
        self._state: dict[str, Any] = self._load_state() or self._new_state()
        if self._state["phase"] == "up" and self.cluster_path.exists():  # attached to a running testbed
            for change in self._state.get("live", []):  # rates set by set_link since up
                self.config = _apply_change(self.config, change)
            self.cluster = fields.safe_load(self.cluster_path.read_text())

    @classmethod
    def from_yaml(cls, path: str | Path, *, name: str | None = None, **kw: Any) -> Testbed:
        """Parse TESTBED.yaml (ConfigError names the bad field); `name` overrides its `name:`."""
        return cls(load_config(path, name=name), source=path, **kw)

    # ---- names ----------------------------------------------------------
    def namespace(self, host: str) -> str:
        """The network namespace of `host` ("client", a device name, or "bridge")."""
        if host != BRIDGE and host not in self.config.hosts:
            raise KeyError(f"no host {host!r} in testbed {self.name!r} (hosts: {self.config.hosts})")
        return f"{self.name}-{host}"

    @property
    def client_namespace(self) -> str:
        return self.namespace(CLIENT)

    @property
    def bridge_namespace(self) -> str:
        return self.namespace(BRIDGE)

    @property
    def client_address(self) -> str:
        return self.config.address(CLIENT)

    def control(self, device: str) -> str:
        self.config.device(device)
        return f"tcp://{self.config.address(device)}:{self.config.control_port}"

    def all_namespaces(self) -> list[str]:
        return [self.bridge_namespace, *(self.namespace(h) for h in self.config.hosts)]

    @property
    def state_path(self) -> Path:
        return self.state_dir / STATE_FILE

    @property
    def cluster_path(self) -> Path:
        return self.state_dir / CLUSTER_FILE

    @property
    def log_dir(self) -> Path:
        return self.state_dir / LOG_DIR

    # ---- state file -----------------------------------------------------
    def _new_state(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "name": self.name, "source": self.source, "phase": "down",
                "netns": [], "cgroups": [], "hosts": {}, "nodes": {}}

    def _load_state(self) -> dict[str, Any] | None:
        try:
            st = json.loads(self.state_path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            log.warning("ignoring unreadable state file %s: %s", self.state_path, e)
            return None
        if st.get("name") != self.name:
            raise TestbedError(f"{self.state_path} belongs to testbed {st.get('name')!r}, not {self.name!r}: "
                               "use another --state-dir")
        return st

    def _holder(self) -> int | None:
        """The process, other than this one, that brought this testbed up and still runs (a
        bench holding it), by its state file's owner (pid and start time: a reused pid is
        not it); None when there is none (down, a CLI `up` that has exited, a killed run)."""
        st = self._load_state() or {}
        owner: dict[str, Any] = st["owner"] if isinstance(st.get("owner"), dict) else {}
        pid, start = owner.get("pid"), owner.get("start")
        if st.get("phase") == "down" or not isinstance(pid, int) or pid == os.getpid() or start is None:
            return None
        return pid if _process_start(pid) == start else None

    def _save(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self._state, indent=1))
        tmp.replace(self.state_path)

    def _record(self, kind: str, item: str) -> None:
        if item not in self._state[kind]:
            self._state[kind].append(item)
            self._save()

    # ---- cgroups --------------------------------------------------------
    @property
    def ctrls(self) -> dict[str, cgroups.Controller]:
        if self._ctrls is None:
            self._ctrls = cgroups.detect()
        return self._ctrls

    def host_cgroups(self, host: str) -> list[Path]:
        """The cgroup directories a process of `host` joins (empty for an unlimited client)."""
        if host in self._state["hosts"]:
            return [Path(p) for p in self._state["hosts"][host]["cgroups"]]
        return []

    def _expected_cgroups(self) -> list[Path]:
        """Every cgroup directory this config would make here (to clean without a state file)."""
        try:
            ctrls = self.ctrls
        except PrerequisiteError:
            return []
        dirs = cgroups.group_dir(ctrls, self.name)
        for h in self.config.hosts:
            dirs += cgroups.host_dirs(ctrls, self.name, h)
        return dirs

    # ---- running things in the testbed -----------------------------------
    def argv_in(self, host: str, argv: list[str], *, limits: bool = True) -> list[str]:
        """`argv` prefixed so that it runs in `host`'s namespace (and, with `limits`, its cgroups)."""
        enter = net.enter_argv(self.namespace(host))
        procs = [str(d / "cgroup.procs") for d in self.host_cgroups(host)] if limits else []
        if procs:
            return ["sh", "-ec", JOIN_CGROUPS_SH, "edgezmq-testbed-join", *procs, "--", *enter, *argv]
        return [*enter, *argv]

    def client_argv(self, argv: list[str]) -> list[str]:
        """`argv` prefixed to run as the client (e.g. a bench), in the client namespace."""
        return self.argv_in(CLIENT, argv)

    def exec_in_client(self, argv: list[str], **kw: Any) -> subprocess.CompletedProcess:
        """``subprocess.run`` of `argv` in the client namespace; keyword arguments go to run()."""
        return subprocess.run(self.client_argv(argv), **kw)

    def popen_in_client(self, argv: list[str], **kw: Any) -> subprocess.Popen:
        return subprocess.Popen(self.client_argv(argv), **kw)

    # ---- up -------------------------------------------------------------
    def up(self, *, reclaim: bool = False) -> dict[str, Any]:
        """Create everything, start the nodes, check them from the client; returns the cluster dict.

        On any failure (or Ctrl-C) everything made so far is removed before the error propagates.
        A testbed of this name that is already (or half) up is an error, unless `reclaim`: then it
        is taken down first (a bench reclaiming what a killed run of its own left behind).
        """
        self._ctrls = check_prerequisites()
        holder = self._holder()
        if holder is not None:  # not a leftover: reclaiming would pull it from under a running bench
            raise TestbedError(f"testbed {self.name!r} is in use by process {holder}, which brought it up and "
                               "is still running: stop that run first (`edgezmq testbed down` takes it down anyway)")
        present = [ns for ns in self.all_namespaces() if net.netns_exists(ns)]
        if present and reclaim:
            log.warning("testbed %s: namespace(s) %s left from an earlier run: taking them down first",
                        self.name, present)
            self.down()
        elif present:
            raise TestbedError(f"testbed {self.name!r} is already up (namespace(s) {present} exist): "
                               f"run `edgezmq testbed down` first, or `up --reclaim`")
        if self.state_path.exists():  # a stale record (e.g. of a crashed up): clean what it names
            self.down()
        self._state = self._new_state()
        self._state["phase"] = "starting"
        self._state["started_at"] = time.time()
        self._state["owner"] = {"pid": os.getpid(), "start": _process_start(os.getpid())}
        self._save()
        try:
            for step in (self._make_network, self._make_cgroups, self._start_nodes, self._check_nodes):
                t0 = time.monotonic()
                step()
                log.info("testbed %s: %s took %.2fs", self.name, step.__name__.strip("_"), time.monotonic() - t0)
            self.cluster = self._cluster_dict()
            self._write_cluster()
            self._state["phase"] = "up"
            self._save()
        except BaseException as e:  # noqa: B036 - Ctrl-C too: clean up, then re-raise
            log.warning("testbed %s: up failed (%s); removing what was made",
                        self.name, type(e).__name__)
            try:
                self.down()
            except Exception as e2:  # the original error matters more; the clean-up's is logged
                log.error("testbed %s: clean-up after the failed up: %s", self.name, e2)
            raise
        for w in self._warnings():
            log.warning("testbed %s: %s", self.name, w)
        return self.cluster

    def _make_network(self) -> None:
        cfg = self.config
        br = self.bridge_namespace
        self._record("netns", br)
        net.add_netns(br)
        net.make_bridge(br)
        for port, host in enumerate(cfg.hosts):
            ns = self.namespace(host)
            self._record("netns", ns)
            net.add_netns(ns)
            net.attach(br, port, ns, cfg.address(host), cfg.subnet)
            self._shape_host(host)

    def _shape_host(self, host: str, *, change: bool = False) -> None:
        """`host`'s htb trees at the config's rates: its egress (pairs, NIC up) and, with a NIC
        down, its ingress; `change`: new rates on the trees made by `up` (set_link)."""
        cfg = self.config
        peers = [(cfg.address(o), cfg.link(host, o).mbps) for o in cfg.hosts if o != host]
        nic = cfg.nic(host)
        net.shape(self.namespace(host), cfg.default_link.mbps, peers, nic.up, change=change)
        if nic.down is not None:  # at the bridge side: what v<port> sends, the host receives
            net.shape_ingress(self.bridge_namespace, cfg.hosts.index(host), nic.down, cfg.default_link.mbps,
                              peers, change=change)

    # ---- live link changes ----------------------------------------------
    def set_link(self, a: str, b: str | None = None, *, mbps: float | None = None,
                 nic_up: float | None = None, nic_down: float | None = None) -> dict[str, Any]:
        """Change rates of the running testbed without touching its nodes (``tc class change``):
        the pair `a`<->`b` to `mbps` (both directions), or `a`'s NIC (`nic_up`, `nic_down`).

        ConfigError names the bad argument; TestbedError when the testbed is not up or tc fails
        (then the rates are put back).  cluster.yaml is rewritten with the new rates and the
        change is kept in the state file, so a Testbed attached later sees the same rates.
        """
        check_prerequisites()
        if self._state.get("phase") != "up":
            raise TestbedError(f"testbed {self.name!r} is not up (phase {self._state.get('phase')}): "
                               "set-link changes the links of a running testbed")
        change = _live_change(a, b, mbps, nic_up, nic_down)
        old = self.config
        self.config = _apply_change(old, change)
        hosts = [a] if b is None else [a, b]
        try:
            for h in hosts:
                self._shape_host(h, change=True)
        except TestbedError:
            self.config = old  # whatever half went through is set back to the old rates
            for h in hosts:
                self._shape_host(h, change=True)
            raise
        self._state.setdefault("live", []).append(change)
        self._save()
        self.cluster = self._cluster_dict()
        self._write_cluster()
        log.info("testbed %s: set %s", self.name, change)
        return {"name": self.name, "change": change,
                "links": self.cluster["links"],
                "nic_mbps": {h: self.config.nic(h).as_dict() for h in hosts if self.config.nic(h).as_dict()}}

    def _make_cgroups(self) -> None:
        def record(p: Path) -> None:
            self._record("cgroups", str(p))

        for d in self.config.devices:
            dirs = cgroups.create_host(self.ctrls, self.name, d.name, cpu=d.cpu, memory=d.memory_bytes,
                                       cpu_now=self.throttle_start, record=record)
            self._state["hosts"][d.name] = {"cgroups": [str(p) for p in dirs]}
        c = self.config.client
        if c.cpu is not None or c.memory_bytes is not None:
            dirs = cgroups.create_host(self.ctrls, self.name, CLIENT, cpu=c.cpu, memory=c.memory_bytes,
                                       memory_accounting=False, record=record)
            self._state["hosts"][CLIENT] = {"cgroups": [str(p) for p in dirs]}
        self._save()

    def _node_argv(self, d: Any) -> list[str]:
        argv = [self.python, "-m", "edgezmq", "node", "--control", self.control(d.name),
                "--name", d.name, "--threads", str(d.threads)]
        if d.memory_bytes is not None:
            argv += ["--memory-limit", str(d.memory_bytes)]
        return self.argv_in(d.name, argv)

    def _start_nodes(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for d in self.config.devices:  # start all, then wait: their imports overlap
            out, err = self.log_dir / f"{d.name}.out", self.log_dir / f"{d.name}.log"
            env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(d.threads))
            with open(out, "wb") as fo, open(err, "ab") as fe:
                # own session: Ctrl-C on `testbed up` must not reach the nodes; stdout to a file,
                # not a pipe, so the nodes outlive the process that started them
                p = subprocess.Popen(self._node_argv(d), stdin=subprocess.DEVNULL, stdout=fo, stderr=fe,
                                     env=env, start_new_session=True)
            self._procs[d.name] = p
            self._state["nodes"][d.name] = {"pid": p.pid, "control": self.control(d.name),
                                            "stdout": str(out), "stderr": str(err)}
            self._save()
        self._wait_ready()
        if not self.throttle_start:
            for d in self.config.devices:
                cgroups.limit_cpu(self.ctrls, self.name, d.name, d.cpu)

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        waiting = {d.name for d in self.config.devices}
        while waiting:
            for name in sorted(waiting):
                info = self._state["nodes"][name]
                text = Path(info["stdout"]).read_text(errors="replace")
                if text.startswith(READY_PREFIX) and "\n" in text:
                    fields = dict(kv.split("=", 1) for kv in text.split("\n", 1)[0].split()[1:])
                    if fields.get("control") != info["control"]:
                        raise TestbedError(f"node {name} serves control on {fields.get('control')!r}, "
                                           f"expected {info['control']!r}")
                    waiting.discard(name)
                    continue
                code = self._procs[name].poll()
                if code is not None:
                    cap = self.config.device(name).memory_bytes
                    oom = (f" (killed by the kernel: over its memory cap of {cap} bytes; an idle node with "
                           f"torch and timm loaded needs ~{IDLE_NODE_BYTES / 1e9:.2f} GB)"
                           if cgroups.oom_kills(self.host_cgroups(name)) else "")
                    raise TestbedError(f"node {name} exited with code {code} before it was ready{oom}; "
                                       f"its log {info['stderr']} ends with:\n{_tail(Path(info['stderr']))}")
            if waiting and time.monotonic() > deadline:
                raise TestbedError(f"node(s) {sorted(waiting)} not ready within {self.start_timeout:g}s "
                                   f"(logs in {self.log_dir})")
            if waiting:
                time.sleep(POLL_S)

    def ping_nodes(self) -> dict[str, dict]:
        """device -> ping answer, asked from inside the client namespace (where the nodes are reachable)."""
        if not net.netns_exists(self.client_namespace):
            return {d.name: {"ok": False, "error": "client namespace missing"} for d in self.config.devices}
        addrs = [self.control(d.name) for d in self.config.devices]
        argv = self.argv_in(CLIENT, [self.python, "-m", "edgezmq.testbed.agent", "ping", *addrs], limits=False)
        try:
            p = subprocess.run(argv, capture_output=True, text=True, timeout=AGENT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise TestbedError(f"pinging the nodes from {self.client_namespace} took over {AGENT_TIMEOUT_S:g}s") from None
        if p.returncode != 0:
            raise TestbedError(f"ping agent in {self.client_namespace} failed (exit {p.returncode}): {p.stderr.strip()}")
        by_addr = json.loads(p.stdout)
        return {d.name: by_addr[self.control(d.name)] for d in self.config.devices}

    def _check_nodes(self) -> None:
        bad = {n: r["error"] for n, r in self.ping_nodes().items() if not r["ok"]}
        if bad:
            raise TestbedError(f"node(s) not reachable from the client namespace: {bad}")

    # ---- cluster.yaml ----------------------------------------------------
    def _cluster_dict(self) -> dict[str, Any]:
        cfg = self.config
        nodes = []
        for d in cfg.devices:
            n: dict[str, Any] = {"name": d.name, "control": self.control(d.name)}
            if d.type is not None:
                n["type"] = d.type
            if d.memory_bytes is not None:
                n["memory_bytes"] = d.memory_bytes
            n.update(threads=d.threads, cpu=d.cpu)
            if d.nic.as_dict():  # configured rates, like links: readers apply tcp_payload_factor
                n["nic_mbps"] = d.nic.as_dict()
            n.update(namespace=self.namespace(d.name), address=cfg.address(d.name))
            nodes.append(n)
        client: dict[str, Any] = {"namespace": self.client_namespace, "address": self.client_address}
        if cfg.client.cpu is not None:
            client["cpu"] = cfg.client.cpu
        if cfg.client.memory_bytes is not None:
            client["memory_bytes"] = cfg.client.memory_bytes
        if cfg.client.nic.as_dict():
            client["nic_mbps"] = cfg.client.nic.as_dict()
        return {
            "nodes": nodes,
            "links": {"default": {"mbps": cfg.default_link.mbps, "latency_ms": cfg.default_link.latency_ms},
                      "overrides": cfg.override_list()},
            "client": client,
            "testbed": {
                "name": self.name, "source": self.source, "state_dir": str(self.state_dir),
                "bridge_namespace": self.bridge_namespace, "subnet": str(cfg.subnet),
                "bandwidth_enforced": True,  # htb per ordered pair at the sender, NICs (nic_mbps) too
                "latency_enforced": False,  # no netem in this kernel: latency_ms is for the planner only
                "tcp_payload_factor": round(net.TCP_PAYLOAD_FACTOR, 4),
                "cgroups": {c.name: f"v{c.version}" for c in self.ctrls.values()},
                # rates changed by set-link since up (links and nic_mbps above already show them)
                **({"live_changes": self._state["live"]} if self._state.get("live") else {}),
            },
        }

    def _write_cluster(self) -> None:
        head = (f"# Written by `edgezmq testbed up` for testbed {self.name!r}"
                f"{f' ({self.source})' if self.source else ''}.\n"
                f"# Control addresses are reachable only inside the testbed: run clients with\n"
                f"#   ip netns exec {self.client_namespace} COMMAND\n"
                f"# Link latency is recorded, not enforced (no netem); rates are htb-enforced.\n")
        self.cluster_path.write_text(head + yaml.safe_dump(self.cluster, sort_keys=False))

    def _warnings(self) -> list[str]:
        from edgezmq.node import device

        total = sum(d.cpu for d in self.config.devices) + (self.config.client.cpu or 0)
        cores = device.cores()
        if total > cores:
            return [f"CPU shares add up to {total:g} cores but this machine has {cores}: "
                    "devices will get less than their share when all are busy"]
        return []

    # ---- down -----------------------------------------------------------
    def down(self) -> dict[str, Any]:
        """Stop every process in the testbed, remove its namespaces and cgroups (idempotent).

        Works from the state file and from the names the config implies, so it cleans
        a testbed whose `up` crashed half-way, or whose state file was lost.
        Raises TestbedError listing whatever could not be removed.
        """
        check_prerequisites()
        namespaces = list(dict.fromkeys([*self._state["netns"], *self.all_namespaces()]))
        cg_dirs = [Path(p) for p in dict.fromkeys([*self._state["cgroups"], *map(str, self._expected_cgroups())])]
        # a 0.2-CPU node needs seconds to unload torch at exit: let it finish at full speed
        cgroups.lift_cpu_limits(cg_dirs)
        stopped: set[int] = set()
        left: set[int] = set()
        for _ in range(STOP_ROUNDS):  # again: a process started in the meantime (a killed up's)
            pids = self._testbed_pids(namespaces, cg_dirs) - stopped
            if not pids:
                break
            stopped |= pids
            _signal_all(pids, signal.SIGTERM)
            slow = _wait_gone(pids, STOP_TIMEOUT_S)
            if slow:
                log.warning("testbed %s: %d process(es) ignored SIGTERM for %gs; killing %s",
                            self.name, len(slow), STOP_TIMEOUT_S, sorted(slow))
                _signal_all(slow, signal.SIGKILL)
                left |= _wait_gone(slow, KILL_TIMEOUT_S)
        for p in self._procs.values():
            if p.poll() is None:
                p.kill()
            p.wait()
        self._procs.clear()
        problems = [f"process {pid} survived SIGKILL" for pid in sorted(left)]
        removed_ns = []
        for ns in namespaces:
            try:
                if net.netns_exists(ns):
                    net.del_netns(ns)
                    removed_ns.append(ns)
            except TestbedError as e:
                problems.append(str(e))
        removed_cg = [str(d) for d in cg_dirs if d.is_dir()]
        problems += cgroups.remove_dirs(cg_dirs)
        if problems:
            self._state["phase"] = "broken"
            self._save()
            raise TestbedError(f"testbed {self.name}: down left things behind:\n  " + "\n  ".join(problems))
        for f in (self.state_path, self.cluster_path):
            f.unlink(missing_ok=True)
        self._state = self._new_state()
        self.cluster = None
        return {"name": self.name, "stopped": sorted(stopped), "namespaces": removed_ns, "cgroups": removed_cg}

    def _testbed_pids(self, namespaces: list[str], cg_dirs: list[Path]) -> set[int]:
        """Processes in the testbed's namespaces or cgroups, and recorded nodes not yet in either."""
        pids: set[int] = set()
        for ns in namespaces:
            try:
                pids |= net.netns_pids(ns)
            except TestbedError as e:
                log.warning("%s", e)
        pids |= cgroups.pids_in(cg_dirs)
        for rec in self._state["nodes"].values():  # spawned, maybe still in the wrapper: check it is ours
            try:
                argv = Path(f"/proc/{rec['pid']}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if rec["control"].encode() in argv:
                pids.add(rec["pid"])
        pids.discard(os.getpid())
        return {p for p in pids if _alive(p)}

    # ---- status ---------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """Which namespaces and cgroups exist, which nodes run and answer ping, each host's usage."""
        check_prerequisites()
        # the recorded cgroups, and any other this config would make that exists (a leftover)
        cg_dirs = list(dict.fromkeys([*map(Path, self._state["cgroups"]),
                                      *(d for d in self._expected_cgroups() if d.is_dir())]))
        nss = {ns: net.netns_exists(ns) for ns in self.all_namespaces()}
        pings = self.ping_nodes() if all(nss.values()) else {}
        nodes = {}
        for d in self.config.devices:
            rec = self._state["nodes"].get(d.name, {})
            pid = rec.get("pid")
            answer = pings.get(d.name, {"ok": False, "error": "testbed not (fully) up"})
            nodes[d.name] = {"control": self.control(d.name), "pid": pid,
                             "running": bool(pid) and _alive(pid), "answers": answer["ok"],
                             "state": answer.get("state"), "error": answer.get("error"),
                             "usage": cgroups.usage(self.host_cgroups(d.name))}
        up = self._state.get("phase") == "up" and all(nss.values()) and all(n["answers"] for n in nodes.values())
        return {"name": self.name, "up": up, "phase": self._state.get("phase"), "state_dir": str(self.state_dir),
                "cluster": str(self.cluster_path) if self.cluster_path.exists() else None,
                "namespaces": nss, "cgroups": {str(d): d.is_dir() for d in cg_dirs}, "nodes": nodes}

    # ---- context manager ---------------------------------------------------
    def __enter__(self) -> Testbed:
        self.up()
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()
