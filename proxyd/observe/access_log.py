"""The access log: one line per request, formatted and written in batches.

A request only appends a tuple of its fields; the lines are built at the flush, in one loop,
with C-level string escaping (no dict, no json.dumps per request) — about half the cost of
formatting each line in its own call — and written about ten times a second, every 256
records, on reopen (SIGUSR1, for logrotate) and at exit, so no line is lost on a graceful stop
or reload.

A reader that does not keep up (stdout a pipe or socket) never stops the worker: writes there
never block (a pipe gets a description of its own, non-blocking; a socket is written with
MSG_DONTWAIT), what the reader has not taken waits in a bounded backlog retried at the next
flush, and lines beyond the bound are dropped. Dropped lines and failed writes (a full disk,
a reader gone) are counted in gateway_access_log_dropped_lines_total and
gateway_access_log_write_errors_total and reported on the worker's log at most every
REPORT_INTERVAL seconds. A regular file (the production case) takes every write whole.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import random
import select
import socket
import stat
import time
from collections.abc import Callable
from json.encoder import encode_basestring_ascii as esc
from typing import TYPE_CHECKING, Final

from proxyd.config.models import AccessLogSettings
from proxyd.observe.log_format import combined, compile_template, protocol_name, render
from proxyd.observe.metrics import LOG_STALLED, LOG_WRITE_ERROR

if TYPE_CHECKING:
    from proxyd.observe.metrics import WorkerMetrics

log = logging.getLogger("proxyd.access_log")

FLUSH_INTERVAL: Final = 0.1
FLUSH_RECORDS: Final = 256  # ~64 KiB of JSON lines
# Bytes that wait for a reader that is behind: a few thousand lines, seconds of a busy
# worker's traffic. A new batch is dropped whole while the backlog is this long, so it holds
# at most this plus one batch.
MAX_BACKLOG: Final = 1 << 20
REPORT_INTERVAL: Final = 10.0  # seconds between two messages about lost lines
CLOSE_WAIT: Final = 1.0  # seconds a stopping worker gives a slow reader to take the backlog
# Writes to a pipe or socket are cut at line ends into pieces of at most PIPE_BUF bytes: a
# pipe takes such a write whole or not at all, so the lines of workers sharing it never
# interleave and a full pipe never leaves half a line behind (a longer line goes alone).
_WHOLE: Final = 1 << 62  # a file's or terminal's writes: not cut
NO_FIELDS: Final[list[tuple[bytes, bytes, bytes]]] = []

# What record() keeps per request, formatted at the flush. The request id is a str, or an int:
# the worker's own counter value for a request that had no id yet, made "<id_prefix>-<hex>"
# only here (no string per request on the hot path, and no escaping: it is hex). Plain values
# only, and what costs a lookup (the User-Agent among the request's fields, "host:port" out of
# the target's URL) is looked up here too: the request keeps its list of fields, unchanged.
# ts, request_id, client_ip, method, host, target, status, bytes_in, bytes_out, duration,
# upstream, upstream_time, cache, route, request fields, HTTP version (10, 11 or 20), target
# URL, tries, TLS
Record = tuple[float, str | int, bytes, bytes, bytes | None, bytes, int, int, int, float, str,
               float | None, str, str, list[tuple[bytes, bytes, bytes]], int, str, int, str]


def _json_text(value: bytes | str | None) -> str:
    if not value:
        return "null"
    return esc(value.decode("latin-1") if isinstance(value, bytes) else value)


# The optional JSON fields (access_log.fields), in their order in the line: name → its value,
# from the User-Agent, the Referer, the HTTP version, the target URL, tries, the TLS version.
ExtraValues = tuple[bytes | None, bytes | None, int, str, int, str]
EXTRA_FIELDS: Final[dict[str, Callable[[ExtraValues], str]]] = {
    "user_agent": lambda v: _json_text(v[0]),
    "referer": lambda v: _json_text(v[1]),
    "protocol": lambda v: f'"{protocol_name(v[2])}"',
    "upstream_addr": lambda v: _json_text(v[3].partition("://")[2]),
    "tries": lambda v: str(v[4]),
    "tls_version": lambda v: _json_text(v[5]),
}
MAX_EXTRAS: Final = 4096  # distinct combinations of those values remembered, then start over


class AccessLog:
    def __init__(self, config: AccessLogSettings, loop: asyncio.AbstractEventLoop,
                 id_prefix: str, metrics: WorkerMetrics | None = None) -> None:
        self.path = config.path
        self.id_prefix = id_prefix  # of request ids recorded as counter values
        self.format = config.format
        self._extra = [(f'"{name}":', EXTRA_FIELDS[name]) for name in config.fields]
        self._agents = "user_agent" in config.fields or "referer" in config.fields
        # Their text by their values: clients send few distinct User-Agents and Referers,
        # and the rest has few values, so a line mostly takes its extra fields from here.
        self._extras: dict[ExtraValues, str] = {}
        self._template = compile_template(config.template) if config.template else []
        self.sample_2xx = config.sample_2xx
        self.pid = os.getpid()
        self._loop = loop
        self._metrics = metrics
        self._pending: list[Record] = []
        self._fd = -1
        self._sock: socket.socket | None = None  # stdout, where it is a socket
        self._write: Callable[[memoryview], int] = self._write_fd
        self._piece = _WHOLE  # the longest single write (see _WHOLE)
        self._backlog = bytearray()  # formatted, not yet taken by the reader
        self._handle: asyncio.TimerHandle | None = None
        self.written = 0  # lines, for tests and status
        self.dropped = 0  # lines lost, for tests (the metric has them by reason)
        self.write_errors = 0
        self._unreported: dict[str, int] = {}  # reason → lines lost since the last message
        self._last_error = ""  # the last failed write's error, for the report
        self._report_handle: asyncio.TimerHandle | None = None
        self._escaped: dict[tuple[bytes, bytes | None, str, str, str], tuple[str, str, str]] = {}
        self.open()

    @property
    def backlog(self) -> int:
        """Bytes waiting for a reader that is behind."""
        return len(self._backlog)

    def open(self) -> None:
        self._piece = _WHOLE
        self._write = self._write_fd
        if self.path == "-":
            self._fd = self._open_stdout()
        else:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                               0o640)
            if stat.S_ISFIFO(os.fstat(self._fd).st_mode):  # a named pipe: a reader to wait for
                os.set_blocking(self._fd, False)  # our own description: no one else's flag
                self._piece = select.PIPE_BUF

    def _open_stdout(self) -> int:
        """fd 1, written without ever blocking where a reader may fall behind. A pipe is
        opened again through /proc: a new description of the same pipe, non-blocking without
        changing fd 1 for the master, the other workers or stderr where it is the same pipe.
        A socket (journald's stream) is sent to with MSG_DONTWAIT, for the same reason."""
        try:
            mode = os.fstat(1).st_mode
        except OSError:
            return 1  # no stdout: the writes fail, and are counted
        if stat.S_ISFIFO(mode):
            self._piece = select.PIPE_BUF
            try:
                return os.open("/proc/self/fd/1", os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError:  # no /proc, or no reader left: fd 1 as it is
                return 1
        if stat.S_ISSOCK(mode):
            self._piece = select.PIPE_BUF
            sock = self._sock = socket.socket(fileno=os.dup(1))
            self._write = self._send_socket
            return sock.fileno()
        return 1

    def _write_fd(self, data: memoryview) -> int:
        return os.write(self._fd, data)

    def _send_socket(self, data: memoryview) -> int:
        assert self._sock is not None
        return self._sock.send(data, socket.MSG_DONTWAIT)

    def _close_fd(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        elif self._fd > 2:
            os.close(self._fd)
        self._fd = -1

    def reopen(self) -> None:
        """SIGUSR1: logrotate moved the file; flush to the old one, continue in a new one.
        What the old one did not take (a reader behind) goes to the new one."""
        self.flush()
        self._close_fd()
        self.open()

    def record(  # positional from the hot path: 18 keyword arguments cost more per call
        self, request_id: str | int, client_ip: bytes, method: bytes, host: bytes | None,
        target: bytes, status: int, bytes_in: int, bytes_out: int, duration: float,
        upstream: str, upstream_time: float | None, cache: str, route: str,
        headers: list[tuple[bytes, bytes, bytes]] = NO_FIELDS, version: int = 11,
        target_url: str = "", tries: int = 0, tls: str = "",
    ) -> None:
        if self.sample_2xx < 1.0 and 200 <= status < 300 and random.random() >= self.sample_2xx:
            return
        pending = self._pending
        pending.append((time.time(), request_id, client_ip, method, host, target, status,
                        bytes_in, bytes_out, duration, upstream, upstream_time, cache, route,
                        headers, version, target_url, tries, tls))
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
        extra = self._extra
        lines = []
        for record in records:
            (now, request_id, client_ip, method, host, target, status, bytes_in, bytes_out,
             duration, upstream, upstream_time, cache, route, *_) = record
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
                f'"upstream_ms":{up_ms},{self._extra_text(record) if extra else ""}'
                f"{fixed[2]}"
            )
        return lines

    def _extra_text(self, record: Record) -> str:
        """The optional fields of one JSON line, each followed by its comma."""
        agent = referer = None
        if self._agents:
            for name, _, value in record[14]:
                if name == b"user-agent":
                    agent = value
                elif name == b"referer":
                    referer = value
        values = (agent, referer, record[15], record[16], record[17], record[18])
        text = self._extras.get(values)
        if text is None:
            text = "".join(f"{key}{value(values)}," for key, value in self._extra)
            if len(self._extras) >= MAX_EXTRAS:
                self._extras.clear()
            if (agent is None or len(agent) <= 256) and (referer is None or len(referer) <= 256):
                self._extras[values] = text
        return text

    def _request_id(self, request_id: str | int) -> str:
        return request_id if isinstance(request_id, str) else f"{self.id_prefix}-{request_id:x}"

    def _combined(self, records: list[Record]) -> list[str]:
        return [combined(record) for record in records]

    def _templated(self, records: list[Record]) -> list[str]:
        parts = self._template
        return [render(parts, record, self._request_id(record[1])) for record in records]

    def flush(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        records = self._pending
        if records:
            self._pending = []
        backlog = self._backlog
        if backlog:  # older lines first
            del backlog[:self._push(backlog, -1)]
            if len(backlog) >= MAX_BACKLOG and records:  # dropped before they cost formatting
                self._lost(LOG_STALLED, len(records))
                records = []
        if records:
            lines = (self._json(records) if self.format == "json"
                     else self._combined(records) if self.format == "combined"
                     else self._templated(records))
            data = "".join(lines).encode("utf-8", "replace")
            if backlog:
                backlog += data
            else:
                done = self._push(data, len(lines))
                if done < len(data):
                    backlog += memoryview(data)[done:]
        if backlog and self._fd != -1:  # the reader is behind: try again, without spinning
            self._handle = self._loop.call_later(FLUSH_INTERVAL, self.flush)

    def _push(self, data: bytes | bytearray, lines: int) -> int:
        """Write data from its start as far as the reader takes it now; the bytes done with
        (written, or lost to a failed write). ``lines`` is data's count of lines, -1 unknown."""
        end = len(data)
        written = 0
        failed = False
        piece = self._piece
        write = self._write
        # (No slice of the view may outlive this block: a bytearray's backlog cannot be cut
        # while one exists. Hence the error kept as text, not as the exception.)
        with memoryview(data) as view:
            try:
                while written < end:
                    stop = end
                    if end - written > piece:
                        stop = data.rfind(b"\n", written, written + piece) + 1
                        if stop <= written:  # a line longer than a piece: alone
                            stop = data.find(b"\n", written + piece) + 1 or end
                    written += write(view[written:stop])
            except BlockingIOError:
                pass  # a full pipe or socket: the rest waits for the next try
            except OSError as exc:  # a full disk, a reader gone: the rest is lost
                self._failed(exc, data.count(b"\n", written))
                failed = True
        self.written += (lines if lines >= 0 and written == end
                         else data.count(b"\n", 0, written))
        return end if failed else written

    def _failed(self, exc: OSError, lines: int) -> None:
        self.write_errors += 1
        self._last_error = str(exc)
        if self._metrics is not None:
            self._metrics.access_log_write_error(errno.errorcode.get(exc.errno or 0, "other"))
        self._lost(LOG_WRITE_ERROR, lines)

    def _lost(self, reason: str, lines: int) -> None:
        self.dropped += lines
        if self._metrics is not None:
            self._metrics.access_log_dropped(reason, lines)
        self._unreported[reason] = self._unreported.get(reason, 0) + lines
        if self._report_handle is None:
            self._report()

    def _report(self) -> None:
        """Say what was lost since the last message; then at most one more message per
        REPORT_INTERVAL, summing up what was lost meanwhile (a stalled reader or a full disk
        loses lines at every flush: a message each time would flood the worker's log)."""
        self._report_handle = None
        unreported = self._unreported
        if not unreported:
            return
        stalled = unreported.get(LOG_STALLED, 0)
        failed = unreported.get(LOG_WRITE_ERROR, 0)
        where = "stdout" if self.path == "-" else self.path
        parts = []
        if stalled:
            parts.append(f"{stalled} because the reader is not keeping up "
                         f"({MAX_BACKLOG >> 10} KiB already waiting)")
        if failed:
            parts.append(f"{failed} on failed writes, the last: {self._last_error}")
        log.warning("access log to %s: %d lines dropped (%s); at most one such message "
                    "every %gs", where, stalled + failed, "; ".join(parts), REPORT_INTERVAL)
        unreported.clear()
        if self._fd != -1:
            self._report_handle = self._loop.call_later(REPORT_INTERVAL, self._report)

    def close(self) -> None:
        if self._fd == -1:
            return
        self.flush()
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        backlog = self._backlog
        if backlog:  # a slow reader gets a last moment
            deadline = time.monotonic() + CLOSE_WAIT
            poller = select.poll()
            poller.register(self._fd, select.POLLOUT)
            while backlog and (left := deadline - time.monotonic()) > 0:
                if poller.poll(left * 1000):
                    del backlog[:self._push(backlog, -1)]
            if backlog:
                self._lost(LOG_STALLED, backlog.count(b"\n"))
                backlog.clear()
        if self._report_handle is not None:
            self._report_handle.cancel()
        self._close_fd()
        self._report()  # what is left unsaid: now, the worker is leaving
