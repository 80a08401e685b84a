"""A hostile config file sent to a running master: refused and reported, at no cost to it.

The master must go on answering (its admin port and the traffic port) while the file is read, its
memory must not keep what reading took, every failed attempt must show in /status, the metrics
and the caller's answer, and SIGTERM must stay prompt, even with a reload in flight.
"""

from __future__ import annotations

import asyncio
import re
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.conftest import (
    Origin,
    Ports,
    Proxyd,
    StartProxyd,
    make_config,
    wait_until,
    write_config,
)

PROBE_TIMEOUT = 2.0  # a blocked loop takes the whole read; a free one answers in milliseconds
RSS_MARGIN_KIB = 40 * 1024  # reading the bomb in the master took ~200 MB and kept it


def laughs() -> str:
    """A few hundred bytes that expand to 387 million values: the reader stops at its limit,
    which takes it a second or so: long enough to watch the master meanwhile."""
    lines = ['a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for prev, name in zip("abcdefgh", "bcdefghi", strict=True):
        lines.append(f"{name}: &{name} [" + ",".join([f"*{prev}"] * 9) + "]")
    return "\n".join(lines) + "\n"


def deep() -> str:
    return "x: " + "[" * 50_000 + "]" * 50_000 + "\n"


def located(error: str, path: Path, text: str, expected: str) -> None:
    """``error`` is ``path:line:col: ...expected...``, and line:col is inside ``text``."""
    m = re.match(rf"{re.escape(str(path))}:(\d+):(\d+): .*{re.escape(expected)}", error)
    assert m, error
    line, col = int(m.group(1)), int(m.group(2))
    assert col <= len(text.splitlines()[line - 1]), error


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def children(pid: int) -> set[int]:
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        found |= {int(c) for c in (task / "children").read_text().split()}
    return found


def running(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status


@dataclass
class Watch:
    """Probes the master's admin port and the traffic port, and samples the master's RSS,
    until stopped; every probe must be answered within PROBE_TIMEOUT."""

    p: Proxyd
    answered: list[tuple[float, float]] = field(default_factory=list)  # (sent, answered)
    failures: list[str] = field(default_factory=list)
    max_rss_kib: int = 0
    _task: asyncio.Task[None] | None = None
    _stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def __aenter__(self) -> Watch:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._task is not None
        await self._task

    async def _run(self) -> None:
        timeout = aiohttp.ClientTimeout(total=PROBE_TIMEOUT)
        connector = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
            while not self._stop.is_set():
                self.max_rss_kib = max(self.max_rss_kib, rss_kib(self.p.pid))
                for url in (f"{self.p.admin_url}/health", f"{self.p.url}/marker"):
                    sent = time.monotonic()
                    try:
                        async with session.get(url) as r:
                            await r.read()
                            if r.status != 200:
                                self.failures.append(f"{url}: {r.status}")
                                continue
                    except (aiohttp.ClientError, TimeoutError) as exc:
                        self.failures.append(f"{url}: {type(exc).__name__} after "
                                             f"{time.monotonic() - sent:.1f}s")
                        continue
                    self.answered.append((sent, time.monotonic()))
                await asyncio.sleep(0.02)

    def within(self, start: float, end: float) -> int:
        return sum(1 for sent, done in self.answered if start <= sent and done <= end)


async def last_reload_after(p: Proxyd, at: float | None, timeout: float = 30.0
                            ) -> dict[str, Any]:
    async def changed() -> dict[str, Any] | None:
        p.check_alive()
        st = await p.status()
        return st if st["last_reload"]["at"] != at else None

    return await wait_until(changed, timeout, "the reload's result in /status")


async def failed_reloads_metric(p: Proxyd) -> float:
    async with p.admin_session.get(f"{p.admin_url}/metrics") as r:
        text = await r.text()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if (sample.name == "gateway_config_reloads_total"
                    and sample.labels.get("result") == "failed"):
                return float(sample.value)
    return 0.0


async def post_reload(p: Proxyd) -> tuple[int, dict[str, Any]]:
    timeout = aiohttp.ClientTimeout(total=60)
    async with p.admin_session.post(f"{p.admin_url}/reload", timeout=timeout) as r:
        return r.status, await r.json()


async def test_hostile_configs_are_refused_while_the_master_serves_on(
    origin: Origin, proxyd: StartProxyd
) -> None:
    ports = Ports()
    p = await proxyd(make_config(ports, origin.url, workers=1), ports=ports)
    rss_before = rss_kib(p.pid)
    bomb = laughs()
    write_config(p.config_path, bomb)

    # SIGHUP: the master answers throughout, and the failure lands in /status.
    async with Watch(p) as watch:
        sent = time.monotonic()
        p.signal(signal.SIGHUP)
        st = await last_reload_after(p, None)
        seen = time.monotonic()
    assert not watch.failures, watch.failures
    assert watch.within(sent, seen) >= 2, (watch.answered, sent, seen)
    assert st["last_reload"]["ok"] is False
    located(st["last_reload"]["error"], p.config_path, bomb, "aliases expand the config past")
    assert st["reloads"] == {"ok": 0, "failed": 1}
    assert st["generation"] == 1
    assert await failed_reloads_metric(p) == 1

    # POST /reload: the caller gets the failure itself.
    async with Watch(p) as watch:
        sent = time.monotonic()
        code, answer = await post_reload(p)
        seen = time.monotonic()
    assert not watch.failures, watch.failures
    assert watch.within(sent, seen) >= 2, (watch.answered, sent, seen)
    assert code == 422 and answer["ok"] is False, answer
    located(answer["error"], p.config_path, bomb, "aliases expand the config past")
    assert (await p.status())["reloads"] == {"ok": 0, "failed": 2}
    assert await failed_reloads_metric(p) == 2
    assert watch.max_rss_kib - rss_before < RSS_MARGIN_KIB, (rss_before, watch.max_rss_kib)

    # Nesting 50,000 deep: refused with its place, not a RecursionError that ends nowhere.
    nested = deep()
    write_config(p.config_path, nested)
    code, answer = await post_reload(p)
    assert code == 422 and answer["ok"] is False, answer
    located(answer["error"], p.config_path, nested, "nested deeper than 64 levels")
    st = await p.status()
    assert st["reloads"] == {"ok": 0, "failed": 3}
    assert st["last_reload"]["error"] == answer["error"]
    assert await failed_reloads_metric(p) == 3

    # The command line says the same, with no traceback.
    for args in (("reload", "--wait", "--admin", p.admin_url),
                 ("check-config", "-c", str(p.config_path))):
        result = await p.cli(*args)
        assert result.returncode == 1, (args, result.stdout, result.stderr)
        assert "Traceback" not in result.stderr, result.stderr
        located(result.stderr.splitlines()[-1], p.config_path, nested,
                "nested deeper than 64 levels")
    assert (await p.status())["reloads"] == {"ok": 0, "failed": 4}

    # What reading took did not stay with the master.
    assert rss_kib(p.pid) - rss_before < RSS_MARGIN_KIB, (rss_before, rss_kib(p.pid))

    # A good file still reloads, and SIGTERM is prompt after all this.
    write_config(p.config_path, make_config(ports, origin.url, workers=1, marker="v2"))
    code, answer = await post_reload(p)
    assert code == 200, answer
    assert {k: answer[k] for k in ("ok", "error", "generation")} == {
        "ok": True, "error": None, "generation": 2}, answer
    await p.wait_generation(2)
    started = time.monotonic()
    p.signal(signal.SIGTERM)
    assert await p.wait_exit(15.0) == 0, p.log()
    assert time.monotonic() - started < 10.0


async def test_sigterm_during_a_reload_is_prompt_and_answers_the_caller(
    origin: Origin, proxyd: StartProxyd
) -> None:
    ports = Ports()
    p = await proxyd(make_config(ports, origin.url, workers=1), ports=ports)
    workers = {w["pid"] for w in (await p.status())["workers"]}
    write_config(p.config_path, laughs())
    pending = asyncio.create_task(post_reload(p))

    def reader() -> set[int] | None:
        return (children(p.pid) - workers) or None

    # The file is being read (in a child of the master): now stop.
    (parser,) = await wait_until(reader, 10.0, "the master to start reading the file")
    started = time.monotonic()
    p.signal(signal.SIGTERM)
    code, answer = await asyncio.wait_for(pending, 15.0)
    assert code == 422 and answer["ok"] is False, answer
    assert await p.wait_exit(15.0) == 0, p.log()
    assert time.monotonic() - started < 10.0
    await wait_until(lambda: not running(parser), 5.0, "the reader to be stopped")
