"""The client's stream loop against raw sockets standing in for the pipeline's two ends."""

from __future__ import annotations

import threading

import numpy as np
import zmq

from edgezmq.client import Client
from edgezmq.protocol import wire
from edgezmq.transport import sockets

WAIT_MS = 120_000  # generous: CI machines are shared and slow


def test_results_are_taken_while_stage_0_cannot_take_the_next_microbatch():
    """A window larger than the pipeline's buffers: the client cannot hand stage 0 the next
    microbatch, yet every result that comes back is taken (and timestamped) at once. A loop
    that waited in the send saw no result until stage 0 took more, which here is never."""
    answered = 3
    x = np.zeros((1, 1, 1024, 1024), np.float32)  # 4 MB: the sockets' buffers hold a few, not 32
    with zmq.Context() as ctx:
        entry = ctx.socket(zmq.PULL)
        entry.setsockopt(zmq.RCVHWM, 1)
        port = entry.bind_to_random_port("tcp://127.0.0.1")
        with Client([f"tcp://127.0.0.1:{port}"], "tcp://127.0.0.1:0", run="r1", window=32, timeout=WAIT_MS / 1000,
                    ctx=ctx) as c:
            sink = ctx.socket(zmq.PUSH)
            sink.connect(c.results_endpoint)
            taken: list[int] = []

            def stage() -> None:  # takes `answered` microbatches, answers them, then takes nothing
                for _ in range(answered):
                    frames = sockets.recv_frames(entry, WAIT_MS)
                    assert frames is not None
                    m = wire.decode(frames)
                    taken.append(m.seq)
                    sockets.send_message(sink, wire.Message("result", m.run, m.seq, 0, [np.ones((1, 10), np.float32)],
                                                            t=m.t, session=m.session))

            th = threading.Thread(target=stage, daemon=True)
            th.start()
            it = c.stream(x for _ in range(64))
            got = [next(it) for _ in range(answered)]
            it.close()
            th.join(WAIT_MS / 1000)
            sink.close(linger=0)
        entry.close(linger=0)
    assert taken == [0, 1, 2] and all(np.array_equal(y, np.ones((1, 10), np.float32)) for y in got)
    assert sorted(c.timestamps) == [0, 1, 2]  # each taken as it came: its receive time kept
