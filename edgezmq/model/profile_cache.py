"""A cache of profiles on disk: one JSON file per (device, model, settings), checked on every read.

    >>> key = profile_key("vit_tiny_patch16_224", granularity="block", microbatch=8, threads=2)
    >>> prof = get(key)
    >>> if prof is None:
    ...     prof = profile_units("vit_tiny_patch16_224", microbatch=8, threads=2)
    ...     put(key, prof)

A key is a plain mapping: device identity, model, granularity, kwargs, microbatch, dtype,
threads, and under ``versions`` the software that measured (torch, timm, edgezmq). The file
is ``<root>/profiles/<model>-<hash>.json``, the hash covering every field but ``versions``;
an entry whose versions differ from the key's is stale (same measurement, other software)
and is removed, as is one that is not JSON, not of this schema, or whose checksum fails.
``<root>`` is ``$EDGEZMQ_CACHE`` or ``~/.cache/edgezmq``, like the checkpoints.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import re
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from edgezmq import __version__
from edgezmq.paths import cache_root

__all__ = ["SCHEMA", "VERSIONS_FIELD", "profile_key", "software_versions", "key_hash", "path_for",
           "profiles_dir", "get", "put", "clear", "work_bytes"]

log = logging.getLogger(__name__)

SCHEMA = 4  # bump when the entry layout or the profile's meaning changes (2: timed rounds,
# 3: rounds of 20 CFS periods, 4: the chain factor)
PROFILES_DIR = "profiles"
VERSIONS_FIELD = "versions"
VERSIONED_PACKAGES = ("torch", "timm")  # plus edgezmq itself
HASH_CHARS = 24
ENTRY_FIELDS = ("schema", "key", "profile", "checksum")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def software_versions() -> dict[str, str]:
    """Versions of the software whose change invalidates a profile (read without importing it)."""
    out = {}
    for pkg in VERSIONED_PACKAGES:
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = "absent"
    out["edgezmq"] = __version__
    return out


def profile_key(model: str, *, granularity: str, microbatch: int, threads: int,
                kwargs: Mapping[str, Any] | None = None, dtype: str = "float32",
                device: Mapping[str, Any] | None = None,
                versions: Mapping[str, str] | None = None, context: int | None = None) -> dict[str, Any]:
    """The key of a profile; `device` defaults to this device, `versions` to the installed ones;
    `context`: a decoder's decode-step profile at that many cached tokens (none: whole inputs)."""
    if device is None:
        from edgezmq.model.profiling import device_identity  # torch: only when this device is meant

        device = device_identity()
    return {
        "device": dict(device),
        "model": model,
        "granularity": granularity,
        "kwargs": dict(kwargs or {}),
        "microbatch": microbatch,
        "dtype": dtype,
        "threads": threads,
        **({"phase": "decode", "context": context} if context is not None else {}),
        VERSIONS_FIELD: dict(versions if versions is not None else software_versions()),
    }


def _canonical(value: Any) -> str:
    # repr for what JSON cannot hold (a class passed as a timm kwarg): stable across runs
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=repr, allow_nan=False)


def key_hash(key: Mapping[str, Any]) -> str:
    """A stable hash of every key field but the versions."""
    fields = {k: v for k, v in key.items() if k != VERSIONS_FIELD}
    return hashlib.sha256(_canonical(fields).encode()).hexdigest()[:HASH_CHARS]


def profiles_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """<root>/profiles, root = `cache_dir`, else $EDGEZMQ_CACHE, else ~/.cache/edgezmq."""
    return cache_root(cache_dir) / PROFILES_DIR


def path_for(key: Mapping[str, Any], cache_dir: str | os.PathLike | None = None) -> Path:
    model = _UNSAFE.sub("_", str(key.get("model", "model")))
    return profiles_dir(cache_dir) / f"{model}-{key_hash(key)}.json"


def _checksum(key: Any, profile: Any) -> str:
    return hashlib.sha256(_canonical({"key": key, "profile": profile}).encode()).hexdigest()


def _discard(path: Path, why: str) -> None:
    log.warning("profile cache: discarding %s: %s", path, why)
    try:
        path.unlink(missing_ok=True)
    except OSError as e:
        log.warning("profile cache: cannot remove %s: %s", path, e)


