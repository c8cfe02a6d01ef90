"""CPU and memory cgroups for emulated devices: detect v1/v2 per controller, create, limit, list, remove."""

from __future__ import annotations

import errno
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import PrerequisiteError, TestbedError

__all__ = ["Controller", "detect", "group_dir", "host_dirs", "create_host", "pids_in", "remove_dirs",
           "cpu_period_quota", "limit_cpu",
           "lift_cpu_limits", "oom_kills", "usage", "GROUP_PREFIX"]

GROUP_PREFIX = "edgezmq-"  # one directory per testbed per controller: edgezmq-<testbed>/<host>
PERIOD_US = 10_000  # 10 ms: a 100 ms period stalls a throttled process for up to 75 ms at a time
MIN_QUOTA_US = 1_000  # the kernel refuses a smaller CFS quota
# The kernel lets each CPU keep up to ~1 ms of unused runtime across periods (per-cpu
# slices are not expired), so a multi-threaded process spread over the CPUs can overrun a
# small quota by a lot (measured: 2 ms per 10 ms ran ~50% fast). A quota of >= 20 ms per
# period keeps that carry-over within ~10%; the price is longer throttled stretches.
ACCURATE_QUOTA_US = 20_000
MAX_PERIOD_US = 1_000_000  # ... and a longer period
CONTROLLERS = ("cpu", "memory")
# The testbed's own group gets the highest CPU weight: its devices are separate machines,
# each held to its quota, and must get that quota while the host runs other work (a test
# suite, a build).  At the default weight the whole testbed competes as ONE task of nice 0
# with every process outside it: one busy process took half its CPU (measured: a 16-device
# pipeline at 0.24 samples/s against 0.58 alone).  Never above the quotas' sum, so a busy
# testbed cannot starve the host either.
GROUP_CPU_WEIGHT = {1: ("cpu.shares", 262144), 2: ("cpu.weight", 10000)}
REMOVE_TIMEOUT_S = 5.0  # a killed process takes a moment to leave its cgroup
REMOVE_POLL_S = 0.05
MOUNTS = Path("/proc/self/mounts")
SELF_CGROUP = Path("/proc/self/cgroup")


@dataclass(frozen=True)
class Controller:
    name: str  # "cpu" | "memory"
    version: int  # 1 (own hierarchy) | 2 (unified)
    parent: Path  # testbed group directories are made here
    root: Path  # the hierarchy's mount point

    def dir_for(self, testbed: str, host: str | None = None) -> Path:
        g = self.parent / f"{GROUP_PREFIX}{testbed}"
        return g / host if host else g


