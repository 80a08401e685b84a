"""The operator-facing scalar types: "5s", "10MiB", "100/s", "host:port"."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import TypeAdapter, ValidationError

from proxyd.config.types import (
    ByteSize,
    Duration,
    HostPort,
    HostPortValue,
    Rate,
    RateValue,
    parse_byte_size,
    parse_duration,
    parse_host_port,
    parse_rate,
    plain_number,
)

DURATION = TypeAdapter(Duration)
SIZE = TypeAdapter(ByteSize)
RATE = TypeAdapter(RateValue)
ADDRESS = TypeAdapter(HostPortValue)


@pytest.mark.parametrize(("text", "seconds"), [
    ("250ms", 0.25), ("5s", 5.0), ("2m", 120.0), ("1h", 3600.0), ("1.5h", 5400.0),
    ("30", 30.0), (" 5 s ", 5.0), (0, 0.0), (7, 7.0), (0.5, 0.5), ("0ms", 0.0),
])
def test_duration_good(text: object, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("bad", [
    "5x", "five seconds", "-3s", "", "1d", "5 s s", True, None, [], -1, math.inf, math.nan,
])
def test_duration_bad(bad: object) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(bad)


@pytest.mark.parametrize(("text", "size"), [
    ("512B", 512), ("8KiB", 8192), ("10MiB", 10 * 1024**2), ("1GiB", 1024**3),
    ("1KB", 1000), ("2MB", 2_000_000), ("1GB", 10**9), ("4k", 4096), ("1.5KiB", 1536),
    ("100", 100), (0, 0), (4096, 4096),
])
def test_size_good(text: object, size: int) -> None:
    assert parse_byte_size(text) == size


@pytest.mark.parametrize("bad", ["10QB", "lots", "-1KiB", "8 XiB", "", True, None, -5, 1.5])
def test_size_bad(bad: object) -> None:
    with pytest.raises(ValueError, match="size"):
        parse_byte_size(bad)


@pytest.mark.parametrize(("text", "rate"), [
    ("100/s", Rate(100, 1.0)), ("20/m", Rate(20, 60.0)), ("1000/h", Rate(1000, 3600.0)),
    ("5/d", Rate(5, 86400.0)), ("20/5m", Rate(20, 300.0)), (" 3 / 2 s ", Rate(3, 2.0)),
])
def test_rate_good(text: str, rate: Rate) -> None:
    assert parse_rate(text) == rate


@pytest.mark.parametrize("bad", ["0/s", "10/0s", "10/w", "ten/s", "10", "", 10, None])
def test_rate_bad(bad: object) -> None:
    with pytest.raises(ValueError, match="rate"):
        parse_rate(bad)


@pytest.mark.parametrize(("text", "expected"), [
    ("127.0.0.1:8080", HostPort("127.0.0.1", 8080)),
    ("localhost:80", HostPort("localhost", 80)),
    ("[::1]:9901", HostPort("::1", 9901)),
    (":8080", HostPort("0.0.0.0", 8080)),
    ("example.com:0", HostPort("example.com", 0)),
])
def test_host_port_good(text: str, expected: HostPort) -> None:
    assert parse_host_port(text) == expected


@pytest.mark.parametrize(("bad", "message"), [
    ("127.0.0.1", "expected host:port"), ("127.0.0.1:70000", "must be 0-65535"),
    ("::1:8080", r"\[::1\]:8080"), ("[zz::1]:80", "invalid IPv6"), ("bad_host!:80", "invalid host"),
    ("host:port", "expected host:port"), (8080, "expected host:port"),
])
def test_host_port_bad(bad: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_host_port(bad)


def test_host_port_str_brackets_ipv6() -> None:
    assert str(HostPort("::1", 80)) == "[::1]:80"
    assert str(HostPort("10.0.0.1", 80)) == "10.0.0.1:80"


def test_pydantic_wraps_parse_errors() -> None:
    with pytest.raises(ValidationError, match="invalid duration"):
        DURATION.validate_python("soon")


@pytest.mark.parametrize(("value", "text"), [
    (5.0, "5"), (0.25, "0.25"), (1e-05, "0.00001"), (1234567.0, "1234567"), (0.0, "0"),
])
def test_plain_number_never_uses_an_exponent(value: float, text: str) -> None:
    assert plain_number(value) == text


# --- round trips: what the models serialise, they read back -----------------------------------

finite_seconds = st.floats(min_value=0, max_value=1e9, allow_nan=False, allow_infinity=False)


@given(finite_seconds)
def test_duration_round_trip(seconds: float) -> None:
    dumped = DURATION.dump_python(seconds)
    assert isinstance(dumped, str)
    assert DURATION.validate_python(dumped) == pytest.approx(seconds)


@given(st.integers(min_value=0, max_value=10**6), st.sampled_from(["ms", "s", "m", "h"]))
def test_duration_units(n: int, unit: str) -> None:
    factor = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]
    assert parse_duration(f"{n}{unit}") == pytest.approx(n * factor)


@given(st.integers(min_value=0, max_value=2**40),
       st.sampled_from([("B", 1), ("KiB", 1024), ("MiB", 1024**2), ("KB", 1000)]))
def test_size_units(n: int, unit: tuple[str, int]) -> None:
    assert SIZE.validate_python(f"{n}{unit[0]}") == n * unit[1]


@given(st.integers(min_value=1, max_value=10**9), st.integers(min_value=1, max_value=10**6),
       st.sampled_from(["s", "m", "h", "d"]))
def test_rate_round_trip(count: int, multiple: int, unit: str) -> None:
    rate = RATE.validate_python(f"{count}/{multiple}{unit}")
    assert RATE.validate_python(RATE.dump_python(rate)) == rate


@given(st.one_of(st.ip_addresses().map(str),
                 st.from_regex(r"[a-z][a-z0-9-]{0,20}(\.[a-z][a-z0-9-]{0,20}){0,3}",
                               fullmatch=True)),
       st.integers(min_value=0, max_value=65535))
def test_host_port_round_trip(host: str, port: int) -> None:
    address = HostPort(host, port)
    assert ADDRESS.validate_python(ADDRESS.dump_python(address)) == address
