"""Deploy from a cluster inventory: info -> profile -> netprobe -> plan -> load -> calibrate -> READY.

``gather`` asks every node what it is, has one node of each device type profile the
model's units on its own hardware (cached on the node; a cached profile is spot-checked
and rescaled when the device has drifted, ``profile.spot_check``), measures the links the planner
needs (all pairs for small clusters, one sample per type pair for large ones, and the
client's link to every node), and builds the planner's problem (#3's format).
``autodeploy`` then plans, deploys through ``edgezmq.orchestrate.deploy`` and calibrates the fresh
deployment (``edgezmq.orchestrate.calibrate``: a burst of microbatches, the device types corrected to
what their stages cost serving, a re-plan, a redeploy if a much better plan comes out).  With a ``keys:`` section in the inventory every one of these
steps speaks CurveZMQ (node <-> node probes too), and so does the plan it deploys.

Moving activations costs a stage CPU too (kernel network stack, ZeroMQ's I/O thread,
copies, decoding), and on a device whose compute already uses all the CPU it has, that
comes out of compute. ``measure_io`` measures it on one node of each type with activation
-sized netprobe messages, in both directions against the bootstrapper (CPU seconds per
byte received and sent), and ``io_costs`` turns it into the stage time per MB the planner
adds (``recv_ms_per_mb`` / ``send_ms_per_mb``): CPU seconds / the CPUs the node has, when
its torch threads use them all (a CPU quota, or as many threads as cores); 0 when it has
CPU to spare, where receiving and sending overlap compute.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import statistics
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import zmq

from edgezmq.client import Client
from edgezmq.node.daemon import BUFFERS_PER_DIRECTION
from edgezmq.orchestrate.address import NodeAddress
from edgezmq.orchestrate.calibrate import CALIBRATION_MICROBATCHES
from edgezmq.orchestrate.calibrate import calibrate as run_calibration
from edgezmq.orchestrate.deploy import DeployError, Deployment, deploy, take_over, unload
from edgezmq.orchestrate.inventory import Cluster, InventoryNode
from edgezmq.orchestrate.planfile import DeployPlan, ModelSpec, StagePlan
from edgezmq.protocol import control, wire
from edgezmq.protocol import messages as m
from edgezmq.terms import CLIENT
from edgezmq.transport import netprobe, security
from edgezmq.transport.nodeclient import JobFailed, JobTimeout, NodeClient
from edgezmq.transport.security import Curve

log = logging.getLogger(__name__)

INFO_TIMEOUT_S = 5.0
JOB_POLL_S = 0.2
PROFILE_TIMEOUT_S = m.PROFILE_DEADLINE_S + 60.0  # the node fails the job at its deadline first
PLAN_TIME_LIMIT_S = 20.0

Say = Callable[[str], None]


@dataclass
class Gathered:
    """Everything measured about a cluster for one model: the planner's problem and its sources."""

    problem: dict[str, Any]
    infos: dict[str, dict]
    profiles: dict[str, dict]  # device type -> profile
    links: dict[tuple[str, str], dict]  # measured (a, b) -> netprobe result
    seconds: float
    io: dict[str, dict] = field(default_factory=dict)  # device type -> measure_io's figures
    calibration: Any = None  # edgezmq.orchestrate.calibrate.Calibration, after autodeploy calibrated
    encodings: Any = None  # edgezmq.orchestrate.compress.Measured, when a budget asked for encodings


def _parallel(items: list, fn: Callable, workers: int | None = None) -> list:
    with ThreadPoolExecutor(max_workers=workers or max(1, min(16, len(items)))) as ex:
        return list(ex.map(fn, items))


def _node(cluster: Cluster, n: NodeAddress, timeout: float = INFO_TIMEOUT_S) -> NodeClient:
    return NodeClient(n.control, timeout=timeout, retries=1, name=n.name, curve=cluster.curve(n.name))


