"""Control messages defined once: each command's request and reply as documented frozen dataclasses.

The node's handlers take these requests and build these replies, ``NodeClient`` sends and
reads them, and docs/control.md's tables are generated from them.  Ranges are checked
when a request is parsed (``edgezmq.protocol.schema``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from edgezmq.protocol import wire
from edgezmq.protocol.model_kwargs import ModelKwargsError, check_model_kwargs
from edgezmq.protocol.schema import JSON, JSONMap, Record, SchemaError, field_
from edgezmq.terms import (
    ENCODINGS,
    GRANULARITIES,
    MAX_BYTES,
    MAX_CONTEXT,
    MAX_MBPS,
    MAX_MICROBATCH,
    MAX_RUNGS,
    MAX_SECONDS,
    MAX_THREADS,
    MAX_UNITS,
)

MAX_RID = 64  # characters of a request id
REPLIES_KEPT = 64  # replies a node remembers by request id: more than any client has in flight
MAX_NAME = 256  # model names, run ids, job ids
MAX_ADDRESS = 512  # a ZeroMQ endpoint
MAX_PATH = 4096
MAX_STAGES = 4096
MAX_CONNECT = 64  # downstream replicas of one stage
KEY_LEN = 40  # a Z85 CurveZMQ public key
MiB = 1 << 20
DEFAULT_CACHE_IDLE_S = 300.0  # a decoder's sequence not stepped for this long is dropped (docs/generate.md)
NETPROBE_MAX_BYTES = 256 * MiB  # a netprobe bulk message (edgezmq.transport.netprobe)
NETPROBE_MAX_SECONDS = 60.0
MAX_PINGS = 10_000  # round trips of one netprobe
PROFILE_DEADLINE_S = 3600.0  # a profile job's default deadline: ViT-Huge unit by unit on a slow board
MAX_JOB_SECONDS = 86400.0  # the longest deadline a peer may ask for
NETPROBE_JOB_DEADLINE_S = 300.0  # a netprobe job: the bulk phase (<= 60 s) plus pings and set-up
JOB_STATES = ("running", "done", "failed", "cancelled")
NODE_STATES = ("idle", "loading", "loaded", "running", "failed")
GRANULARITY_DOC = "how the model is cut into units: block | half | sublayer (docs/model.md)"


class Request(Record):
    """A control request; ``CMD`` is its command name."""

    CMD: ClassVar[str] = ""

    def validate(self) -> None:
        """Constraints between fields (after each field was checked); raises SchemaError."""


class Reply(Record):
    """The fields of a command's ok reply."""


KWARGS_DOC = ("timm architecture arguments (img_size, depth, num_classes, ...): only those of "
              "`edgezmq.protocol.model_kwargs.ALLOWED`, each in its range; anything else (a URL, a "
              "cache directory, a layer class) is refused")


def _check_kwargs(kwargs: dict[str, JSON], cmd: str) -> None:
    try:
        check_model_kwargs(kwargs, f"{cmd}.kwargs")
    except ModelKwargsError as e:  # the error names the field: `load.kwargs.cache_dir: ...`
        path, _, message = str(e).partition(": ")
        raise SchemaError(path, message) from None


# ---------------------------------------------------------------- shared parts


@dataclass(frozen=True, kw_only=True)
class TensorSpec(Record):
    WIRE_NAME = "tensor"
    shape: list[int] = field_("dimensions, the batch first (at the microbatch given)")
    dtype: str = field_("numpy dtype name (float32)")


@dataclass(frozen=True, kw_only=True)
class UnitDesc(Record):
    WIRE_NAME = "unit"
    index: int = field_("position in the chain, 0-based")
    name: str = field_("timm module path it covers (`embed`, `blocks.3`, `blocks.3.attn`, `head`)")
    param_bytes: int = field_("bytes of its parameters and buffers", unit="bytes")
    inputs: list[TensorSpec] = field_("the tensors entering it (unit 0: the image batch)")


