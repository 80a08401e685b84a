"""Metrics: plain in-process counters in each worker, merged by the master for /metrics.

Why not prometheus_client objects on the hot path: ``Counter.labels(...).inc()`` takes a lock
and a dict lookup per label set — a few microseconds per metric per request, which at 20k req/s
per worker is several percent of a core. A worker instead bumps dict entries keyed by label
tuples and pushes cumulative snapshots to the master about once a second (and at exit). The
master keeps the last snapshot of every live worker plus the summed totals of dead ones, so
counters never go backwards across recycling or crashes; gauges come from live workers only.
Not prometheus_client multiprocess mode: its files grow with every recycled worker.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, Final

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from proxyd.observe import process

# The bounds as a list of float objects, for bucket(): compiled, a Final tuple literal of floats
# is unboxed, and iterating or passing it boxes every element again on each use.
_BOUNDS: Final[list[float]] = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                               1.0, 2.5, 5.0, 10.0]
BUCKETS: Final[tuple[float, ...]] = tuple(_BOUNDS)


def bucket(seconds: float) -> int:
    """The histogram row index of a duration: bisect_left(BUCKETS, seconds), as a loop over
    _BOUNDS (bisect got BUCKETS boxed into a new tuple of 14 floats per call); the usual
    sub-millisecond answer takes one comparison."""
    i = 0
    for bound in _BOUNDS:
        if seconds <= bound:
            return i
        i += 1
    return i


# name → (kind, help, label names); the order of label names is the order of key tuples.
COUNTERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "gateway_requests_total": ("Requests answered", ("route", "method", "status")),
    "gateway_cache_hits_total": ("Responses served from the cache", ("route",)),
    "gateway_cache_misses_total": ("Cacheable requests not in the cache", ("route",)),
    "gateway_upstream_errors_total": ("Failed upstream exchanges", ("upstream", "kind")),
    "gateway_upstream_retries_total": ("Upstream tries beyond the first", ("upstream",)),
    "gateway_upstream_rejected_total": ("Requests refused with 503 before reaching a target "
                                        "(breaker, queue, no target up)", ("upstream", "reason")),
    "gateway_upstream_ejections_total": ("Targets ejected by outlier detection",
                                         ("upstream", "target")),
    "gateway_rate_limited_total": ("Requests refused by rate limiting", ("route",)),
    "gateway_websocket_messages_total": ("WebSocket messages relayed", ("direction",)),
    "gateway_websocket_bytes_total": ("WebSocket bytes relayed", ("direction",)),
    "gateway_websocket_closes_total": ("WebSocket relays ended, by close code", ("code",)),
    "gateway_client_limits_total": (
        "Client connections or requests refused or cut by a limit or the parser "
        "(max_connections, body_timeout, send_timeout, header_timeout, malformed, "
        "uri_too_long, header_too_large, body_too_large, bad_path, bad_version, "
        "underscore_header)", ("limit",)),
    "gateway_access_log_dropped_lines_total": (
        "Access log lines lost: the reader did not keep up (stalled) or a write failed "
        "(write_error)", ("reason",)),
    "gateway_access_log_write_errors_total": ("Failed writes of the access log, by errno",
                                              ("errno",)),
    "gateway_fd_exhausted_total": (
        "Checks (one a second per worker) that found no file descriptor free: meanwhile new "
        "client connections are closed without an answer and upstream connects fail", ()),
    "gateway_tls_handshake_errors_total": (
        "Failed TLS handshakes on a listener, by reason: plain_http (HTTP to the TLS port), "
        "protocol (no TLS version, cipher or group in common), no_certificate (client_auth: "
        "required, none sent), bad_certificate (the client's failed verification), "
        "certificate_refused (the client refused proxyd's), timeout (header_timeout), closed "
        "(the client closed or reset mid-handshake; port checks too), other",
        ("listener", "reason")),
    "gateway_tls_handshakes_total": ("Completed TLS handshakes on a listener, by TLS version",
                                     ("listener", "version")),
    "gateway_auth_total": (
        "Requests decided by an access element (jwt_auth, basic_auth, api_key, ip_access, "
        "forward_auth), by result: ok, missing (no credentials), invalid, expired, denied "
        "(ip_access; forward_auth's service refused), unavailable (jwt_auth without keys; "
        "forward_auth's service down, slow or 5xx, refused with 503), busy (basic_auth's hash "
        "checks full; forward_auth's subrequests at max_pending: 503), error_allowed "
        "(forward_auth's service failed, on_error: allow)",
        ("route", "element", "result")),
    "gateway_jwks_refreshes_total": (
        "JWKS fetches by jwt_auth, by result (ok, error); after an error the last good keys "
        "stay in use", ("result",)),
}

# gateway_access_log_dropped_lines_total's reasons.
LOG_STALLED: Final = "stalled"
LOG_WRITE_ERROR: Final = "write_error"
HISTOGRAMS: dict[str, tuple[str, tuple[str, ...]]] = {
    "gateway_request_duration_seconds": ("Time from request head to response end",
                                         ("route", "method")),
    "gateway_upstream_request_duration_seconds": ("Time from upstream request to response end",
                                                  ("upstream",)),
}
GAUGES: dict[str, tuple[str, tuple[str, ...]]] = {
    "gateway_active_connections": ("Open client connections", ()),
    "gateway_pool_connections_active": ("Upstream connections in use", ("upstream",)),
    "gateway_pool_connections_idle": ("Idle pooled upstream connections", ("upstream",)),
    "gateway_upstream_target_connections_active": ("Upstream connections in use, per target",
                                                   ("upstream", "target")),
    "gateway_upstream_target_connections_idle": ("Idle pooled connections, per target",
                                                 ("upstream", "target")),
    "gateway_upstream_target_requests_active": (
        "Requests in flight per target: one per connection in use on HTTP/1.1, the open "
        "streams on HTTP/2", ("upstream", "target")),
    "gateway_upstream_target_ejected": ("Workers that have ejected the target",
                                        ("upstream", "target")),
    "gateway_upstream_circuit_open": ("Workers whose circuit breaker for the upstream is open",
                                      ("upstream",)),
    "gateway_websocket_connections_active": ("Relayed WebSocket connections", ()),
    # One gauge per user of Redis: each fails over in its own way, and has its own alert.
    "gateway_rate_limit_redis_fallback_active": (
        "Workers whose Redis-backed rate limiter cannot reach Redis and applies "
        "on_backend_error (local: its share of the limit, in memory)", ()),
    "gateway_cache_redis_unavailable": (
        "Workers whose Redis cache cannot reach Redis (lookups are misses meanwhile)", ()),
}


class Counter:
    """One counter of a worker, held as an attribute of its WorkerMetrics: code counts through
    the attribute, so a misspelt counter is a type error, not a series nobody exports."""

    __slots__ = ("name", "series")

    def __init__(self, metrics: WorkerMetrics, name: str) -> None:
        self.name = name
        self.series = metrics.counters[name]  # (a name not in COUNTERS fails at start)

    def inc(self, labels: tuple[str, ...], amount: float = 1.0) -> None:
        """``labels`` in the order COUNTERS names them."""
        series = self.series
        series[labels] = series.get(labels, 0.0) + amount


class WorkerMetrics:
    """The per-worker side: cheap increments, and a JSON-able cumulative snapshot."""

    def __init__(self) -> None:
        # Label tuples: strings, except the request status, an int until snapshot().
        self.counters: dict[str, dict[tuple[Any, ...], float]] = {n: {} for n in COUNTERS}
        # histogram name → labels → [bucket counts..., +Inf count, sum]
        self.histograms: dict[str, dict[tuple[str, ...], list[float]]] = {
            n: {} for n in HISTOGRAMS
        }
        self.requests = self.counters["gateway_requests_total"]
        self.durations = self.histograms["gateway_request_duration_seconds"]
        self.upstream_durations = self.histograms["gateway_upstream_request_duration_seconds"]
        self.log_dropped = self.counters["gateway_access_log_dropped_lines_total"]
        self.log_write_errors = self.counters["gateway_access_log_write_errors_total"]
        # Every other counter, typed (tests/unit/observe/test_metrics.py checks that each of
        # COUNTERS has its attribute here, or its method above and below).
        self.cache_hits = Counter(self, "gateway_cache_hits_total")
        self.cache_misses = Counter(self, "gateway_cache_misses_total")
        self.upstream_errors = Counter(self, "gateway_upstream_errors_total")
        self.upstream_retries = Counter(self, "gateway_upstream_retries_total")
        self.upstream_rejected = Counter(self, "gateway_upstream_rejected_total")
        self.upstream_ejections = Counter(self, "gateway_upstream_ejections_total")
        self.rate_limited = Counter(self, "gateway_rate_limited_total")
        self.websocket_messages = Counter(self, "gateway_websocket_messages_total")
        self.websocket_bytes = Counter(self, "gateway_websocket_bytes_total")
        self.websocket_closes = Counter(self, "gateway_websocket_closes_total")
        self.client_limits = Counter(self, "gateway_client_limits_total")
        self.fd_exhausted = Counter(self, "gateway_fd_exhausted_total")
        self.tls_handshake_errors = Counter(self, "gateway_tls_handshake_errors_total")
        self.tls_handshakes = Counter(self, "gateway_tls_handshakes_total")
        self.auth = Counter(self, "gateway_auth_total")
        self.jwks_refreshes = Counter(self, "gateway_jwks_refreshes_total")

    @staticmethod
    def row(series: dict[tuple[str, ...], list[float]], labels: tuple[str, ...]) -> list[float]:
        """The mutable row of one histogram series (made on first use): bucket counts
        (non-cumulative here; summed on export), +Inf count, sum. Callers may keep it: rows
        are never replaced."""
        row = series.get(labels)
        if row is None:
            row = series[labels] = [0.0] * (len(BUCKETS) + 2)
        return row

    def request(self, route: str, method: str, status: int, duration: float) -> None:
        # The status stays an int here (str() per request is not free): made a label in
        # snapshot(). The histogram update is observe()'s, inlined: once per request.
        key = (route, method, status)
        requests = self.requests
        requests[key] = requests.get(key, 0.0) + 1
        durations = self.durations
        row = durations.get((route, method))
        if row is None:
            row = durations[(route, method)] = [0.0] * (len(BUCKETS) + 2)
        row[bucket(duration)] += 1
        row[-1] += duration

    def access_log_dropped(self, reason: str, lines: int) -> None:
        """Lines the access log lost; reason is LOG_STALLED or LOG_WRITE_ERROR."""
        series = self.log_dropped
        series[(reason,)] = series.get((reason,), 0.0) + lines

    def access_log_write_error(self, errno_name: str) -> None:
        """One failed write of the access log ("ENOSPC", "EPIPE", ...)."""
        series = self.log_write_errors
        series[(errno_name,)] = series.get((errno_name,), 0.0) + 1

    def snapshot(self, gauges: dict[str, dict[tuple[str, ...], float]]) -> dict[str, Any]:
        return {
            "process": process.sample(),  # memory, CPU, descriptors: per worker, by the master
            "counters": {n: [[[str(label) for label in k], v] for k, v in s.items()]
                         for n, s in self.counters.items()},
            "histograms": {n: [[list(k), v] for k, v in s.items()]
                           for n, s in self.histograms.items()},
            "gauges": {n: [[list(k), v] for k, v in s.items()] for n, s in gauges.items()},
        }


PROCESS_HELP: Final = {
    "resident_memory_bytes": "Resident memory; a worker slot's sums its processes (while a "
                             "successor starts or a predecessor drains, two)",
    "virtual_memory_bytes": "Virtual memory, summed per slot like resident memory",
    "cpu_seconds_total": "User and system CPU time; a worker slot's includes every worker "
                         "that has run in it, so it never goes back on recycling",
    "open_fds": "Open file descriptors, summed per slot",
    "max_fds": "The descriptor limit (RLIMIT_NOFILE) of each process of the slot",
    "start_time_seconds": "Start time since the epoch; of a slot, its newest process",
}


def _rows(data: Iterable[list[Any]]) -> Iterator[tuple[tuple[str, ...], Any]]:
    for key, value in data:
        yield tuple(key), value


def _add_counts(into: dict[tuple[str, ...], float], rows: Iterable[list[Any]]) -> None:
    for key, value in _rows(rows):
        into[key] = into.get(key, 0.0) + value


def _add_histograms(into: dict[tuple[str, ...], list[float]], rows: Iterable[list[Any]]) -> None:
    for key, row in _rows(rows):
        acc = into.get(key)
        into[key] = list(row) if acc is None else [a + b for a, b in zip(acc, row, strict=True)]


class MasterMetrics:
    """The master's side: live snapshots by pid, totals of dead workers, and the export."""

    def __init__(self) -> None:
        self.live: dict[int, dict[str, Any]] = {}
        self.retired_counters: dict[str, dict[tuple[str, ...], float]] = {n: {} for n in COUNTERS}
        self.retired_histograms: dict[str, dict[tuple[str, ...], list[float]]] = {
            n: {} for n in HISTOGRAMS
        }
        self.master_counters: dict[str, dict[tuple[str, ...], float]] = {
            "gateway_worker_restarts_total": {},
            "gateway_worker_unresponsive_total": {},
            "gateway_config_reloads_total": {},
        }
        self.master_gauges: dict[str, float] = {}
        self.slots: dict[int, str] = {}  # live worker pid → its slot, as a label
        # CPU seconds of the workers that have exited, per slot: a slot's counter then never
        # goes back when its worker is recycled or replaced.
        self.retired_cpu: dict[str, float] = {}

    def update(self, pid: int, snapshot: dict[str, Any], slot: int | None = None) -> None:
        self.live[pid] = snapshot
        if slot is not None:
            self.slots[pid] = str(slot)

    def worker_exited(self, pid: int) -> None:
        """Fold a dead worker's last snapshot into the retired totals."""
        snapshot = self.live.pop(pid, None)
        slot = self.slots.pop(pid, "")
        if snapshot is None:
            return
        cpu = snapshot.get("process", {}).get("cpu_seconds_total", 0.0)
        self.retired_cpu[slot] = self.retired_cpu.get(slot, 0.0) + cpu
        for name, rows in snapshot.get("counters", {}).items():
            _add_counts(self.retired_counters.setdefault(name, {}), rows)
        for name, rows in snapshot.get("histograms", {}).items():
            _add_histograms(self.retired_histograms.setdefault(name, {}), rows)

    def counter_totals(self, name: str) -> dict[tuple[str, ...], float]:
        totals = dict(self.retired_counters.get(name, {}))
        for snapshot in self.live.values():
            _add_counts(totals, snapshot.get("counters", {}).get(name, []))
        return totals

    def histogram_totals(self, name: str) -> dict[tuple[str, ...], list[float]]:
        totals = {k: list(v) for k, v in self.retired_histograms.get(name, {}).items()}
        for snapshot in self.live.values():
            _add_histograms(totals, snapshot.get("histograms", {}).get(name, []))
        return totals

    def gauge_totals(self, name: str) -> dict[tuple[str, ...], float]:
        totals: dict[tuple[str, ...], float] = {}
        for snapshot in self.live.values():
            _add_counts(totals, snapshot.get("gauges", {}).get(name, []))
        return totals

    def process_rows(self) -> dict[str, dict[tuple[str, str], float]]:
        """Per field: (process, slot) → value, for the master and each worker slot."""
        rows: dict[str, dict[tuple[str, str], float]] = {f: {} for f in process.FIELDS}
        for field, value in process.sample().items():
            rows[field][("master", "")] = value
        for slot, cpu in self.retired_cpu.items():
            rows["cpu_seconds_total"][("worker", slot)] = cpu
        for pid, snapshot in self.live.items():
            key = ("worker", self.slots.get(pid, ""))
            for field, value in snapshot.get("process", {}).items():
                series = rows.get(field)
                if series is None:
                    continue
                if field in ("max_fds", "start_time_seconds"):  # of each process: not summed
                    series[key] = max(series.get(key, value), value)
                else:
                    series[key] = series.get(key, 0.0) + value
        return rows

    def _processes(self) -> Iterator[Metric]:
        for field, series in self.process_rows().items():
            name = f"gateway_process_{field}"
            family: Metric
            if field == "cpu_seconds_total":
                family = CounterMetricFamily(name.removesuffix("_total"), PROCESS_HELP[field],
                                             labels=("process", "slot"))
            else:
                family = GaugeMetricFamily(name, PROCESS_HELP[field], labels=("process", "slot"))
            for key, value in sorted(series.items()):
                family.add_metric(list(key), value)
            yield family

    def collect(self) -> Iterator[Metric]:
        """prometheus_client collector protocol."""
        for name, (help_text, labels) in COUNTERS.items():
            family = CounterMetricFamily(name.removesuffix("_total"), help_text, labels=labels)
            for key, value in sorted(self.counter_totals(name).items()):
                family.add_metric(list(key), value)
            yield family
        for name, (help_text, labels) in HISTOGRAMS.items():
            hist = HistogramMetricFamily(name, help_text, labels=labels)
            for key, row in sorted(self.histogram_totals(name).items()):
                cumulative, buckets = 0.0, []
                for bound, count in zip((*BUCKETS, float("inf")), row[:-1], strict=True):
                    cumulative += count
                    buckets.append((str(bound) if bound != float("inf") else "+Inf", cumulative))
                hist.add_metric(list(key), buckets, row[-1])
            yield hist
        for name, (help_text, labels) in GAUGES.items():
            gauge = GaugeMetricFamily(name, help_text, labels=labels)
            for key, value in sorted(self.gauge_totals(name).items()):
                gauge.add_metric(list(key), value)
            yield gauge
        restarts = CounterMetricFamily("gateway_worker_restarts", "Workers that died unexpectedly")
        restarts.add_metric([], sum(self.master_counters["gateway_worker_restarts_total"].values()))
        yield restarts
        silent = CounterMetricFamily(
            "gateway_worker_unresponsive", "Workers replaced for sending the master nothing "
            "for the heartbeat timeout (stopped or blocked)")
        silent.add_metric(
            [], sum(self.master_counters["gateway_worker_unresponsive_total"].values()))
        yield silent
        yield from self._processes()
        reloads = CounterMetricFamily("gateway_config_reloads", "Config reloads by result",
                                      labels=("result",))
        for key, value in sorted(self.master_counters["gateway_config_reloads_total"].items()):
            reloads.add_metric(list(key), value)
        yield reloads
        for name, value in sorted(self.master_gauges.items()):
            gauge = GaugeMetricFamily(name, name.replace("_", " "))
            gauge.add_metric([], value)
            yield gauge