def wait_job(n: NodeAddress, reply: m.ProfileReply | m.NetprobeReply, timeout: float,
             on_progress: Callable[[list[Any]], None] | None = None,
             curve: Curve | None = None) -> dict[str, Any]:
    """The result of the job ``reply`` started on node ``n`` (a profile's cache hit: at once),
    polled over CurveZMQ with ``curve``; DeployError naming the node when it fails or is not
    done in ``timeout`` seconds."""
    if isinstance(reply, m.ProfileReply) and reply.job is None:
        return reply.result or {}
    assert reply.job is not None  # a netprobe always starts a job
    with NodeClient(n.control, timeout=INFO_TIMEOUT_S, retries=2, name=n.name, curve=curve) as c:
        try:
            return c.wait_job(reply.job, timeout, poll_s=JOB_POLL_S, on_progress=on_progress)
        except JobFailed as e:
            raise DeployError(f"{n.name}: {e.message}", {n.name: e.message}) from None
        except JobTimeout:
            raise DeployError(f"{n.name}: job {reply.job} did not finish in {timeout:g}s",
                              {n.name: "job timed out"}) from None


def device_type_of(n: InventoryNode) -> str:
    """Nodes that share a `type` label share one profile; untyped nodes are their own type."""
    return n.type or n.name


def _usable_memory(n: InventoryNode, info: dict) -> tuple[int, int]:
    """(memory the node may use in all, of which the runtime already holds), in bytes."""
    dev = info["device"]
    rss = int(dev["rss"])
    total = int(dev["memory_available"]) + rss
    for cap in (n.memory_bytes, dev.get("memory_limit"), info.get("memory_limit_arg")):
        if cap:
            total = min(total, int(cap))
    return total, rss


@dataclass(frozen=True)
class Generation:
    """Plan a decoder for generation (docs/generate.md): its units timed on decode steps of a
    microbatch of sequences with `context` tokens cached (the most a sequence holds), and every
    stage holding the KV caches of `sequences` live sequences of that length. The last link
    carries each row's token, not its logits: the generator has the last stage choose it
    (gen.pick, greedy or sampled)."""

    context: int
    sequences: int


def gather(
    cluster: Cluster, *, model: str, microbatch: int, granularity: str = "block",
    kwargs: dict | None = None, reprofile: bool = False, replication: bool = True, say: Say | None = None,
    info_timeout: float = INFO_TIMEOUT_S, spot_check: bool = True, generation: Generation | None = None,
) -> Gathered:
    say = say or (lambda m: log.info("%s", m))
    t0 = time.time()
    kwargs = dict(kwargs or {})
    nodes = cluster.nodes

    # 1. info
    def info(n: InventoryNode) -> Any:
        try:
            with _node(cluster, n, info_timeout) as c:
                # kept as the wire map: Gathered.infos feeds the planner's problem (build_problem,
                # io_costs) and the calibration, which read node facts as maps
                return c.info().to_wire()
        except control.ControlError as e:
            return e

    infos_l = _parallel(nodes, info)
    errors = {n.name: r.message for n, r in zip(nodes, infos_l) if isinstance(r, control.ControlError)}
    if errors:
        raise DeployError("unreachable node(s):\n" + "\n".join(f"  {k}: {v}" for k, v in errors.items()), errors)
    infos = {n.name: r for n, r in zip(nodes, infos_l)}
    for n in nodes:
        d = infos[n.name]["device"]
        quota = f" (quota {d['cpu_quota']:.2f} CPU)" if d.get("cpu_quota") else ""
        say(f"{n.name}: {d['cpu']}, {d['cores']} cores{quota}, "
            f"{_usable_memory(n, infos[n.name])[0] / 1e9:.2f} GB usable, threads {infos[n.name]['threads']}")

    # 2. profiles: one representative per device type
    reps: dict[str, InventoryNode] = {}
    for n in nodes:
        reps.setdefault(device_type_of(n), n)
    # all at once: nodes that share a machine's cores (an emulated cluster, or several nodes
    # on one board) are then timed sharing them, as they will while serving (the pipeline
    # keeps every stage busy); it is also N times quicker, so the figures are fresh when used

    def prof(item: tuple[str, InventoryNode]) -> dict:
        typ, n = item
        with _node(cluster, n, 60.0) as c:
            r = c.profile(m.ProfileRequest(model=model, microbatch=microbatch, granularity=granularity,
                                           kwargs=kwargs, reprofile=reprofile, check=spot_check,
                                           context=generation.context if generation else None))
        if r.cached:
            say(f"{n.name}: profile of {model} from the node's cache" + (", spot check" if r.job else ""))
        got = wait_job(n, r, PROFILE_TIMEOUT_S, lambda p: say(
            f"{n.name}: profiled unit {p[0]}/{p[1]} {p[2]}: {p[3] * 1e3:.1f} ms"), cluster.curve(n.name))
        if r.cached and got.get("spot_check"):
            sc = got["spot_check"]
            drift = "rescaled" if sc.get("rescaled") else "kept"
            say(f"{n.name}: units {sc['units'][0]}-{sc['units'][1] - 1} now take {sc['time_s'] * 1e3:.1f} ms,"
                f" {sc['ratio']:.2f}x the cached {sc['cached_time_s'] * 1e3:.1f} ms: profile {drift}")
        return got

    profiles = dict(zip(reps, _parallel(list(reps.items()), prof)))

    # 3. links
    measured: dict[tuple[str, str], dict] = {}
    pairs = _pairs_to_measure(cluster)
    for a, b in pairs:
        na = cluster.node(a)
        with _node(cluster, na) as c:
            r = c.netprobe(m.NetprobeRequest(peer=infos[b]["probe"], seconds=cluster.probe_seconds,
                                             bytes_per_msg=cluster.probe_bytes, pings=cluster.pings,
                                             **_peer_key(cluster, b)))
        measured[(a, b)] = wait_job(na, r, 60.0, curve=cluster.curve(a))
        say(f"link {a} <-> {b}: {measured[(a, b)]['bandwidth_mbps']:.0f} Mbit/s, "
            f"{measured[(a, b)]['latency_ms']:.2f} ms")
    for n in nodes:  # the client's own links, measured from here
        if cluster.link_overrides.get(frozenset((CLIENT, n.name))) or cluster.default_link:
            continue
        measured[(CLIENT, n.name)] = netprobe.probe(
            infos[n.name]["probe"], seconds=cluster.probe_seconds, bytes_per_msg=cluster.probe_bytes,
            pings=cluster.pings, curve=cluster.curve(n.name))
        say(f"link {CLIENT} <-> {n.name}: {measured[(CLIENT, n.name)]['bandwidth_mbps']:.0f} Mbit/s")

    io = measure_io(cluster, reps, infos, profiles, say)
    problem = build_problem(cluster, infos, profiles, measured, model=model, microbatch=microbatch,
                            granularity=granularity, kwargs=kwargs, replication=replication, io=io,
                            generation=generation)
    return Gathered(problem, infos, profiles, measured, time.time() - t0, io)


