"""How many CPUs this process may use: what ``workers: auto`` forks.

The affinity mask says which CPUs the process may run on; a cgroup CPU quota (Docker's
``--cpus``, a Kubernetes CPU limit) says how much time it gets on them. A container limited
to 2 CPUs on a 64-core node has 64 CPUs in its mask: 64 workers there would share 2 CPUs'
worth of time, each throttled in turn, with 32 times the memory. So the count is the quota,
rounded up and at least 1, when it is below the mask (as Go's runtime sets GOMAXPROCS).

The quota is the smallest along the process's cgroup and its ancestors: a parent's limit
binds its children. Both hierarchies are read: cgroup v2 ``cpu.max`` and cgroup v1
``cpu.cfs_quota_us``/``cpu.cfs_period_us``. The files are read at each call (start and each
reload), so a resized container gets its new count on the next reload.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass


@dataclass(frozen=True)
class CpuBudget:
    count: int  # the CPUs to plan for: at least 1
    reason: str  # how the count was found, for the log, check-config and /status
    affinity: int  # CPUs in the affinity mask
    quota: float | None = None  # CPUs' worth of time the cgroup grants, if it sets a limit


def worker_choice(workers: int | str) -> tuple[int, str]:
    """server.workers as a count, and why: the number configured, or what auto found."""
    if workers == "auto":
        budget = usable_cpus()
        return budget.count, f"auto: {budget.reason}"
    return int(workers), "configured"


def usable_cpus(root: str = "/") -> CpuBudget:
    """The CPU budget of this process. ``root`` prefixes every path read (tests)."""
    affinity = max(1, len(os.sched_getaffinity(0)))
    found = cgroup_quota(root)
    if found is None:
        return CpuBudget(affinity, f"{affinity} CPUs in the affinity mask, no cgroup CPU quota",
                         affinity)
    quota, where = found
    limited = max(1, math.ceil(quota))
    if limited >= affinity:
        return CpuBudget(affinity, f"{affinity} CPUs in the affinity mask (the cgroup CPU quota "
                         f"of {quota:g} at {where} is not lower)", affinity, quota)
    return CpuBudget(limited, f"cgroup CPU quota of {quota:g} CPUs at {where}, rounded up "
                     f"({affinity} CPUs in the affinity mask)", affinity, quota)


def cgroup_quota(root: str = "/") -> tuple[float, str] | None:
    """The smallest CPU quota (in CPUs) over this process's cgroups and their ancestors, and
    the file that sets it; None when no cgroup limits CPU time or none can be read."""
    try:
        memberships = _read(root, "/proc/self/cgroup").splitlines()
        mounts = _read(root, "/proc/self/mountinfo").splitlines()
    except OSError:
        return None
    best: tuple[float, str] | None = None
    for line in memberships:
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and controllers == "":
            found = _walk(root, mounts, path, v2=True)
        elif "cpu" in controllers.split(","):
            found = _walk(root, mounts, path, v2=False)
        else:
            continue
        if found is not None and (best is None or found[0] < best[0]):
            best = found
    return best


def _read(root: str, path: str) -> str:
    with open(os.path.join(root, path.lstrip("/")), encoding="utf-8") as f:
        return f.read()


def _mount(mounts: list[str], v2: bool) -> tuple[str, str] | None:
    """(root inside the hierarchy, mount point) of the cgroup2 mount, or the v1 one with the
    cpu controller (proc(5): mountinfo fields; the filesystem type follows the " - ")."""
    for line in mounts:
        fields, sep, tail = line.partition(" - ")
        parts, extra = fields.split(), tail.split()
        if not sep or len(parts) < 5 or len(extra) < 3:
            continue
        if v2 and extra[0] == "cgroup2":
            return parts[3], parts[4]
        if not v2 and extra[0] == "cgroup" and "cpu" in extra[2].split(","):
            return parts[3], parts[4]
    return None


def _walk(root: str, mounts: list[str], path: str, *, v2: bool) -> tuple[float, str] | None:
    mount = _mount(mounts, v2)
    if mount is None:
        return None
    mount_root, mount_point = mount
    if mount_root != "/" and path != mount_root and not path.startswith(mount_root + "/"):
        return None  # the cgroup is outside what this mount shows
    relative = path[len(mount_root):] if mount_root != "/" else path
    parts = [p for p in relative.split("/") if p]
    best: tuple[float, str] | None = None
    for depth in range(len(parts), -1, -1):
        directory = "/".join([mount_point.rstrip("/"), *parts[:depth]])
        quota = _quota_v2(root, directory) if v2 else _quota_v1(root, directory)
        if quota is not None and (best is None or quota[0] < best[0]):
            best = quota
    return best


def _quota_v2(root: str, directory: str) -> tuple[float, str] | None:
    where = f"{directory}/cpu.max"
    try:
        fields = _read(root, where).split()  # "max 100000" or "<quota> <period>"
    except OSError:
        return None
    return _ratio(fields[0], fields[1], where) if len(fields) == 2 else None


def _quota_v1(root: str, directory: str) -> tuple[float, str] | None:
    where = f"{directory}/cpu.cfs_quota_us"
    try:
        limit = _read(root, where).strip()
        period = _read(root, f"{directory}/cpu.cfs_period_us").strip()
    except OSError:
        return None
    return _ratio(limit, period, where)


def _ratio(limit: str, period: str, where: str) -> tuple[float, str] | None:
    if limit in ("max", "-1"):
        return None
    try:
        quota, interval = int(limit), int(period)
    except ValueError:
        return None
    if quota <= 0 or interval <= 0:
        return None
    return quota / interval, where