@dataclass(frozen=True, kw_only=True)
class DeviceFacts(Record):
    WIRE_NAME = "device"
    hostname: str = field_("the node's host name")
    machine: str = field_("CPU architecture (x86_64, aarch64)")
    cpu: str = field_("CPU model name")
    cores: int = field_("CPU cores this process may run on")
    cpu_quota: float | None = field_("CPUs allowed by the cgroup quota; null: unlimited")
    cpu_period_s: float | None = field_("the cgroup quota's period (its throttling cycle); null: unlimited",
                                        unit="s")
    memory_total: int = field_("physical memory", unit="bytes")
    memory_available: int = field_("MemAvailable now", unit="bytes")
    memory_limit: int | None = field_("cgroup memory limit; null: none", unit="bytes")
    rss: int = field_("resident memory of the node process", unit="bytes")
    device_type: str = field_("where shards compute: cpu")
    versions: dict[str, str] = field_("software versions: edgezmq, python, torch, timm, numpy, pyzmq, libzmq")


@dataclass(frozen=True, kw_only=True)
class StageStats(Record):
    """What a loaded stage counts; every counter starts at 0 when the shard is loaded."""

    WIRE_NAME = "stats.stage"
    received: int = field_("data messages taken off the PULL socket, good or bad")
    processed: int = field_("microbatches put through the shard")
    samples: int = field_("samples (batch rows) put through the shard")
    sent: int = field_("messages sent downstream: activations/results and error messages")
    bad_messages: int = field_("messages refused, each counted once (every code of docs/wire.md, "
                               "`wrong_run` included); each became an error message downstream")
    wrong_run: int = field_("of `bad_messages`, those refused for another `run` (not counted again)")
    compute_errors: int = field_("microbatches whose forward raised (`compute_failed` downstream)")
    forwarded_errors: int = field_("error messages of the upstream stage passed on untouched")
    send_retries: int = field_("sends retried because downstream was full or not connected")
    bytes_in: int = field_("bytes of data frames received, headers included", unit="bytes")
    bytes_out: int = field_("bytes of data frames sent, headers included", unit="bytes")
    recv_s: float = field_("receive thread decoding and validating", unit="s")
    wait_s: float = field_("compute thread idle, waiting for input", unit="s")
    compute_s: float = field_("compute thread inside forwards (wall clock)", unit="s")
    compute_cpu_s: float = field_("CPU time of the compute thread inside forwards", unit="s")
    send_s: float = field_("send thread inside send (includes back-pressure and encoding)", unit="s")
    encode_s: float = field_("of `send_s`, encoding tensors (docs/compression.md)", unit="s", default=0.0)
    enc_messages: dict[str, int] = field_("messages sent per rung of the link's ladder (`int8`, per tensor "
                                          "`int8+f16`); {} without `start.encodings`", factory=dict,
                                          default_doc="{}")
    enc_switches: int = field_("rung changes made by the adaptive policy", default=0)
    enc_fallbacks: int = field_("tensors sent raw because int8/int4 refuse NaN/inf", default=0)
    last_error: str = field_("the last refusal or compute error (`seq N: code: message`), or empty")
    stage: int = field_("this shard's stage index")
    units: list[int] = field_("[start, end) unit range")
    model: str = field_("timm model name")
    run: str = field_("deployment id")
    in_queue: int = field_("microbatches waiting for compute")
    out_queue: int = field_("messages waiting to be sent")
    uptime_s: float = field_("since `start`; 0 before", unit="s")
    cpu_s: float = field_("CPU time of the whole process since `start` (all threads; with "
                          "`compute_cpu_s`, what receiving and sending cost), less the forward "
                          "in progress: it grows by whole forwards, as `processed` does", unit="s")
    in_flight: int = field_("received and not yet through compute: received - processed - "
                            "compute_errors - bad_messages - forwarded_errors")
    backpressured: bool = field_("its output queue is full: it waits on its downstream")
    paused: bool = field_("held by `pause`")
    encoding: str = field_("the rung the next message goes out on (`raw` without `start.encodings`)",
                           default="raw")
    goodput_bps: float | None = field_("the link's smoothed goodput as the adaptive policy measures it "
                                       "(message bytes / send seconds); null without a ladder or before "
                                       "a measurement", unit="bytes/s", default=None)
    cache: dict[str, int] | None = field_(
        "a decoder stage's KV caches (docs/generate.md): `sequences` held, `cache_reserved_bytes` (their "
        "max_len x bytes per token), `cache_held_bytes` (the tokens they hold), `cache_budget_bytes`, "
        "`cache_refused` (steps refused `cache_full`), `cache_expired` (sequences dropped idle), "
        "`cache_released`; null for other models", default=None)


# ---------------------------------------------------------------- commands


@dataclass(frozen=True, kw_only=True)
class PingRequest(Request):
    """Liveness and state; the bootstrapper polls it until a shard is `loaded`."""

    CMD = WIRE_NAME = "ping"


