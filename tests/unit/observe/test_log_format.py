"""Access log templates and escaping: compiled once, rendered from a record at the flush."""

from __future__ import annotations

import pytest

from proxyd.observe.access_log import Record
from proxyd.observe.log_format import combined, compile_template, escape, render

RECORD: Record = (
    0.0, "rid-1", b"10.0.0.7", b"POST", b"example.com", b"/p?q=1", 201, 12, 34, 0.0125,
    "backend", 0.01, "miss", "api",
    [(b"user-agent", b"User-Agent", b"curl/8"), (b"x-forwarded-for", b"X-Forwarded-For",
                                                b"1.2.3.4")],
    10, "https://[::1]:8443", 2, "TLSv1.3",
)


@pytest.mark.parametrize(("template", "line"), [
    ("$remote_addr $request", '10.0.0.7 POST /p?q=1 HTTP/1.0'),
    ("$uri|$args|$request_method|$host", "/p|q=1|POST|example.com"),
    ("$status $body_bytes_sent $request_body_length", "201 34 12"),
    ("$request_time $upstream_response_time", "0.013 0.010"),
    ("$upstream_name $upstream_addr $upstream_tries", "backend [::1]:8443 2"),
    ("$cache_status $route $ssl_protocol $request_id", "miss api TLSv1.3 rid-1"),
    ("$http_user_agent $http_x_forwarded_for $http_referer", "curl/8 1.2.3.4 -"),
    ("${status}ok $$status $", "201ok $status $"),
    ("$time_local", "01/Jan/1970:00:00:00 +0000"),
    ("$time_iso8601", "1970-01-01T00:00:00+00:00"),
    ("no variables", "no variables"),
])
def test_variables(template: str, line: str) -> None:
    assert render(compile_template(template), RECORD, "rid-1") == line + "\n"


@pytest.mark.parametrize("template", ["$nope", "${request_timex}", "$http_"])
def test_unknown_variables_are_refused(template: str) -> None:
    with pytest.raises(ValueError, match="unknown variable"):
        compile_template(template)


@pytest.mark.parametrize(("value", "text"), [
    (None, "-"), (b"", "-"), (b"plain", "plain"), (b'q"u\\o', "q\\x22u\\x5Co"),
    (b"tab\there\n", "tab\\x09here\\x0A"), ("é", "\\xE9"), (b"\x7f", "\\x7F"),
])
def test_escape(value: bytes | str | None, text: str) -> None:
    assert escape(value) == text


def test_combined_line() -> None:
    assert combined(RECORD) == ('10.0.0.7 - - [01/Jan/1970:00:00:00 +0000] '
                                '"POST /p?q=1 HTTP/1.0" 201 34 "-" "curl/8"\n')


def test_protocol_names_the_http_version() -> None:
    template = compile_template("$server_protocol")
    for version, name in ((10, "HTTP/1.0"), (11, "HTTP/1.1"), (20, "HTTP/2.0")):
        record = (*RECORD[:15], version, *RECORD[16:])
        assert render(template, record, "p") == name + "\n"  # type: ignore[arg-type]
