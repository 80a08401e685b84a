"""Hardening in the config: TLS listeners, the new limits, and secrets kept out of output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import trustme
from click.testing import CliRunner

from proxyd.cli import main
from proxyd.config import ConfigError, GatewayConfig, load_config_text
from proxyd.config.models import Listener
from proxyd.config.redact import redact_text, redact_url
from proxyd.config.summary import format_summary, summarize
from proxyd.config.types import HostPort
from proxyd.sockets import SocketSet
from proxyd.tls import file_issues, server_context

ROUTE = "routes:\n  - {name: r, match: {path: /}, respond: {status: 200}}\n"


def lines(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config_text(text, "g.yaml", {})
    return [str(i) for i in info.value.issues]


# -- listeners ----------------------------------------------------------------------------------


def test_listen_accepts_strings_and_tls_mappings() -> None:
    config = load_config_text(
        "server:\n  listen:\n    - 127.0.0.1:8080\n"
        "    - {address: '[::1]:8443', tls: {cert: /c.pem, key: /k.pem, min_version: 1.3}}\n"
        + ROUTE, "g.yaml", {})
    plain, secure = config.server.listen
    assert isinstance(plain, Listener) and plain.tls is None
    assert secure == HostPort("::1", 8443) and str(secure) == "[::1]:8443"
    assert isinstance(secure, Listener) and secure.tls is not None
    assert (secure.tls.cert, secure.tls.key, secure.tls.min_version) == ("/c.pem", "/k.pem",
                                                                         "1.3")
    # Round trip: strings stay strings; a TLS listener dumps as its mapping.
    dumped = config.model_dump()["server"]["listen"]
    assert dumped[0] == "127.0.0.1:8080"
    assert dumped[1] == {"address": "[::1]:8443",
                         "tls": {"cert": "/c.pem", "key": "/k.pem", "min_version": "1.3"}}
    assert GatewayConfig.model_validate(config.model_dump()) == config


def test_listener_is_keyed_by_address() -> None:
    """The master keys sockets by address: adding TLS on reload keeps the same socket."""
    plain = GatewayConfig.model_validate({"server": {"listen": ["127.0.0.1:0"]}})
    secure = GatewayConfig.model_validate({"server": {"listen": [
        {"address": "127.0.0.1:0", "tls": {"cert": "c", "key": "k"}}]}})
    a, b = plain.server.listen[0], secure.server.listen[0]
    assert a == b and hash(a) == hash(b) and {(a, 0): 1}[(b, 0)] == 1
    sockets = SocketSet()
    try:
        sockets.ensure(plain.server.listen, 1, 16)
        first = sockets.for_slot(plain.server.listen, 0)
        sockets.ensure(secure.server.listen, 1, 16)
        assert sockets.for_slot(secure.server.listen, 0) == first
        assert len(sockets.keys()) == 1
    finally:
        sockets.close_all()


@pytest.mark.parametrize(("item", "message"), [
    ("{address: 127.0.0.1:1, tls: {cert: c}}", "tls.key: required key is missing"),
    ("{address: 127.0.0.1:1, tls: {cert: c, key: k, min_version: '1.1'}}", "min_version"),
    ("{address: 127.0.0.1:1, tsl: {}}", "tsl: unknown key"),
    ("{tls: {cert: c, key: k}}", "address: required key is missing"),
    ("{address: nope}", "invalid address 'nope'"),
])
def test_listen_mapping_errors(item: str, message: str) -> None:
    found = lines(f"server:\n  listen:\n    - {item}\n" + ROUTE)
    assert len(found) == 1 and found[0].startswith("g.yaml:3:7: server.listen[0]:")
    assert message in found[0]


def test_new_limits_and_defaults() -> None:
    limits = GatewayConfig().server.limits
    assert (limits.body_timeout, limits.send_timeout) == (60.0, 60.0)
    assert limits.max_keepalive_requests == 1000 and limits.max_connections == 10000
    config = load_config_text(
        "server:\n  limits: {body_timeout: 2s, send_timeout: 500ms, max_connections: 0,\n"
        "           max_keepalive_requests: 0}\n" + ROUTE, "g.yaml", {})
    assert config.server.limits.send_timeout == 0.5
    assert lines("server:\n  limits: {max_connections: -1}\n" + ROUTE) == [
        "g.yaml:2:29: server.limits.max_connections: must be at least 0, got -1"]


def test_admin_defaults_to_loopback() -> None:
    assert GatewayConfig().admin.listen == HostPort("127.0.0.1", 9901)


def test_schema_documents_both_listener_forms() -> None:
    schema = GatewayConfig.model_json_schema()
    text = json.dumps(schema)
    assert "min_version" in text and "address" in text


# -- TLS files ----------------------------------------------------------------------------------


@pytest.fixture
def pems(tmp_path: Path) -> tuple[Path, Path]:
    leaf = trustme.CA().issue_cert("127.0.0.1")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    return cert, key


def tls_config(cert: Path | str, key: Path | str, version: str = "1.2") -> GatewayConfig:
    return GatewayConfig.model_validate({"server": {"listen": [
        "127.0.0.1:8080",
        {"address": "127.0.0.1:8443",
         "tls": {"cert": str(cert), "key": str(key), "min_version": version}}]}})


def test_tls_files_load(pems: tuple[Path, Path]) -> None:
    config = tls_config(*pems, version="1.3")
    assert file_issues(config, "g.yaml") == []
    tls = config.server.listen[1].tls  # type: ignore[attr-defined]
    ctx = server_context(tls)
    assert ctx.minimum_version.name == "TLSv1_3"


def test_tls_file_problems_are_config_issues(pems: tuple[Path, Path], tmp_path: Path) -> None:
    cert, key = pems
    other = trustme.CA().issue_cert("127.0.0.1")
    wrong_key = tmp_path / "other-key.pem"
    other.private_key_pem.write_to_path(str(wrong_key))
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nnope\n")
    for bad_cert, bad_key, expect in [
        (tmp_path / "missing.pem", key, "No such file or directory"),
        (garbage, key, "not a valid PEM"),
        (cert, wrong_key, "not a valid PEM"),
    ]:
        issues = file_issues(tls_config(bad_cert, bad_key), "g.yaml")
        assert len(issues) == 1
        text = str(issues[0])
        assert text.startswith("g.yaml: server.listen[1].tls: 127.0.0.1:8443: cannot load")
        assert expect in text
        assert "PRIVATE KEY" not in text


def test_encrypted_key_is_refused_without_prompting(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization

    leaf = trustme.CA().issue_cert("127.0.0.1")
    key = serialization.load_pem_private_key(leaf.private_key_pem.bytes(), password=None)
    encrypted = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.BestAvailableEncryption(b"pw"))
    cert, key_path = tmp_path / "c.pem", tmp_path / "k.pem"
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    key_path.write_bytes(encrypted)
    issues = file_issues(tls_config(cert, key_path), "g.yaml")
    assert len(issues) == 1 and "encrypted" in str(issues[0])


def test_check_config_reports_unloadable_tls_files(tmp_path: Path,
                                                   pems: tuple[Path, Path]) -> None:
    cert, key = pems
    path = tmp_path / "g.yaml"
    path.write_text("server:\n  listen:\n    - {address: 127.0.0.1:8443, tls: "
                    f"{{cert: {tmp_path / 'nope.pem'}, key: {key}}}}}\n" + ROUTE)
    result = CliRunner().invoke(main, ["check-config", "-c", str(path)])
    assert result.exit_code == 1 and "server.listen[0].tls" in result.stderr
    path.write_text("server:\n  listen:\n    - {address: 127.0.0.1:8443, tls: "
                    f"{{cert: {cert}, key: {key}}}}}\n" + ROUTE)
    result = CliRunner().invoke(main, ["check-config", "-c", str(path)])
    assert result.exit_code == 0, result.output
    assert "127.0.0.1:8443 (TLS 1.2+" in result.stdout
    result = CliRunner().invoke(main, ["check-config", "-c", str(path), "--format", "json"])
    summary = json.loads(result.stdout)["summary"]
    assert summary["tls"] == {"127.0.0.1:8443": {"cert": str(cert), "key": str(key),
                                                 "min_version": "1.2"}}


# -- secrets ------------------------------------------------------------------------------------

SECRETS = ("tok-0123456789", "redis-pw-42")
SECRET_CONFIG = f"""
admin: {{token: {SECRETS[0]}, listen: 0.0.0.0:9901}}
redis: {{url: "redis://user:{SECRETS[1]}@cache:6379/0"}}
cache: {{backend: redis}}
upstreams:
  backend: {{targets: ["http://127.0.0.1:9001"]}}