@dataclass(frozen=True, kw_only=True)
class PingReply(Reply):
    WIRE_NAME = "ping"
    name: str = field_("the node's name")
    state: str = field_("idle | loading | loaded | running | failed")
    error: str | None = field_("why the last load failed (state `failed`), else null")
    run: str | None = field_("run id of the loaded shard, else null")
    data: str | None = field_("the shard's data PULL endpoint, else null")
    time: float = field_("the node's wall clock (Unix time), for trace clock offsets", unit="s")


@dataclass(frozen=True, kw_only=True)
class InfoRequest(Request):
    """What the node is and where it listens; the device facts a planner needs."""

    CMD = WIRE_NAME = "info"


@dataclass(frozen=True, kw_only=True)
class InfoReply(Reply):
    WIRE_NAME = "info"
    name: str = field_("the node's name")
    state: str = field_("as in `ping`")
    threads: int | None = field_("the node's `--threads` (torch threads for compute), null: torch's default")
    memory_limit_arg: int | None = field_("the node's `--memory-limit` in bytes, null: none", unit="bytes")
    device: DeviceFacts = field_("facts about the device (below)")
    control: str = field_("the control endpoint it bound")
    probe: str = field_("its probe server's endpoint (`netprobe.peer` of other nodes)")
    public_key: str | None = field_("Z85 public key of a secured node, null on a plaintext one")


@dataclass(frozen=True, kw_only=True)
class DescribeRequest(Request):
    """A model's unit chain as this node's edgezmq cuts it: unit count, names, each unit's input
    tensors, parameter bytes.  Nothing is loaded (shapes come from meta tensors)."""

    CMD = WIRE_NAME = "describe"
    model: str = field_("timm model name", max_len=MAX_NAME)
    granularity: str = field_(GRANULARITY_DOC, default="block", choices=GRANULARITIES)
    kwargs: dict[str, JSON] = field_(KWARGS_DOC, factory=dict,
                                     default_doc="{}")
    microbatch: int = field_("batch size of the input specs", default=1, lo=1, hi=MAX_MICROBATCH)

    def validate(self) -> None:
        _check_kwargs(self.kwargs, self.CMD)


@dataclass(frozen=True, kw_only=True)
class DescribeReply(Reply):
    WIRE_NAME = "describe"
    model: str = field_("timm model name")
    granularity: str = field_("as asked")
    microbatch: int = field_("as asked")
    n_units: int = field_("number of units: a `load.units` range lies in [0, n_units]")
    units: list[UnitDesc] = field_("one entry per unit, in chain order (below)")
    output: list[TensorSpec] = field_("what the last unit returns (the logits)")


@dataclass(frozen=True, kw_only=True)
class LoadRequest(Request):
    """Check a shard synchronously, bind its data PULL socket, then build it in the background."""

    CMD = WIRE_NAME = "load"
    run: str = field_("deployment id; data messages of other runs are refused (`wrong_run`)",
                      max_len=MAX_NAME)
    model: str = field_("timm model name", max_len=MAX_NAME)
    units: tuple[int, int] = field_("[start, end): the unit range of this shard (see `describe`)",
                                    lo=0, hi=MAX_UNITS)
    stage: int = field_("this shard's stage index: it accepts activations of stage - 1 (-1: the client)",
                        lo=0, hi=MAX_STAGES - 1)
    last: bool = field_("the last stage: sends `result` messages (to the client) instead of `act`")
    microbatch: int = field_("largest batch a data message may carry", lo=1, hi=MAX_MICROBATCH)
    granularity: str = field_(GRANULARITY_DOC, default="block", choices=GRANULARITIES)
    kwargs: dict[str, JSON] = field_(KWARGS_DOC,
                                     factory=dict, default_doc="{}")
    checkpoint: str | None = field_("a safetensors file's path ON THE NODE (only the shard's tensors are "
                                    "read); exactly one of checkpoint and pretrained", default=None,
                                    max_len=MAX_PATH)
    pretrained: bool = field_("timm's hub weights (the node needs a hub); exactly one of checkpoint "
                              "and pretrained", default=False)
    dtype: str = field_("compute dtype", default="float32", choices=("float32",))
    threads: int | None = field_("torch threads for compute", default=None, lo=1, hi=MAX_THREADS,
                                 default_doc="the node's `--threads`")
    bind: str | None = field_("data PULL address to bind", default=None, max_len=MAX_ADDRESS,
                              default_doc="the control host, any port")
    cache_bytes: int | None = field_(
        "a decoder's KV-cache budget on this stage (docs/generate.md): sequences are admitted while their "
        "reservations fit; at most what the node has left after the shard", default=None, lo=0, hi=MAX_BYTES,
        unit="bytes", default_doc="half of what the node has left after the shard")
    exact_generation: bool = field_(
        "a decoder's generation steps run every row on its own (batch 1), each sequence's arithmetic "
        "that of the model's `generate` bit for bit; otherwise the decode rows of a microbatch run as one "
        "left-padded batch (the model's own batched forward: the same tokens to rounding, faster)",
        default=False)
    generation_only: bool = field_(
        "a decoder's stage that serves `gen` steps only (docs/generate.md): the last stage's outgoing "
        "buffers are sized for each row's next-token logits (microbatch x vocabulary) instead of every "
        "position's, and a whole-sequence message is refused (`gen_state`)", default=False)
    cache_idle_s: float | None = field_(
        "a decoder's sequences are dropped when no step of their client's session has ended at the stage for this long (the client is gone)", default=None,
        lo=1, hi=MAX_SECONDS, unit="s", default_doc=f"{DEFAULT_CACHE_IDLE_S:g}")

    def validate(self) -> None:
        _check_kwargs(self.kwargs, self.CMD)
        if (self.checkpoint is None) == (not self.pretrained):
            raise SchemaError("load", "give exactly one of checkpoint (a safetensors path on the node) "
                              f"or pretrained: true, got checkpoint={self.checkpoint!r}, "
                              f"pretrained={self.pretrained}")


