"""forward_auth's options, its checks in a whole config (file:line), proxyd explain, and the
pure parts of the element: the credentials' cache key and the fields relayed to the client."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from proxyd.config import ConfigError, load_config_text
from proxyd.config.loader import load_config_text_with_warnings
from proxyd.explain import explain, format_explain
from proxyd.middleware.access.forward_auth import ForwardAuth, _relayed
from proxyd.middleware.access.forward_auth_options import ForwardAuthOptions
from proxyd.middleware.base import Context


def options(**kw: Any) -> ForwardAuthOptions:
    return ForwardAuthOptions.model_validate({"type": "forward_auth", "upstream": "auth", **kw})


def test_defaults() -> None:
    o = options()
    assert (o.path, o.method, o.timeout, o.on_error, o.cache_ttl) == ("/auth", "GET", 1.0,
                                                                      "deny", 0.0)
    assert o.request_headers == ["Authorization", "Cookie"]
    assert o.response_headers == [] and o.forward_body is False
    assert o.max_pending == 256


@pytest.mark.parametrize(("kw", "message"), [
    ({"upstream": ""}, "name an upstream"),
    ({"path": "auth"}, "starting with '/'"),
    ({"path": "/a b"}, "without spaces"),
    ({"method": "GE T"}, "not a valid method"),
    ({"request_headers": ["X Bad"]}, "not a valid header name"),
    ({"request_headers": ["Cookie", "cookie"]}, "listed twice"),
    ({"request_headers": ["X-Forwarded-For"]}, "proxyd sets it"),
    ({"response_headers": ["Content-Length"]}, "framing"),
    ({"timeout": "0s"}, "above 0"),
    ({"on_error": "maybe"}, "'deny' or 'allow'"),
    ({"forward_body": True}, "False"),
    ({"cache_size": 0}, "greater than or equal to 1"),
    ({"max_pending": 0}, "greater than or equal to 1"),
])
def test_invalid_options_are_refused(kw: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError) as info:
        options(**kw)
    assert message in str(info.value)


def test_the_method_is_upper_case() -> None:
    assert options(method="post").method == "POST"


YAML = """\
upstreams:
  backend: {targets: [http://127.0.0.1:9000]}
  authz: {targets: [http://127.0.0.1:9001]}
routes:
  - name: r
    match: {path_prefix: /}
    upstream: backend
    middleware:
      forward_auth: {upstream: nowhere}
middleware:
  - type: forward_auth
    upstream: auth
    timeout: 500ms
"""


def test_an_unknown_upstream_is_an_error_at_its_line() -> None:
    with pytest.raises(ConfigError) as info:
        load_config_text(YAML, "g.yaml", {})
    issues = {i.key_path: i for i in info.value.issues}
    top = issues["middleware[0].upstream"]
    assert top.line == 12
    assert top.message == "unknown upstream 'auth' for forward_auth, did you mean 'authz'?"
    override = issues["routes[0].middleware.forward_auth.upstream"]
    assert override.line == 9 and "unknown upstream 'nowhere'" in override.message


def test_max_pending_is_checked_at_its_line() -> None:
    text = YAML.replace("timeout: 500ms", "max_pending: -1")
    with pytest.raises(ConfigError) as info:
        load_config_text(text, "g.yaml", {})
    [issue] = [i for i in info.value.issues if i.key_path == "middleware[0].max_pending"]
    assert issue.line == 13 and "greater than or equal to 1" in issue.message


def test_the_auth_upstream_counts_as_used() -> None:
    text = YAML.replace("upstream: auth", "upstream: authz").replace(
        "forward_auth: {upstream: nowhere}", "forward_auth: {timeout: 2s}")
    _, warnings = load_config_text_with_warnings(text, "g.yaml", {})
    assert not [w for w in warnings if "not used" in w.message]


def test_explain_says_what_would_be_asked() -> None:
    text = YAML.replace("upstream: auth", "upstream: authz").replace(
        "forward_auth: {upstream: nowhere}", "forward_auth: {cache_ttl: 30s}")
    cfg = load_config_text(text, "g.yaml", {})
    ok, result = explain(cfg, "GET", "/x", [])
    assert ok
    [decision] = result["access"]
    assert decision == {"element": "forward_auth", "decision": (
        "asks upstream authz: GET /auth with Authorization, Cookie and X-Forwarded-*, within "
        "0.5s; 2xx passes, copying no headers; any other answer goes back to the client; "
        "down, slow or 5xx: 503; answers reused for 30s per credentials; at most 256 "
        "subrequests in flight per worker, beyond that 503 with Retry-After")}
    assert "access     forward_auth: asks upstream authz" in format_explain(ok, result)


def context(headers: list[tuple[str, str]]) -> Context:
    sent = [(n.lower().encode(), n.encode(), v.encode()) for n, v in headers]
    return Context(b"GET", b"/x", b"", b"test", sent, b"127.0.0.1", "r", lambda: "id")


def test_the_cache_key_tells_credentials_apart() -> None:
    element = ForwardAuth(options(cache_ttl="1m"))

    def key(headers: list[tuple[str, str]]) -> bytes:
        return element._key(element._credentials(context(headers)))

    alice = key([("Authorization", "Bearer a"), ("Cookie", "s=1")])
    assert alice == key([("authorization", "Bearer a"), ("X-Other", "y"), ("Cookie", "s=1")])
    assert alice != key([("Authorization", "Bearer a")])
    assert alice != key([("Authorization", "Bearer a"), ("Cookie", "s=2")])
    # Absent and empty differ; values cannot run together across fields.
    assert key([("Authorization", "")]) != key([])
    assert key([("Authorization", "ab"), ("Cookie", "c")]) != key(
        [("Authorization", "a"), ("Cookie", "bc")])
    # Cookies in two fields are the one cookie list they make.
    assert key([("Cookie", "a=1"), ("Cookie", "b=2")]) == key([("Cookie", "a=1; b=2")])


def test_a_refusal_is_relayed_without_its_connection_fields() -> None:
    fields = [(b"WWW-Authenticate", b"Bearer"), (b"Content-Length", b"3"),
              (b"Connection", b"close, X-Hop"), (b"X-Hop", b"1"), (b"Keep-Alive", b"t=5"),
              (b"Transfer-Encoding", b"chunked"), (b"Location", b"/login"),
              (b"Content-Type", b"text/plain")]
    assert _relayed(fields) == [(b"WWW-Authenticate", b"Bearer"), (b"Location", b"/login"),
                                (b"Content-Type", b"text/plain")]
