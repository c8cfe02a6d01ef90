"""Tests for edgezmq.transport.netprobe: loopback bandwidth and latency, clear failures, a server that survives."""

from __future__ import annotations

import threading
import time

import pytest
import zmq

from edgezmq.transport import netprobe as N

MiB = 1024 * 1024
TIMEOUT_S = 1.0  # every probe in these tests gives up after this long
SLACK_S = 2.0  # scheduling slack on a loaded 2-core machine


@pytest.fixture
def server(ctx):
    srv = N.ProbeServer("127.0.0.1", ctx=ctx).start()
    yield srv
    srv.stop()


def test_loopback_count(server, ctx):
    r = N.probe(server.endpoint, bytes_per_msg=MiB, count=10, pings=5, timeout=TIMEOUT_S, ctx=ctx)
    assert r["bandwidth_mbps"] > 0 and r["latency_ms"] > 0
    assert r["bandwidth_bytes_per_s"] == pytest.approx(r["bandwidth_mbps"] * 1e6 / 8)
    assert r["messages"] == 10 and r["bytes"] == 10 * MiB and r["pings"] == 5
    assert r["latency_ms"] == pytest.approx(r["rtt_ms_p50"] / 2)
    assert 0 < r["rtt_ms_min"] <= r["rtt_ms_p50"] <= r["rtt_ms_p90"]
    st = server.stats()
    # one uncounted ping and one small uncounted bulk message (sizing) warm the connection up
    assert st["pings"] == 6 and st["messages"] == 11 and st["bytes"] == 10 * MiB + N.SIZING_BYTES
    assert st["bad"] == 0 and st["dropped"] == 0


def test_cpu_cost_of_moving_bytes_is_measured(server, ctx, socks):
    r = N.probe(server.endpoint, bytes_per_msg=MiB, count=10, pings=1, timeout=TIMEOUT_S, ctx=ctx)
    # both ends live in this process here, so each reads the same clock; a real pair does not.
    # Moving 10 MiB over loopback costs CPU, but far less than a second per MB
    for key in ("sender_cpu_s_per_byte", "receiver_cpu_s_per_byte"):
        assert 0 < r[key] < 1e-6, (key, r[key])
    d = socks(zmq.DEALER)
    d.connect(server.endpoint)
    d.send_multipart([N.CPU, N._U64.pack(7)])
    tag, seq, seconds = d.recv_multipart()
    assert tag == N.CPU and seq == N._U64.pack(7) and N._F64.unpack(seconds)[0] > 0
    d.send_multipart([N.CPU])  # no sequence number: refused, counted
    assert d.recv_multipart()[0] == N.ERR and server.stats()["bad"] == 1


def test_loopback_seconds_default_size(server, ctx):
    r = N.probe(server.endpoint, seconds=0.2, pings=3, timeout=TIMEOUT_S, ctx=ctx)
    assert r["bytes_per_msg"] == N.DEFAULT_MSG_BYTES == 4 * MiB
    assert r["messages"] >= N.MIN_BULK_MESSAGES and r["bytes"] == r["messages"] * 4 * MiB
    assert r["seconds"] >= 0.2 and r["bandwidth_mbps"] > 0


def test_own_context_and_context_manager():
    with N.ProbeServer() as srv:
        r = N.probe(srv.endpoint, bytes_per_msg=64 * 1024, count=4, pings=2, timeout=TIMEOUT_S, window=1)
    assert r["messages"] == 4 and r["window"] == 1


def test_several_probers_share_a_server(server, ctx):
    results = [N.probe(server.endpoint, bytes_per_msg=MiB, count=3, pings=2, timeout=TIMEOUT_S, ctx=ctx)
               for _ in range(3)]
    assert all(r["messages"] == 3 for r in results)


def test_probe_many_runs_at_once_and_aggregates(ctx):
    servers = [N.ProbeServer("127.0.0.1", ctx=ctx).start() for _ in range(3)]
    try:
        eps = [s.endpoint for s in servers]
        results = N.probe_many(eps, bytes_per_msg=64 * 1024, count=6, pings=2, timeout=TIMEOUT_S)
    finally:
        for s in servers:
            s.stop()
    assert [r["endpoint"] for r in results] == eps and all(r["messages"] == 6 for r in results)
    for r in results:
        assert r["bulk_ended_at"] - r["bulk_started_at"] == pytest.approx(r["seconds"], abs=1e-6)  # wall-clock floats
    together = N.aggregate(results)
    assert together["flows"] == 3 and together["bytes"] == 3 * 6 * 64 * 1024
    # wall-clock stamps near 1.7e9 s carry ~2e-7 s of rounding
    assert together["seconds"] >= max(r["seconds"] for r in results) - 1e-6 and 0 <= together["overlap"] <= 1


def test_aggregate_of_flows_in_step_and_out_of_step():
    def flow(start, end, nbytes):
        return {"bulk_started_at": start, "bulk_ended_at": end, "bytes": nbytes,
                "bandwidth_mbps": nbytes * 8 / (end - start) / 1e6}

    inline = N.aggregate([flow(10.0, 12.0, 500_000), flow(10.0, 12.0, 250_000)])
    assert inline["bandwidth_mbps"] == pytest.approx(3.0) == pytest.approx(inline["sum_of_rates_mbps"])
    assert inline["overlap"] == 1.0 and inline["seconds"] == 2.0
    # one after the other: together they moved 750 kB in 4 s; the sum of rates overstates
    apart = N.aggregate([flow(10.0, 12.0, 500_000), flow(12.0, 14.0, 250_000)])
    assert apart["bandwidth_mbps"] == pytest.approx(1.5) and apart["sum_of_rates_mbps"] == pytest.approx(3.0)
    assert apart["overlap"] == 0.0
    with pytest.raises(ValueError, match="no bulk_started_at"):
        N.aggregate([{"endpoint": "tcp://x:1", "bytes": 1, "bandwidth_mbps": 1.0}])