@dataclass(frozen=True, kw_only=True)
class LoadReply(Reply):
    WIRE_NAME = "load"
    state: str = field_("`loading` (a repeat of the same load: the node's state now)")
    data: str = field_("the data PULL endpoint the upstream (or the client) connects to")
    param_bytes: int = field_("bytes of the shard's parameters", unit="bytes")
    buffer_bytes: int = field_("bytes the load check counted for activation buffers: the microbatches in "
                               "flight each way (the stage's input and its output, at the microbatch)",
                               lo=0, hi=MAX_BYTES, unit="bytes", default=0)
    public_key: str | None = field_("as in `info`")


@dataclass(frozen=True, kw_only=True)
class StartRequest(Request):
    """Connect the data PUSH downstream and start the receive, compute and send threads."""

    CMD = WIRE_NAME = "start"
    connect: tuple[str, ...] = field_("downstream data endpoints: the next stage's replicas, or the "
                                      "client's results address (last stage)", max_len=MAX_CONNECT)
    server_keys: tuple[str, ...] | None = field_(
        "secured nodes (required there, refused elsewhere): the Z85 public key of each `connect` "
        "address", default=None, max_len=MAX_CONNECT)
    encodings: tuple[tuple[str, ...], ...] | None = field_(
        "the outgoing link's encodings (docs/compression.md): a ladder of rungs, largest first; a rung is "
        f"one encoding for every tensor or one per tensor sent (1..{wire.MAX_TENSORS}); one rung: that "
        "encoding always, several: the stage steps along them per microbatch as the link's goodput asks",
        default=None, max_len=MAX_RUNGS, choices=ENCODINGS, default_doc="null: raw")
    link_mbps: float | None = field_(
        "the outgoing link's rate as planned: the data socket's kernel send buffer is sized from it "
        "(docs/compression.md, \"Socket buffers\"), so that a send waits for a slow link",
        default=None, lo=0, hi=MAX_MBPS, lo_open=True, unit="Mbit/s", default_doc="null: the kernel's autotuning")

    def validate(self) -> None:
        if not self.connect:
            raise SchemaError("start.connect", "expected a non-empty list of addresses")
        if any(len(a) > MAX_ADDRESS for a in self.connect):
            raise SchemaError("start.connect", f"an address is longer than {MAX_ADDRESS} characters")
        for i, rung in enumerate(self.encodings or ()):
            if not 1 <= len(rung) <= wire.MAX_TENSORS:
                raise SchemaError(f"start.encodings[{i}]", f"expected 1..{wire.MAX_TENSORS} encodings, got {len(rung)}")
        if self.encodings is not None and not self.encodings:
            raise SchemaError("start.encodings", "expected at least one rung (or null: raw)")