def activation_bytes(profile: dict) -> int:
    """The typical message between two stages of this model: the median unit output."""
    return max(1, int(statistics.median(int(u["out_bytes"]) for u in profile["units"])))


def measure_io(cluster: Cluster, reps: dict[str, InventoryNode], infos: dict, profiles: dict,
               say: Say) -> dict[str, dict]:
    """Per device type (its representative node): CPU seconds per byte it spends receiving
    (the bootstrapper probes it) and sending (it probes the bootstrapper), with messages the
    size of the model's activations, and the stage time per MB that makes (``io_costs``)."""
    out: dict[str, dict] = {}
    with _probe_server(cluster) as server:
        for typ, n in reps.items():
            nbytes = activation_bytes(profiles[typ])
            curve = cluster.curve(n.name)
            got = netprobe.probe(infos[n.name]["probe"], bytes_per_msg=nbytes, seconds=cluster.probe_seconds,
                                 pings=1, curve=curve)
            own_key = cluster.keyring.own.public_text if cluster.keyring is not None else None
            assert server.endpoint is not None  # _probe_server yields it started: bound
            with _node(cluster, n) as c:
                r = c.netprobe(m.NetprobeRequest(peer=server.endpoint, seconds=cluster.probe_seconds,
                                                 bytes_per_msg=nbytes, pings=1, peer_key=own_key))
            sent = wait_job(n, r, 60.0, curve=curve)
            recv_cpu, send_cpu = got.get("receiver_cpu_s_per_byte"), sent.get("sender_cpu_s_per_byte")
            fig = {"bytes_per_msg": nbytes, "recv_cpu_s_per_byte": recv_cpu, "send_cpu_s_per_byte": send_cpu,
                   **io_costs(infos[n.name], recv_cpu, send_cpu)}
            out[typ] = fig
            say(f"{n.name}: receiving costs {_ms_mb(recv_cpu)} ms CPU per MB, sending {_ms_mb(send_cpu)};"
                f" a stage pays {fig['recv_ms_per_mb']:.2f} / {fig['send_ms_per_mb']:.2f} ms per MB")
    return out