def test_probe_many_raises_the_real_failure_and_the_others_stop_waiting(server, socks):
    s = socks(zmq.ROUTER)
    port = s.bind_to_random_port("tcp://127.0.0.1")
    s.close(linger=0)
    dead = f"tcp://127.0.0.1:{port}"
    with pytest.raises(TimeoutError, match=dead):
        N.probe_many([server.endpoint, dead], bytes_per_msg=64 * 1024, count=3, pings=1, timeout=0.3)
    # the good probe warmed up, then gave up waiting at the line-up for the dead one (it did
    # not run its timed phase alone): what is raised is the dead one's timeout
    assert server.stats()["messages"] == 1


def test_dead_endpoint_fails_within_timeout(socks):
    s = socks(zmq.ROUTER)
    port = s.bind_to_random_port("tcp://127.0.0.1")
    s.close(linger=0)  # nothing listens on that port any more
    endpoint = f"tcp://127.0.0.1:{port}"
    t = time.monotonic()
    with pytest.raises(TimeoutError, match=endpoint):
        N.probe(endpoint, count=2, timeout=0.3)
    assert time.monotonic() - t < 0.3 + SLACK_S


def test_silent_peer_fails_within_timeout(socks):
    silent = socks(zmq.ROUTER)  # accepts the connection, never answers
    port = silent.bind_to_random_port("tcp://127.0.0.1")
    endpoint = f"tcp://127.0.0.1:{port}"
    t = time.monotonic()
    with pytest.raises(TimeoutError, match=f"no reply from {endpoint}"):
        N.probe(endpoint, count=2, timeout=0.3)
    assert time.monotonic() - t < 0.3 + SLACK_S


def test_stopped_server_is_a_timeout(ctx):
    srv = N.ProbeServer(ctx=ctx).start()
    endpoint = srv.endpoint
    srv.stop()
    with pytest.raises(TimeoutError, match=endpoint):
        N.probe(endpoint, count=2, timeout=0.3, ctx=ctx)


def test_server_stopped_mid_run_is_a_timeout(ctx):
    srv = N.ProbeServer(ctx=ctx).start()
    stopper = threading.Timer(0.3, srv.stop)
    stopper.start()
    t = time.monotonic()
    try:
        with pytest.raises(TimeoutError, match=srv.endpoint):
            N.probe(srv.endpoint, bytes_per_msg=MiB, seconds=30, pings=1, timeout=0.3, ctx=ctx)
    finally:
        stopper.join()
    assert time.monotonic() - t < 0.6 + SLACK_S


def test_bad_messages_are_refused_and_the_server_survives(server, socks, ctx):
    d = socks(zmq.DEALER)
    d.connect(server.endpoint)
    d.send_multipart([b"hello", b"world", b"!"])
    reply = d.recv_multipart()  # RCVTIMEO bounds it
    assert reply[0] == N.ERR and b"not a netprobe message" in reply[1]
    d.send_multipart([b"x" * 100])
    assert d.recv_multipart()[0] == N.ERR
    assert server.stats()["bad"] == 2
    r = N.probe(server.endpoint, bytes_per_msg=MiB, count=2, pings=1, timeout=TIMEOUT_S, ctx=ctx)
    assert r["messages"] == 2


def test_wrong_socket_type_is_a_timeout(socks):
    pull = socks(zmq.PULL)  # a data socket: ZMTP refuses a DEALER, so no connection ever forms
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    with pytest.raises(TimeoutError, match=str(port)):
        N.probe(f"tcp://127.0.0.1:{port}", count=2, timeout=0.3)


@pytest.mark.parametrize("bad, match", [
    ({"bytes_per_msg": 0}, "bytes_per_msg"), ({"bytes_per_msg": N.MAX_MSG_BYTES + 1}, "bytes_per_msg"),
    ({"count": 1}, "count"), ({"seconds": 0}, "seconds"), ({"pings": 0}, "pings"),
    ({"timeout": 0}, "timeout"), ({"window": N.MAX_WINDOW + 1}, "window"),
])
def test_bad_arguments(bad, match):
    with pytest.raises(ValueError, match=match):
        N.probe("tcp://127.0.0.1:1", **bad)


def test_bad_endpoint_is_a_value_error():
    with pytest.raises(ValueError, match="nowhere"):
        N.probe("nowhere", count=2, timeout=0.3)


def test_server_bind_failure_is_reported(server, ctx):
    port = server.endpoint.rsplit(":", 1)[1]
    with pytest.raises(OSError, match=port):
        N.ProbeServer("127.0.0.1", port=int(port), ctx=ctx).start()


def test_start_twice_and_stop_twice(ctx):
    srv = N.ProbeServer(ctx=ctx).start()
    with pytest.raises(RuntimeError, match="already started"):
        srv.start()
    srv.stop()
    srv.stop()
