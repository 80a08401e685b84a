"""Scalar config types written the way operators write them: "5s", "10MiB", "100/s", "host:port".

Each is an ``Annotated`` pydantic type, so models use them like builtins and ``proxyd schema``
documents them as patterned strings.
"""

from __future__ import annotations

import ipaddress
import math
import re
from decimal import Decimal
from typing import Annotated, Any, NamedTuple

from pydantic import BeforeValidator, PlainSerializer, WithJsonSchema

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KiB|MiB|GiB|KB|MB|GB|k|K|M|G)?\s*$")
_SIZE_UNITS = {
    None: 1, "B": 1,
    "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3,
    "k": 1024, "K": 1024, "M": 1024**2, "G": 1024**3,
    "KB": 1000, "MB": 1000**2, "GB": 1000**3,
}

_RATE_RE = re.compile(r"^\s*(\d+)\s*/\s*(\d*)\s*(s|m|h|d)\s*$")
_RATE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def plain_number(value: float) -> str:
    """Shortest exact decimal without an exponent: ``f"{v:g}"`` writes 1e-05 and 1.23457e+06,
    which lose digits and which the parsers here do not accept back."""
    text = format(Decimal(repr(float(value))), "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


def parse_duration(value: Any) -> float:
    """Seconds as a float; a bare number means seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 250ms, 5s, 2m")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION_RE.match(value)):
        seconds = float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    else:
        raise ValueError(f"invalid duration {value!r}: expected e.g. 250ms, 5s, 2m, 1h")
    if not math.isfinite(seconds):  # YAML's .inf / .nan would break every timer using it
        raise ValueError(f"invalid duration {value!r}: must be finite")
    if seconds < 0:
        raise ValueError("a duration cannot be negative")
    return seconds


def parse_byte_size(value: Any) -> int:
    """Bytes as an int; binary units (KiB, MiB, GiB) are the documented spelling."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as 8KiB or 10MiB")
    if isinstance(value, int):
        size = value
    elif isinstance(value, str) and (m := _SIZE_RE.match(value)):
        size = int(float(m.group(1)) * _SIZE_UNITS[m.group(2)])
    else:
        raise ValueError(f"invalid size {value!r}: expected e.g. 512B, 8KiB, 10MiB, 1GiB")
    if size < 0:
        raise ValueError("a size cannot be negative")
    return size


class Rate(NamedTuple):
    """``count`` events per ``period`` seconds."""

    count: int  # type: ignore[assignment]  # hides tuple.count, unused here
    period: float

    def __str__(self) -> str:
        return f"{self.count}/{plain_number(self.period)}s"


def parse_rate(value: Any) -> Rate:
    if isinstance(value, Rate):
        return value
    if isinstance(value, str) and (m := _RATE_RE.match(value)):
        count = int(m.group(1))
        multiple = int(m.group(2)) if m.group(2) else 1
        if count <= 0 or multiple <= 0:
            raise ValueError("a rate must be positive")
        return Rate(count, float(multiple * _RATE_UNITS[m.group(3)]))
    raise ValueError(f"invalid rate {value!r}: expected e.g. 100/s, 20/m, 1000/h")


class HostPort(NamedTuple):
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_host_port(value: Any) -> HostPort:
    if isinstance(value, HostPort):
        return value
    if not isinstance(value, str):
        raise ValueError(f"invalid address {value!r}: expected host:port such as 127.0.0.1:8080")
    text = value.strip()
    host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isdigit():
        raise ValueError(f"invalid address {value!r}: expected host:port such as 127.0.0.1:8080")
    port = int(port_text)
    if not 0 <= port <= 65535:
        raise ValueError(f"invalid port {port} in {value!r}: must be 0-65535")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"invalid IPv6 address in {value!r}") from None
    elif host == "":
        host = "0.0.0.0"
    elif ":" in host:
        raise ValueError(f"invalid address {value!r}: write IPv6 addresses as [::1]:8080")
    elif not re.fullmatch(r"[A-Za-z0-9.-]+", host):
        raise ValueError(f"invalid host {host!r} in {value!r}")
    return HostPort(host, port)


Duration = Annotated[
    float,
    BeforeValidator(parse_duration),
    PlainSerializer(lambda v: f"{plain_number(v)}s", return_type=str),
    WithJsonSchema({"type": ["string", "number"], "pattern": r"^\d+(\.\d+)?(ms|s|m|h)?$",
                    "description": "duration: 250ms, 5s, 2m, 1h"}),
]
ByteSize = Annotated[
    int,
    BeforeValidator(parse_byte_size),
    WithJsonSchema({"type": ["string", "integer"],
                    "pattern": r"^\d+(\.\d+)?(B|KiB|MiB|GiB|KB|MB|GB|k|K|M|G)?$",
                    "description": "size: 512B, 8KiB, 10MiB, 1GiB"}),
]
RateValue = Annotated[
    Rate,
    BeforeValidator(parse_rate),
    PlainSerializer(str, return_type=str),
    WithJsonSchema({"type": "string", "pattern": r"^\d+/\d*(s|m|h|d)$",
                    "description": "rate: 100/s, 20/m, 1000/h"}),
]
HostPortValue = Annotated[
    HostPort,
    BeforeValidator(parse_host_port),
    PlainSerializer(str, return_type=str),
    WithJsonSchema({"type": "string", "description": "address: host:port, [::1]:port"}),
]
