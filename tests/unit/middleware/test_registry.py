"""check_middleware, per-route overrides, build_chain, and errors located in the YAML."""

from __future__ import annotations

from typing import Any

import pytest

from proxyd.config import ConfigError, GatewayConfig, load_config_text
from proxyd.middleware import REGISTRY, build_chain, check_middleware, route_entries

ROUTE: dict[str, Any] = {"match": {"path_prefix": "/"}, "respond": {"status": 200}}


def config(middleware: list[dict[str, Any]], *routes: dict[str, Any]) -> GatewayConfig:
    return GatewayConfig.model_validate({
        "middleware": middleware,
        "routes": [{**ROUTE, **r} for r in routes] or [{**ROUTE, "name": "r"}],
    })


def test_registry_lists_every_type() -> None:
    assert set(REGISTRY) == {"cors", "security_headers", "validation", "trace_id", "headers",
                             "rate_limit", "cache", "etag", "compression", "jwt_auth",
                             "basic_auth", "api_key", "ip_access", "forward_auth"}
    for name, cls in REGISTRY.items():
        assert cls.type == name


def test_valid_config_has_no_problems() -> None:
    cfg = config([{"type": "trace_id"}, {"type": "cors", "allow_origins": ["https://a.test"]},
                  {"type": "etag"}, {"type": "compression"}])
    assert check_middleware(cfg) == ([], [])


def test_unknown_type_has_key_path_and_suggestion() -> None:
    errors, _ = check_middleware(config([{"type": "trace_id"}, {"type": "corss"}]))
    assert errors == [(("middleware", 1, "type"),
                       "unknown middleware type 'corss', did you mean 'cors'?")]


def test_unknown_type_without_close_match_lists_known_types() -> None:
    errors, _ = check_middleware(config([{"type": "zzzz"}]))
    [(path, message)] = errors
    assert path == ("middleware", 0, "type")
    assert "known types:" in message
    assert "compression" in message


def test_unknown_option_has_key_path_and_suggestion() -> None:
    errors, _ = check_middleware(config([{"type": "cors", "allow_origin": ["https://a.test"]}]))
    assert errors == [(("middleware", 0, "allow_origin"),
                       "unknown option 'allow_origin' for cors, did you mean 'allow_origins'?")]


def test_bad_option_value_is_located_at_the_option() -> None:
    errors, _ = check_middleware(config([{"type": "compression", "gzip_level": 42}]))
    [(path, message)] = errors
    assert path == ("middleware", 0, "gzip_level")
    assert "9" in message


def test_duplicate_type_is_an_error() -> None:
    errors, _ = check_middleware(config([{"type": "cors"}, {"type": "etag"}, {"type": "cors"}]))
    assert len(errors) == 1
    path, message = errors[0]
    assert path == ("middleware", 2, "type")
    assert "listed twice" in message
    assert "middleware[0]" in message


def test_etag_after_compression_warns() -> None:
    errors, warnings = check_middleware(config([{"type": "compression"}, {"type": "etag"}]))
    assert errors == []
    [(path, message)] = warnings
    assert path == ("middleware", 1, "type")
    assert "etag after compression" in message


def test_etag_before_compression_does_not_warn() -> None:
    assert check_middleware(config([{"type": "etag"}, {"type": "compression"}])) == ([], [])


def test_route_override_of_type_missing_globally_is_an_error() -> None:
    cfg = config([{"type": "cors"}], {"name": "r", "middleware": {"etag": {"max_size": "2KiB"}}})
    errors, _ = check_middleware(cfg)
    [(path, message)] = errors
    assert path == ("routes", 0, "middleware", "etag")
    assert "not in the top-level middleware list" in message


def test_route_override_bad_option_is_located_under_the_route() -> None:
    cfg = config([{"type": "cors"}],
                 {"name": "a"}, {"name": "b", "middleware": {"cors": {"max_agee": "5s"}}})
    errors, _ = check_middleware(cfg)
    assert errors == [(("routes", 1, "middleware", "cors", "max_agee"),
                       "unknown option 'max_agee' for cors, did you mean 'max_age'?")]


def test_route_override_merged_options_are_validated_together() -> None:
    # Each part alone is fine; together, credentials with "*" is not.
    cfg = config([{"type": "cors", "allow_origins": ["*"]}],
                 {"name": "r", "middleware": {"cors": {"allow_credentials": True}}})
    errors, _ = check_middleware(cfg)
    [(path, message)] = errors
    assert path == ("routes", 0, "middleware", "cors")
    assert "allow_credentials" in message


def test_route_override_merges_options_by_type() -> None:
    cfg = config(
        [{"type": "trace_id"},
         {"type": "cors", "allow_origins": ["https://a.test"], "max_age": "600s"}],
        {"name": "plain"},
        {"name": "special", "middleware": {"cors": {"max_age": "5s"}}},
    )
    assert check_middleware(cfg) == ([], [])
    plain = build_chain(cfg, cfg.routes[0])
    special = build_chain(cfg, cfg.routes[1])
    assert plain.names == special.names == ["trace_id", "cors"]  # position from the global list
    assert plain.middleware[1].options.max_age == 600
    assert special.middleware[1].options.max_age == 5
    # Options not overridden come from the global entry.
    assert special.middleware[1].options.allow_origins == ["https://a.test"]