@contextlib.contextmanager
def _probe_server(cluster: Cluster) -> Iterator[netprobe.ProbeServer]:
    """A probe server on the client's address for the nodes to send to: over CurveZMQ, with
    only the inventory's nodes allowed in, when the inventory has keys."""
    ctx = zmq.Context()
    auth = None
    try:
        curve = None
        if cluster.keyring is not None:
            auth = security.Authenticator(ctx, allow=list(cluster.keyring.nodes.values()))
            curve = cluster.keyring.server
        with netprobe.ProbeServer(cluster.client_address, ctx=ctx, curve=curve) as server:
            yield server
    finally:
        if auth is not None:
            auth.stop()
        ctx.term()


def _ms_mb(s_per_byte: float | None) -> str:
    return "?" if s_per_byte is None else f"{s_per_byte * 1e9:.2f}"


def io_costs(info: dict, recv_cpu_s_per_byte: float | None, send_cpu_s_per_byte: float | None) -> dict[str, float]:
    """A node's receive/send CPU cost as stage time per MB (module doc): divided by the CPUs
    it has when its torch threads use them all (quota or cores), else 0 (overlapped)."""
    dev = info["device"]
    cpus = float(dev.get("cpu_quota") or dev.get("cores") or 1)
    threads = int(info.get("threads") or dev.get("cores") or 1)
    scale = 1.0 / cpus if cpus <= threads else 0.0
    return {"recv_ms_per_mb": (recv_cpu_s_per_byte or 0.0) * scale * 1e9,
            "send_ms_per_mb": (send_cpu_s_per_byte or 0.0) * scale * 1e9}


def _peer_key(cluster: Cluster, name: str) -> dict[str, Any]:
    """The ``peer_key`` argument of a node's ``netprobe`` to ``name``: its public key from the
    inventory's keys (never the key the peer reports about itself), when secured."""
    return {"peer_key": cluster.keyring.node_key(name).decode()} if cluster.keyring else {}


def _pairs_to_measure(cluster: Cluster) -> list[tuple[str, str]]:
    """Unordered node pairs whose link is not configured: all of them for small clusters,
    else one sample pair per pair of device types (its figure stands for the type pair)."""
    nodes = cluster.nodes
    unknown = [(a.name, b.name) for a, b in itertools.combinations(nodes, 2) if cluster.known_link(a.name, b.name) is None]
    if len(nodes) <= cluster.all_pairs_up_to:
        return unknown
    sample: dict[frozenset, tuple[str, str]] = {}
    for a, b in unknown:
        key = frozenset((device_type_of(cluster.node(a)), device_type_of(cluster.node(b))))
        sample.setdefault(key, (a, b))
    return list(sample.values())


def unit_times(profile: dict) -> list[float]:
    """A profile's unit times as a stage sees them: each unit's own time scaled by the
    profile's chain factor (units run back to back vs alone; 1 if it was not measured)."""
    chain = profile.get("chain") or {}
    factor = float(chain.get("factor") or 1.0)
    return [float(u["time_s"]) * factor for u in profile["units"]]


def _figure(r: dict) -> dict:
    return {"mbps": round(float(r["bandwidth_mbps"]), 3), "latency_ms": round(float(r["latency_ms"]), 4)}


