"""check-config says which freshness each route's cache applies (no invented freshness)."""

from __future__ import annotations

from typing import Any

from proxyd.config.models import GatewayConfig
from proxyd.config.summary import format_summary, summarize


def config(cache: dict[str, Any] | None = None) -> GatewayConfig:
    upstream = {"targets": ["http://127.0.0.1:9001"]}
    return GatewayConfig.model_validate({
        "upstreams": {"u": upstream},
        "middleware": [{"type": "cache"}],
        "cache": cache or {},
        "routes": [
            {"name": "plain", "match": {"path_prefix": "/p"}, "upstream": "u"},
            {"name": "ttl", "match": {"path_prefix": "/t"}, "upstream": "u",
             "cache": {"ttl": "60s"}},
            {"name": "forced", "match": {"path_prefix": "/f"}, "upstream": "u",
             "cache": {"force_ttl": "5s"}},
            {"name": "off", "match": {"path_prefix": "/o"}, "upstream": "u",
             "middleware": {"cache": {"enabled": False}}},
        ],
    })


def test_check_config_says_which_freshness_applies_on_each_route() -> None:
    routes = summarize(config())["cache"]["routes"]
    assert routes == {
        "plain": "freshness from the origin only; without it, not stored (cache.default_ttl 0)",
        "ttl": "freshness from the origin, else 60s for heuristically cacheable statuses "
               "(route cache.ttl)",
        "forced": "every stored response fresh for 5s (route force_ttl)",
    }
    text = format_summary(config(), "g.yaml", [])
    assert "cache:      memory, on 3 route(s):" in text
    assert "(cache.default_ttl 0)" in text


def test_a_default_ttl_is_named_where_it_applies() -> None:
    routes = summarize(config({"default_ttl": "300s"}))["cache"]["routes"]
    assert routes["plain"] == ("freshness from the origin, else 300s for heuristically "
                               "cacheable statuses (cache.default_ttl)")
    assert "route cache.ttl" in routes["ttl"]


def test_no_cache_line_without_the_cache() -> None:
    plain = GatewayConfig.model_validate({"upstreams": {"u": {"targets": ["http://h:1"]}},
                                          "routes": [{"name": "r", "upstream": "u"}]})
    assert summarize(plain)["cache"]["routes"] == {}
    assert "cache:" not in format_summary(plain, "g.yaml", [])
