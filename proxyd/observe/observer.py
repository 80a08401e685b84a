"""Once per answered request: the metrics and the access log line, from plain values.

The data plane hands each finished request over as plain values (proxy/pipeline.observe), so
nothing here knows a connection, an exchange or a route object.
"""

from __future__ import annotations

from time import monotonic
from typing import Final

from proxyd.observe.access_log import AccessLog
from proxyd.observe.metrics import WorkerMetrics, bucket
from proxyd.observe.request_ids import RequestIds

KNOWN_METHODS: Final = (b"GET", b"HEAD", b"POST", b"PUT", b"PATCH", b"DELETE", b"OPTIONS",
                        b"TRACE", b"CONNECT")


class Observer:
    def __init__(self, metrics: WorkerMetrics, metrics_enabled: bool,
                 access_log: AccessLog | None, ids: RequestIds) -> None:
        self.metrics = metrics
        self.metrics_enabled = metrics_enabled  # off: no per-request counting at all
        self.access_log = access_log
        self.ids = ids
        # metrics.enabled: false and no access log: nothing to record per request.
        self.observing = metrics_enabled or access_log is not None
        self._upstream_hist = metrics.upstream_durations
        self._upstream_rows: dict[str, list[float]] = {}  # per upstream: its histogram row
        self._methods: dict[bytes, str] = {m: m.decode() for m in KNOWN_METHODS}

    def record(  # positional from the hot path, as AccessLog.record
        self, request_id: str | None, client_ip: bytes, method: bytes, host: bytes | None,
        target: bytes, status: int, bytes_in: int, bytes_out: int, started: float,
        route: str, cache: str, upstream: str, upstream_started: float, tries: int,
        target_url: str, headers: list[tuple[bytes, bytes, bytes]], version: int, tls: str,
    ) -> None:
        """``request_id`` None: the request never needed one (the log makes it at its
        flush). ``upstream_started``: when the first try began, 0 if none did."""
        now = monotonic()
        duration = now - started
        metrics_on = self.metrics_enabled
        if metrics_on:
            self.metrics.request(route, self._methods.get(method, "OTHER"), status, duration)
            if cache:
                if cache == "hit":
                    self.metrics.cache_hits.inc((route,))
                elif cache in ("miss", "revalidated", "stale"):
                    self.metrics.cache_misses.inc((route,))
        upstream_time = None
        # Timed only when a try began: a request the circuit breaker, a full queue or no
        # target up refused at once never met the upstream, and its near-zero time would
        # drag the upstream's latency down exactly when it fails.
        if tries:
            upstream_time = now - upstream_started
            if metrics_on:  # else the access log's upstream_ms only
                row = self._upstream_rows.get(upstream)
                if row is None:
                    row = self._upstream_rows[upstream] = self.metrics.row(
                        self._upstream_hist, (upstream,))
                row[bucket(upstream_time)] += 1  # WorkerMetrics.request's, inlined
                row[-1] += upstream_time
        if self.access_log is not None:
            self.access_log.record(
                request_id if request_id is not None else self.ids.deferred(), client_ip,
                method, host, target, status, bytes_in, bytes_out, duration, upstream,
                upstream_time, cache, route, headers, version, target_url, tries, tls,
            )
