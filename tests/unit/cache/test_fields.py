"""Field values the cache reads: HTTP-dates, Age, Cache-Control, targeted fields, Range,
entity-tags — each against its grammar, invalid values reported as invalid."""

from __future__ import annotations

import calendar

import pytest

from proxyd.cache import fields

H = list[tuple[bytes, bytes]]
SUNDAY = calendar.timegm((1994, 11, 6, 8, 49, 37, 0, 0, 0))


# -- HTTP-date: RFC 9110 §5.6.7 ------------------------------------------------------------------


@pytest.mark.parametrize("value", [
    b"Sun, 06 Nov 1994 08:49:37 GMT",  # IMF-fixdate
    b"Sunday, 06-Nov-94 08:49:37 GMT",  # obsolete RFC 850 form
    b"Sun Nov  6 08:49:37 1994",  # obsolete asctime form
    b"  Sun, 06 Nov 1994 08:49:37 GMT\t",  # surrounding whitespace is not part of the value
])
def test_rfc9110_5_6_7_the_three_http_date_forms(value: bytes) -> None:
    assert fields.http_date(value) == SUNDAY


@pytest.mark.parametrize("value", [
    b"Thu, 18 Aug 50 02:01:18 GMT",  # two-digit year in IMF form (was read as 2050)
    b"Thu, 18 Aug 2050 02:01:18 UTC",  # another zone than GMT
    b"Thu, 18 Aug 2050 02:01:18 +0000",
    b"Thu 18 Aug 2050 02:01:18 GMT",  # missing comma
    b"Thu, 18  Aug  2050 02:01:18 GMT",  # extra spaces
    b"Thu, 18-Aug-2050 02:01:18 GMT",  # dashes in an IMF date
    b"Thu, 18 Aug 2050 02.01.18 GMT",  # dots in the time
    b"Thu, 18 Aug 2050 2:01:18 GMT",  # one-digit hour
    b"Thu, 18 Aug 2050 02:01:18 GMT, Fri, 19 Aug 2050 02:01:18 GMT",  # several values
    b"THU, 18 Aug 2050 02:01:18 GMT",  # the grammar is case-sensitive
    b"Thu, 18 AUG 2050 02:01:18 GMT",
    b"Thu, 18 Aug 2050 02:01:18 gmt",
    b"Thu, 31 Feb 2050 02:01:18 GMT",  # no such day
    b"Thu, 18 Aug 2050 24:00:00 GMT",
    b"Thu, 18 Aug 2050 02:60:18 GMT",
    b"0", b"-1", b"", b"tomorrow",
    b"Thursday, 18-Aug-2050 02:01:18 GMT",  # RFC 850 has a two-digit year
    b"Thu Aug 18 02:01:18 50",
])
def test_rfc9110_5_6_7_anything_else_is_not_an_http_date(value: bytes) -> None:
    assert fields.http_date(value) is None


def test_rfc9110_5_6_7_a_leap_second_is_a_date() -> None:
    assert fields.http_date(b"Sat, 31 Dec 2016 23:59:60 GMT") is not None


def test_rfc9110_5_6_7_two_digit_years_more_than_50_years_ahead_are_in_the_past() -> None:
    now = calendar.timegm((2026, 6, 1, 0, 0, 0, 0, 0, 0))
    assert fields.two_digit_year(94, now) == 1994
    assert fields.two_digit_year(50, now) == 2050
    assert fields.two_digit_year(76, now) == 2076
    assert fields.two_digit_year(77, now) == 1977


def test_single_date_refuses_several_fields() -> None:
    date = b"Sun, 06 Nov 1994 08:49:37 GMT"
    assert fields.single_date([(b"Expires", date)], b"expires") == SUNDAY
    assert fields.single_date([(b"Expires", date), (b"expires", date)], b"expires") is None
    assert fields.single_date([], b"expires") is None


# -- Age: RFC 9111 §5.1 --------------------------------------------------------------------------


@pytest.mark.parametrize(("values", "expected"), [
    ([b"17"], 17.0),
    ([b"7200, 0"], 7200.0),  # a list counts by its first member
    ([b"0, 7200"], 0.0),
    ([b"7200,0"], 7200.0),
    ([b"7200"], 7200.0),
    ([b"7200", b"0"], 7200.0),  # two field lines are one list
    ([b"0", b"7200"], 0.0),
    ([b"abc"], 0.0),  # invalid: ignored, never fresher than no Age
    ([b"-7200"], 0.0),
    ([b"7200.0"], 0.0),
    ([b""], 0.0),
    ([b"99999999999"], 2147483648.0),  # delta-seconds beyond 2^31 are 2^31 (§1.2.2)
    ([], 0.0),
])
def test_rfc9111_5_1_age_is_the_first_member_and_invalid_is_ignored(values: list[bytes],
                                                                      expected: float) -> None:
    assert fields.age_value([(b"Age", v) for v in values]) == expected


