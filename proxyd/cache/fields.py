"""Field values the cache reads, parsed exactly as their grammars say.

HTTP-dates (RFC 9110 §5.6.7), Age (RFC 9111 §5.1), Cache-Control directives (RFC 9111 §5.2),
targeted cache-control fields such as CDN-Cache-Control (RFC 9213, Dictionary Structured
Fields of RFC 8941) and byte ranges (RFC 9110 §14). A value that does not follow its grammar
is reported as invalid (None), never guessed at: the caller applies what the RFC says an
invalid value means (an invalid Expires is "already expired", an invalid Age is ignored, an
invalid targeted field is as if absent).
"""

from __future__ import annotations

import calendar
import re
import time
from collections.abc import Sequence
from typing import Final

Headers = Sequence[tuple[bytes, bytes]]
Directives = dict[str, str | None]

# RFC 9111 §1.2.2: a delta-seconds too large to represent is read as 2^31.
DELTA_MAX: Final = 2147483648

MONTHS: Final = {b"Jan": 1, b"Feb": 2, b"Mar": 3, b"Apr": 4, b"May": 5, b"Jun": 6, b"Jul": 7,
                 b"Aug": 8, b"Sep": 9, b"Oct": 10, b"Nov": 11, b"Dec": 12}
_MONTH: Final = rb"(Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec)"
_TIME: Final = rb"([0-9]{2}):([0-9]{2}):([0-9]{2})"
# The three forms of RFC 9110 §5.6.7, case-sensitive as its grammar is. Anything else — a
# two-digit year in IMF form, another zone than GMT, a missing comma, doubled spaces, dashes
# in an IMF date, dots in the time, a one-digit hour — is not an HTTP-date.
IMF_FIXDATE: Final = re.compile(
    rb"(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun), ([0-9]{2}) " + _MONTH + rb" ([0-9]{4}) " + _TIME
    + rb" GMT")
RFC850_DATE: Final = re.compile(
    rb"(?:Monday|Tuesday|Wednesday|Thursday|Friday|Saturday|Sunday), ([0-9]{2})-" + _MONTH
    + rb"-([0-9]{2}) " + _TIME + rb" GMT")
ASCTIME_DATE: Final = re.compile(
    rb"(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun) " + _MONTH + rb" ([0-9]{2}| [0-9]) " + _TIME
    + rb" ([0-9]{4})")


def header(headers: Headers, lname: bytes) -> bytes | None:
    for name, value in headers:
        if name.lower() == lname:
            return value
    return None


def all_values(headers: Headers, lname: bytes) -> list[bytes]:
    return [value for name, value in headers if name.lower() == lname]


# -- HTTP-date ------------------------------------------------------------------------------------


def http_date(value: bytes | None) -> float | None:
    """Seconds since the epoch, or None when ``value`` is not an HTTP-date."""
    if value is None:
        return None
    value = value.strip(b" \t")
    m = IMF_FIXDATE.fullmatch(value)
    if m is not None:
        day, month, year, hh, mm, ss = m.groups()
        return _timestamp(int(year), MONTHS[month], int(day), int(hh), int(mm), int(ss))
    m = RFC850_DATE.fullmatch(value)
    if m is not None:
        day, month, yy, hh, mm, ss = m.groups()
        return _timestamp(two_digit_year(int(yy)), MONTHS[month], int(day), int(hh), int(mm),
                          int(ss))
    m = ASCTIME_DATE.fullmatch(value)
    if m is not None:
        month, day, hh, mm, ss, year = m.groups()
        return _timestamp(int(year), MONTHS[month], int(day.strip()), int(hh), int(mm), int(ss))
    return None


def two_digit_year(yy: int, now: float | None = None) -> int:
    """RFC 9110 §5.6.7: a year that would be more than 50 years in the future is the most
    recent past year with those last two digits."""
    this_year = time.gmtime(now).tm_year
    year = this_year - this_year % 100 + yy
    return year - 100 if year > this_year + 50 else year