@dataclass(frozen=True, kw_only=True)
class StartReply(Reply):
    WIRE_NAME = "start"
    state: str = field_("`running`")


@dataclass(frozen=True, kw_only=True)
class StatsRequest(Request):
    """Counters and times of the node and its stage (`edgezmq status`, heartbeats, calibration)."""

    CMD = WIRE_NAME = "stats"


@dataclass(frozen=True, kw_only=True)
class StatsReply(Reply):
    WIRE_NAME = "stats"
    name: str = field_("the node's name")
    state: str = field_("as in `ping`")
    error: str | None = field_("as in `ping`")
    rss: int = field_("resident memory of the node process", unit="bytes")
    peak_rss: int = field_("its peak", unit="bytes")
    requests: int = field_("control requests received")
    bad_requests: int = field_("control requests answered with an error")
    stage: StageStats | None = field_("the loaded shard's counters (below), null when none is loaded")


@dataclass(frozen=True, kw_only=True)
class ProfileRequest(Request):
    """Time each unit of a model on this node (a job), or answer from the node's profile cache."""

    CMD = WIRE_NAME = "profile"
    model: str = field_("timm model name", max_len=MAX_NAME)
    microbatch: int = field_("batch size to time each unit at", lo=1, hi=MAX_MICROBATCH)
    granularity: str = field_(GRANULARITY_DOC, default="block", choices=GRANULARITIES)
    kwargs: dict[str, JSON] = field_(KWARGS_DOC, factory=dict,
                                     default_doc="{}")
    threads: int | None = field_("torch threads", default=None, lo=1, hi=MAX_THREADS,
                                 default_doc="the node's `--threads`, else torch's")
    warmup: int = field_("untimed forwards per unit", default=1, lo=0, hi=100)
    reps: int = field_("timed rounds per unit; the median is reported", default=3, lo=1, hi=1000)
    reprofile: bool = field_("ignore the node's profile cache", default=False)
    context: int | None = field_("a decoder's decode step: time each unit on one new token per sequence "
                                 "against caches of this many tokens (docs/generate.md)", default=None, lo=1,
                                 hi=MAX_CONTEXT, default_doc="null: whole inputs, as served by `submit`")
    check: bool = field_("on a cache hit, time the profile's chain window again and rescale the "
                         "profile if the device has drifted (a job)", default=False)
    deadline: float = field_("the job fails when still running this long after it started (checked "
                             "before every timed forward)", default=PROFILE_DEADLINE_S, lo=0,
                             hi=MAX_JOB_SECONDS, lo_open=True, unit="s")

    def validate(self) -> None:
        _check_kwargs(self.kwargs, self.CMD)


@dataclass(frozen=True, kw_only=True)
class ProfileReply(Reply):
    WIRE_NAME = "profile"
    state: str = field_("`done` (a cache hit, `result` set) or `running` (poll `job`)")
    cached: bool = field_("the profile came from the node's cache")
    job: str | None = field_("the job's id when one was started, else null")
    result: JSONMap | None = field_("the profile on a plain cache hit (edgezmq/model/profiling.py), else null")


@dataclass(frozen=True, kw_only=True)
class NetprobeRequest(Request):
    """Measure this node's link to a peer's probe server: latency, bandwidth, CPU per byte (a job)."""

    CMD = WIRE_NAME = "netprobe"
    peer: str = field_("a probe endpoint tcp://HOST:PORT (another node's `info.probe`)", max_len=MAX_ADDRESS)
    peer_key: str | None = field_("secured nodes (required there): the peer's Z85 public key "
                                  "(`info.public_key`)", default=None, max_len=KEY_LEN)
    bytes_per_msg: int = field_("bulk message size", default=4 * MiB, lo=1, hi=NETPROBE_MAX_BYTES,
                                unit="bytes")
    seconds: float = field_("bulk transfer duration", default=1.0, lo=0, hi=NETPROBE_MAX_SECONDS,
                            lo_open=True, unit="s")
    pings: int = field_("round trips timed for the latency", default=20, lo=1, hi=MAX_PINGS)

    def validate(self) -> None:
        if not self.peer.startswith("tcp://"):
            raise SchemaError("netprobe.peer", f"expected tcp://HOST:PORT, got {self.peer!r}")


@dataclass(frozen=True, kw_only=True)
class NetprobeReply(Reply):
    WIRE_NAME = "netprobe"
    state: str = field_("`running`")
    job: str = field_("the job's id (poll `job`)")


