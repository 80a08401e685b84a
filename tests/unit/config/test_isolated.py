"""load_isolated: the config is read in a forked child; every way that child can fail is a
ConfigError, and the child never outlives the call."""

from __future__ import annotations

import asyncio
import gc
import hashlib
import os
import signal
import time
from pathlib import Path

import pytest

from proxyd.config import ConfigError, isolated, load_config_with_warnings
from proxyd.config.isolated import Loaded, load_isolated

CONFIG = """\
server: {listen: ['127.0.0.1:8080'], workers: 1}
admin: {listen: '127.0.0.1:9901'}
upstreams: {origin: {targets: ['http://127.0.0.1:9000']}}
routes:
  - {name: all, match: {path_prefix: /}, upstream: origin}
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "gateway.yaml"
    path.write_text(text)
    return path


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


async def wait_for_pid(path: Path, timeout: float = 10.0) -> int:
    """The pid a child wrote into ``path`` once it started."""
    deadline = time.monotonic() + timeout
    while not (path.exists() and path.read_text().endswith("\n")):
        assert time.monotonic() < deadline, "the child never started"
        await asyncio.sleep(0.01)
    return int(path.read_text())


def gone(pid: int) -> bool:
    """Reaped (no such process any more), not merely exited."""
    return not Path(f"/proc/{pid}").exists()


async def test_a_valid_file_comes_back_whole(tmp_path: Path) -> None:
    path = write(tmp_path, CONFIG + "  - {name: x, match: {path: /x}, respond: {status: 204}}\n")
    loaded = await load_isolated(str(path))
    config, warnings = load_config_with_warnings(path)
    assert loaded == Loaded(config, warnings, hashlib.sha256(path.read_bytes()).hexdigest())


async def test_config_errors_come_back_located(tmp_path: Path) -> None:
    path = write(tmp_path, CONFIG.replace("workers: 1", "wrokers: 1"))
    with pytest.raises(ConfigError) as info:
        await load_isolated(str(path))
    assert str(info.value) == f"{path}:1:38: server.wrokers: unknown key 'wrokers', " \
                              "did you mean 'workers'?"


async def test_a_long_list_of_problems_is_cut_short(tmp_path: Path) -> None:
    path = write(tmp_path, CONFIG + "".join(f"bogus{i}: 1\n" for i in range(200)))
    with pytest.raises(ConfigError) as info:
        await load_isolated(str(path))
    issues = info.value.issues
    assert len(issues) == isolated.MAX_ISSUES + 1
    assert issues[0].message.startswith("unknown key 'bogus0'")
    assert str(issues[-1]) == (f"{path}: ... and {200 - isolated.MAX_ISSUES} more; "
                               "`proxyd check-config` lists every one")


async def test_a_bomb_costs_the_caller_nothing(tmp_path: Path) -> None:
    lines = ['a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for prev, name in zip("abcdefgh", "bcdefghi", strict=True):
        lines.append(f"{name}: &{name} [" + ",".join([f"*{prev}"] * 9) + "]")
    path = write(tmp_path, "\n".join(lines) + "\n")
    gc.collect()  # what earlier tests left is freed before, not counted against the load
    before = rss_kib()
    with pytest.raises(ConfigError) as info:
        await load_isolated(str(path))
    (issue,) = info.value.issues
    assert issue.line is not None and issue.column is not None
    assert "aliases expand" in issue.message
    # Read here it would take a hundred MB or more; in the child, it takes nothing of ours. The
    # bound leaves room for what the rest of a test run allocates meanwhile.
    assert rss_kib() - before < 64 * 1024


async def test_a_child_past_its_deadline_is_killed_and_reaped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pid_file = tmp_path / "pid"

    def hang(path: str) -> Loaded:
        pid_file.write_text(f"{os.getpid()}\n")
        signal.pause()  # nothing wakes it: only the caller's deadline ends this
        raise AssertionError("woke up")

    monkeypatch.setattr(isolated, "_load", hang)
    started = time.monotonic()
    with pytest.raises(ConfigError) as info:
        await load_isolated(str(write(tmp_path, CONFIG)), timeout=0.5)
    assert time.monotonic() - started < 5.0
    assert "took longer than 0.5s" in str(info.value)
    assert gone(int(pid_file.read_text()))


async def test_a_child_past_its_memory_cap_reports_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def greedy(path: str) -> Loaded:
        hoard = bytearray(512 * 1024 * 1024)
        raise AssertionError(f"got {len(hoard)} bytes")

    monkeypatch.setattr(isolated, "_load", greedy)
    with pytest.raises(ConfigError) as info:
        await load_isolated(str(write(tmp_path, CONFIG)), memory=64 * 1024 * 1024)
    assert "needed more than the 64 MiB allowed" in str(info.value)


async def test_a_child_that_dies_is_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def crash(path: str) -> Loaded:
        os.kill(os.getpid(), signal.SIGKILL)
        raise AssertionError("not killed")

    monkeypatch.setattr(isolated, "_load", crash)
    with pytest.raises(ConfigError) as info:
        await load_isolated(str(write(tmp_path, CONFIG)))
    assert "was killed by SIGKILL without a result" in str(info.value)


async def test_an_unexpected_error_is_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(path: str) -> Loaded:
        raise RecursionError("maximum recursion depth exceeded")

    monkeypatch.setattr(isolated, "_load", broken)
    with pytest.raises(ConfigError) as info:
        await load_isolated(str(write(tmp_path, CONFIG)))
    path = tmp_path / "gateway.yaml"
    assert str(info.value) == (f"{path}: cannot read the config: RecursionError: "
                               "maximum recursion depth exceeded")


async def test_cancelling_kills_the_child_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pid_file = tmp_path / "pid"

    def hang(path: str) -> Loaded:
        pid_file.write_text(f"{os.getpid()}\n")
        signal.pause()
        raise AssertionError("woke up")

    monkeypatch.setattr(isolated, "_load", hang)
    task = asyncio.create_task(load_isolated(str(write(tmp_path, CONFIG)), timeout=60))
    pid = await wait_for_pid(pid_file)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # Killed, not yet reaped: in a master, its own reaping takes it; here the test does.
    reaped, status = await asyncio.to_thread(os.waitpid, pid, 0)
    assert reaped == pid and os.waitstatus_to_exitcode(status) == -signal.SIGKILL
