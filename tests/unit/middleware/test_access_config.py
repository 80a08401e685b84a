"""The access elements in a whole config: errors at file:line, order warnings, route
overrides, ``proxyd explain``, ``proxyd hash-password`` and their metric families."""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from proxyd.cli import main
from proxyd.config import ConfigError, GatewayConfig, load_config_text
from proxyd.explain import explain, format_explain
from proxyd.middleware import build_chain, check_middleware
from proxyd.middleware.access.passwords import verify
from proxyd.observe.metrics import COUNTERS

SECRET = "s" * 32
ALICE = "$2b$04$4AUipPXc.8XtD8lb1m3AB.m8a9mANC6DQ2nA9Wi8CNR9zobqZlds2"  # "pw", cost 4
ROUTE: dict[str, Any] = {"match": {"path_prefix": "/"}, "respond": {"status": 200}}


def config(middleware: list[dict[str, Any]], **server: Any) -> GatewayConfig:
    return GatewayConfig.model_validate({
        "server": {"workers": 1, **server}, "middleware": middleware,
        "routes": [{**ROUTE, "name": "r"}]})


YAML = """\
routes:
  - name: r
    match: {path_prefix: /}
    respond: {status: 200}
middleware:
  - type: jwt_auth
    algorithms: [RS256, none]
    jwks_url: https://idp.test/jwks
  - type: basic_auth
    users:
      alice: wonderland
  - type: ip_access
    deny: [10.0.0.1/8]
"""


def test_errors_carry_file_and_line() -> None:
    with pytest.raises(ConfigError) as info:
        load_config_text(YAML, "g.yaml", {})
    issues = {i.key_path: i for i in info.value.issues}
    assert issues["middleware[0].algorithms"].line == 7
    assert "'none' is never accepted" in issues["middleware[0].algorithms"].message
    assert issues["middleware[1].users"].line == 11  # where the mapping's value starts
    assert "plain-text passwords are never accepted" in issues["middleware[1].users"].message
    assert issues["middleware[2].deny"].line == 13
    assert "host bits set" in issues["middleware[2].deny"].message
    assert "g.yaml:7:" in str(info.value)


def test_cache_before_an_access_element_warns() -> None:
    cfg = config([{"type": "cache"}, {"type": "api_key", "keys": {"k": "sha256:" + "0" * 64}}])
    errors, warnings = check_middleware(cfg)
    assert errors == []
    assert [w for w in warnings if "cache before api_key" in w[1]]
    cfg = config([{"type": "api_key", "keys": {"k": "sha256:" + "0" * 64}}, {"type": "cache"}])
    assert not [w for w in check_middleware(cfg)[1] if "cache before" in w[1]]


def test_rate_limit_on_consumer_needs_an_authenticating_element_before_it() -> None:
    limit = {"type": "rate_limit", "rate": "10/s", "key": ["consumer", "route"]}
    key = {"type": "api_key", "keys": {"k": "sha256:" + "0" * 64}}
    [(path, message)] = check_middleware(config([limit, key]))[1]
    assert path == ("middleware", 0, "key") and "every request counts under one" in message
    assert check_middleware(config([key, limit])) == ([], [])


def test_jwks_over_plain_http_warns_unless_loopback() -> None:
    def warnings(url: str) -> list[str]:
        entry = {"type": "jwt_auth", "algorithms": ["RS256"], "jwks_url": url}
        return [m for _, m in check_middleware(config([entry]))[1]]

    assert "jwks_url over plain http" in warnings("http://idp.internal/jwks")[0]
    assert warnings("http://127.0.0.1:8080/jwks") == []
    assert warnings("https://idp.internal/jwks") == []


def test_a_route_can_skip_an_element() -> None:
    cfg = GatewayConfig.model_validate({
        "middleware": [{"type": "jwt_auth", "algorithms": ["HS256"], "secret": SECRET}],
        "routes": [{**ROUTE, "name": "api"},
                   {**ROUTE, "name": "public", "middleware": {"jwt_auth": {"enabled": False}}}],
    })
    assert check_middleware(cfg) == ([], [])
    assert build_chain(cfg, cfg.routes[0]).names == ["jwt_auth"]
    assert build_chain(cfg, cfg.routes[1]).names == []


