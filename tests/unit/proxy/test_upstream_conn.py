"""The worker's upstream read buffer: reused while no view of it lives, left to a view that does.

ReadBuffer tells by reference count, so these tests keep no plain reference to a buffer (the
event loop keeps none between reads either); a fresh buffer is zeroed, so the bytes written
into one tell whether the next read gets the same.
"""

from __future__ import annotations

from proxyd.proxy.upstream_conn import READ_SIZE, ReadBuffer


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
