"""workers: auto under a cgroup CPU quota: the files a container's kernel shows, laid out under
a directory that stands for /, read by the same code that reads the real ones."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest

from proxyd.cpus import cgroup_quota, usable_cpus

AFFINITY = len(os.sched_getaffinity(0))
V2_MOUNT = "30 23 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n"
V1_MOUNT = ("31 23 0:27 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n"
            "32 23 0:28 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n")


def layout(root: Path, files: dict[str, str]) -> str:
    for name, text in files.items():
        path = root / name.lstrip("/")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return str(root)


def v2(root: Path, cgroup: str, limits: dict[str, str]) -> str:
    files = {"/proc/self/cgroup": f"0::{cgroup}\n", "/proc/self/mountinfo": V2_MOUNT}
    files.update({f"/sys/fs/cgroup{where}/cpu.max": text for where, text in limits.items()})
    return layout(root, files)


def test_container_with_its_own_namespace(tmp_path: Path) -> None:
    # docker --cpus=1.5 with a cgroup namespace: the container's cgroup is the mount's root.
    root = v2(tmp_path, "/", {"": "150000 100000\n"})
    assert cgroup_quota(root) == (1.5, "/sys/fs/cgroup/cpu.max")


def test_smallest_limit_among_the_ancestors(tmp_path: Path) -> None:
    # A pod's limit on its slice binds the container below it, which sets none of its own.
    root = v2(tmp_path, "/kubepods.slice/pod1/ctr", {
        "/kubepods.slice": "max 100000\n",
        "/kubepods.slice/pod1": "200000 100000\n",
        "/kubepods.slice/pod1/ctr": "max 100000\n",
    })
    assert cgroup_quota(root) == (2.0, "/sys/fs/cgroup/kubepods.slice/pod1/cpu.max")


def test_no_limit(tmp_path: Path) -> None:
    assert cgroup_quota(v2(tmp_path, "/system.slice/proxyd.service", {
        "/system.slice": "max 100000\n", "/system.slice/proxyd.service": "max 100000\n"})) is None


def test_cgroup_v1(tmp_path: Path) -> None:
    root = layout(tmp_path, {
        "/proc/self/cgroup": "4:memory:/docker/abc\n3:cpu,cpuacct:/docker/abc\n",
        "/proc/self/mountinfo": V1_MOUNT,
        "/sys/fs/cgroup/cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "50000\n",
        "/sys/fs/cgroup/cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000\n",
        "/sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us": "-1\n",
        "/sys/fs/cgroup/cpu,cpuacct/cpu.cfs_period_us": "100000\n",
    })
    assert cgroup_quota(root) == (0.5, "/sys/fs/cgroup/cpu,cpuacct/docker/abc/cpu.cfs_quota_us")


def test_a_mount_of_part_of_the_hierarchy(tmp_path: Path) -> None:
    # Without a cgroup namespace, docker mounts the container's own cgroup (mountinfo root).
    root = layout(tmp_path, {
        "/proc/self/cgroup": "0::/docker/abc\n",
        "/proc/self/mountinfo": "30 23 0:26 /docker/abc /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n",
        "/sys/fs/cgroup/cpu.max": "300000 100000\n",
    })
    assert cgroup_quota(root) == (3.0, "/sys/fs/cgroup/cpu.max")


@pytest.mark.parametrize("text", ["", "garbage\n", "0 100000\n", "100000 0\n", "x y\n"])
def test_unreadable_limits_are_no_limit(tmp_path: Path, text: str) -> None:
    assert cgroup_quota(v2(tmp_path, "/", {"": text})) is None


def test_nothing_to_read_is_no_limit(tmp_path: Path) -> None:
    assert cgroup_quota(str(tmp_path)) is None
    assert usable_cpus(str(tmp_path)).count == AFFINITY


@pytest.mark.skipif(AFFINITY < 2, reason="needs 2 CPUs in the affinity mask")
def test_quota_below_the_mask_rounds_up(tmp_path: Path) -> None:
    root = v2(tmp_path, "/", {"": f"{(AFFINITY - 1) * 100000 - 50000} 100000\n"})
    budget = usable_cpus(root)
    assert budget.count == AFFINITY - 1  # e.g. 1.5 CPUs: 2 workers
    assert "cgroup CPU quota" in budget.reason and "rounded up" in budget.reason


def test_tiny_quota_is_one_worker(tmp_path: Path) -> None:
    budget = usable_cpus(v2(tmp_path, "/", {"": "10000 100000\n"}))  # 0.1 CPU
    assert budget.count == 1 and budget.quota == 0.1


def test_quota_above_the_mask_changes_nothing(tmp_path: Path) -> None:
    budget = usable_cpus(v2(tmp_path, "/", {"": f"{(AFFINITY + 4) * 100000} 100000\n"}))
    assert budget.count == AFFINITY and "is not lower" in budget.reason


def test_this_machine() -> None:
    budget = usable_cpus()
    assert 1 <= budget.count <= AFFINITY
    limited = budget.quota is not None and math.ceil(budget.quota) < AFFINITY
    assert (budget.count < AFFINITY) == limited