def _timestamp(year: int, month: int, day: int, hour: int, minute: int, second: int
               ) -> float | None:
    # Each part in its range (a leap second, 60, is allowed): 31 Feb is not a date.
    if (day < 1 or day > calendar.monthrange(year, month)[1] or hour > 23 or minute > 59
            or second > 60):
        return None
    return float(calendar.timegm((year, month, day, hour, minute, second, 0, 0, 0)))


def single_date(headers: Headers, lname: bytes) -> float | None:
    """The field's date when it occurs once with one valid HTTP-date; else None (several
    values are invalid: the field is a singleton)."""
    values = all_values(headers, lname)
    return http_date(values[0]) if len(values) == 1 else None


# -- Age and delta-seconds ------------------------------------------------------------------------


def delta_seconds(value: bytes | str) -> int | None:
    """RFC 9111 §1.2.2: digits only, capped at 2^31; None when not delta-seconds."""
    if not value.isdigit() or not value.isascii():
        return None
    return min(int(value), DELTA_MAX)


def age_value(headers: Headers) -> float:
    """RFC 9111 §5.1: the first member of the first Age field; an invalid one is ignored
    (0), so it can never make a response look fresher than it is."""
    value = header(headers, b"age")
    if value is None:
        return 0.0
    seconds = delta_seconds(value.split(b",", 1)[0].strip(b" \t"))
    return float(seconds) if seconds is not None else 0.0


# -- Cache-Control ---------------------------------------------------------------------------------


def cache_control(headers: Headers) -> Directives:
    """Directives of every Cache-Control field: lowercase names, unquoted values; the first
    occurrence of a directive counts (RFC 9111 §4.2.1). Commas inside quoted strings do not
    split (``no-cache="a, b"``)."""
    directives: Directives = {}
    for value in all_values(headers, b"cache-control"):
        for part in split_list(value.decode("latin-1")):
            name, sep, arg = part.partition("=")
            name = name.strip().lower()
            if name and name not in directives:
                directives[name] = unquote(arg.strip()) if sep else None
    return directives


def split_list(value: str) -> list[str]:
    """A comma-separated list (RFC 9110 §5.6.1) whose members may hold quoted strings."""
    if '"' not in value:
        return value.split(",")
    parts: list[str] = []
    start = 0
    quoted = False
    i = 0
    while i < len(value):
        c = value[i]
        if quoted and c == "\\":
            i += 1
        elif c == '"':
            quoted = not quoted
        elif c == "," and not quoted:
            parts.append(value[start:i])
            start = i + 1
        i += 1
    parts.append(value[start:])
    return parts


def unquote(arg: str) -> str:
    if len(arg) >= 2 and arg[0] == '"' and arg[-1] == '"':
        return re.sub(r"\\(.)", r"\1", arg[1:-1])
    return arg


# -- targeted fields (RFC 9213) --------------------------------------------------------------------

# Directives whose value is delta-seconds (an sf-integer in a targeted field).
DELTA_DIRECTIVES: Final = frozenset({"max-age", "s-maxage", "stale-while-revalidate",
                                     "stale-if-error"})
# Directives that may carry a list of field names (an sf-string there) or nothing.
QUALIFIED_DIRECTIVES: Final = frozenset({"no-cache", "private"})
FLAG_DIRECTIVES: Final = frozenset({"no-store", "public", "must-revalidate", "proxy-revalidate",
                                    "must-understand", "no-transform", "immutable"})