@dataclass(frozen=True, kw_only=True)
class JobRequest(Request):
    """A job's progress, and at the end its result or its error."""

    CMD = WIRE_NAME = "job"
    id: str = field_("a job id returned by `profile` or `netprobe`", max_len=MAX_NAME)


@dataclass(frozen=True, kw_only=True)
class JobReply(Reply):
    WIRE_NAME = "job"
    id: str = field_("the job's id")
    kind: str = field_("profile | spot-check | netprobe")
    state: str = field_("running | done | failed | cancelled (a cancelled job is `running` until "
                        "it reaches its next check, within one timed forward or one probe message)")
    progress: list[JSON] = field_("profile: [units done, units, last unit's name, its time_s]; else []")
    result: JSONMap | None = field_("when done: the profile (edgezmq/model/profiling.py) or the link "
                                    "measurement (edgezmq/transport/netprobe.py)")
    error: str | None = field_("when failed: why, naming the node")


@dataclass(frozen=True, kw_only=True)
class CancelRequest(Request):
    """Stop a running job at its next check (a client that gave up: Ctrl-C, its own timeout)."""

    CMD = WIRE_NAME = "cancel"
    id: str = field_("a job id returned by `profile` or `netprobe`", max_len=MAX_NAME)


@dataclass(frozen=True, kw_only=True)
class PauseRequest(Request):
    """Hold the compute thread (maintenance); sockets stay up, state stays `running`."""

    CMD = WIRE_NAME = "pause"


@dataclass(frozen=True, kw_only=True)
class PauseReply(Reply):
    WIRE_NAME = "pause"
    name: str = field_("the node's name")
    state: str = field_("`running`")
    paused: bool = field_("true after `pause`, false after `resume`")


@dataclass(frozen=True, kw_only=True)
class ResumeRequest(Request):
    """Let a paused compute thread go on."""

    CMD = WIRE_NAME = "resume"


@dataclass(frozen=True, kw_only=True)
class UnloadRequest(Request):
    """Stop the stage (no drain), free the shard, go back to `idle`."""

    CMD = WIRE_NAME = "unload"


@dataclass(frozen=True, kw_only=True)
class StateReply(Reply):
    WIRE_NAME = "state"
    state: str = field_("the node's state after the command (`idle`; `shutting down`)")


@dataclass(frozen=True, kw_only=True)
class ShutdownRequest(Request):
    """Reply, then drain the stage (unless paused) and exit 0."""

    CMD = WIRE_NAME = "shutdown"


@dataclass(frozen=True)
class Command:
    """One command: its request, its reply, the client's default timeout and what a resend does."""

    request: type[Request]
    reply: type[Reply]
    timeout_s: float  # NodeClient's default; the node answers most commands in milliseconds
    resend: str  # what an identical request sent again gets (without a `rid`)

    @property
    def name(self) -> str:
        return self.request.CMD


COMMANDS: dict[str, Command] = {c.name: c for c in (
    Command(PingRequest, PingReply, 3.0, "the state now"),
    Command(InfoRequest, InfoReply, 5.0, "the facts now"),
    Command(DescribeRequest, DescribeReply, 60.0, "the same description (the first call of a model "
            "imports and traces it: seconds)"),
    Command(LoadRequest, LoadReply, 60.0, "the same endpoint and sizes, with the state now; a "
            "*different* load while loading/loaded/running is `bad_state`"),
    Command(StartRequest, StartReply, 3.0, "`running` when started with the same `connect` and "
            "`server_keys`; other addresses while running are `bad_state`"),
    Command(StatsRequest, StatsReply, 10.0, "the counters now"),
    Command(ProfileRequest, ProfileReply, 60.0, "the job already running for the same arguments; a "
            "cache hit again"),
    Command(NetprobeRequest, NetprobeReply, 5.0, "the job already running for the same arguments"),
    Command(JobRequest, JobReply, 5.0, "the job's state now"),
    Command(CancelRequest, JobReply, 5.0, "the job's state now (a job that already ended stays "
            "`done` or `failed`)"),
    Command(PauseRequest, PauseReply, 5.0, "`paused: true` (already paused)"),
    Command(ResumeRequest, PauseReply, 5.0, "`paused: false` (already going)"),
    Command(UnloadRequest, StateReply, 30.0, "`idle` (already idle)"),
    Command(ShutdownRequest, StateReply, 5.0, "`shutting down`"),
)}
