"""field_rules.py: the intermediary rules — Content-Length parsing, trusted proxies, the bounded
table of lowercase names, and the shapes of the fields a response drops."""

from __future__ import annotations

import pytest

from proxyd.proxy.field_rules import (
    NAMES_MAX,
    RESPONSE_DROP,
    RESPONSE_DROP_SHAPES,
    TrustedProxies,
    content_length,
    lower_name,
    name_shape,
)


def test_content_length_parses_digits_and_leaves_the_rest_to_int() -> None:
    for value in (b"0", b"7", b"1024", b"007", b"18446744073709551616"):
        assert content_length(value) == int(value)
    for odd in (b" 12 ", b"+1", b"-1"):  # not digits only: int()'s rules, as before
        assert content_length(odd) == int(odd)
    for bad in (b"", b"1a", b"1 2"):
        with pytest.raises(ValueError):
            content_length(bad)


def test_trusted_proxies_membership_and_truth() -> None:
    none = TrustedProxies([])
    assert not none and "10.1.2.3" not in none  # nothing trusted: callers skip the lookup
    some = TrustedProxies(["10.0.0.0/8", "2001:db8::/32"])
    assert some
    assert "10.1.2.3" in some and "2001:db8::1" in some
    assert "192.0.2.1" not in some and "not an address" not in some


def test_lower_name_gives_one_lowercase_object_per_name_and_stays_bounded() -> None:
    names: dict[bytes, bytes] = {}
    first = lower_name(b"Content-Length", names)
    assert first == b"content-length"
    assert lower_name(b"Content-Length", names) is first
    assert lower_name(b"CONTENT-length", names) is first  # another spelling, the same object
    assert lower_name(b"content-length", names) is first
    for i in range(NAMES_MAX):  # a peer inventing names fills the table, then no more
        assert lower_name(b"X-Made-Up-%d" % i, names) == b"x-made-up-%d" % i
    full = len(names)
    assert NAMES_MAX - 2 <= full <= NAMES_MAX
    assert lower_name(b"X-One-More", names) == b"x-one-more"
    assert len(names) == full and b"X-One-More" not in names
    assert lower_name(b"Content-Length", names) is first  # what it holds is still served


def test_every_dropped_response_field_in_any_case_has_a_marked_shape() -> None:
    """A relay without middleware lowers only names of a marked shape: a dropped field whose
    shape were unmarked would reach the client."""
    for name in RESPONSE_DROP:
        for spelling in (name, name.upper(), name.title(), name.capitalize()):
            assert RESPONSE_DROP_SHAPES[name_shape(spelling)], spelling
    assert RESPONSE_DROP_SHAPES[name_shape(b"")]
    relayed = [b"Server", b"Date", b"Content-Type", b"Last-Modified", b"Accept-Ranges", b"ETag",
               b"Cache-Control", b"Vary", b"Set-Cookie", b"Location"]
    assert not any(RESPONSE_DROP_SHAPES[name_shape(n)] for n in relayed)
