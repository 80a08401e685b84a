"""api_key: hashed keys from the config or a file, header or query, the consumer it names."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from proxyd.middleware.access.api_key import ApiKey, query_value
from proxyd.middleware.base import Response
from proxyd.middleware.rate_limit import RateLimit

from .helpers import make, make_ctx, route, worker_services


def hashed(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


KEYS = {"ci": hashed("k-ci-0123456789"), "mobile": hashed("k-mobile-0123456789")}


def api_key(**options: Any) -> ApiKey:
    mw = make("api_key", **{"keys": KEYS, **options})
    assert isinstance(mw, ApiKey)
    return mw


def refused(answer: object, message: str) -> None:
    assert isinstance(answer, Response) and answer.status == 401
    assert answer.get(b"www-authenticate") == b'ApiKey realm="proxyd"'
    assert message.encode() in (answer.body or b"")


@pytest.mark.parametrize("options, message", [
    ({"keys": {"ci": "k-ci-0123456789"}}, "plain keys are never accepted"),
    ({"keys": {"ci": "sha256:abc"}}, "expected sha256:<64 hex digits>"),
    ({"keys": {"a": KEYS["ci"], "b": KEYS["ci"]}}, "the same key as 'a'"),
    ({"keys": KEYS, "header": None}, "set header or query"),
    ({"keys": {}}, "no keys"),
    ({"keys": KEYS, "consumer_header": "X Consumer"}, "not a valid header name"),
])
def test_options_refused(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        make("api_key", **options)


def test_keys_file(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    upper = "sha256:" + KEYS["mobile"].removeprefix("sha256:").upper()  # as some tools write
    path.write_text(f"# name:hash\nci:{KEYS['ci']}\nmobile:{upper}\n")
    mw = make("api_key", keys_file=str(path))
    assert isinstance(mw, ApiKey) and sorted(mw.by_digest.values()) == ["ci", "mobile"]
    path.write_text(f"ci:{KEYS['ci']}\nci:{KEYS['mobile']}\n")
    with pytest.raises(ValidationError, match=rf"keys_file {path}:2: the name 'ci' is given twice"):
        make("api_key", keys_file=str(path))


def test_header_key_names_the_consumer() -> None:
    mw = api_key(consumer_header="X-Consumer")
    ctx = make_ctx(headers=[(b"X-API-Key", b"k-ci-0123456789"), (b"X-Consumer", b"admin")])
    assert mw.on_request(ctx) is None
    assert ctx.consumer == "ci"
    assert ctx.set_request == [(b"X-Consumer", b"ci")]
    # The key and the client's own X-Consumer stay here.
    assert {b"x-api-key", b"x-consumer"} <= ctx.remove_request


def test_forward_key_keeps_the_header() -> None:
    ctx = make_ctx(headers=[(b"X-API-Key", b"k-ci-0123456789")])
    assert api_key(forward_key=True).on_request(ctx) is None
    assert b"x-api-key" not in ctx.remove_request


def test_query_parameter() -> None:
    mw = api_key(header=None, query="api_key")
    ctx = make_ctx(query=b"a=1&api_key=k-mobile-0123456789&b=2")
    assert mw.on_request(ctx) is None and ctx.consumer == "mobile"
    refused(mw.on_request(make_ctx(headers=[(b"X-API-Key", b"k-ci-0123456789")])),
            "API key required")  # header not configured: not read


def test_header_first_then_query() -> None:
    mw = api_key(query="key")
    ctx = make_ctx(headers=[(b"X-API-Key", b"k-ci-0123456789")], query=b"key=k-mobile-0123456789")
    assert mw.on_request(ctx) is None and ctx.consumer == "ci"


def test_wrong_and_missing_keys() -> None:
    mw = api_key()
    refused(mw.on_request(make_ctx(headers=[(b"X-API-Key", b"k-ci-012345678")])),
            "invalid API key")
    refused(mw.on_request(make_ctx()), "API key required")
    refused(mw.on_request(make_ctx(headers=[(b"X-API-Key", b"")])), "API key required")


def test_query_value() -> None:
    assert query_value(b"key=a%2Bb+c", b"key=") == b"a+b c"
    assert query_value(b"mykey=x&key=y", b"key=") == b"y"
    assert query_value(b"key", b"key=") is None


def test_rate_limit_keys_on_the_consumer() -> None:
    """Each key's name gets its own bucket, whatever address it comes from."""
    mw = api_key()
    limit = make("rate_limit", rate="1/m", burst=1, key="consumer")
    assert isinstance(limit, RateLimit)
    limit.bind(worker_services(), route("api"))

    def request(key: bytes, ip: bytes) -> object:
        ctx = make_ctx(headers=[(b"X-API-Key", key)], client_ip=ip)
        assert mw.on_request(ctx) is None
        return limit.on_request(ctx)

    assert request(b"k-ci-0123456789", b"192.0.2.1") is None
    denied = request(b"k-ci-0123456789", b"192.0.2.2")  # same key, another address
    assert isinstance(denied, Response) and denied.status == 429
    assert request(b"k-mobile-0123456789", b"192.0.2.1") is None
