"""FrameTracker and the handshake helpers: header-only frame boundary tracking."""

from __future__ import annotations

import os
import random
import struct

import pytest

from proxyd.proxy.websocket import FrameTracker, accept_key, close_frame, new_key

TEXT, BINARY, CONT, CLOSE, PING, PONG = 1, 2, 0, 8, 9, 10


def frame(opcode: int, payload: bytes, *, fin: bool = True, masked: bool = False) -> bytes:
    """One frame as RFC 6455 §5.2 lays it out."""
    head = bytes([(0x80 if fin else 0) | opcode])
    bit = 0x80 if masked else 0
    n = len(payload)
    if n < 126:
        head += bytes([bit | n])
    elif n < 1 << 16:
        head += bytes([bit | 126]) + struct.pack("!H", n)
    else:
        head += bytes([bit | 127]) + struct.pack("!Q", n)
    if masked:
        key = os.urandom(4)
        head += key
        payload = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    return head + payload


def feed_in(tracker: FrameTracker, data: bytes, sizes: list[int]) -> None:
    """Feed ``data`` cut at the given read sizes (cycled)."""
    pos, i = 0, 0
    while pos < len(data):
        n = sizes[i % len(sizes)]
        tracker.feed(data[pos:pos + n])
        pos += n
        i += 1


def test_accept_key_rfc_example() -> None:
    assert accept_key(b"dGhlIHNhbXBsZSBub25jZQ==") == b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
    assert len(new_key()) == 24 and new_key() != new_key()


@pytest.mark.parametrize("size", [0, 5, 125, 126, 300, 65535, 65536, 70000])
@pytest.mark.parametrize("masked", [False, True])
def test_lengths_7_16_64_bit(size: int, masked: bool) -> None:
    data = frame(BINARY, os.urandom(size), masked=masked) + frame(TEXT, b"x", masked=masked)
    for sizes in ([len(data)], [1], [3, 7, 1, 13], [2, 1000]):
        t = FrameTracker()
        feed_in(t, data, sizes)
        assert t.messages == 2, sizes
        assert t.remaining == 0 and t.at_boundary
        assert t.message_bytes == 0


def test_header_split_across_reads_is_not_a_boundary() -> None:
    data = frame(BINARY, b"a" * 70000, masked=True)  # 2 + 8 + 4 header bytes
    t = FrameTracker()
    for cut in range(1, 14):
        t.feed(data[cut - 1:cut])
        assert not t.at_boundary, cut
        assert t.messages == 0
    t.feed(data[13:14])  # the header's last byte: the whole payload is still to come
    assert t.remaining == 70000 and not t.at_boundary and t.messages == 1
    t.feed(data[14:-1])
    assert t.remaining == 1 and not t.at_boundary
    t.feed(data[-1:])
    assert t.at_boundary and t.remaining == 0


def test_random_splits_of_many_frames() -> None:
    rng = random.Random(7)
    frames = [frame(rng.choice((TEXT, BINARY)), os.urandom(rng.choice((0, 3, 200, 70000))),
                    masked=True) for _ in range(40)]
    data = b"".join(frames)
    t = FrameTracker()
    pos = 0
    while pos < len(data):
        n = rng.randint(1, 5000)
        t.feed(data[pos:pos + n])
        pos += n
    assert t.messages == 40 and t.at_boundary


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("cut", [1, 2, 3, 7, 8])
def test_close_code_masked_or_not_split_anywhere(masked: bool, cut: int) -> None:
    data = frame(CLOSE, struct.pack("!H", 4001) + b"reason", masked=masked)
    t = FrameTracker()
    t.feed(data[:cut])
    t.feed(data[cut:])
    assert t.close_code == 4001
    assert t.messages == 0 and t.at_boundary


def test_close_without_code_and_close_frame_helper() -> None:
    t = FrameTracker()
    t.feed(frame(CLOSE, b""))
    assert t.close_code is None and t.at_boundary
    for masked in (False, True):
        t = FrameTracker()
        raw = close_frame(1001, masked=masked)
        assert len(raw) == (8 if masked else 4)
        t.feed(raw)
        assert t.close_code == 1001 and t.at_boundary


def test_fragments_sum_into_one_message_and_control_frames_do_not_count() -> None:
    t = FrameTracker()
    t.feed(frame(TEXT, b"a" * 10, fin=False))
    assert t.message_bytes == 10 and t.messages == 0
    t.feed(frame(PING, b"p"))  # control frames may come between fragments
    assert t.message_bytes == 10 and t.messages == 0
    t.feed(frame(CONT, b"b" * 20, fin=False) + frame(CONT, b"c" * 5))
    assert t.messages == 1 and t.message_bytes == 0
    t.feed(frame(PONG, b""))
    assert t.messages == 1


def test_message_size_limit_single_frame_and_fragmented() -> None:
    t = FrameTracker(limit=100)
    t.feed(frame(TEXT, b"x" * 100))
    assert not t.too_big  # exactly the limit is allowed
    t = FrameTracker(limit=100)
    t.feed(frame(BINARY, b"x" * 101)[:4])  # the header alone tells
    assert t.too_big
    t = FrameTracker(limit=100)
    t.feed(frame(TEXT, b"x" * 60, fin=False))
    assert not t.too_big
    t.feed(frame(CONT, b"x" * 60))
    assert t.too_big
    t = FrameTracker()  # no limit
    t.feed(frame(BINARY, b"x" * 70000))
    assert not t.too_big