def test_route_entries_locates_overridden_entries_under_the_route() -> None:
    cfg = config([{"type": "trace_id"}, {"type": "cors"}],
                 {"name": "r", "middleware": {"cors": {"max_age": "5s"}}})
    entries, problems = route_entries(cfg, cfg.routes[0], 0)
    assert problems == []
    assert [at for _, at in entries] == [("middleware", 0), ("routes", 0, "middleware", "cors")]
    assert entries[1][0]["max_age"] == "5s"


def test_enabled_false_removes_the_entry_for_that_route_only() -> None:
    cfg = config([{"type": "trace_id"}, {"type": "compression"}],
                 {"name": "on"}, {"name": "off", "middleware": {"compression": {"enabled": False}}})
    assert build_chain(cfg, cfg.routes[0]).names == ["trace_id", "compression"]
    assert build_chain(cfg, cfg.routes[1]).names == ["trace_id"]


def test_globally_disabled_entry_can_be_enabled_per_route() -> None:
    cfg = config([{"type": "etag", "enabled": False}],
                 {"name": "off"}, {"name": "on", "middleware": {"etag": {"enabled": True}}})
    assert build_chain(cfg, cfg.routes[0]).names == []
    assert not build_chain(cfg, cfg.routes[0])
    assert build_chain(cfg, cfg.routes[1]).names == ["etag"]


YAML = """\
routes:
  - name: r
    match: {path_prefix: /}
    respond: {status: 200}
    middleware:
      cors:
        max_agee: 5s
middleware:
  - type: cors
    allow_origins: ["https://a.test"]
  - type: compression
    min_sizee: 10
  - type: corss
"""


def test_yaml_middleware_errors_carry_line_numbers() -> None:
    with pytest.raises(ConfigError) as info:
        load_config_text(YAML, "g.yaml", {})
    issues = {i.key_path: i for i in info.value.issues}
    assert set(issues) == {"routes[0].middleware.cors.max_agee", "middleware[1].min_sizee",
                           "middleware[2].type"}
    assert issues["routes[0].middleware.cors.max_agee"].line == 7
    assert issues["middleware[1].min_sizee"].line == 12
    assert issues["middleware[2].type"].line == 13
    text = str(info.value)
    assert ("g.yaml:12:16: middleware[1].min_sizee: unknown option 'min_sizee' for compression, "
            "did you mean 'min_size'?") in text
    assert "g.yaml:13:11: middleware[2].type: unknown middleware type 'corss', did you mean " \
           "'cors'?" in text


def test_yaml_bad_option_value_line() -> None:
    text = ("routes:\n  - {name: r, match: {path: /}, respond: {status: 200}}\n"
            "middleware:\n  - type: cors\n    allow_origins: ['*']\n"
            "    allow_credentials: true\n")
    with pytest.raises(ConfigError) as info:
        load_config_text(text, "g.yaml", {})
    [issue] = info.value.issues
    assert issue.line == 4
    assert issue.key_path == "middleware[0]"
    assert "allow_credentials" in issue.message


def test_option_defaults_are_parsed_like_configured_values() -> None:
    # Size and duration defaults are written as strings; they must reach the code as numbers.
    assert make_options("cors").max_age == 600
    assert make_options("etag").max_size == 1024 * 1024
    assert make_options("compression").min_size == 1024
    # Types without a workable default: a limiter without a rate, an access element with
    # nothing to check against.
    required: dict[str, dict[str, Any]] = {
        "rate_limit": {"rate": "10/s"},
        "jwt_auth": {"algorithms": ["HS256"], "secret": "s" * 32},
        "basic_auth": {"users": {
            "u": "$2b$04$4AUipPXc.8XtD8lb1m3AB.m8a9mANC6DQ2nA9Wi8CNR9zobqZlds2"}},
        "api_key": {"keys": {"k": "sha256:" + "0" * 64}},
        "ip_access": {"allow": ["10.0.0.0/8"]},
        "forward_auth": {"upstream": "auth"},
    }
    for name, cls in REGISTRY.items():  # every type builds from its defaults
        cls(cls.options_model.model_validate({"type": name, **required.get(name, {})}))


def make_options(name: str) -> Any:
    return REGISTRY[name].options_model.model_validate({"type": name})


def test_memory_rate_limit_with_several_workers_says_each_gets_a_share() -> None:
    cfg = GatewayConfig.model_validate({
        "server": {"workers": 4},
        "middleware": [{"type": "rate_limit", "rate": "100/s"}],
    })
    errors, warnings = check_middleware(cfg)
    assert errors == []
    [(path, message)] = warnings
    assert path == ("middleware", 0, "backend")
    assert "each of the 4 workers enforces 1/4" in message


def test_redis_rate_limit_or_one_worker_does_not_warn() -> None:
    for server, backend in (({"workers": 4}, "redis"), ({"workers": 1}, "memory")):
        cfg = GatewayConfig.model_validate({
            "server": server,
            "middleware": [{"type": "rate_limit", "rate": "100/s", "backend": backend}],
        })
        assert check_middleware(cfg) == ([], [])
