"""The access log: one line per request, formatted and written in batches.

A request only appends a tuple of its fields; the lines are built at the flush, in one loop,
with C-level string escaping (no dict, no json.dumps per request) — about half the cost of
formatting each line in its own call — and written with one os.write about ten times a
second, every 256 records, on reopen (SIGUSR1, for logrotate) and at exit, so no line is lost
on a graceful stop or reload. A write to a full pipe blocks the worker briefly; a file (the
production case) does not.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from json.encoder import encode_basestring_ascii as esc
from typing import Final

from proxyd.config.models import AccessLog as AccessLogConfig

FLUSH_INTERVAL: Final = 0.1
FLUSH_RECORDS: Final = 256  # ~64 KiB of JSON lines

# What record() keeps per request, formatted at the flush. The request id is a str, or an int:
# the worker's own counter value for a request that had no id yet, made "<id_prefix>-<hex>"
# only here (no string per request on the hot path, and no escaping: it is hex).
Record = tuple[float, str | int, bytes, bytes, bytes | None, bytes, int, int, int, float, str,
               float | None, str, str]
_MONTHS: Final = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov",
                  "Dec")


def _clf_time(ts: float) -> str:
    t = time.gmtime(ts)
    return f"{t.tm_mday:02d}/{_MONTHS[t.tm_mon - 1]}/{t.tm_year}:{t.tm_hour:02d}:" \
           f"{t.tm_min:02d}:{t.tm_sec:02d} +0000"


class AccessLog:
    def __init__(self, config: AccessLogConfig, loop: asyncio.AbstractEventLoop,
                 id_prefix: str) -> None:
        self.path = config.path
        self.id_prefix = id_prefix  # of request ids recorded as counter values
        self.format = config.format
        self.sample_2xx = config.sample_2xx
        self.pid = os.getpid()
        self._loop = loop
        self._pending: list[Record] = []
        self._fd = -1
        self._handle: asyncio.TimerHandle | None = None
        self.written = 0  # lines, for tests and status
        self._escaped: dict[tuple[bytes, bytes | None, str, str, str], tuple[str, str, str]] = {}
        self.open()

    def open(self) -> None:
        if self.path == "-":
            self._fd = 1
        else:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                               0o640)

    def reopen(self) -> None:
        """SIGUSR1: logrotate moved the file; flush to the old one, continue in a new one."""
        self.flush()
        if self._fd > 2:
            os.close(self._fd)
        self.open()

    def record(  # positional from the hot path: 13 keywords cost ~0.25 µs a call
        self, request_id: str | int, client_ip: bytes, method: bytes, host: bytes | None,
        target: bytes, status: int, bytes_in: int, bytes_out: int, duration: float,
        upstream: str, upstream_time: float | None, cache: str, route: str,
    ) -> None:
        if self.sample_2xx < 1.0 and 200 <= status < 300 and random.random() >= self.sample_2xx:
            return
        pending = self._pending
        pending.append((time.time(), request_id, client_ip, method, host, target, status,
                        bytes_in, bytes_out, duration, upstream, upstream_time, cache, route))
        if len(pending) >= FLUSH_RECORDS:
            self.flush()
        elif self._handle is None:
            self._handle = self._loop.call_later(FLUSH_INTERVAL, self.flush)

    def _json(self, records: list[Record]) -> list[str]:
        # Fields with few distinct values (method, host, route, upstream, cache) are escaped
        # once and remembered. Hosts are client-chosen: only short ones are kept, and a full
        # table starts over (a scan must not pin memory or the slow path).
        known = self._escaped
        pid = self.pid
        prefix = self.id_prefix
        lines = []
        for (now, request_id, client_ip, method, host, target, status, bytes_in, bytes_out,
             duration, upstream, upstream_time, cache, route) in records:
            rid = (esc(request_id) if request_id.__class__ is str
                   else f'"{prefix}-{request_id:x}"')
            fixed = known.get((method, host, upstream, cache, route))
            if fixed is None:
                if len(known) >= 1024:
                    known.clear()
                fixed = (
                    f'"method":{esc(method.decode("latin-1"))},'
                    f'"host":{esc((host or b"").decode("latin-1"))},',
                    f'"upstream":{esc(upstream)},',
                    f'"cache":{esc(cache)},"route":{esc(route)},"pid":{pid}}}\n',
                )
                if host is None or len(host) <= 128:
                    known[(method, host, upstream, cache, route)] = fixed
            path, _, query = target.partition(b"?")
            up_ms = "null" if upstream_time is None else f"{upstream_time * 1000:.3f}"
            lines.append(
                f'{{"ts":{now:.3f},"request_id":{rid},'
                f'"client_ip":"{client_ip.decode("latin-1")}",{fixed[0]}'
                f'"path":{esc(path.decode("latin-1"))},'
                f'"query":{esc(query.decode("latin-1"))},"status":{status},'
                f'"bytes_in":{bytes_in},"bytes_out":{bytes_out},'
                f'"duration_ms":{duration * 1000:.3f},{fixed[1]}'
                f'"upstream_ms":{up_ms},{fixed[2]}'
            )
        return lines

    def _combined(self, records: list[Record]) -> list[str]:
        # Without referer/agent lookups on the hot path: "-".
        prefix = self.id_prefix
        return [
            f'{client_ip.decode("latin-1")} - - [{_clf_time(now)}] '
            f'{esc(method.decode("latin-1") + " " + target.decode("latin-1"))} '
            f'{status} {bytes_out} "-" "-" '
            f'{request_id if request_id.__class__ is str else f"{prefix}-{request_id:x}"}\n'
            for (now, request_id, client_ip, method, _host, target, status, _in, bytes_out,
                 *_rest) in records
        ]

    def flush(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        records = self._pending
        if not records:
            return
        self._pending = []
        lines = self._json(records) if self.format == "json" else self._combined(records)
        data = "".join(lines).encode("utf-8", "replace")
        view = memoryview(data)
        while view:
            try:
                n = os.write(self._fd, view)
            except BlockingIOError:
                continue  # stdout set non-blocking by someone else: retry
            except OSError:
                return  # a closed stdout must not take the worker down
            view = view[n:]
        self.written += len(lines)

    def close(self) -> None:
        self.flush()
        if self._fd > 2:
            os.close(self._fd)
        self._fd = -1