def targeted_directives(value: bytes) -> Directives | None:
    """A targeted field's value as Cache-Control-style directives; None when the field must
    be ignored (RFC 9213 §2.1: empty, or not a valid Dictionary — a directive whose value has
    the wrong type included). Unknown directives are left out."""
    members = sf_dictionary(value)
    if not members:
        return None
    directives: Directives = {}
    for name, item in members.items():
        if name in DELTA_DIRECTIVES:
            if isinstance(item, bool) or not isinstance(item, int):
                return None
            directives[name] = str(min(max(item, 0), DELTA_MAX))
        elif name in QUALIFIED_DIRECTIVES:
            if item is True:
                directives[name] = None
            elif isinstance(item, str):
                directives[name] = item
            elif item is not False:
                return None
        elif name in FLAG_DIRECTIVES:
            if item is True:
                directives[name] = None
            elif item is not False:
                return None
    return directives


class Token:
    """An sf-token, told apart from an sf-string (no directive takes one)."""

    __slots__ = ("value",)

    def __init__(self, value: str) -> None:
        self.value = value


class Invalid(Exception):
    """A Structured Field that does not parse."""


_KEY: Final = re.compile(r"[a-z*][a-z0-9_.*-]*")
_TOKEN: Final = re.compile(r"[A-Za-z*][!#$%&'*+.^_`|~0-9A-Za-z:/-]*")
_NUMBER: Final = re.compile(r"-?([0-9]+)(\.[0-9]+)?")
_BYTES: Final = re.compile(r":([A-Za-z0-9+/=]*):")

Item = int | float | str | bool | bytes | Token | list[object]


def sf_dictionary(value: bytes) -> dict[str, Item] | None:
    """RFC 8941 §4.2.2: the members of a Dictionary (parameters dropped), or None when the
    value is not one. A member without a value is True."""
    try:
        text = value.decode("ascii")
    except UnicodeDecodeError:
        return None
    parser = _SF(text.strip(" "))
    try:
        return parser.dictionary()
    except Invalid:
        return None


class _SF:
    def __init__(self, text: str) -> None:
        self.s = text
        self.i = 0

    def peek(self) -> str:
        return self.s[self.i] if self.i < len(self.s) else ""

    def skip(self, chars: str) -> None:
        while self.i < len(self.s) and self.s[self.i] in chars:
            self.i += 1

    def dictionary(self) -> dict[str, Item]:
        members: dict[str, Item] = {}
        while self.i < len(self.s):
            key = self.key()
            if self.peek() == "=":
                self.i += 1
                members[key] = self.member()
            else:
                members[key] = True
                self.parameters()
            self.skip(" \t")
            if self.i >= len(self.s):
                return members
            if self.peek() != ",":
                raise Invalid
            self.i += 1
            self.skip(" \t")
            if self.i >= len(self.s):
                raise Invalid  # a trailing comma
        return members

    def key(self) -> str:
        m = _KEY.match(self.s, self.i)
        if m is None:
            raise Invalid
        self.i = m.end()
        return m.group()

    def member(self) -> Item:
        if self.peek() == "(":
            self.i += 1
            items: list[object] = []
            while True:
                self.skip(" ")
                if self.peek() == ")":
                    self.i += 1
                    self.parameters()
                    return items
                items.append(self.bare())
                self.parameters()
                if self.peek() not in (" ", ")"):
                    raise Invalid
        item = self.bare()
        self.parameters()
        return item

    def parameters(self) -> None:
        while self.peek() == ";":
            self.i += 1
            self.skip(" ")
            self.key()
            if self.peek() == "=":
                self.i += 1
                self.bare()

    def bare(self) -> Item:
        c = self.peek()
        if c == "-" or c.isdigit():
            m = _NUMBER.match(self.s, self.i)
            if m is None:
                raise Invalid
            whole, fraction = m.group(1), m.group(2)
            if fraction is None:
                if len(whole) > 15:
                    raise Invalid
                self.i = m.end()
                return int(m.group())
            if len(whole) > 12 or len(fraction) > 4:
                raise Invalid
            self.i = m.end()
            return float(m.group())
        if c == '"':
            return self.string()
        if c == "?":
            flag = self.s[self.i + 1:self.i + 2]
            if flag not in ("0", "1"):
                raise Invalid
            self.i += 2
            return flag == "1"
        if c == ":":
            m = _BYTES.match(self.s, self.i)
            if m is None:
                raise Invalid
            self.i = m.end()
            return m.group(1).encode()
        m = _TOKEN.match(self.s, self.i)
        if m is None:
            raise Invalid
        self.i = m.end()
        return Token(m.group())

    def string(self) -> str:
        out: list[str] = []
        i = self.i + 1
        s = self.s
        while i < len(s):
            c = s[i]
            if c == "\\":
                if i + 1 >= len(s) or s[i + 1] not in '"\\':
                    raise Invalid
                out.append(s[i + 1])
                i += 2
            elif c == '"':
                self.i = i + 1
                return "".join(out)
            elif " " <= c <= "~":
                out.append(c)
                i += 1
            else:
                raise Invalid
        raise Invalid  # no closing quote


