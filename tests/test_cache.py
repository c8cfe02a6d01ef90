"""Tests for edgezmq.model.profile_cache: hits, misses on any key change, corrupt and stale entries removed."""

from __future__ import annotations

import json
import logging

import pytest

from edgezmq import paths
from edgezmq.model import profile_cache as C
from edgezmq.model import profiling as P

TINY = "vit_tiny_patch16_224"
SMALL = {"img_size": 64, "depth": 2}
DEVICE = {"hostname": "board-1", "machine": "x86_64", "cpu": "Atom E3845", "cores": 4,
          "cpu_quota": None, "memory_total": 2 << 30, "memory_limit": None}
VERSIONS = {"torch": "2.14.1", "timm": "1.0.31", "edgezmq": "0.1.0"}
PROFILE = {"model": TINY, "units": [{"index": 0, "name": "embed", "time_s": 0.001234567891,
                                     "work_bytes": 4096}], "total_time_s": 0.001234567891}


def key(**over):
    args = {"granularity": "block", "microbatch": 8, "threads": 2, "kwargs": SMALL,
            "device": DEVICE, "versions": VERSIONS, **over}
    return C.profile_key(TINY, **args)


@pytest.fixture
def root(tmp_path):
    return tmp_path / "cache"


def test_miss_put_hit(root):
    k = key()
    assert C.get(k, cache_dir=root) is None
    path = C.put(k, PROFILE, cache_dir=root)
    assert path.parent == root / "profiles" and path.name.startswith(TINY + "-")
    assert C.get(k, cache_dir=root) == PROFILE
    assert C.get(key(), cache_dir=root) == PROFILE  # an equal key built again
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary files left


def test_real_profile_is_hit_on_the_second_run(root):
    def run():
        k = C.profile_key(TINY, granularity="block", microbatch=1, threads=1, kwargs=SMALL)
        hit = C.get(k, cache_dir=root)
        if hit is not None:
            return hit, True
        prof = P.profile_units(TINY, microbatch=1, threads=1, kwargs=SMALL, warmup=0, reps=1)
        C.put(k, prof, cache_dir=root)
        return prof, False

    first, hit1 = run()
    second, hit2 = run()
    assert (hit1, hit2) == (False, True)
    assert second == first


@pytest.mark.parametrize("change", [
    {"threads": 1}, {"microbatch": 4}, {"granularity": "half"}, {"kwargs": {"img_size": 64}},
    {"dtype": "float16"}, {"device": {**DEVICE, "cores": 2}}, {"device": {**DEVICE, "hostname": "board-2"}},
])
def test_miss_after_a_key_change(root, change):
    C.put(key(), PROFILE, cache_dir=root)
    assert C.get(key(**change), cache_dir=root) is None
    assert C.get(key(), cache_dir=root) == PROFILE  # the other entry is untouched


@pytest.mark.parametrize("pkg", ["torch", "timm", "edgezmq"])
def test_version_change_is_stale_and_removed(root, pkg, caplog):
    path = C.put(key(), PROFILE, cache_dir=root)
    newer = {**VERSIONS, pkg: VERSIONS[pkg] + ".post1"}
    with caplog.at_level(logging.WARNING, logger="edgezmq.model.profile_cache"):
        assert C.get(key(versions=newer), cache_dir=root) is None
    assert "stale" in caplog.text and not path.exists()
    assert C.get(key(), cache_dir=root) is None  # gone for the old versions too


def _rewrite(path, edit):
    entry = json.loads(path.read_text())
    edit(entry)
    path.write_text(json.dumps(entry))