def _problem(entry: Any, key: Any) -> str | None:
    """Why `entry` (parsed JSON) cannot serve `key`, or None when it can."""
    if not isinstance(entry, dict) or sorted(entry) != sorted(ENTRY_FIELDS):
        got = sorted(entry) if isinstance(entry, dict) else type(entry).__name__
        return f"not a cache entry: expected fields {sorted(ENTRY_FIELDS)}, got {got}"
    if entry["schema"] != SCHEMA:
        return f"schema {entry['schema']!r}, expected {SCHEMA}"
    if not isinstance(entry["key"], dict) or not isinstance(entry["profile"], dict):
        return "key and profile must be JSON objects"
    if entry["checksum"] != _checksum(entry["key"], entry["profile"]):
        return "checksum mismatch (file altered or half written)"
    want = json.loads(_canonical(key))  # the key as it reads back from JSON
    stored = entry["key"]
    if {k: v for k, v in stored.items() if k != VERSIONS_FIELD} != \
            {k: v for k, v in want.items() if k != VERSIONS_FIELD}:
        return "key fields differ from the file name's (hash collision or renamed file)"
    if stored.get(VERSIONS_FIELD) != want.get(VERSIONS_FIELD):
        return f"stale: measured with {stored.get(VERSIONS_FIELD)}, now {want.get(VERSIONS_FIELD)}"
    return None


def _non_finite(name: str) -> Any:
    # put() never writes NaN/Infinity (allow_nan=False): a file holding one was altered
    raise ValueError(f"non-finite number {name} (the cache writes only finite numbers)")


def get(key: Mapping[str, Any], *, cache_dir: str | os.PathLike | None = None) -> dict[str, Any] | None:
    """The cached profile for `key`, or None; a corrupt or stale entry is logged and removed."""
    path = path_for(key, cache_dir)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as e:
        _discard(path, f"unreadable: {e}")
        return None
    try:
        entry = json.loads(text, parse_constant=_non_finite)
    except ValueError as e:
        _discard(path, f"not JSON: {e}")
        return None
    try:
        why = _problem(entry, key)
    except (ValueError, TypeError) as e:  # any entry this module did not write must not fail a deploy
        why = f"unusable entry ({type(e).__name__}: {e})"
    if why:
        _discard(path, why)
        return None
    log.debug("profile cache hit: %s", path)
    return entry["profile"]


def put(key: Mapping[str, Any], profile: Mapping[str, Any], *,
        cache_dir: str | os.PathLike | None = None) -> Path:
    """Store `profile` under `key` atomically (temporary file + rename); returns the file."""
    if not isinstance(profile, Mapping):
        raise TypeError(f"profile: expected a mapping, got {type(profile).__name__}")
    path = path_for(key, cache_dir)
    key_plain, prof_plain = json.loads(_canonical(key)), json.loads(_canonical(profile))
    entry = {"schema": SCHEMA, "key": key_plain, "profile": prof_plain,
             "checksum": _checksum(key_plain, prof_plain)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "w") as f:
            f.write(json.dumps(entry, sort_keys=True, indent=1, allow_nan=False))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def clear(*, cache_dir: str | os.PathLike | None = None) -> int:
    """Remove every cached profile (and stray temporary files); returns how many files went."""
    d = profiles_dir(cache_dir)
    n = 0
    for p in [*d.glob("*.json"), *d.glob(".*.tmp")]:
        p.unlink(missing_ok=True)
        n += 1
    return n


def work_bytes(model: str, start: int, end: int, *, granularity: str, microbatch: int, threads: int | None,
               kwargs: Mapping[str, Any] | None = None) -> int | None:
    """Peak working memory of units [start, end) by this device's cached profile of the model
    at these settings (``threads`` None: torch's current count, as ``profile`` defaults to), or
    None when this device has not profiled it."""
    if threads is None:
        import torch

        threads = torch.get_num_threads()
    prof = get(profile_key(model, granularity=granularity, microbatch=microbatch, threads=threads, kwargs=kwargs))
    units = prof["units"][start:end] if prof else []
    return max(int(u["work_bytes"]) for u in units) if units else None
