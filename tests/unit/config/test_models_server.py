"""The server and admin sections: listener forms (plain, or an address with TLS), listeners
keyed by address, the client limits' defaults, the admin listener's default, the schema."""

from __future__ import annotations

import json

import pytest

from proxyd.config import GatewayConfig, load_config_text
from proxyd.config.models import Listener
from proxyd.config.types import HostPort
from proxyd.sockets import SocketSet
from tests.unit.config._load import ROUTE, lines

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
