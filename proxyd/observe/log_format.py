"""Access log lines other than the JSON ones: the Combined Log Format, and templates.

Both are built at the flush from the records a request left (access_log.py), never on the
request path. The Combined Log Format is the one Apache and nginx call ``combined``, field for
field, so goaccess (``--log-format=COMBINED``), awstats (``LogFormat=1``) and other log tools
read it as they read theirs::

    127.0.0.1 - - [10/Oct/2024:13:55:36 +0000] "GET /a?b=1 HTTP/1.1" 200 2326 "-" "curl/8.5.0"

A template is nginx's ``log_format``: ``$name`` or ``${name}`` variables in literal text,
compiled once into a list of parts. Values are escaped as nginx escapes them (``"``, ``\\``
and bytes outside printable ASCII as ``\\xHH``), and an empty value is ``-``.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from proxyd.observe.access_log import Record

_MONTHS: Final = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov",
                  "Dec")
# Printable ASCII but '"' and '\\' as themselves; everything else as nginx writes it.
_ESCAPES: Final = {i: f"\\x{i:02X}" for i in (*range(0x20), 0x22, 0x5C, *range(0x7F, 0x100))}


def clf_time(ts: float) -> str:
    t = time.gmtime(ts)
    return (f"{t.tm_mday:02d}/{_MONTHS[t.tm_mon - 1]}/{t.tm_year}:{t.tm_hour:02d}:"
            f"{t.tm_min:02d}:{t.tm_sec:02d} +0000")


def iso_time(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(ts))


def escape(value: bytes | str | None) -> str:
    """A value as a log line may hold it: nginx's escaping; ``-`` when empty."""
    if not value:
        return "-"
    text = value.decode("latin-1") if isinstance(value, bytes) else value
    return text.translate(_ESCAPES) if not text.isascii() or not text.isprintable() \
        or '"' in text or "\\" in text else text


def header(record: Record, lname: bytes) -> bytes | None:
    """The first value of a request header field (the record keeps the request's list)."""
    for name, _, value in record[14]:
        if name == lname:
            return value
    return None


PROTOCOL_NAMES: Final = {10: "HTTP/1.0", 11: "HTTP/1.1", 20: "HTTP/2.0"}


def protocol_name(version: int) -> str:
    return PROTOCOL_NAMES.get(version, "HTTP/1.1")


def protocol(record: Record) -> str:
    return protocol_name(record[15])


def upstream_addr(record: Record) -> str:
    """host:port of the target the last try went to ("" when none was tried)."""
    return record[16].partition("://")[2]


def combined(record: Record) -> str:
    """One Combined Log Format line (the request id is not part of it)."""
    (now, _rid, client_ip, method, _host, target, status, _in, bytes_out, *_rest) = record
    request = f"{method.decode('latin-1')} {target.decode('latin-1')} {protocol(record)}"
    return (f'{client_ip.decode("latin-1")} - - [{clf_time(now)}] "{escape(request)}" '
            f'{status} {bytes_out} "{escape(header(record, b"referer"))}" '
            f'"{escape(header(record, b"user-agent"))}"\n')


# -- templates ---------------------------------------------------------------------------------

Part = Callable[["Record", str], str]


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.3f}"


# name → value of one record (and its request id, made at the flush).
VARIABLES: Final[dict[str, Part]] = {
    "remote_addr": lambda r, _: r[2].decode("latin-1"),
    "time_local": lambda r, _: clf_time(r[0]),
    "time_iso8601": lambda r, _: iso_time(r[0]),
    "msec": lambda r, _: f"{r[0]:.3f}",
    "request": lambda r, _: escape(
        f"{r[3].decode('latin-1')} {r[5].decode('latin-1')} {protocol(r)}"),
    "request_method": lambda r, _: escape(r[3]),
    "request_uri": lambda r, _: escape(r[5]),
    "uri": lambda r, _: escape(r[5].partition(b"?")[0]),
    "args": lambda r, _: escape(r[5].partition(b"?")[2]),
    "server_protocol": lambda r, _: protocol(r),
    "host": lambda r, _: escape(r[4]),
    "status": lambda r, _: str(r[6]),
    "request_body_length": lambda r, _: str(r[7]),
    "body_bytes_sent": lambda r, _: str(r[8]),
    "request_time": lambda r, _: f"{r[9]:.3f}",
    "upstream_name": lambda r, _: escape(r[10]),
    "upstream_response_time": lambda r, _: _ms(r[11]),
    "upstream_addr": lambda r, _: upstream_addr(r) or "-",
    "upstream_tries": lambda r, _: str(r[17]),
    "cache_status": lambda r, _: escape(r[12]),
    "route": lambda r, _: escape(r[13]),
    "ssl_protocol": lambda r, _: r[18] or "-",
    "request_id": lambda r, rid: escape(rid),
    "http_referer": lambda r, _: escape(header(r, b"referer")),
    "http_user_agent": lambda r, _: escape(header(r, b"user-agent")),
}
_TOKEN: Final = re.compile(
    r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)\}|\$([A-Za-z_][A-Za-z0-9_]*)")


def _request_header(name: str) -> Part:
    lname = name.replace("_", "-").lower().encode("latin-1")
    return lambda r, _: escape(header(r, lname))


def compile_template(text: str) -> list[str | Part]:
    """The template as literal text and value parts; ValueError names an unknown variable.
    ``$http_NAME`` is any request header (``$http_x_forwarded_for``); ``$$`` is a ``$``."""
    parts: list[str | Part] = []
    literal = ""
    position = 0
    for m in _TOKEN.finditer(text):
        literal += text[position:m.start()]
        position = m.end()
        if m.group(0) == "$$":
            literal += "$"
            continue
        name = m.group(1) or m.group(2)
        if name in VARIABLES:
            part = VARIABLES[name]
        elif name.startswith("http_") and len(name) > len("http_"):
            part = _request_header(name[len("http_"):])
        else:
            known = ", ".join(f"${v}" for v in sorted(VARIABLES))
            raise ValueError(f"unknown variable ${name} in the access log template "
                             f"(known: {known}, $http_NAME)")
        if literal:
            parts.append(literal)
            literal = ""
        parts.append(part)
    literal += text[position:]
    if literal:
        parts.append(literal)
    return parts


def render(parts: list[str | Part], record: Record, request_id: str) -> str:
    return "".join(p if p.__class__ is str else p(record, request_id)  # type: ignore[operator]
                   for p in parts) + "\n"


def check_template(text: Any) -> None:
    """For the config model: the template compiles (ValueError otherwise)."""
    compile_template(str(text))
