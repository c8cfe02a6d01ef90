"""Facts about the device this process runs on: cores, CPU quota, memory limits, RSS."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import os
import platform
import resource
import socket
from collections.abc import Callable
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
_UNLIMITED = 1 << 60  # cgroup v1 reports "no limit" as a huge number


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _cgroup_paths() -> dict[str, str]:
    """controller -> this process's cgroup path ("" key for the v2 unified hierarchy)."""
    out: dict[str, str] = {}
    text = _read(Path("/proc/self/cgroup")) or ""
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        for c in controllers.split(",") if controllers else [""]:
            out[c] = path
    return out


def cpu_limit() -> tuple[int, int] | None:
    """This process's cgroup CPU limit as (quota_us, period_us) (v1 cfs or v2 cpu.max), or None."""
    paths = _cgroup_paths()
    if "cpu" in paths:  # v1
        base = CGROUP_ROOT / "cpu" / paths["cpu"].lstrip("/")
        q, p = _read(base / "cpu.cfs_quota_us"), _read(base / "cpu.cfs_period_us")
        if q and p and int(q) > 0 and int(p) > 0:
            return int(q), int(p)
    if "" in paths:  # v2
        v = _read(CGROUP_ROOT / paths[""].lstrip("/") / "cpu.max")
        if v and not v.startswith("max"):
            q, p = v.split()
            return int(q), int(p)
    return None


def cpu_quota() -> float | None:
    """CPUs this process may use per the cgroup CPU quota, or None when unlimited."""
    limit = cpu_limit()
    return limit[0] / limit[1] if limit else None


def cpu_period_s() -> float | None:
    """The cgroup CPU quota's period in seconds (the throttling cycle), or None when unlimited."""
    limit = cpu_limit()
    return limit[1] / 1e6 if limit else None


def memory_limit() -> int | None:
    """The cgroup memory limit in bytes (v1 or v2), or None when unlimited."""
    paths = _cgroup_paths()
    if "memory" in paths:
        v = _read(CGROUP_ROOT / "memory" / paths["memory"].lstrip("/") / "memory.limit_in_bytes")
        if v and int(v) < _UNLIMITED:
            return int(v)
    if "" in paths:
        v = _read(CGROUP_ROOT / paths[""].lstrip("/") / "memory.max")
        if v and v != "max":
            return int(v)
    return None


def memory_budget(*limits: int | None) -> int:
    """Bytes this process may still allocate: the machine's available memory, capped by the
    cgroup limit and any further `limits` (each less what the process already holds)."""
    avail = mem_available()
    for limit in (memory_limit(), *limits):
        if limit:
            avail = min(avail, limit - rss_bytes())
    return avail


def mem_total() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def mem_available() -> int:
    """MemAvailable from /proc/meminfo (bytes), falling back to total."""
    for line in (_read(Path("/proc/meminfo")) or "").splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return mem_total()


def rss_bytes() -> int:
    v = _read(Path("/proc/self/statm"))
    if v:
        return int(v.split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return peak_rss_bytes()


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def cpu_model() -> str:
    for line in (_read(Path("/proc/cpuinfo")) or "").splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def describe() -> dict:
    """Everything a planner or an operator wants to know about this device."""
    import numpy
    import timm
    import torch
    import zmq

    from edgezmq import __version__

    return {
        "hostname": socket.gethostname(),
        "machine": platform.machine(),
        "cpu": cpu_model(),
        "cores": cores(),
        "cpu_quota": cpu_quota(),
        "cpu_period_s": cpu_period_s(),
        "memory_total": mem_total(),
        "memory_available": mem_available(),
        "memory_limit": memory_limit(),
        "rss": rss_bytes(),
        "device_type": "cpu",
        "versions": {
            "edgezmq": __version__,
            "python": platform.python_version(),
            "torch": torch.__version__,
            "timm": timm.__version__,
            "numpy": numpy.__version__,
            "pyzmq": zmq.__version__,
            "libzmq": zmq.zmq_version(),
        },
    }


@functools.cache  # find_library runs ldconfig: look the C library up once per process
def malloc_trim() -> Callable[[], None]:
    """glibc's malloc_trim(0), or a no-op on other C libraries."""
    name = ctypes.util.find_library("c")
    try:
        fn = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        fn = None
    if fn is None:
        return lambda: None
    fn.argtypes = [ctypes.c_size_t]

    def trim() -> None:
        fn(0)

    return trim


def release_memory() -> None:
    """Give freed memory back to the system: a collection, then glibc's malloc_trim. Without
    it an unloaded shard's pages stay in the process (RSS 1.8 GB after unloading ViT-Large's
    second half), and the next load is refused, or planned around, as if they were in use."""
    gc.collect()
    malloc_trim()()
