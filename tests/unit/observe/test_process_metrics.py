"""Per-process metrics as the master exports them: its own, and each worker slot's, summed
over the processes of the slot and, for CPU time, over every worker that ran in it."""

from __future__ import annotations

from typing import Any

from proxyd.observe import process
from proxyd.observe.metrics import MasterMetrics


def snapshot(cpu: float, rss: float, fds: float, start: float) -> dict[str, Any]:
    return {"process": {"cpu_seconds_total": cpu, "resident_memory_bytes": rss,
                        "virtual_memory_bytes": 2 * rss, "open_fds": fds, "max_fds": 1024.0,
                        "start_time_seconds": start}}


def test_the_master_samples_itself() -> None:
    rows = MasterMetrics().process_rows()
    mine = process.sample()
    assert set(rows) == set(process.FIELDS)
    assert rows["max_fds"][("master", "")] == mine["max_fds"]
    assert rows["resident_memory_bytes"][("master", "")] > 0


def test_slots_sum_their_processes_and_cpu_never_goes_back() -> None:
    m = MasterMetrics()
    m.update(101, snapshot(2.0, 100.0, 10.0, 1000.0), slot=0)
    m.update(102, snapshot(1.0, 50.0, 5.0, 1001.0), slot=1)
    rows = m.process_rows()
    assert rows["cpu_seconds_total"][("worker", "0")] == 2.0
    # A successor starts on slot 0 while its predecessor drains: both count.
    m.update(103, snapshot(0.5, 80.0, 8.0, 1100.0), slot=0)
    rows = m.process_rows()
    assert rows["resident_memory_bytes"][("worker", "0")] == 180.0
    assert rows["open_fds"][("worker", "0")] == 18.0
    assert rows["max_fds"][("worker", "0")] == 1024.0  # a limit: not summed
    assert rows["start_time_seconds"][("worker", "0")] == 1100.0  # the newest
    assert rows["cpu_seconds_total"][("worker", "0")] == 2.5
    # The predecessor exits: its memory leaves the slot, its CPU time stays.
    m.worker_exited(101)
    rows = m.process_rows()
    assert rows["resident_memory_bytes"][("worker", "0")] == 80.0
    assert rows["cpu_seconds_total"][("worker", "0")] == 2.5
    assert rows["cpu_seconds_total"][("worker", "1")] == 1.0
    m.worker_exited(103)
    assert m.process_rows()["cpu_seconds_total"][("worker", "0")] == 2.5  # still


def test_exported_families() -> None:
    m = MasterMetrics()
    m.update(7, snapshot(1.5, 10.0, 3.0, 5.0), slot=0)
    names = {family.name: family for family in m.collect()}
    cpu = names["gateway_process_cpu_seconds"]
    assert cpu.type == "counter"
    assert {tuple(s.labels.values()) for s in cpu.samples} >= {("master", ""), ("worker", "0")}
    assert names["gateway_process_resident_memory_bytes"].type == "gauge"
