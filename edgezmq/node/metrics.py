"""Opt-in Prometheus endpoint of a node: its ``stats`` counters, queue depths, RSS and per-microbatch histograms.

    handle = serve_metrics(node, 9550)          # http://127.0.0.1:9550/metrics
    ...
    handle.stop()

Counters and gauges are read from ``node.cmd_stats`` at scrape time (nothing is
added to the data path).  The per-phase histograms come from the node's send thread,
which hands every microbatch's timestamp entry to ``node.observers``; a node without
that hook serves everything but the histograms.  A stage's counters restart at zero on
every deployment; Prometheus' ``rate()`` treats that as a counter reset.

Needs ``prometheus_client`` (``pip install 'edgezmq[metrics]'``); imported only here,
so the base install works without it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from edgezmq.errors import EdgezmqError

log = logging.getLogger(__name__)

PREFIX = "edgezmq"
DEFAULT_HOST = "127.0.0.1"
# per-microbatch phase durations on boards: sub-millisecond sends to tens of seconds of compute
BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
             10.0, 30.0, 60.0)
STATES = ("idle", "loading", "loaded", "running", "failed")
PHASE_COUNTERS = {"recv": "recv_s", "wait": "wait_s", "compute": "compute_s", "send": "send_s"}
ERROR_COUNTERS = {"bad_message": "bad_messages", "wrong_run": "wrong_run",
                  "compute": "compute_errors", "forwarded": "forwarded_errors"}
MICROBATCH_COUNTERS = {"received": "received", "processed": "processed", "sent": "sent"}
MIN_PROMETHEUS_CLIENT = "0.20"  # start_http_server returns (server, thread) so it can be stopped
INSTALL_HINT = f"Prometheus metrics need prometheus_client >= {MIN_PROMETHEUS_CLIENT}: pip install 'edgezmq[metrics]'"


class MetricsUnavailable(EdgezmqError, RuntimeError):
    """prometheus_client is not installed."""


def _prometheus():
    try:
        import prometheus_client
    except ImportError:
        raise MetricsUnavailable(INSTALL_HINT) from None
    return prometheus_client


class StatsCollector:
    """A prometheus_client collector over ``node.cmd_stats``."""

    def __init__(self, node: Any) -> None:
        self.node = node

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        from edgezmq.protocol.messages import StatsRequest

        s = self.node.cmd_stats(StatsRequest()).to_wire()
        st = s.get("stage") or {}
        name = str(s.get("name"))

        state = GaugeMetricFamily(f"{PREFIX}_node_state", "1 for the node's current state",
                                  labels=["node", "state"])
        for k in sorted({*STATES, s["state"]}):
            state.add_metric([name, k], 1.0 if k == s["state"] else 0.0)
        yield state
        yield GaugeMetricFamily(f"{PREFIX}_resident_memory_bytes", "resident set size of the node process",
                                value=s.get("rss", 0))
        yield GaugeMetricFamily(f"{PREFIX}_peak_resident_memory_bytes", "peak resident set size",
                                value=s.get("peak_rss", 0))
        yield CounterMetricFamily(f"{PREFIX}_control_requests", "control requests served",
                                  value=s.get("requests", 0))
        yield CounterMetricFamily(f"{PREFIX}_control_errors", "control requests answered with an error",
                                  value=s.get("bad_requests", 0))
        if not st:
            return
        info = GaugeMetricFamily(f"{PREFIX}_stage_info", "the loaded shard (value 1)",
                                 labels=["run", "model", "stage", "units"])
        info.add_metric([str(st.get("run")), str(st.get("model")), str(st.get("stage")),
                         "{}-{}".format(*st.get("units", ("?", "?")))], 1.0)
        yield info
        mb = CounterMetricFamily(f"{PREFIX}_microbatches", "microbatches through this stage",
                                 labels=["event"])
        for label, key in MICROBATCH_COUNTERS.items():
            mb.add_metric([label], st.get(key, 0))
        yield mb
        yield CounterMetricFamily(f"{PREFIX}_samples_processed", "samples computed by this stage",
                                  value=st.get("samples", 0))
        phase = CounterMetricFamily(
            f"{PREFIX}_phase_seconds", "seconds each data thread spent per phase: recv (decode + "
            "validate), wait (compute idle), compute, send (incl. back-pressure)", labels=["phase"])
        for label, key in PHASE_COUNTERS.items():
            phase.add_metric([label], st.get(key, 0.0))
        yield phase
        errors = CounterMetricFamily(f"{PREFIX}_errors", "microbatches answered with an error",
                                     labels=["kind"])
        for label, key in ERROR_COUNTERS.items():
            errors.add_metric([label], st.get(key, 0))
        yield errors
        yield CounterMetricFamily(f"{PREFIX}_send_retries", "sends retried (downstream full or away)",
                                  value=st.get("send_retries", 0))
        if "bytes_in" in st:
            yield CounterMetricFamily(f"{PREFIX}_received_bytes", "data-plane bytes received",
                                      value=st["bytes_in"])
            yield CounterMetricFamily(f"{PREFIX}_sent_bytes", "data-plane bytes sent",
                                      value=st.get("bytes_out", 0))
        q = GaugeMetricFamily(f"{PREFIX}_queue_depth", "microbatches waiting between data threads",
                              labels=["queue"])
        q.add_metric(["in"], st.get("in_queue", 0))
        q.add_metric(["out"], st.get("out_queue", 0))
        yield q
        yield GaugeMetricFamily(f"{PREFIX}_stage_uptime_seconds", "seconds since the stage started",
                                value=st.get("uptime_s", 0.0))


class PhaseObserver:
    """Turns a sent microbatch's ``[stage, t_recv, t_start, t_end, t_send]`` into histogram samples."""

    def __init__(self, histogram: Any) -> None:
        self.h = histogram

    def __call__(self, entry: list, send_s: float) -> None:
        _, t_recv, t_start, t_end, t_send = entry[:5]
        for phase, dt in (("queued_in", t_start - t_recv), ("compute", t_end - t_start),
                          ("queued_out", t_send - t_end), ("send", send_s),
                          ("total", t_send + send_s - t_recv)):
            self.h.labels(phase).observe(max(dt, 0.0))