@pytest.mark.parametrize("corrupt, why", [
    (lambda p: p.write_bytes(b"\x00\xff garbage"), "unreadable"),
    (lambda p: p.write_text('{"schema": 1, "key": '), "not JSON"),
    (lambda p: p.write_text("[1, 2, 3]"), "not a cache entry"),
    (lambda p: _rewrite(p, lambda e: e.pop("checksum")), "not a cache entry"),
    (lambda p: _rewrite(p, lambda e: e.update(schema=0)), "schema"),
    (lambda p: _rewrite(p, lambda e: e.update(profile=[1])), "JSON objects"),
    (lambda p: _rewrite(p, lambda e: e["profile"]["units"][0].update(time_s=9.0)), "checksum"),
    (lambda p: p.write_text(p.read_text()[: len(p.read_text()) // 2]), "not JSON"),
    # NaN / Infinity: Python's json reads them, the cache never writes them
    (lambda p: p.write_text(p.read_text().replace('"time_s": 0.001234567891', '"time_s": NaN', 1)), "non-finite number NaN"),
    (lambda p: p.write_text(p.read_text().replace('"time_s": 0.001234567891', '"time_s": -Infinity', 1)), "non-finite"),
])
def test_corrupt_entry_is_detected_and_removed(root, corrupt, why, caplog):
    path = C.put(key(), PROFILE, cache_dir=root)
    corrupt(path)
    with caplog.at_level(logging.WARNING, logger="edgezmq.model.profile_cache"):
        assert C.get(key(), cache_dir=root) is None
    assert why in caplog.text and str(path) in caplog.text
    assert not path.exists()
    C.put(key(), PROFILE, cache_dir=root)  # remeasured and stored again
    assert C.get(key(), cache_dir=root) == PROFILE


def test_entry_under_another_keys_name_is_refused(root, caplog):
    a, b = key(), key(threads=1)
    pa = C.put(a, PROFILE, cache_dir=root)
    pb = C.path_for(b, cache_dir=root)
    pb.write_text(pa.read_text())  # valid checksum, wrong key
    with caplog.at_level(logging.WARNING, logger="edgezmq.model.profile_cache"):
        assert C.get(b, cache_dir=root) is None
    assert "key fields differ" in caplog.text and not pb.exists() and pa.exists()


def test_key_hash_is_stable_and_ignores_versions():
    k = key()
    shuffled = dict(reversed(list(k.items())))
    shuffled["kwargs"] = dict(reversed(list(SMALL.items())))
    assert C.key_hash(k) == C.key_hash(shuffled)
    assert C.key_hash(k) == C.key_hash(key(versions={"torch": "0"}))
    assert C.key_hash(k) != C.key_hash(key(threads=1))
    assert C.path_for(k, cache_dir="/x") == C.path_for(shuffled, cache_dir="/x")


class _Layer:  # a timm kwarg that is a class (e.g. mlp_layer=SwiGLU) has no JSON form
    pass


def test_kwargs_that_are_classes_hash_by_name(root):
    k = key(kwargs={**SMALL, "mlp_layer": _Layer})
    C.put(k, PROFILE, cache_dir=root)
    assert C.get(key(kwargs={**SMALL, "mlp_layer": _Layer}), cache_dir=root) == PROFILE
    assert C.get(key(kwargs={**SMALL, "mlp_layer": object}), cache_dir=root) is None


def test_put_overwrites_and_refuses_bad_profiles(root):
    C.put(key(), PROFILE, cache_dir=root)
    C.put(key(), {**PROFILE, "total_time_s": 1.0}, cache_dir=root)
    assert C.get(key(), cache_dir=root)["total_time_s"] == 1.0
    with pytest.raises(ValueError):
        C.put(key(), {"t": float("nan")}, cache_dir=root)
    with pytest.raises(TypeError, match="mapping"):
        C.put(key(), [1, 2], cache_dir=root)
    assert C.get(key(), cache_dir=root)["total_time_s"] == 1.0  # a failed put leaves the old entry
    assert len(list((root / "profiles").iterdir())) == 1


def test_clear(root):
    assert C.clear(cache_dir=root) == 0
    C.put(key(), PROFILE, cache_dir=root)
    C.put(key(threads=1), PROFILE, cache_dir=root)
    assert C.clear(cache_dir=root) == 2
    assert C.get(key(), cache_dir=root) is None


def test_root_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(paths.CACHE_ENV, str(tmp_path / "env"))
    assert C.profiles_dir() == tmp_path / "env" / "profiles"
    path = C.put(key(), PROFILE)
    assert path.parent == tmp_path / "env" / "profiles"
    monkeypatch.delenv(paths.CACHE_ENV)
    assert C.profiles_dir() == paths.DEFAULT_CACHE_ROOT.expanduser() / "profiles"


def test_default_key_is_this_device_and_installed_software():
    k = C.profile_key(TINY, granularity="block", microbatch=8, threads=2)
    assert k["device"] == P.device_identity()
    assert k["versions"] == C.software_versions()
    assert set(k["versions"]) == {"torch", "timm", "edgezmq"}
    assert k["dtype"] == "float32" and k["kwargs"] == {}