def build_problem(
    cluster: Cluster, infos: dict, profiles: dict, measured: dict, *, model: str, microbatch: int,
    granularity: str, kwargs: dict, replication: bool = True, io: dict[str, dict] | None = None,
    generation: Generation | None = None,
) -> dict[str, Any]:
    """The planner's problem dict (docs/planner.md) from what was measured. For `generation`
    (decode-step profiles), each unit keeps the KV caches of every live sequence (`cache_bytes`)
    and stages are not replicated: a sequence's cache lives on the replica that made it."""
    first = next(iter(profiles.values()))
    units = []
    for i, u in enumerate(first["units"]):
        work = max(int(p["units"][i]["work_bytes"]) for p in profiles.values())
        units.append({"name": u["name"], "out_bytes": int(u["out_bytes"]), "param_bytes": int(u["param_bytes"]),
                      "work_bytes": work})
        if generation is not None:
            units[-1]["cache_bytes"] = generation.sequences * generation.context * int(u["cache_bytes_per_token"])
    if generation is not None:
        units[-1]["out_bytes"] = wire.gen_out_bytes(microbatch, units[-1]["out_bytes"], "argmax")
        replication = False
    device_types, devices = {}, []
    for n in cluster.nodes:
        typ = device_type_of(n)
        mem, rss = _usable_memory(n, infos[n.name])
        if typ not in device_types:
            device_types[typ] = {"memory_bytes": mem, "reserved_bytes": rss,
                                 "unit_times_s": unit_times(profiles[typ])}
            if io and typ in io:
                device_types[typ].update(recv_ms_per_mb=io[typ]["recv_ms_per_mb"],
                                         send_ms_per_mb=io[typ]["send_ms_per_mb"])
        dev = {"name": n.name, "type": typ, "control": n.control, "memory_bytes": mem, "reserved_bytes": rss}
        if n.nic is not None and n.nic.limited:
            dev["nic_mbps"] = n.nic.to_dict()
        devices.append(dev)
    # links: configured figures win; measured pairs become overrides; a sampled type pair
    # stands for every pair of those types
    overrides: list[dict] = []
    for pair, fig in cluster.link_overrides.items():
        a, b = sorted(pair)
        overrides.append({"a": a, "b": b, "mbps": fig.mbps, "latency_ms": fig.latency_ms})
    if len(cluster.nodes) > cluster.all_pairs_up_to:
        typed = {}
        for (a, b), r in measured.items():
            if CLIENT in (a, b):
                continue
            ta, tb = device_type_of(cluster.node(a)), device_type_of(cluster.node(b))
            typed[frozenset((ta, tb))] = r
        for a, b in itertools.combinations(cluster.nodes, 2):
            if cluster.known_link(a.name, b.name) is None:
                r = typed.get(frozenset((device_type_of(a), device_type_of(b))))
                if r is not None:
                    overrides.append({"a": a.name, "b": b.name, **_figure(r)})
        node_measured = {k: v for k, v in measured.items() if CLIENT in k}
    else:
        node_measured = measured
    for (a, b), r in node_measured.items():
        overrides.append({"a": a, "b": b, **_figure(r)})
    if cluster.default_link is not None:
        default = {"mbps": cluster.default_link.mbps, "latency_ms": cluster.default_link.latency_ms}
    elif measured:
        default = {"mbps": statistics.median(float(r["bandwidth_mbps"]) for r in measured.values()),
                   "latency_ms": statistics.median(float(r["latency_ms"]) for r in measured.values())}
    else:  # a single node with configured client links
        default = {"mbps": 1000.0, "latency_ms": 0.5}
    problem = {
        "model": {"name": model, "microbatch": microbatch, "granularity": granularity, "kwargs": kwargs,
                  "input_bytes": int(first["input_bytes"]), "units": units},
        "device_types": device_types,
        "devices": devices,
        "links": {"default": default, "overrides": overrides},
        "options": {"replication": replication, "buffers": BUFFERS_PER_DIRECTION},
    }
    if cluster.client_nic is not None and cluster.client_nic.limited:
        problem["client"] = {"nic_mbps": cluster.client_nic.to_dict()}
    return problem


@dataclass(frozen=True)
class Budget:
    """The accuracy budget a deployment may spend on encoded links (docs/compression.md): none
    given, every link raw (exact)."""

    max_error: float | None = None  # the used cuts' logit errors (relative L2), summed, at most
    min_agreement: float | None = None  # top-1 agreement with fp32, percent, at least (100 - summed disagreement)

    @property
    def given(self) -> bool:
        return self.max_error is not None or self.min_agreement is not None


EXACT = Budget()


def plan_problem(problem_dict: dict, *, time_limit_s: float = PLAN_TIME_LIMIT_S, budget: Budget = EXACT):
    """(Problem, planner Plan) for a problem dict, within ``budget`` when its encodings allow."""
    from edgezmq.planner import Problem, solve

    problem = Problem.from_dict(problem_dict)
    return problem, solve(problem, time_limit_s=time_limit_s, max_error=budget.max_error,
                          min_agreement=budget.min_agreement)