@dataclass
class MetricsHandle:
    """A running endpoint: ``url``, ``port``; ``stop()`` shuts it down and unhooks the node."""

    node: Any
    server: Any
    thread: Any
    observer: PhaseObserver | None
    host: str
    port: int

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def stop(self) -> None:
        if self.observer is not None and self.observer in getattr(self.node, "observers", []):
            self.node.observers.remove(self.observer)
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5.0)


def build_registry(node: Any) -> tuple[Any, PhaseObserver | None]:
    """A registry of this node's metrics (plus process CPU/memory/fds), and its histogram observer."""
    pc = _prometheus()
    reg = pc.CollectorRegistry(auto_describe=True)
    reg.register(StatsCollector(node))
    pc.ProcessCollector(registry=reg)
    observer = None
    if isinstance(getattr(node, "observers", None), list):
        h = pc.Histogram(f"{PREFIX}_microbatch_phase_seconds",
                         "per microbatch: queued_in (received -> compute), compute, queued_out "
                         "(compute -> send thread), send (incl. back-pressure), total",
                         ["phase"], buckets=BUCKETS_S, registry=reg)
        observer = PhaseObserver(h)
    return reg, observer


def serve_metrics(node: Any, port: int, host: str = DEFAULT_HOST) -> MetricsHandle:
    """Serve ``node``'s metrics over HTTP on ``host:port`` (port 0: any free port)."""
    pc = _prometheus()
    reg, observer = build_registry(node)
    try:
        started = pc.start_http_server(port, addr=host, registry=reg)
    except OSError as e:
        raise OSError(e.errno, f"metrics: cannot listen on {host}:{port} ({e.strerror})") from None
    if not isinstance(started, tuple):  # older prometheus_client: a server we could never stop
        raise MetricsUnavailable(INSTALL_HINT)
    server, thread = started
    if observer is not None:
        node.observers.append(observer)
    handle = MetricsHandle(node=node, server=server, thread=thread, observer=observer, host=host,
                           port=int(server.server_port))
    log.info("metrics of node %s on %s", getattr(node, "name", "?"), handle.url)
    return handle
