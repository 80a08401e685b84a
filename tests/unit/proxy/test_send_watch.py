"""send_timeout's watch: time without progress, not time spent paused."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from proxyd.config.models import GatewayConfig
from proxyd.proxy.connection import ClientConnection, SendWatch
from proxyd.proxy.pipeline import Pipeline


class FakeTransport:
    """Only the write-buffer size the watch reads, and the close a timeout ends in."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.aborted = 0

    def get_write_buffer_size(self) -> int:
        return self.size

    def get_extra_info(self, name: str, default: object = None) -> object:
        return ("127.0.0.1", 40000) if name == "peername" else default

    def is_closing(self) -> bool:
        return self.aborted > 0

    def abort(self) -> None:
        self.aborted += 1

    close = abort


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def make(loop: asyncio.AbstractEventLoop, size: int
         ) -> tuple[SendWatch, ClientConnection, FakeTransport]:
    config = GatewayConfig.model_validate({"server": {"listen": ["127.0.0.1:0"],
                                                      "limits": {"send_timeout": "5s"}}})
    ds = ClientConnection(Pipeline(config, loop))
    transport = FakeTransport(size)
    ds.connection_made(transport)  # type: ignore[arg-type]
    ds.p.deadlines.now = 100.0
    watch = SendWatch(ds)
    watch.arm(transport, 100.0, 5.0)  # type: ignore[arg-type]
    return watch, ds, transport


def test_no_progress_times_out(loop: asyncio.AbstractEventLoop) -> None:
    watch, ds, transport = make(loop, 65536)
    transport.size = 70000  # it even grew: nothing was read
    watch.on_deadline()
    assert transport.aborted == 1 and ds.closed


def test_progress_buys_another_period(loop: asyncio.AbstractEventLoop) -> None:
    watch, ds, transport = make(loop, 65536)
    transport.size = 60000
    ds.p.deadlines.now = 105.0
    watch.on_deadline()
    assert transport.aborted == 0
    assert watch.deadline == 110.0 and watch.buffered == 60000
    watch.on_deadline()  # no progress in the second period
    assert transport.aborted == 1