def _self_paths(text: str) -> dict[str, str]:
    """controller -> this process's cgroup path; "" -> its v2 (unified) path."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3:
            for c in parts[1].split(",") if parts[1] else [""]:
                out[c] = parts[2]
    return out


def detect(mounts: str | None = None, self_cgroup: str | None = None) -> dict[str, Controller]:
    """Where the cpu and memory controllers live; raises PrerequisiteError when one is missing.

    v1 (a hierarchy per controller): groups go under this process's own cgroup, so the
    testbed stays accounted to whoever started it.  v2: under the unified root, because a
    v2 cgroup with processes in it cannot have controller-enabled children.
    """
    mounts = MOUNTS.read_text() if mounts is None else mounts
    paths = _self_paths(SELF_CGROUP.read_text() if self_cgroup is None else self_cgroup)
    v1: dict[str, Path] = {}
    v2: Path | None = None
    for line in mounts.splitlines():
        f = line.split()
        if len(f) < 4:
            continue
        if f[2] == "cgroup":
            for c in CONTROLLERS:
                if c in f[3].split(","):
                    v1[c] = Path(f[1])
        elif f[2] == "cgroup2":
            v2 = Path(f[1])
    v2_controllers: set[str] = set()
    if v2 is not None:
        try:
            v2_controllers = set((v2 / "cgroup.controllers").read_text().split())
        except OSError:
            pass
    out: dict[str, Controller] = {}
    for c in CONTROLLERS:
        if c in v1:
            out[c] = Controller(c, 1, v1[c] / paths.get(c, "/").lstrip("/"), v1[c])
        elif v2 is not None and c in v2_controllers:
            out[c] = Controller(c, 2, v2, v2)
    missing = [c for c in CONTROLLERS if c not in out]
    if missing:
        raise PrerequisiteError(
            f"cgroup controller(s) {missing} not available: need a v1 hierarchy with them mounted "
            f"(e.g. /sys/fs/cgroup/cpu) or cgroup v2 listing them in cgroup.controllers "
            f"(v2 mount: {v2}, its controllers: {sorted(v2_controllers)})")
    return out


def cpu_period_quota(share: float) -> tuple[int, int]:
    """(period_us, quota_us) for a CPU share in cores: at least a 10 ms period, long enough
    for a quota of ACCURATE_QUOTA_US (so 0.25 of a core is 20 ms every 80 ms)."""
    if share <= 0:
        raise ValueError(f"cpu share: expected > 0 cores, got {share}")
    period = min(max(PERIOD_US, math.ceil(ACCURATE_QUOTA_US / share)), MAX_PERIOD_US)
    return period, max(round(share * period), MIN_QUOTA_US)


def _write(path: Path, value: str | int) -> None:
    try:
        path.write_text(f"{value}\n")
    except OSError as e:
        raise TestbedError(f"cannot write {value!r} to {path}: {e.strerror or e}") from None


def _enable_v2(dirpath: Path, names: list[str]) -> None:
    """Let `dirpath`'s children use the controllers `names` (v2 subtree_control)."""
    try:
        have = set((dirpath / "cgroup.subtree_control").read_text().split())
    except OSError:
        have = set()
    need = [n for n in names if n not in have]
    if need:
        _write(dirpath / "cgroup.subtree_control", " ".join(f"+{n}" for n in need))


def group_dir(ctrls: dict[str, Controller], testbed: str) -> list[Path]:
    """The per-testbed group directories (one per hierarchy), in controller order, no duplicates."""
    return list(dict.fromkeys(c.dir_for(testbed) for c in ctrls.values()))


def host_dirs(ctrls: dict[str, Controller], testbed: str, host: str,
              controllers: tuple[str, ...] = CONTROLLERS) -> list[Path]:
    return list(dict.fromkeys(ctrls[c].dir_for(testbed, host) for c in controllers))


def _mkdir(path: Path) -> None:
    try:
        path.mkdir(exist_ok=True)
    except OSError as e:
        raise TestbedError(f"cannot create cgroup {path}: {e.strerror or e}") from None


def limit_cpu(ctrls: dict[str, Controller], testbed: str, host: str, share: float) -> None:
    """Write `host`'s CPU quota: `share` cores."""
    ctl = ctrls["cpu"]
    d = ctl.dir_for(testbed, host)
    period, quota = cpu_period_quota(share)
    if ctl.version == 1:
        _write(d / "cpu.cfs_period_us", period)
        _write(d / "cpu.cfs_quota_us", quota)
    else:
        _write(d / "cpu.max", f"{quota} {period}")


def lift_cpu_limits(dirs: list[Path]) -> None:
    """Remove the CPU quota of these cgroups (best effort): exiting processes then finish at full speed."""
    for d in dirs:
        for name, value in (("cpu.cfs_quota_us", "-1"), ("cpu.max", "max")):
            f = d / name
            if f.exists():
                try:
                    f.write_text(f"{value}\n")
                except OSError:
                    pass


