"""The CLI's side of the admin port: small synchronous HTTP calls and a readable status."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from datetime import datetime
from typing import Any

from proxyd.config.diff import describe


class AdminUnreachable(Exception):
    pass


def admin_request(
    url: str, *, method: str = "GET", token: str = "", timeout: float = 60.0
) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as exc:
        body = exc.read()
        try:
            return exc.code, json.loads(body or b"{}")
        except ValueError:
            return exc.code, {"error": body.decode(errors="replace")}
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise AdminUnreachable(f"admin port {url} unreachable: {reason}") from None


def wait_for_reload(base: str, before: float | None, timeout: float = 60.0,
                    token: str = "") -> dict[str, Any]:
    """After a SIGHUP: poll /status until last_reload changes."""

    def outcome(data: dict[str, Any]) -> dict[str, Any] | None:
        last = data.get("last_reload") or {}
        if last.get("at") not in (None, before):
            return {**last, "generation": data.get("generation")}
        return None

    return _poll_status(base, token, timeout, outcome, "the reload result")


def wait_for_upgrade(base: str, old_pid: int | None, before: float | None, timeout: float,
                     token: str = "", new_pid: int | None = None) -> dict[str, Any]:
    """After an upgrade began: poll /status until a new master answers it (its pid, ``new_pid``
    when known) or the old one records a failed upgrade newer than ``before``."""

    def outcome(data: dict[str, Any]) -> dict[str, Any] | None:
        pid = data.get("pid")
        if pid is not None and pid != old_pid and new_pid in (None, pid):
            return {"ok": True, "error": None, "pid": pid, "version": data.get("version")}
        last = (data.get("upgrades") or {}).get("last") or {}
        if pid == old_pid and last.get("at") not in (None, before) and not last.get("ok"):
            return {"ok": False, "error": last.get("error")}
        return None

    return _poll_status(base, token, timeout, outcome, "a new master to answer")


def _poll_status(base: str, token: str, timeout: float,
                 outcome: Callable[[dict[str, Any]], dict[str, Any] | None],
                 waiting_for: str) -> dict[str, Any]:
    """Poll /status until ``outcome`` makes a result of it. An admin port that does not
    answer reads as an empty status: a master may be between processes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            _, data = admin_request(f"{base}/status", timeout=5, token=token)
        except AdminUnreachable:
            data = {}
        if (result := outcome(data)) is not None:
            return result
        time.sleep(0.1)
    return {"ok": False, "error": f"timed out waiting for {waiting_for}"}


def _when(ts: float | None) -> str:
    return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S") if ts else "-"


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return f"{n:.1f}GiB"


def format_status(data: dict[str, Any]) -> str:
    config = data.get("config", {})
    lines = [
        f"proxyd {data.get('version')} ({data.get('build', '?')} build)  pid {data.get('pid')}  "
        f"state {data.get('state')}  generation {data.get('generation')}",
        f"config  {config.get('path')}  sha256 {str(config.get('sha256'))[:12]}  "
        f"loaded {_when(data.get('loaded_at'))}",
    ]
    last = data.get("last_reload") or {}
    if last.get("at"):
        outcome = "ok" if last.get("ok") else f"FAILED: {last.get('error')}"
        if last.get("ok") and isinstance(last.get("changes"), dict):
            outcome += f" ({describe(last['changes'])})"
        lines.append(f"last reload  {_when(last['at'])}  {outcome}")
    upgrades = data.get("upgrades") or {}
    if (last_upgrade := upgrades.get("last")) is not None:
        outcome = ("ok" if last_upgrade.get("ok")
                   else f"FAILED: {last_upgrade.get('error')}")
        lines.append(f"last upgrade  {_when(last_upgrade.get('at'))}  "
                     f"{last_upgrade.get('from_version')} → {last_upgrade.get('to_version')}  "
                     f"{outcome}  (ok {upgrades.get('ok', 0)}, failed "
                     f"{upgrades.get('failed', 0)})")
    counts = data.get("reloads", {})
    lines.append(f"reloads  ok {counts.get('ok', 0)}  failed {counts.get('failed', 0)}  "
                 f"worker restarts {data.get('worker_restarts', 0)}")
    listeners = sorted({entry["listen"] for entry in data.get("listeners", [])})
    lines.append(f"listeners  {', '.join(listeners) or '-'}")
    if data.get("workers_reason"):
        lines.append(f"workers  {data.get('worker_count')} ({data['workers_reason']})")
    lines.append("")
    lines.append(f"{'SLOT':>4}  {'PID':>7}  {'GEN':>4}  {'STATE':<9} {'REQUESTS':>9}  "
                 f"{'CONNS':>6}  {'CACHE':>7}  {'CACHE SIZE':>10}  UPTIME")
    now = time.time()
    for w in data.get("workers", []):
        uptime = int(now - w.get("started_at", now))
        cache = w.get("cache") or {}
        entries = cache.get("entries")
        size = cache.get("bytes")
        lines.append(f"{w['slot']:>4}  {w['pid']:>7}  {w['generation']:>4}  {w['state']:<9} "
                     f"{w['requests']:>9}  {w.get('connections', 0):>6}  "
                     f"{'-' if entries is None else entries:>7}  "
                     f"{'-' if size is None else _size(size):>10}  {uptime}s")
    upstreams = data.get("upstreams") or {}
    if upstreams:
        lines.append("")
        lines.append(f"{'UPSTREAM':<16} {'TARGET':<32} {'ACTIVE CHECK':<14} EJECTED BY WORKERS")
        for name, targets in sorted(upstreams.items()):
            for url, t in targets.items():
                lines.append(f"{name:<16} {url:<32} {_active(t):<14} {_passive(t)}")
    return "\n".join(lines)


def _active(target: dict[str, Any]) -> str:
    if not target.get("checked"):
        return "-"
    return "healthy" if target.get("healthy") else "UNHEALTHY"


def _passive(target: dict[str, Any]) -> str:
    if target.get("outlier_detection") is False:
        return "-"
    ejected, workers = target.get("ejected_by_workers", 0), target.get("workers", 0)
    slots = ", ".join(str(s) for s in target.get("ejected_slots", []))
    return f"{ejected}/{workers}" + (f" (slots {slots})" if slots else "")
