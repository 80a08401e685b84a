"""send_timeout's watch: time without progress, not time spent paused."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from proxyd.proxy.downstream import SendWatch


class FakeTransport:
    def __init__(self, size: int) -> None:
        self.size = size

    def get_write_buffer_size(self) -> int:
        return self.size


def make(size: int) -> tuple[SendWatch, Any, FakeTransport]:
    transport = FakeTransport(size)
    ds: Any = SimpleNamespace(transport=transport, timed_out=0,
                              p=SimpleNamespace(deadlines=SimpleNamespace(now=100.0),
                                                send_timeout=5.0))
    ds.send_timed_out = lambda: setattr(ds, "timed_out", ds.timed_out + 1)
    watch = SendWatch(ds)
    watch.arm(transport, 100.0, 5.0)  # type: ignore[arg-type]
    return watch, ds, transport


def test_no_progress_times_out() -> None:
    watch, ds, transport = make(65536)
    transport.size = 70000  # it even grew: nothing was read
    watch.on_deadline()
    assert ds.timed_out == 1


def test_progress_buys_another_period() -> None:
    watch, ds, transport = make(65536)
    transport.size = 60000
    ds.p.deadlines.now = 105.0
    watch.on_deadline()
    assert ds.timed_out == 0
    assert watch.deadline == 110.0 and watch.buffered == 60000
    watch.on_deadline()  # no progress in the second period
    assert ds.timed_out == 1
