"""Answering from a stored entry: the client's conditions (RFC 9110 §13), byte ranges (§14),
and an entry refreshed by a 304 (RFC 9111 §4.3.4)."""

from __future__ import annotations

import time

import pytest

from proxyd.cache import fields, policy
from proxyd.cache.store import Entry
from proxyd.middleware.cache_entry import (
    if_range_matches,
    not_modified,
    refreshed,
    requested_range,
    stored_fields,
)

from .helpers import make_ctx

MODIFIED = b"Tue, 01 Jul 2025 12:00:00 GMT"
DATE = b"Tue, 01 Jul 2025 12:00:05 GMT"
BODY = b"0123456789A"


def entry(*headers: tuple[bytes, bytes], status: int = 200, body: bytes = BODY) -> Entry:
    return Entry(status=status, headers=list(headers), body=body, stored_at=time.time(),
                 initial_age=0.0, lifetime=60.0)


TAGGED = entry((b"ETag", b'"v1"'), (b"Last-Modified", MODIFIED), (b"Date", DATE))


@pytest.mark.parametrize(("request_headers", "expected"), [
    ([(b"If-None-Match", b'"v1"')], True),
    ([(b"If-None-Match", b'W/"v1"')], True),  # weak comparison (RFC 9110 §13.1.2)
    ([(b"If-None-Match", b'"v0", "v1"')], True),
    ([(b"If-None-Match", b'"v0"')], False),
    ([(b"If-None-Match", b"*")], True),
    # If-None-Match present: If-Modified-Since is not evaluated (§13.2.2)
    ([(b"If-None-Match", b'"v0"'), (b"If-Modified-Since", DATE)], False),
    ([(b"If-Modified-Since", MODIFIED)], True),
    ([(b"If-Modified-Since", DATE)], True),
    ([(b"If-Modified-Since", b"Mon, 30 Jun 2025 12:00:00 GMT")], False),
    ([(b"If-Modified-Since", b"Tue, 01 Jul 25 12:00:00 GMT")], False),  # invalid: ignored
    ([], False),
])
def test_rfc9111_4_3_2_the_clients_own_conditions(request_headers: list[tuple[bytes, bytes]],
                                                  expected: bool) -> None:
    assert not_modified(make_ctx(headers=request_headers), TAGGED) is expected


def test_rfc9111_4_3_2_without_last_modified_the_date_counts() -> None:
    dated = entry((b"Date", DATE))
    assert not_modified(make_ctx(headers=[(b"If-Modified-Since", DATE)]), dated)
    assert not not_modified(make_ctx(headers=[(b"If-Modified-Since", MODIFIED)]), dated)


@pytest.mark.parametrize(("request_headers", "expected"), [
    ([(b"Range", b"bytes=0-1")], (0, 1)),
    ([(b"Range", b"bytes=-1")], (10, 10)),
    ([(b"Range", b"bytes=20-")], fields.UNSATISFIABLE),
    ([(b"Range", b"bytes=0-1,3-4")], None),  # several ranges: the whole response
    ([(b"Range", b"bytes=0-1"), (b"If-Range", b'"v1"')], (0, 1)),
    ([(b"Range", b"bytes=0-1"), (b"If-Range", b'"v0"')], None),  # changed: the whole
    ([(b"Range", b"bytes=0-1"), (b"If-Range", b'W/"v1"')], None),  # strong comparison only
    ([(b"Range", b"bytes=0-1"), (b"If-Range", MODIFIED)], (0, 1)),
    ([(b"Range", b"bytes=0-1"), (b"If-Range", DATE)], None),
    ([], None),
])
def test_rfc9110_14_2_ranges_of_a_complete_stored_response(
        request_headers: list[tuple[bytes, bytes]], expected: tuple[int, int] | None) -> None:
    assert requested_range(make_ctx(headers=request_headers), TAGGED) == expected


def test_rfc9110_14_2_range_only_on_get_and_only_of_a_200() -> None:
    ranged = [(b"Range", b"bytes=0-1")]
    assert requested_range(make_ctx(b"HEAD", headers=ranged), TAGGED) is None
    assert requested_range(make_ctx(headers=ranged), entry(status=404)) is None


def test_rfc9110_13_1_5_a_weak_last_modified_never_matches_if_range() -> None:
    # Last-Modified within a second of Date: a weak validator (RFC 9110 §8.8.2.2).
    weak = entry((b"Last-Modified", MODIFIED), (b"Date", MODIFIED))
    assert not if_range_matches(MODIFIED, weak)
    assert if_range_matches(MODIFIED, TAGGED)
    assert not if_range_matches(b'"v1"', entry((b"ETag", b'W/"v1"')))


def test_rfc9111_4_3_4_a_304_updates_the_stored_fields_and_freshness() -> None:
    stale = entry((b"ETag", b'"v1"'), (b"Cache-Control", b"max-age=0"),
                  (b"Content-Type", b"text/plain"))
    reply = [(b"ETag", b'"v1"'), (b"Cache-Control", b"max-age=60"), (b"Content-Length", b"0"),
             (b"Connection", b"keep-alive")]
    fresh, keep = refreshed(stale, reply, [], policy.Rules(), 3.0)
    assert keep and fresh.lifetime == 60.0 and fresh.initial_age == 3.0
    assert fresh.body == BODY and fresh.status == 200
    assert fresh.headers == [(b"Content-Type", b"text/plain"), (b"ETag", b'"v1"'),
                             (b"Cache-Control", b"max-age=60")]


def test_rfc9111_4_3_4_a_304_that_says_no_store_ends_the_entry() -> None:
    stale = entry((b"ETag", b'"v1"'), (b"Cache-Control", b"max-age=0"))
    _, keep = refreshed(stale, [(b"Cache-Control", b"no-store")], [], policy.Rules(), 0.0)
    assert not keep


def test_stored_fields_leave_out_hop_by_hop_framing_and_the_caches_own() -> None:
    fields_ = [(b"Content-Type", b"a"), (b"Connection", b"close"), (b"Age", b"3"),
               (b"Content-Length", b"3"), (b"Cache-Status", b"x"), (b"X-Cache", b"HIT")]
    assert stored_fields(fields_) == [(b"Content-Type", b"a")]