def test_explain_shows_each_access_decision() -> None:
    import jwt

    cfg = config([
        {"type": "ip_access", "deny": ["198.51.100.0/24"]},
        {"type": "api_key", "keys": {"ci": "sha256:" + hashlib.sha256(b"k1").hexdigest()}},
        {"type": "basic_auth", "users": {"alice": ALICE}},
        {"type": "jwt_auth", "algorithms": ["HS256"], "secret": SECRET},
    ], trusted_proxies=["10.0.0.0/8"])
    token = jwt.encode({"sub": "svc", "exp": 4102444800}, SECRET, algorithm="HS256")
    ok, result = explain(cfg, "GET", "/x", [
        ("X-API-Key", "k1"), ("Authorization", "Bearer " + token),
        ("X-Forwarded-For", "203.0.113.5")], client_ip="10.1.1.1")
    assert ok
    assert result["access"] == [
        {"element": "ip_access", "decision": "passes: client 203.0.113.5 in no deny network"},
        {"element": "api_key", "decision": "passes; consumer ci"},
        {"element": "basic_auth", "decision": "401: needs Basic credentials (realm \"proxyd\")"},
        {"element": "jwt_auth", "decision": "passes (shared secret); consumer svc"},
    ]
    text = format_explain(ok, result)
    assert "access     ip_access: passes: client 203.0.113.5 in no deny network" in text
    basic = "Basic " + base64.b64encode(b"alice:pw").decode()
    _, result = explain(cfg, "GET", "/x", [("Authorization", basic)], client_ip="198.51.100.9")
    assert [a["decision"] for a in result["access"]] == [
        "403: client 198.51.100.9 in deny 198.51.100.0/24", "401: needs an API key (header "
        "X-API-Key)", "passes; consumer alice", "401: needs a bearer token (HS256; shared secret)"]


def test_explain_never_fetches_a_jwks() -> None:
    import jwt

    token = jwt.encode({"sub": "svc", "exp": 4102444800}, SECRET, algorithm="HS256")
    cfg = config([{"type": "jwt_auth", "algorithms": ["RS256"],
                   "jwks_url": "https://idp.test/jwks"}])
    _, result = explain(cfg, "GET", "/x", [("Authorization", "Bearer " + token)])
    assert result["access"] == [{"element": "jwt_auth", "decision": (
        "token not verified offline (keys from JWKS https://idp.test/jwks); its claims say "
        "exp=4102444800, sub=svc")}]


def test_explain_without_access_elements_has_no_access_section() -> None:
    ok, result = explain(config([]), "GET", "/x", [])
    assert ok and "access" not in result


def test_hash_password_command(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(main, ["hash-password", "--stdin", "--rounds", "4"],
                           input="correct horse\n")
    assert result.exit_code == 0, result.output
    hashed = result.stdout.strip()
    assert hashed.startswith("$2b$04$") and verify(hashed, b"correct horse")
    # What it prints is accepted by basic_auth as it is.
    path = tmp_path / "users"
    path.write_text(f"alice:{hashed}\n")
    assert check_middleware(config([{"type": "basic_auth", "users_file": str(path)}]))[0] == []
    result = runner.invoke(main, ["hash-password", "--stdin", "--scheme", "sha256"],
                           input="k-123\n")
    assert result.stdout.strip() == "sha256:" + hashlib.sha256(b"k-123").hexdigest()
    result = runner.invoke(main, ["hash-password"], input="pw1\npw2\n")  # prompts twice
    assert result.exit_code != 0
    result = runner.invoke(main, ["hash-password", "--stdin"], input="\n")
    assert result.exit_code == 1 and "an empty secret" in result.stderr


def test_metric_families() -> None:
    assert COUNTERS["gateway_auth_total"][1] == ("route", "element", "result")
    assert COUNTERS["gateway_jwks_refreshes_total"][1] == ("result",)
