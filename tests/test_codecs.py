"""codecs.py and its place in wire.py: round trips, error bounds, NaN/Inf policy, byte layouts, hostile frames."""

from __future__ import annotations

import math

import msgpack
import numpy as np
import pytest

from edgezmq.protocol import codecs, wire

SHAPES = [(2, 17, 192), (1,), (3, 5), (4, 1), (7,), (2, 3, 4, 5), (2, 0, 3), (0,)]
LOSSY_INT = [n for n in codecs.NAMES if codecs.CODECS[n].enc in codecs.QUANTIZED]


def rand(shape, seed=0, scale=3.0):
    return (np.random.default_rng(seed).standard_normal(shape, dtype=np.float32) * scale).astype(np.float32)


def frames_of(m, encoded=()):
    return [bytes(memoryview(f)) if not isinstance(f, bytes) else f for f in wire.encode(m, encoded)]


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("name", codecs.NAMES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_round_trip_keeps_shape_and_dtype_and_sizes(name, shape):
    a = rand(shape)
    e = codecs.encode(name, a)
    assert e.nbytes == codecs.encoded_nbytes(name, shape)  # the size the planner is told is the size sent
    b = codecs.decode(e.spec(), e.buffers)
    assert b.shape == a.shape and b.dtype == np.float32
    assert np.array_equal(codecs.roundtrip(name, a), b)


def test_raw_is_the_array_itself_and_any_dtype():
    a = np.arange(6, dtype=np.int64).reshape(2, 3)
    e = codecs.encode("raw", a)
    assert e.buffers[0] is a and e.spec() == {"dtype": "int64", "shape": [2, 3], "enc": "raw"}
    assert np.array_equal(codecs.roundtrip("raw", a), a)


def test_f16_is_exact_for_every_representable_value():
    bits = np.arange(1 << 16, dtype=np.uint16)
    h = bits.view(np.float16)
    a = h[np.isfinite(h)].astype(np.float32)
    assert np.array_equal(codecs.roundtrip("f16", a), a)


def test_bf16_is_exact_for_every_representable_value():
    bits = np.arange(1 << 16, dtype=np.uint32) << 16
    a = bits.view(np.float32)
    a = a[np.isfinite(a)]
    assert np.array_equal(codecs.roundtrip("bf16", a).view(np.uint32), a.view(np.uint32))


def test_bf16_rounds_like_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    edge = np.array([0.0, -0.0, 1.0, 1.00390625, 1.01171875, 1.0 + 2**-8, 1.0 + 3 * 2**-8, 3.4028235e38,
                     -3.4028235e38, 1e-40, -1e-45, np.inf, -np.inf, 65504, 1e30], np.float32)
    a = np.concatenate([edge, rng.standard_normal(10000, dtype=np.float32) * 100,
                        rng.integers(0, 2**32, 10000, dtype=np.uint64).astype(np.uint32).view(np.float32)])
    a = a[~np.isnan(a)]
    ours = codecs.roundtrip("bf16", a)
    theirs = torch.from_numpy(a).bfloat16().float().numpy()
    assert np.array_equal(ours.view(np.uint32), theirs.view(np.uint32))


def test_half_precision_nan_inf_policy():
    a = np.array([np.nan, np.inf, -np.inf, 70000.0, -70000.0, 65504.0, 1.0], np.float32)
    f = codecs.roundtrip("f16", a)
    assert np.isnan(f[0]) and f[1] == np.inf and f[2] == -np.inf
    assert f[3] == np.inf and f[4] == -np.inf  # f16 overflow -> inf (documented)
    assert f[5] == 65504.0 and f[6] == 1.0
    b = codecs.roundtrip("bf16", a)
    assert np.isnan(b[0]) and b[1] == np.inf and b[2] == -np.inf
    assert b[3] == 70144.0 and b[6] == 1.0  # bf16 keeps float32's range: rounded, not inf


@pytest.mark.parametrize("name", LOSSY_INT)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_integer_codecs_refuse_non_finite_input(name, bad):
    a = rand((2, 4, 8))
    a[1, 2, 3] = bad
    with pytest.raises(codecs.CodecError) as ei:
        codecs.encode(name, a)
    assert ei.value.code == "non_finite"


@pytest.mark.parametrize("name", ["int8", "int8-ch", "int4", "int4-ch"])
@pytest.mark.parametrize("shape", [(2, 17, 192), (3, 5), (1, 1), (5,)], ids=str)
@pytest.mark.parametrize("scale", [1e-30, 1.0, 1e30])
def test_integer_error_is_within_half_a_step(name, shape, scale):
    """Without clipping every element is within scale/2 of its value, scale = max|x| of its group / qmax."""
    c = codecs.CODECS[name]
    a = rand(shape, seed=len(shape), scale=scale)
    b = codecs.roundtrip(name, a)
    rows = a.reshape(-1, shape[-1])
    amax = np.abs(rows).max(axis=1 if c.scale == "token" else 0)
    step = (amax / codecs.QMAX[c.enc]).astype(np.float64)
    step = step[:, None] if c.scale == "token" else step[None, :]
    err = np.abs(rows.astype(np.float64) - b.reshape(rows.shape))
    assert (err <= step * (0.5 + 1e-5) + 1e-45).all()
    # relative to each group's largest value: 1/(2*127) for int8, 1/(2*7) for int4
    assert (err <= (np.abs(rows).max(axis=1 if c.scale == "token" else 0, keepdims=True)
                    * (0.5 / codecs.QMAX[c.enc]) * (1 + 1e-5) + 1e-45)).all()


def test_integer_extremes_and_zeros():
    big = np.array([[3.4028235e38, -3.4028235e38, 1.0], [0.0, 0.0, 0.0]], np.float32)
    b = codecs.roundtrip("int8", big)
    assert np.isfinite(b).all() and b[0, 0] == pytest.approx(3.4028235e38, rel=1e-6) and (b[1] == 0).all()
    e = codecs.encode("int4", np.zeros((3, 4), np.float32))
    assert (e.buffers[1] == 0).all() and (codecs.decode(e.spec(), e.buffers) == 0).all()


def test_aciq_clips_heavy_tails_and_lowers_the_error_at_4_bits():
    a = np.random.default_rng(5).laplace(0, 1, (64, 768)).astype(np.float32)  # the distribution ACIQ assumes
    mse = {n: float(np.mean((codecs.roundtrip(n, a) - a) ** 2)) for n in ("int4", "int4-aciq")}
    assert mse["int4-aciq"] < 0.75 * mse["int4"]
    e = codecs.encode("int4-aciq", a)
    b = np.abs(a).mean(axis=1)
    assert (e.buffers[1] <= codecs.ACIQ_ALPHA[4] * b / 7 * (1 + 1e-5)).all()  # the clip bounds every scale
    assert (e.buffers[1] < np.abs(a).max(axis=1) / 7).any()  # ... and clips


def test_aciq_never_zeroes_a_constant_row():
    a = np.full((2, 16), 5.0, np.float32)
    assert np.allclose(codecs.roundtrip("int8-aciq", a), 5.0)
    assert np.allclose(codecs.roundtrip("int4-aciq", a), 5.0)


def test_ratio_and_sizes():
    shape = (8, 197, 768)
    n = math.prod(shape)
    assert codecs.encoded_nbytes("raw", shape) == 4 * n
    assert codecs.encoded_nbytes("f16", shape) == 2 * n
    assert codecs.encoded_nbytes("int8", shape) == n + 4 * 8 * 197
    assert codecs.encoded_nbytes("int4-ch", shape) == n // 2 + 4 * 768
    assert codecs.encoded_nbytes("int4", (3,)) == 2 + 4
    assert codecs.ratio("raw", shape) == 1.0 and codecs.ratio("f16", (0,)) == 1.0
    with pytest.raises(ValueError, match="unknown encoding 'int3'"):
        codecs.encoded_nbytes("int3", shape)


def test_encode_refuses_what_no_codec_takes():
    with pytest.raises(TypeError, match="float32"):
        codecs.encode("f16", np.zeros(3, np.float64))
    with pytest.raises(ValueError, match="at least one dimension"):
        codecs.encode("int8", np.array(1.0, np.float32))
    with pytest.raises(ValueError, match="unknown encoding"):
        codecs.encode("zstd", np.zeros(3, np.float32))


def test_measure_cost():
    c = codecs.measure_cost("int8", shape=(2, 17, 192), reps=2)
    assert c.encode_s_per_mb > 0 and c.decode_s_per_mb > 0 and c.ratio == codecs.ratio("int8", (2, 17, 192))
    assert set(c.to_dict()) == {"name", "encode_s_per_mb", "decode_s_per_mb", "ratio", "shape"}
    with pytest.raises(ValueError, match="reps"):
        codecs.measure_cost("int8", reps=0)


# ---------------------------------------------------------------- byte layouts (docs/wire.md)


def test_int4_layout_byte_for_byte():
    a = np.array([1, -1, 7, -7, 3], np.float32)  # max 7 -> scale 1: values as they are
    e = codecs.encode("int4", a)
    assert e.spec() == {"dtype": "float32", "shape": [5], "enc": "int4", "scale": "token"}
    assert e.buffers[0].tobytes() == b"\xf1\x97\x03"  # low nibble first; odd count: last high nibble 0
    assert e.buffers[1].tobytes() == np.float32(1.0).tobytes() == b"\x00\x00\x80\x3f"
    # -8 (0x8 nibble), never written, decodes like any other value
    s = {"dtype": "float32", "shape": [2], "enc": "int4", "scale": "channel"}
    assert codecs.decode(s, [b"\x78", np.array([1, 2], np.float32).tobytes()]).tolist() == [-8.0, 14.0]


def test_int8_and_half_layouts_byte_for_byte():
    a = np.array([[254.0, -127.0], [0.5, 1.0]], np.float32)
    e = codecs.encode("int8", a)
    assert e.buffers[0].tobytes() == bytes([127, (-64) & 0xFF, 64, 127])  # row 0: scale 2; row 1: scale 1/127
    assert np.array_equal(e.buffers[1], np.array([2.0, 1 / 127], np.float32))
    ch = codecs.encode("int8-ch", a)
    assert np.array_equal(ch.buffers[1], np.array([2.0, 1.0], np.float32))  # per column: max|x| / 127
    assert codecs.encode("bf16", np.array([1.0, -2.0], np.float32)).buffers[0].tobytes() == b"\x80\x3f\x00\xc0"
    assert codecs.encode("f16", np.array([1.0], np.float32)).buffers[0].tobytes() == b"\x00\x3c"


# ---------------------------------------------------------------- on the wire


def test_a_message_carries_each_tensor_in_its_own_encoding():
    act, res, pos = rand((2, 17, 192), 1), rand((2, 17, 192), 2), np.arange(4, dtype=np.int64)
    m = wire.Message("act", "r", 3, 0, [act, res, pos])
    encoded = [codecs.encode("int8", act), codecs.encode("f16", res), None]
    frames = frames_of(m, encoded)
    assert len(frames) == 1 + 2 + 1 + 1
    h = msgpack.unpackb(frames[0])
    assert [t["enc"] for t in h["tensors"]] == ["int8", "f16", "raw"] and h["tensors"][0]["scale"] == "token"
    out = wire.decode(frames)
    assert np.array_equal(out.tensors[0], codecs.roundtrip("int8", act))
    assert np.array_equal(out.tensors[1], codecs.roundtrip("f16", res))
    assert np.array_equal(out.tensors[2], pos)
    assert all(t.dtype == np.float32 for t in out.tensors[:2]) and all(t.flags.writeable for t in out.tensors[:2])


def test_without_encodings_the_frames_are_as_before():
    a = rand((2, 3))
    m = wire.Message("act", "r", 3, 0, [a])
    assert frames_of(m) == frames_of(m, [None])
    assert msgpack.unpackb(frames_of(m)[0])["tensors"] == [{"dtype": "float32", "shape": [2, 3], "enc": "raw"}]


def header(*tensors):
    return msgpack.packb({"v": 1, "kind": "act", "run": "r", "seq": 9, "stage": 0, "tensors": list(tensors), "t": []})


def spec(enc="int8", shape=(2, 4), dtype="float32", **over):
    return {"dtype": dtype, "shape": list(shape), "enc": enc, **({"scale": "token"} if enc in ("int8", "int4") else {}),
            **over}


Q8, S2 = b"\x01" * 8, np.ones(2, np.float32).tobytes()
Q4 = b"\x11" * 4


@pytest.mark.parametrize("frames, code", [
    ([header(spec()), Q8, S2], None),
    ([header(spec("int4")), Q4, S2], None),
    ([header(spec("f16")), b"\0" * 16], None),
    ([header(spec()), Q8, S2[:-1]], "bad_length"),  # scales frame one byte short
    ([header(spec()), Q8, S2 + b"\0" * 4], "bad_length"),  # one scale too many
    ([header(spec()), Q8[:-1], S2], "bad_length"),
    ([header(spec("int4")), Q4 + b"\0", S2], "bad_length"),  # packed length wrong
    ([header(spec("int4", shape=(3,))), b"\0", np.ones(1, np.float32).tobytes()], "bad_length"),
    ([header(spec("f16")), b"\0" * 15], "bad_length"),
    ([header(spec("bf16")), b"\0" * 32], "bad_length"),
    ([header(spec()), Q8], "missing_frames"),  # the scales frame missing
    ([header(spec()), Q8, S2, S2], "extra_frames"),
    ([header(spec(), spec("f16")), Q8, S2], "missing_frames"),
    ([header(spec(scale="row")), Q8, S2], "bad_encoding"),
    ([header(spec(scale=["token"])), Q8, S2], "bad_encoding"),
    ([header({"dtype": "float32", "shape": [2, 4], "enc": "int8"}), Q8, S2], "bad_encoding"),  # no scale
    ([header(spec("f16", dtype="int64")), b"\0" * 16], "bad_encoding"),
    ([header(spec("int8", dtype="float64")), Q8, S2], "bad_encoding"),
    ([header(spec("int3")), Q8], "bad_encoding"),
    ([header(spec(enc=["int8"])), Q8], "bad_encoding"),
    ([header(spec(shape=())), b"\1", b""], "bad_shape"),  # int8 of a scalar: no last dimension
    ([header(spec()), Q8, np.array([1.0, np.nan], np.float32).tobytes()], "bad_encoding"),
    ([header(spec()), Q8, np.array([1.0, np.inf], np.float32).tobytes()], "bad_encoding"),
    ([header(spec()), Q8, np.array([-1.0, 1.0], np.float32).tobytes()], "bad_encoding"),
    ([header(spec(shape=[1 << 20, 1 << 20])), b"", b""], "oversize"),
    # 0 elements, yet 2^217 scales declared: the scale count is bounded as well, before any length check
    ([header(spec(shape=[2**31 - 1] * 7 + [0])), b"", b""], "oversize"),
    ([header(spec("int4", shape=[2**31 - 1] * 7 + [0], scale="channel")), b"", b""], "oversize"),
    ([header(spec("raw", shape=[2**31 - 1] * 7 + [0])), b""], "oversize"),  # numpy could not even shape it
    ([header(spec("int8", shape=[3, 5, 0])), b"", np.ones(15, np.float32).tobytes()], None),  # 15 rows of 0
])
def test_hostile_encoded_messages_are_refused_with_their_code(frames, code):
    if code is None:
        wire.decode(frames)
        return
    with pytest.raises(wire.WireError) as ei:
        wire.decode(frames)
    assert ei.value.code == code and ei.value.seq == 9
    assert code in wire.ERRORS


def test_mutated_encoded_messages_raise_wire_error_only():
    rng = np.random.default_rng(11)
    a = rand((2, 5, 7))
    base = [frames_of(wire.Message("act", "r", 1, 0, [a, a]), [codecs.encode(n, a), codecs.encode(m, a)])
            for n, m in (("int8", "int4-ch"), ("f16", "bf16"), ("int4", "int8-ch"))]
    refused = 0
    for i in range(3000):
        frames = [bytearray(f) for f in base[i % len(base)]]
        k = rng.integers(0, 4)
        if k == 0:  # flip bytes in the header
            for _ in range(rng.integers(1, 6)):
                j = rng.integers(0, len(frames[0]))
                frames[0][j] = rng.integers(0, 256)
        elif k == 1:  # truncate a frame
            f = rng.integers(0, len(frames))
            frames[f] = frames[f][: rng.integers(0, len(frames[f]) + 1)]
        elif k == 2:  # damage the scales
            f = len(frames) - 1
            frames[f][rng.integers(0, len(frames[f]))] = rng.integers(0, 256)
        else:  # drop or add frames
            frames = frames[: rng.integers(0, len(frames) + 1)] + [bytearray(b"x")] * int(rng.integers(0, 2))
        try:
            out = wire.decode([bytes(f) for f in frames])
        except wire.WireError:
            refused += 1
            continue
        # what is accepted is well-formed: float32 tensors of the declared shapes
        assert all(t.dtype == np.float32 and t.size < 1 << 20 for t in out.tensors)
    assert refused > 1500


def test_the_conformance_vectors_built_by_hand_from_the_docs_decode_as_codecs_does():
    """tests/vectors/generate.py lays the encoded images out from docs/wire.md by hand: codecs agrees."""
    import json
    from pathlib import Path

    cases = {c["name"]: c for c in json.loads(
        (Path(__file__).resolve().parent / "vectors" / "data.json").read_text())["cases"]}
    image = wire.decode([bytes.fromhex(f) for f in cases["a good microbatch still goes through"]["frames_hex"]])
    x = image.tensors[0]
    bounds = {"an f16 microbatch": 1e-3, "a bf16 microbatch": 1e-2,
              "an int8 microbatch, a scale per token (row of the last dimension)": 1 / 254,
              "an int4 microbatch, a scale per channel (index of the last dimension)": 1 / 14}
    for name, bound in bounds.items():
        got = wire.decode([bytes.fromhex(f) for f in cases[name]["frames_hex"]]).tensors[0]
        assert got.shape == x.shape and got.dtype == np.float32
        assert float(np.max(np.abs(got - x))) <= bound * float(np.max(np.abs(x))) * (1 + 1e-5), name
    for c in cases.values():  # every case the decoder alone refuses is refused with the expected code
        try:
            wire.decode([bytes.fromhex(f) for f in c["frames_hex"]])
        except wire.WireError as e:
            assert e.code == c["expect"]["code"], c["name"]