# -- Range (RFC 9110 §14) --------------------------------------------------------------------------

UNSATISFIABLE: Final = (-1, -1)
_RANGE: Final = re.compile(rb"bytes[ \t]*=[ \t]*([0-9]*)-([0-9]*)[ \t]*")


def byte_range(value: bytes, length: int) -> tuple[int, int] | None:
    """The first and last byte (inclusive) that a Range field asks of ``length`` bytes;
    UNSATISFIABLE when none of it exists; None when the field is to be ignored (not one
    valid byte range: another unit, several ranges, bad syntax) and the whole answered."""
    m = _RANGE.fullmatch(value)
    if m is None:
        return None
    first, last = m.group(1), m.group(2)
    if not first:
        if not last:
            return None
        suffix = int(last)  # the last N bytes
        if suffix == 0 or length == 0:
            return UNSATISFIABLE
        return max(0, length - suffix), length - 1
    start = int(first)
    end = int(last) if last else length - 1
    if last and end < start:
        return None  # invalid: ignored (RFC 9110 §14.1.1)
    if start >= length:
        return UNSATISFIABLE
    return start, min(end, length - 1)


# -- validators (RFC 9110 §8.8.3, §13.1) ---------------------------------------------------------

_ENTITY_TAG: Final = re.compile(rb'[ \t]*((?:W/)?"[\x21\x23-\x7e\x80-\xff]*")[ \t]*(?:,|$)')


def entity_tags(value: bytes) -> list[bytes] | None:
    """The entity-tags of an If-None-Match or If-Match list (``*`` not included), or None
    when the value is not such a list. Commas may appear inside a tag: no naive split."""
    tags: list[bytes] = []
    i, n = 0, len(value)
    while i < n:
        m = _ENTITY_TAG.match(value, i)
        if m is None:
            if not value[i:].strip(b" \t,"):
                break  # empty list members are allowed
            return None
        tags.append(m.group(1))
        i = m.end()
    return tags


def weak_match(if_none_match: bytes, etag: bytes | None) -> bool:
    """If-None-Match against a representation's ETag (RFC 9110 §13.1.2): weak comparison
    (W/ ignored); ``*`` matches any current representation, with or without a tag."""
    if if_none_match.strip(b" \t") == b"*":
        return True
    if etag is None:
        return False
    tags = entity_tags(if_none_match)
    if not tags:
        return False
    opaque = etag.strip(b" \t").removeprefix(b"W/")
    for tag in tags:  # noqa: SIM110  (any(genexpr) costs more, compiled)
        if tag.removeprefix(b"W/") == opaque:
            return True
    return False


def strong_match(a: bytes, b: bytes | None) -> bool:
    """Strong comparison (RFC 9110 §8.8.3.2): both tags strong and identical."""
    if b is None:
        return False
    a, b = a.strip(b" \t"), b.strip(b" \t")
    return a == b and a.startswith(b'"') and len(a) >= 2 and a.endswith(b'"')
