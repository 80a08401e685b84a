"""Just enough PromQL reading to list the metric names an expression selects."""

from __future__ import annotations

import re

METRICS = frozenset({
    "gateway_requests_total", "gateway_active_connections", "gateway_cache_hits_total",
    "gateway_cache_misses_total", "gateway_pool_connections_active",
    "gateway_upstream_errors_total", "gateway_rate_limited_total",
    "gateway_worker_restarts_total", "gateway_config_reloads_total",
    "gateway_config_last_reload_success_timestamp_seconds",
    "gateway_websocket_connections_active", "gateway_rate_limit_redis_fallback_active",
    "gateway_cache_redis_unavailable",
    "gateway_build_info",
})
HISTOGRAMS = frozenset({"gateway_request_duration_seconds",
                        "gateway_upstream_request_duration_seconds"})
ALLOWED = METRICS | {h + suffix for h in HISTOGRAMS for suffix in ("_bucket", "_sum", "_count")}

FUNCTIONS = frozenset({
    "abs", "absent", "absent_over_time", "avg", "avg_over_time", "bottomk", "ceil", "changes",
    "clamp", "clamp_max", "clamp_min", "count", "count_over_time", "delta", "deriv", "floor",
    "group", "histogram_quantile", "idelta", "increase", "irate", "label_replace", "max",
    "max_over_time", "min", "min_over_time", "quantile", "quantile_over_time", "rate",
    "resets", "round", "scalar", "sort", "sort_desc", "sqrt", "stddev", "sum", "sum_over_time",
    "time", "timestamp", "topk", "vector",
})
KEYWORDS = frozenset({"and", "or", "unless", "bool", "offset", "inf", "nan"})

GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h"}


def substitute_grafana(expr: str) -> str:
    for name, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(name, value)
    return re.sub(r"\$\{?(\w+)\}?", ".*", expr)  # dashboard variables, used in =~ matchers


def metric_names(expr: str) -> set[str]:
    """Names of the series an expression selects; raises on an unknown function."""
    text = substitute_grafana(expr)
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', text)  # string literals
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # ranges
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names: set[str] = set()
    for m in re.finditer(r"(?<![\w.])([a-zA-Z_:][\w:]*)(\s*\()?", text):
        word, call = m.group(1), m.group(2)
        if word.lower() in KEYWORDS:
            continue
        if call:
            if word not in FUNCTIONS:
                raise ValueError(f"unknown PromQL function {word!r} in {expr!r}")
        else:
            names.add(word)
    return names