# -- Cache-Control: RFC 9111 §5.2 ----------------------------------------------------------------


def test_rfc9111_5_2_cache_control_directives() -> None:
    cc = fields.cache_control([(b"Cache-Control", b'Max-Age=5, no-cache="Set-Cookie", ,public'),
                               (b"cache-control", b"max-age=9")])
    assert cc == {"max-age": "5", "no-cache": "Set-Cookie", "public": None}


def test_rfc9111_5_2_a_quoted_comma_does_not_split() -> None:
    cc = fields.cache_control([(b"Cache-Control", b'private="a, b", max-age=3')])
    assert cc == {"private": "a, b", "max-age": "3"}


# -- targeted fields: RFC 9213 §2 (Dictionary Structured Fields, RFC 8941 §3.2) -----------------


@pytest.mark.parametrize(("value", "expected"), [
    (b"max-age=3600", {"max-age": "3600"}),
    (b"foobar, max-age=3600", {"max-age": "3600"}),  # unknown directives are left out
    (b"no-store", {"no-store": None}),
    (b"private", {"private": None}),
    (b'no-cache="set-cookie"', {"no-cache": "set-cookie"}),
    (b"max-age=99999999999", {"max-age": "2147483648"}),
    (b"max-age=60, must-revalidate", {"max-age": "60", "must-revalidate": None}),
    (b"no-store=?0, max-age=1", {"max-age": "1"}),  # a false flag is no flag
    (b"max-age=5;a=1, public;b", {"max-age": "5", "public": None}),  # parameters dropped
    (b"x=(a b), s-maxage=2", {"s-maxage": "2"}),
    (b"x=:aGk=:, x2=1.5, x3=\"s\", max-age=0", {"max-age": "0"}),
])
def test_rfc9213_2_targeted_field_directives(value: bytes, expected: dict[str, str | None]
                                             ) -> None:
    assert fields.targeted_directives(value) == expected


@pytest.mark.parametrize("value", [
    b"",  # empty: ignored, as if absent
    b"max-age =100",  # space before "=": not a Dictionary
    b"max-age= 100",
    b"MaX-aGe=3600",  # keys are lowercase
    b"max-age=10000, &&&&&",
    b"max-age=3600,",  # trailing comma
    b'max-age="10000"',  # the wrong type for a directive
    b"max-age=1.5",
    b"no-store=1",
    b"private=tok",
    b"max-age=1234567890123456",  # more than 15 digits
    b'x="unterminated',
    b"caf\xe9=1",
])
def test_rfc9213_2_1_an_invalid_targeted_field_is_ignored(value: bytes) -> None:
    assert fields.targeted_directives(value) is None


# -- Range: RFC 9110 §14 -------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "expected"), [
    (b"bytes=0-1", (0, 1)),
    (b"bytes=1-", (1, 10)),
    (b"bytes=-1", (10, 10)),
    (b"bytes=-100", (0, 10)),  # more than there is: all of it
    (b"bytes=5-100", (5, 10)),
    (b"bytes=11-", fields.UNSATISFIABLE),
    (b"bytes=-0", fields.UNSATISFIABLE),
    (b"bytes=3-2", None),  # invalid: ignored, the whole is sent
    (b"bytes=0-1,5-6", None),  # several ranges: answered whole
    (b"items=0-1", None),
    (b"bytes=", None),
    (b"bytes=-", None),
])
def test_rfc9110_14_byte_ranges_of_eleven_bytes(value: bytes,
                                                expected: tuple[int, int] | None) -> None:
    assert fields.byte_range(value, 11) == expected


# -- entity-tags: RFC 9110 §8.8.3 and §13.1.2 ----------------------------------------------------


def test_rfc9110_13_1_2_if_none_match_uses_the_weak_comparison() -> None:
    assert fields.weak_match(b'"a"', b'W/"a"')
    assert fields.weak_match(b'W/"a", "b"', b'"b"')
    assert fields.weak_match(b'"x", W/"a"', b'"a"')
    assert not fields.weak_match(b'"a"', b'"b"')
    assert fields.weak_match(b'"a,b"', b'"a,b"')  # a comma inside a tag is part of it
    assert not fields.weak_match(b'"a,b"', b'"a"')
    assert fields.weak_match(b"*", None)  # any current representation
    assert not fields.weak_match(b'"a"', None)
    assert not fields.weak_match(b"a", b"a")  # unquoted: not an entity-tag


def test_rfc9110_8_8_3_2_strong_comparison() -> None:
    assert fields.strong_match(b'"a"', b'"a"')
    assert not fields.strong_match(b'W/"a"', b'W/"a"')
    assert not fields.strong_match(b'"a"', b'W/"a"')
    assert not fields.strong_match(b'"a"', None)
