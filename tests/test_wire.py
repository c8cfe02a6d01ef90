"""wire.py: round trips, zero-copy, and every kind of malformed message."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
import zmq

from edgezmq.protocol import wire
from edgezmq.transport import sockets


def msg(*tensors, **kw):
    base = dict(kind="act", run="r1", seq=7, stage=0, tensors=list(tensors))
    base.update(kw)
    return wire.Message(**base)


def frames_of(m):
    return [bytes(memoryview(f)) if not isinstance(f, bytes) else f for f in wire.encode(m)]


def test_round_trip_preserves_everything():
    a = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    b = np.ones((2, 5), dtype=np.int64)
    m = msg(a, b, t=[[0, 1.5, 2.0, 3.0, 4.0]])
    out = wire.decode(frames_of(m))
    assert (out.kind, out.run, out.seq, out.stage) == ("act", "r1", 7, 0)
    assert out.t == [[0, 1.5, 2.0, 3.0, 4.0]]
    np.testing.assert_array_equal(out.tensors[0], a)
    np.testing.assert_array_equal(out.tensors[1], b)
    assert out.tensors[0].dtype == np.float32 and out.tensors[1].dtype == np.int64


def test_error_message_round_trip():
    e = wire.error_message("r1", 3, 2, "bad_shape", "expected (B, 197, 384)")
    out = wire.decode(frames_of(e))
    assert out.kind == "error" and out.seq == 3 and out.error == {"code": "bad_shape", "message": "expected (B, 197, 384)"}


def test_large_buffers_are_not_copied_on_encode():
    big = np.zeros((8, 197, 384), dtype=np.float32)  # 2.4 MB
    small = np.zeros(16, dtype=np.float32)
    frames = wire.encode(msg(big, small))
    assert frames[1] is big  # handed to zmq as-is (zero-copy send)
    assert wire.copy_flags(frames) == [True, False, True]


def test_receive_is_zero_copy(socks):
    pull, push = socks(zmq.PULL), socks(zmq.PUSH)
    ep = sockets.bind(pull, "tcp://127.0.0.1:0")
    push.connect(ep)
    x = np.random.default_rng(0).standard_normal((8, 197, 384), dtype=np.float32)
    sockets.send_message(push, msg(x))
    frames = sockets.recv_frames(pull, 10_000)
    assert frames is not None
    out = wire.decode(frames)
    frame_mem = np.frombuffer(frames[1].buffer, dtype=np.uint8)
    assert np.shares_memory(out.tensors[0], frame_mem)  # a view on the frame, no copy
    np.testing.assert_array_equal(out.tensors[0], x)


def test_encode_refuses_non_contiguous_and_bad_types():
    a = np.zeros((4, 4), dtype=np.float32)
    with pytest.raises(ValueError, match="C-contiguous"):
        wire.encode(msg(a.T))
    with pytest.raises(TypeError, match="dtype"):
        wire.encode(msg(np.array(["a"], dtype=object)))
    with pytest.raises(TypeError, match="numpy"):
        wire.encode(msg([1, 2, 3]))
    with pytest.raises(ValueError, match="kind"):
        wire.encode(msg(a, kind="nope"))


def header(**over):
    h = {"v": 1, "kind": "act", "run": "r", "seq": 1, "stage": 0,
         "tensors": [{"dtype": "float32", "shape": [2, 2], "enc": "raw"}], "t": []}
    h.update(over)
    return msgpack.packb(h)


GOOD_BUF = np.zeros((2, 2), dtype=np.float32).tobytes()


@pytest.mark.parametrize(
    "frames, code",
    [
        ([], "missing_frames"),
        ([b"\xc1\xff garbage"], "bad_header"),
        ([msgpack.packb([1, 2, 3])], "bad_header"),
        ([header(v=2), GOOD_BUF], "bad_version"),
        ([header(v="1"), GOOD_BUF], "bad_version"),
        ([header(kind="pickle"), GOOD_BUF], "bad_kind"),
        ([header(run=5), GOOD_BUF], "bad_field"),
        ([header(seq="x"), GOOD_BUF], "bad_field"),
        ([header(seq=-5), GOOD_BUF], "bad_field"),
        ([header(stage=True), GOOD_BUF], "bad_field"),
        ([header(tensors=[{"dtype": "object", "shape": [2, 2]}]), GOOD_BUF], "bad_dtype"),
        ([header(tensors=[{"dtype": "float32", "shape": [2, -2]}]), GOOD_BUF], "bad_shape"),
        ([header(tensors=[{"dtype": "float32", "shape": "2x2"}]), GOOD_BUF], "bad_shape"),
        ([header(tensors=[{"dtype": "float32", "shape": [2, 2], "enc": "pickle"}]), GOOD_BUF], "bad_encoding"),
        ([header(tensors=[{"dtype": "float32", "shape": [1 << 20, 1 << 20]}]), GOOD_BUF], "oversize"),
        ([header(tensors=[{"dtype": "float32", "shape": [2, 3]}]), GOOD_BUF], "bad_length"),
        ([header(), GOOD_BUF[:-1]], "bad_length"),
        ([header()], "missing_frames"),
        ([header(), GOOD_BUF, GOOD_BUF], "extra_frames"),
        ([header(kind="error"), GOOD_BUF], "bad_field"),
        ([header(t="later"), GOOD_BUF], "bad_field"),
        ([b"\x00" * (wire.MAX_HEADER_BYTES + 1)], "oversize"),
        ([msgpack.packb({"v": 1, "blob": b"x" * 10}), GOOD_BUF], "bad_header"),
    ],
)
def test_malformed_messages_raise_wire_error_only(frames, code):
    with pytest.raises(wire.WireError) as ei:
        wire.decode(frames)
    assert ei.value.code == code
    assert isinstance(ei.value, ValueError)


def test_wire_error_keeps_seq_when_header_readable():
    with pytest.raises(wire.WireError) as ei:
        wire.decode([header(seq=41), GOOD_BUF[:3]])
    assert ei.value.seq == 41


def test_random_garbage_never_raises_anything_but_wire_error():
    rng = np.random.default_rng(1)
    good = frames_of(msg(np.ones((2, 3), dtype=np.float32)))
    for _i in range(3000):
        frames = [bytearray(f) for f in good]
        k = rng.integers(0, 4)
        if k == 0:  # flip bytes in the header
            for _ in range(rng.integers(1, 6)):
                j = rng.integers(0, len(frames[0]))
                frames[0][j] = rng.integers(0, 256)
        elif k == 1:  # truncate something
            f = rng.integers(0, len(frames))
            frames[f] = frames[f][: rng.integers(0, len(frames[f]) + 1)]
        elif k == 2:  # random bytes
            frames = [bytes(rng.integers(0, 256, rng.integers(0, 64), dtype=np.uint8))]
        else:  # drop or add frames
            frames = frames[: rng.integers(0, 3)] + [b"x"] * int(rng.integers(0, 2))
        try:
            wire.decode([bytes(f) for f in frames])
        except wire.WireError:
            pass


def test_check_tensors():
    exp = [((8, 197, 384), "float32")]
    wire.check_tensors([np.zeros((8, 197, 384), np.float32)], exp)
    wire.check_tensors([np.zeros((3, 197, 384), np.float32)], exp)  # short last batch
    with pytest.raises(wire.WireError, match="expected 1 tensors"):
        wire.check_tensors([], exp)
    with pytest.raises(wire.WireError, match="float32"):
        wire.check_tensors([np.zeros((8, 197, 384), np.float64)], exp)
    with pytest.raises(wire.WireError, match="197, 384"):
        wire.check_tensors([np.zeros((8, 196, 384), np.float32)], exp)
    with pytest.raises(wire.WireError, match="batch 9 outside 1..8"):
        wire.check_tensors([np.zeros((9, 197, 384), np.float32)], exp)
    with pytest.raises(wire.WireError, match="batch 0"):
        wire.check_tensors([np.zeros((0, 197, 384), np.float32)], exp)