routes:
  - {{name: api, match: {{path_prefix: /}}, upstream: backend}}
"""


def test_redact_url() -> None:
    assert redact_url("redis://:pw@h:1/0") == "redis://:***@h:1/0"
    assert redact_url("redis://u:pw@h/0") == "redis://u:***@h/0"
    assert redact_url("redis://h:6379/0") == "redis://h:6379/0"
    assert redact_url("rediss://u@h") == "rediss://u@h"


def test_summaries_never_show_secrets() -> None:
    config = load_config_text(SECRET_CONFIG, "g.yaml", {})
    text = format_summary(config, "g.yaml", [])
    blob = json.dumps(summarize(config))
    for secret in SECRETS:
        assert secret not in text and secret not in blob
    assert "redis://user:***@cache:6379/0" in text and "token set" in text
    assert json.loads(blob)["redis"] == "redis://user:***@cache:6379/0"
    assert redact_text(f"x {SECRETS[0]} y", config) == "x *** y"


def test_cli_output_never_shows_secrets(tmp_path: Path) -> None:
    path = tmp_path / "g.yaml"
    path.write_text(SECRET_CONFIG)
    runner = CliRunner()
    outputs = [runner.invoke(main, ["check-config", "-c", str(path)]),
               runner.invoke(main, ["check-config", "-c", str(path), "--format", "json"]),
               runner.invoke(main, ["explain", "-c", str(path), "GET", "/x"]),
               runner.invoke(main, ["explain", "-c", str(path), "GET", "/x", "--json"])]
    for result in outputs:
        assert result.exit_code == 0, result.output
        for secret in SECRETS:
            assert secret not in result.output


def test_config_errors_never_quote_secrets(tmp_path: Path) -> None:
    found = lines("admin: {token: 98765432123}\nredis: {url: 5551234}\n" + ROUTE)
    assert len(found) == 2
    assert all("98765432123" not in line and "5551234" not in line for line in found)
    assert "admin.token: expected a string" in found[0] and "secret" in found[0]
    found = lines("upstreams:\n  b: {targets: ['http://u:hunter22@h:1']}\n"
                  "routes: [{name: r, upstream: b}]\n")
    assert any("must not contain credentials" in line for line in found)
    assert not any("hunter22" in line for line in found)