def to_deploy_plan(
    cluster: Cluster, planned, *, model: ModelSpec, results: str | None = None, problem: Any = None,
    budget: Budget = EXACT,
) -> DeployPlan:
    """The plan to deploy, with the planner's window (``predicted.window`` in a file: Plan.window,
    what its clients keep in flight); with the planner's ``problem``, each stage also gets its
    outgoing link's rate (``link_mbps``: the nodes size their send buffers by it) and its
    encoding ladder within ``budget`` (as ``edgezmq plan -o`` writes them, planner.deploy)."""
    from edgezmq.planner.deploy import link_mbps
    from edgezmq.planner.encoded import ladders

    def address(name: str) -> NodeAddress:
        n = cluster.node(name)
        return NodeAddress(n.name, n.control, n.threads, n.curve)

    stages = []
    rungs = ladders(problem, planned, budget.max_error, budget.min_agreement) if problem is not None else None
    for i, s in enumerate(planned.stages):
        st = StagePlan(units=(s.units[0], s.units[1]), nodes=[address(d) for d in s.devices])
        if problem is not None:
            nxt = planned.stages[i + 1].devices if i + 1 < len(planned.stages) else (CLIENT,)
            st.link_mbps = link_mbps(problem, s.devices, nxt)
            st.encodings = [[e] for e in rungs[i]] if rungs and rungs[i] else None
        stages.append(st)
    return DeployPlan(model=model, stages=stages, results=results or cluster.results,
                      keyring=cluster.keyring, keys=cluster.keys, window=planned.window,
                      input_encoding=planned.stages[0].input_encoding)


def measure_encodings(g: Gathered, cluster: Cluster, model: ModelSpec, *, encodings: Any = None,
                      calibration: Any = None, samples: int | None = None, say: Say | None = None,
                      measured: Any = None) -> Any:
    """Add the candidate encodings and their codec costs to ``g.problem`` (edgezmq.orchestrate.compress):
    measured on this machine with the deployment's weights on `calibration` (an image array;
    None: `samples` seeded images, default compress.CALIBRATION_SAMPLES), the codec costs
    scaled to each device type by its profile. `measured`: what an earlier call measured for
    the same model (``g.encodings`` of a deployment on these or more devices, e.g. before a
    failover): reused as it is, the model is not run again."""
    from edgezmq.orchestrate import compress  # torch: only when compressing

    say = say or (lambda m: log.info("%s", m))
    threads: dict[str, int] = {}
    for n in cluster.nodes:
        info = g.infos[n.name]
        threads.setdefault(device_type_of(n), int(info.get("threads") or info["device"].get("cores") or 1))
    if measured is not None:
        say(f"encodings {', '.join(measured.encodings)}: as measured before, on {measured.samples} "
            f"{measured.source} calibration samples")
        compress.apply_measured(g.problem, measured, threads=threads, say=say)
        g.encodings = measured
        return measured
    net = compress.load_model(model.name, checkpoint=model.checkpoint, pretrained=model.pretrained,
                              kwargs=model.kwargs)
    x, source = compress.calibration_batch(model.name, model.microbatch, calibration, model.kwargs,
                                           n=samples or compress.CALIBRATION_SAMPLES)
    say(f"measuring encodings {', '.join(encodings or compress.DEFAULT_ENCODINGS)} on {x.shape[0]} {source} "
        "calibration samples")
    g.encodings = compress.add_encodings(g.problem, net, x, threads=threads,
                                         encodings=encodings or compress.DEFAULT_ENCODINGS, source=source, say=say)
    return g.encodings


