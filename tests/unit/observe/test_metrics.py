"""WorkerMetrics → snapshot → MasterMetrics: what one worker counts reaches the export intact."""

from __future__ import annotations

import bisect
import json

import pytest
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import CollectorRegistry

from proxyd.observe.metrics import BUCKETS, COUNTERS, Counter, MasterMetrics, WorkerMetrics, bucket


def test_request_counts_and_durations_survive_the_trip_to_the_master() -> None:
    worker = WorkerMetrics()
    for status, duration in ((200, 0.0004), (200, 0.003), (404, 0.2), (200, 20.0)):
        worker.request("api", "GET", status, duration)
    worker.request("api", "POST", 201, 0.001)
    # Through JSON, as over the control channel.
    snapshot = json.loads(json.dumps(worker.snapshot({})))
    master = MasterMetrics()
    master.update(4242, snapshot)
    assert master.counter_totals("gateway_requests_total") == {
        ("api", "GET", "200"): 3.0, ("api", "GET", "404"): 1.0, ("api", "POST", "201"): 1.0,
    }
    rows = master.histogram_totals("gateway_request_duration_seconds")
    get = rows[("api", "GET")]
    assert sum(get[:-1]) == 4  # every observation in exactly one bucket (or +Inf)
    assert get[0] == 1 and get[BUCKETS.index(0.005)] == 1 and get[len(BUCKETS)] == 1
    assert abs(get[-1] - 20.2034) < 1e-9
    registry = CollectorRegistry()
    registry.register(master)
    text = generate_latest(registry).decode()
    assert 'gateway_requests_total{method="GET",route="api",status="200"} 3.0' in text
    assert 'gateway_request_duration_seconds_count{method="GET",route="api"} 4.0' in text


def test_a_dead_workers_counts_are_kept() -> None:
    master = MasterMetrics()
    for pid in (1, 2):
        worker = WorkerMetrics()
        worker.request("api", "GET", 200, 0.01)
        master.update(pid, json.loads(json.dumps(worker.snapshot({}))))
    master.worker_exited(1)
    assert master.counter_totals("gateway_requests_total") == {("api", "GET", "200"): 2.0}


def test_bucket_is_bisect_left_over_the_bounds() -> None:
    values = [0.0, 1e-7, 1e3, *BUCKETS,
              *(b * 0.999 for b in BUCKETS), *(b * 1.001 for b in BUCKETS)]
    for v in values:
        assert bucket(v) == bisect.bisect_left(BUCKETS, v), v
    assert bucket(BUCKETS[-1] * 2) == len(BUCKETS)  # the +Inf row


def test_every_counter_is_a_typed_attribute_of_the_worker_metrics() -> None:
    """Code counts through attributes (a misspelt one is a type error): each counter of
    COUNTERS has one, except those the worker keeps as series behind a method."""
    metrics = WorkerMetrics()
    # (dir, not vars: a compiled WorkerMetrics has no __dict__)
    attributes = [getattr(metrics, name) for name in dir(metrics) if not name.startswith("_")]
    typed = {c.name for c in attributes if isinstance(c, Counter)}
    behind_methods = {"gateway_requests_total", "gateway_access_log_dropped_lines_total",
                      "gateway_access_log_write_errors_total"}
    assert typed | behind_methods == set(COUNTERS)
    assert not typed & behind_methods
    metrics.client_limits.inc(("body_timeout",))
    metrics.client_limits.inc(("body_timeout",), 2.0)
    assert metrics.counters["gateway_client_limits_total"] == {("body_timeout",): 3.0}


def test_a_counter_not_in_the_table_fails_when_the_worker_starts() -> None:
    with pytest.raises(KeyError):
        Counter(WorkerMetrics(), "gateway_no_such_total")
