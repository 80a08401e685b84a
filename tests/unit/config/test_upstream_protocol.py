"""upstreams.NAME.protocol: which targets and options each protocol takes, with the error
naming file:line and the key."""

from __future__ import annotations

import pytest

from proxyd.config import ConfigError, load_config_text
from proxyd.config.summary import format_summary, summarize

ROUTE = "routes: [{name: all, match: {path_prefix: /}, upstream: app}]\n"


def load(upstream: str, route: str = ROUTE) -> None:
    load_config_text(f"upstreams: {{app: {upstream}}}\n" + route, "g.yaml", {})


def test_each_protocol_with_its_scheme_loads() -> None:
    load("{targets: ['http://127.0.0.1:9001'], protocol: h2c}")
    load("{targets: ['https://127.0.0.1:9001'], protocol: h2}")
    load("{targets: ['http://127.0.0.1:9001']}")


@pytest.mark.parametrize(("upstream", "says"), [
    ("{targets: ['http://127.0.0.1:9001'], protocol: h2}", "protocol h2 needs https://"),
    ("{targets: ['https://127.0.0.1:9001'], protocol: h2c}", "protocol h2c needs http://"),
    ("{targets: ['http://127.0.0.1:9001'], protocol: h2c, proxy_protocol: v2}",
     "PROXY protocol header names one client"),
    ("{targets: ['http://127.0.0.1:9001'], protocol: http3}", "protocol"),
])
def test_wrong_combinations_are_refused(upstream: str, says: str) -> None:
    with pytest.raises(ConfigError) as exc:
        load(upstream)
    assert says in str(exc.value)
    assert "g.yaml:1:" in str(exc.value)


def test_websocket_route_to_an_h2_upstream_is_refused() -> None:
    route = ("routes: [{name: ws, match: {path_prefix: /}, upstream: app, websocket: true}]\n")
    with pytest.raises(ConfigError) as exc:
        load("{targets: ['http://127.0.0.1:9001'], protocol: h2c}", route)
    assert "cannot take over HTTP/2" in str(exc.value)


def test_check_config_summary_names_the_protocols() -> None:
    text = ("server: {listen: [{address: '127.0.0.1:8080', http2: false}]}\n"
            "upstreams: {app: {targets: ['http://127.0.0.1:9001'], protocol: h2c}}\n" + ROUTE)
    config = load_config_text(text, "g.yaml", {})
    out = format_summary(config, "g.yaml", [])
    assert "127.0.0.1:8080 (HTTP/1.1 only)" in out
    assert "http://127.0.0.1:9001 (h2c)" in out
    assert summarize(config)["upstreams"]["app"]["protocol"] == "h2c"