def autodeploy(
    cluster: Cluster, model: ModelSpec, *, reprofile: bool = False, dry_run: bool = False,
    results: str | None = None, time_limit_s: float = PLAN_TIME_LIMIT_S, say: Say | None = None,
    load_timeout: float = 600.0, replication: bool = True, spot_check: bool = True,
    calibrate: int = CALIBRATION_MICROBATCHES, client: Client | None = None, generation: Generation | None = None,
    budget: Budget = EXACT, encodings: Any = None, calibration: Any = None, calibration_samples: int | None = None,
    measured: Any = None,
) -> tuple[Deployment | None, DeployPlan, Any, Any, Gathered]:
    """Measure, plan, deploy, calibrate (`calibrate` microbatches through the deployment,
    ``edgezmq.orchestrate.calibrate``; 0: not), through `client` when given (bound to `results`).
    With a `budget`, the candidate `encodings` (default compress.DEFAULT_ENCODINGS) are measured
    on the `calibration` images (default: `calibration_samples` seeded ones; ``measure_encodings``),
    or `measured` (an earlier deployment's ``g.encodings``) is reused, and the planner
    may encode links within it; without one every link is raw (exact).
    Returns (deployment or None when dry_run, deploy plan, planner problem, planner plan,
    what was gathered, with ``calibration`` and ``encodings``)."""
    say = say or (lambda m: log.info("%s", m))
    if not dry_run:  # unreachable nodes are left to the info step, which names them
        take_over(list(cluster.nodes), curve=lambda a: cluster.curve(a.name), say=say)
    g = gather(cluster, model=model.name, microbatch=model.microbatch, granularity=model.granularity,
               kwargs=model.kwargs, reprofile=reprofile, replication=replication, say=say,
               spot_check=spot_check, generation=generation)
    if budget.given:
        measure_encodings(g, cluster, model, encodings=encodings, calibration=calibration,
                          samples=calibration_samples, say=say, measured=measured)
    problem, planned = plan_problem(g.problem, time_limit_s=time_limit_s, budget=budget)
    plan = to_deploy_plan(cluster, planned, model=model, results=results, problem=problem, budget=budget)
    if generation is not None:  # each stage reserves what the plan gave its units' caches
        # the head's buffers as planned (decode-step profiles): next-token logits, not every position's
        plan.model = dataclasses.replace(plan.model, generation_only=True)
        for st in plan.stages:
            st.cache_bytes = sum(u.cache_bytes for u in problem.units[st.units[0]:st.units[1]])
        if calibrate:
            say("calibration skipped: it times whole sequences, not decode steps")
            calibrate = 0
    if dry_run:
        return None, plan, problem, planned, g
    dep = deploy(plan, load_timeout=load_timeout, progress=say)
    if calibrate and client is None and results is not None:
        say("calibration skipped: the results address is someone else's (pass their client)")
    elif calibrate:
        dep, problem, planned = _calibrate(cluster, model, dep, problem, planned, g, n=calibrate, client=client,
                                           results=results, time_limit_s=time_limit_s, load_timeout=load_timeout,
                                           say=say, budget=budget)
    return dep, dep.plan, problem, planned, g


def _liveness(dep: Deployment, client: Client, cluster: Cluster, planned: Any) -> contextlib.AbstractContextManager[None]:
    """Heartbeats over `dep` while calibration streams through it (failover.watched)."""
    from edgezmq.orchestrate.failover import stall_limits, watched  # failover builds on this module

    return watched(dep, client, keyring=cluster.keyring, stall_limits=stall_limits(planned))


def _calibrate(cluster: Cluster, model: ModelSpec, dep: Deployment, problem: Any, planned: Any, g: Gathered, *,
               n: int, client: Client | None, results: str | None, time_limit_s: float, load_timeout: float,
               say: Say, budget: Budget = EXACT) -> tuple[Deployment, Any, Any]:
    """``edgezmq.orchestrate.calibrate`` on a fresh deployment, through `client` or, without one, a client
    of its own on the plan's results address (the inventory's; closed after); on failure the
    nodes are unloaded."""
    try:
        cl = client or Client([], dep.plan.results, run="", window=planned.window, microbatch=model.microbatch,
                              keyring=dep.plan.keyring)
    except zmq.ZMQError as e:  # deploying from another machine than the inventory's client
        say(f"calibration skipped: cannot receive results at {dep.plan.results} here ({e})")
        return dep, problem, planned
    replanned = [problem]  # the last re-plan's problem: the plan to deploy takes its link rates

    def replan(d: dict) -> tuple[Any, Any]:
        got = plan_problem(d, time_limit_s=time_limit_s, budget=budget)
        replanned[0] = got[0]
        return got

    try:
        dep, problem, planned, g.calibration = run_calibration(
            dep, g.problem, problem, planned, client=cl, infos=g.infos,
            types={n_.name: device_type_of(n_) for n_ in cluster.nodes}, replan=replan,
            to_plan=lambda p: to_deploy_plan(cluster, p, model=model, results=results, problem=replanned[0],
                                             budget=budget), n=n,
            load_timeout=load_timeout, say=say, watch=lambda d: _liveness(d, cl, cluster, planned))
    except BaseException:
        unload(dep.plan)  # the first plan (a failed redeploy has unloaded it and cleaned up itself)
        raise
    finally:
        if cl is not client:
            cl.close()
    return dep, problem, planned
