"""The worker's upstream read buffer: reused while no view of it lives, left to a view that does.

ReadBuffer tells by reference count, so these tests keep no plain reference to a buffer (the
event loop keeps none between reads either); a fresh buffer is zeroed, so the bytes written
into one tell whether the next read gets the same.
"""

from __future__ import annotations

from types import SimpleNamespace

from proxyd.config.models import Upstream
from proxyd.proxy.resolver import Resolver
from proxyd.proxy.timers import Deadlines
from proxyd.proxy.upstream import UpstreamPool
from proxyd.proxy.upstream_conn import READ_SIZE, ReadBuffer, UpstreamConnection


def test_the_buffer_is_reused_while_nothing_holds_a_view_of_it() -> None:
    reads = ReadBuffer()
    assert len(reads.take()) == READ_SIZE
    reads.take()[:4] = b"mark"
    for n in (1, 100, READ_SIZE):  # a read handled: views made, sliced, cast and dropped
        view = memoryview(memoryview(reads.take())[:n]).cast("b")
        assert bytes(view[:1]) == b"m"
        del view
        assert reads.take()[:4] == b"mark"


def test_a_view_still_held_keeps_its_bytes_and_the_next_read_gets_a_new_buffer() -> None:
    reads = ReadBuffer()
    reads.take()[:5] = b"first"
    # As uvloop queues a piece for a slow client: a view of our view, cast to bytes.
    queued = memoryview(memoryview(reads.take())[:5]).cast("b")
    reads.take()[:5] = b"other"
    assert bytes(queued) == b"first"
    assert reads.take()[:5] == b"other"  # the new buffer, free, is kept


def test_a_buffer_left_to_a_view_is_not_taken_back() -> None:
    reads = ReadBuffer()
    reads.take()[:4] = b"old!"
    view = memoryview(reads.take())[:4]
    reads.take()[:4] = b"new!"
    del view  # the old buffer is free now, but no longer the worker's
    assert reads.take()[:4] == b"new!"


def test_one_buffer_for_every_connection_of_a_pipeline_none_shared_between_pipelines() -> None:
    """One per event loop (Pipeline passes it to its pools): a buffer shared by two loops in
    two threads could be handed to both at once."""
    clock = Deadlines(SimpleNamespace(time=lambda: 0.0), 1.0)  # type: ignore[arg-type]
    cfg = Upstream.model_validate({"targets": ["http://10.0.0.1:80", "http://10.0.0.2:80"]})
    reads = ReadBuffer()
    pools = [UpstreamPool(name, cfg, clock, Resolver(), None, reads) for name in ("a", "b")]
    conns = [UpstreamConnection(t) for pool in pools for t in pool.targets]
    assert len(conns) == 4 and all(c.reads is reads for c in conns)
    other = UpstreamPool("c", cfg, clock, Resolver())
    assert other.reads is not reads and UpstreamConnection(other.targets[0]).reads is other.reads