def create_host(ctrls: dict[str, Controller], testbed: str, host: str, *, cpu: float | None,
                memory: int | None, memory_accounting: bool = True, cpu_now: bool = True,
                record=None) -> list[Path]:
    """Make `host`'s cgroups with their limits; returns the directories whose cgroup.procs a process joins.

    `record(path)` is called before each directory is made, so a crash leaves a trace to clean.
    A memory cgroup is made even without a cap when `memory_accounting` (its peak usage is reported).
    With `cpu_now` false the cpu cgroup is made without its quota: call limit_cpu() later.
    """
    record = record or (lambda p: None)
    wanted: list[str] = []
    if cpu is not None:
        wanted.append("cpu")
    if memory is not None or memory_accounting:
        wanted.append("memory")
    made: list[Path] = []
    for c in wanted:
        ctl = ctrls[c]
        group, d = ctl.dir_for(testbed), ctl.dir_for(testbed, host)
        for p in (group, d):
            if not p.is_dir():
                record(p)
                if ctl.version == 2 and p == group:
                    _enable_v2(ctl.root, list(CONTROLLERS))
                _mkdir(p)
                if ctl.version == 2 and p == group:
                    _enable_v2(group, list(CONTROLLERS))
                if c == "cpu" and p == group:
                    name, weight = GROUP_CPU_WEIGHT[ctl.version]
                    _write(p / name, weight)
        if c == "cpu":
            if cpu_now and cpu is not None:  # "cpu" is wanted only with a share: for mypy
                limit_cpu(ctrls, testbed, host, cpu)
        elif memory is not None:
            if ctl.version == 1:
                _write(d / "memory.limit_in_bytes", memory)
                if (d / "memory.memsw.limit_in_bytes").exists():  # no swapping past the cap either
                    _write(d / "memory.memsw.limit_in_bytes", memory)
            else:
                _write(d / "memory.max", memory)
                if (d / "memory.swap.max").exists():
                    _write(d / "memory.swap.max", 0)
        if d not in made:
            made.append(d)
    return made


def pids_in(dirs: list[Path]) -> set[int]:
    """Every process in these cgroups (and their descendants' cgroups)."""
    out: set[int] = set()
    for d in dirs:
        if not d.is_dir():
            continue
        for sub, _, _ in os.walk(d):
            try:
                out |= {int(x) for x in (Path(sub) / "cgroup.procs").read_text().split()}
            except OSError:
                pass
    return out


def remove_dirs(dirs: list[Path], timeout: float = REMOVE_TIMEOUT_S) -> list[str]:
    """rmdir each cgroup, deepest first, retrying while the kernel still counts exiting processes.

    Returns the problems (empty when every directory is gone).
    """
    todo = sorted({d for d in dirs if d.is_dir()}, key=lambda p: len(p.parts), reverse=True)
    deadline = time.monotonic() + timeout
    problems: list[str] = []
    for d in todo:
        while True:
            try:
                d.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError as e:
                if e.errno == errno.EBUSY and time.monotonic() < deadline:
                    time.sleep(REMOVE_POLL_S)
                    continue
                left = pids_in([d]) if e.errno == errno.EBUSY else set()
                problems.append(f"cannot remove cgroup {d}: {e.strerror or e}"
                                + (f" (processes still in it: {sorted(left)})" if left else ""))
                break
    return problems


def _read_int(path: Path) -> int | None:
    try:
        v = path.read_text().strip()
    except OSError:
        return None
    return int(v) if v.isdigit() else None


def oom_kills(dirs: list[Path]) -> int:
    """How many processes the kernel killed in these cgroups for going over their memory cap."""
    n = 0
    for d in dirs:
        for name in ("memory.oom_control", "memory.events"):  # v1, v2
            try:
                text = (d / name).read_text()
            except OSError:
                continue
            for line in text.splitlines():
                k, _, v = line.partition(" ")
                if k == "oom_kill":
                    n += int(v)
    return n


def usage(dirs: list[Path]) -> dict[str, int | None]:
    """Memory usage/peak and CPU throttling of a host's cgroups (whatever the kernel exposes)."""
    out: dict[str, int | None] = {}
    for d in dirs:
        if (d / "memory.usage_in_bytes").exists():  # v1
            out["memory_bytes"] = _read_int(d / "memory.usage_in_bytes")
            out["memory_peak_bytes"] = _read_int(d / "memory.max_usage_in_bytes")
        elif (d / "memory.current").exists():  # v2
            out["memory_bytes"] = _read_int(d / "memory.current")
            out["memory_peak_bytes"] = _read_int(d / "memory.peak")
        stat = d / "cpu.stat"
        if stat.exists() and "cpu_throttled" not in out:
            for line in stat.read_text().splitlines():
                k, _, v = line.partition(" ")
                if k == "nr_throttled":
                    out["cpu_throttled"] = int(v)
    return out
