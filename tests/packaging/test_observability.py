"""The Grafana dashboard and the Prometheus alerts: valid, and only the metrics proxyd exports."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.packaging._parse import PACKAGING
from tests.packaging._promql import ALLOWED, metric_names, substitute_grafana

DASHBOARD = PACKAGING / "grafana" / "proxyd-dashboard.json"
ALERTS = PACKAGING / "prometheus" / "proxyd-alerts.yml"


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def panel_exprs(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    out = []
    for panel in dashboard["panels"]:
        for sub in [panel, *panel.get("panels", [])]:  # rows may nest panels
            for target in sub.get("targets", []):
                out.append((sub["title"], target["expr"]))
    return out


def alert_rules() -> list[dict[str, Any]]:
    data = yaml.safe_load(ALERTS.read_text())
    return [rule for group in data["groups"] for rule in group["rules"]]


def promtool() -> str:
    tool = shutil.which("promtool")
    if tool is None:
        pytest.skip("promtool not installed (apt-get install prometheus) - PromQL not checked")
    return tool


def test_metric_name_reader() -> None:
    assert metric_names('sum by (route) (rate(gateway_requests_total{status=~"5.."}[5m]))'
                        ) == {"gateway_requests_total"}
    assert metric_names("histogram_quantile(0.95, sum by (le) (rate(x_bucket[1m]))) > 1e-3"
                        ) == {"x_bucket"}
    with pytest.raises(ValueError):
        metric_names("made_up_function(gateway_requests_total)")


def test_dashboard_structure(dashboard: dict[str, Any]) -> None:
    assert dashboard["title"] and dashboard["uid"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    for panel in dashboard["panels"]:
        assert set(panel["gridPos"]) == {"h", "w", "x", "y"}
        if panel["type"] != "row":
            assert panel["targets"], panel["title"]
            assert panel["datasource"]["uid"] == "${datasource}"


def test_dashboard_uses_only_exported_metrics(dashboard: dict[str, Any]) -> None:
    exprs = panel_exprs(dashboard)
    exprs += [("variable " + v["name"], v["definition"])
              for v in dashboard["templating"]["list"] if v["type"] == "query"]
    for title, expr in exprs:
        if expr.startswith("label_values("):
            expr = expr[len("label_values("):].split(",")[0]
        names = metric_names(expr)
        assert names, f"{title}: selects no metric: {expr}"
        assert names <= ALLOWED, f"{title}: unknown metrics {names - ALLOWED} in {expr}"


def test_dashboard_has_the_required_panels(dashboard: dict[str, Any]) -> None:
    exprs = [e for _, e in panel_exprs(dashboard)]
    used = set().union(*(metric_names(e) for e in exprs))
    for metric in ("gateway_requests_total", "gateway_request_duration_seconds_bucket",
                   "gateway_cache_hits_total", "gateway_cache_misses_total",
                   "gateway_upstream_errors_total", "gateway_pool_connections_active",
                   "gateway_worker_restarts_total", "gateway_config_reloads_total"):
        assert metric in used, metric
    assert any(e.startswith("histogram_quantile(0.95,") and "rate(" in e for e in exprs)
    assert any('status=~"5.."' in e for e in exprs)
    assert any("by (route" in e for e in exprs)


def test_dashboard_promql_parses(dashboard: dict[str, Any], tmp_path: Path) -> None:
    tool = promtool()
    rules = [{"record": f"proxyd:dashboard_panel:{i}", "expr": substitute_grafana(expr)}
             for i, (_, expr) in enumerate(panel_exprs(dashboard))]
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run([tool, "check", "rules", str(path)], capture_output=True,
                            text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_alerts_cover_the_required_conditions() -> None:
    rules = {r["alert"]: r for r in alert_rules()}
    assert {"ProxydHigh5xxRate", "ProxydHighP95Latency", "ProxydLowCacheHitRate",
            "ProxydWorkerCrashLoop", "ProxydConfigReloadFailed",
            "ProxydRateLimitRedisFallback", "ProxydCacheRedisUnavailable"} <= set(rules)
    for name, rule in rules.items():
        names = metric_names(rule["expr"])
        assert names and names <= ALLOWED, f"{name}: {names - ALLOWED}"
        assert rule["labels"]["severity"] in ("warning", "critical")
        assert rule["annotations"]["summary"]
    assert "0.005" in rules["ProxydHighP95Latency"]["expr"]
    assert "0.7" in rules["ProxydLowCacheHitRate"]["expr"]
    # Each Redis alert reads its own user's gauge, and says which it covers.
    for alert, gauge, covers in (
            ("ProxydRateLimitRedisFallback", "gateway_rate_limit_redis_fallback_active",
             "rate limit"),
            ("ProxydCacheRedisUnavailable", "gateway_cache_redis_unavailable", "cache")):
        assert metric_names(rules[alert]["expr"]) == {gauge}
        assert covers in rules[alert]["annotations"]["summary"].lower()


def test_promtool_check_rules() -> None:
    result = subprocess.run([promtool(), "check", "rules", str(ALERTS)], capture_output=True,
                            text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def _series(values: dict[str, str]) -> list[dict[str, str]]:
    return [{"series": s, "values": v} for s, v in values.items()]


def _fires(alert: str, at: str, *labels: dict[str, str]) -> dict[str, Any]:
    return {"eval_time": at, "alertname": alert,
            "exp_alerts": [{"exp_labels": label} for label in labels]}


ALERT_CASES: list[dict[str, Any]] = [
    {   # a: 10 of 70 responses 5xx (fires); b: 1 in 101 (does not)
        "interval": "1m",
        "input_series": _series({
            'gateway_requests_total{instance="a",status="200"}': "0+60x30",
            'gateway_requests_total{instance="a",status="502"}': "0+10x30",
            'gateway_requests_total{instance="b",status="200"}': "0+100x30",
            'gateway_requests_total{instance="b",status="500"}': "0+1x30",
        }),
        "alert_rule_test": [
            _fires("ProxydHigh5xxRate", "20m", {"instance": "a", "severity": "critical"})],
    },
    {   # p95 between 5 and 10 ms
        "interval": "1m",
        "input_series": _series({
            'gateway_request_duration_seconds_bucket{instance="a",le="0.005"}': "0+10x30",
            'gateway_request_duration_seconds_bucket{instance="a",le="0.01"}': "0+100x30",
            'gateway_request_duration_seconds_bucket{instance="a",le="+Inf"}': "0+100x30",
        }),
        "alert_rule_test": [
            _fires("ProxydHighP95Latency", "25m", {"instance": "a", "severity": "warning"})],
    },
    {   # a: 50% hits (fires); b: 90% hits (does not)
        "interval": "1m",
        "input_series": _series({
            'gateway_cache_hits_total{instance="a"}': "0+50x60",
            'gateway_cache_misses_total{instance="a"}': "0+50x60",
            'gateway_cache_hits_total{instance="b"}': "0+90x60",
            'gateway_cache_misses_total{instance="b"}': "0+10x60",
        }),
        "alert_rule_test": [
            _fires("ProxydLowCacheHitRate", "45m", {"instance": "a", "severity": "warning"})],
    },
    {   # a: a worker dies every minute (fires); b: one restart long ago (does not)
        "interval": "1m",
        "input_series": _series({
            'gateway_worker_restarts_total{instance="a"}': "0+1x20",
            'gateway_worker_restarts_total{instance="b"}': "1x20",
        }),
        "alert_rule_test": [
            _fires("ProxydWorkerCrashLoop", "12m", {"instance": "a", "severity": "critical"})],
    },
    {   # one rejected reload at minute 3: alert, then quiet once out of the 15m window
        "interval": "1m",
        "input_series": _series({
            'gateway_config_reloads_total{instance="a",result="failed"}': "0x2 1x40",
            'gateway_config_reloads_total{instance="a",result="ok"}': "0+1x42",
        }),
        "alert_rule_test": [
            _fires("ProxydConfigReloadFailed", "5m", {"instance": "a", "result": "failed",
                                                      "severity": "warning"}),
            _fires("ProxydConfigReloadFailed", "30m"),
        ],
    },
    {   # each Redis user has its gauge and its alert: one does not fire for the other
        "interval": "1m",
        "input_series": _series({
            'gateway_rate_limit_redis_fallback_active{instance="a"}': "0 0 1x10",
            'gateway_rate_limit_redis_fallback_active{instance="b"}': "0x12",
            'gateway_cache_redis_unavailable{instance="a"}': "0x12",
            'gateway_cache_redis_unavailable{instance="b"}': "0 0 0 1x10",
        }),
        "alert_rule_test": [
            _fires("ProxydRateLimitRedisFallback", "1m"),
            _fires("ProxydRateLimitRedisFallback", "6m",
                   {"instance": "a", "severity": "warning"}),
            _fires("ProxydCacheRedisUnavailable", "2m"),
            _fires("ProxydCacheRedisUnavailable", "6m",
                   {"instance": "b", "severity": "warning"}),
        ],
    },
]


def test_promtool_test_rules(tmp_path: Path) -> None:
    """Feed series through the real rule engine: each alert fires when, and only where, due."""
    tool = promtool()
    data = yaml.safe_load(ALERTS.read_text())
    for group in data["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)  # promtool compares annotations verbatim; not tested
    rules = tmp_path / "rules.yml"
    rules.write_text(yaml.safe_dump(data))
    tests = tmp_path / "tests.yml"
    tests.write_text(yaml.safe_dump({"rule_files": [str(rules)], "evaluation_interval": "1m",
                                     "tests": ALERT_CASES}))
    result = subprocess.run([tool, "test", "rules", str(tests)], capture_output=True,
                            text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
