"""``proxyd explain`` golden outputs: tests/configs/valid/explain.yaml against the files in
tests/unit/explain/ (regenerate with ``PROXYD_UPDATE_GOLDEN=1`` and review the diff)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from proxyd.cli import main
from proxyd.config import load_config
from proxyd.explain import explain, format_explain

HERE = Path(__file__).resolve().parent
CONFIG = HERE.parent / "configs" / "valid" / "explain.yaml"
GOLDEN = HERE / "explain"

# name → (arguments after ``explain -c CONFIG``, exit code)
CASES: dict[str, tuple[list[str], int]] = {
    "respond": (["GET", "/ping"], 0),
    "strip_prefix": (["GET", "http://shop.example.com/api/v2/items?id=7"], 0),
    "cache_rate_limit": (["GET", "/products/42?b=2&utm_source=mail&a=1",
                          "-H", "X-Api-Key: k1", "-H", "Accept-Language: de",
                          "-H", "X-Forwarded-For: 198.51.100.7, 203.0.113.9",
                          "--client-ip", "10.1.2.3"], 0),
    "cache_no_store": (["GET", "/products/42", "-H", "Cache-Control: no-store"], 0),
    "cache_method": (["POST", "/products/42", "--client-ip", "192.0.2.1"], 0),
    "cache_head": (["HEAD", "/products/42"], 0),
    "cache_origin_only": (["GET", "/docs/a", "-H", "Range: bytes=0-99",
                           "-H", "Cache-Control: max-age=5"], 0),
    "not_found": (["GET", "/nothing/here"], 1),
    "wrong_method": (["POST", "/reports"], 1),
}


@pytest.fixture
def runner(monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    monkeypatch.delenv("PROXYD_CONFIG", raising=False)
    return CliRunner()


@pytest.mark.parametrize("name", sorted(CASES))
def test_golden(runner: CliRunner, name: str) -> None:
    args, code = CASES[name]
    result = runner.invoke(main, ["explain", "-c", str(CONFIG), *args])
    golden = GOLDEN / f"{name}.txt"
    if os.environ.get("PROXYD_UPDATE_GOLDEN"):
        golden.write_text(result.output)
    assert result.exit_code == code, result.output
    assert result.output == golden.read_text()


def test_every_golden_file_has_a_case() -> None:
    assert {p.stem for p in GOLDEN.glob("*.txt")} == set(CASES)


def test_json_has_the_same_facts(runner: CliRunner) -> None:
    args, _ = CASES["cache_rate_limit"]
    result = runner.invoke(main, ["explain", "-c", str(CONFIG), *args, "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["route"]["name"] == "products"
    assert data["chain"] == ["trace_id", "rate_limit", "cache"]
    # Query sorted, utm_source ignored, Accept-Language appended (key_headers).
    assert data["cache"]["key"] == "http://localhost/products/42?a=1&b=2\naccept-language=de"
    assert data["cache"]["decision"].startswith("cacheable if the response allows")
    # 10.1.2.3 is a trusted proxy: the client is the last untrusted X-Forwarded-For hop.
    assert data["rate_limit"] == [{"key": "products|203.0.113.9|k1", "backend": "memory",
                                   "limits": ["100/1s burst 20"]}]


def test_keys_match_the_middleware_with_a_bound_route() -> None:
    """The library call (no CLI): the same key the data plane's Cache.primary would make."""
    config = load_config(CONFIG)
    ok, result = explain(config, "get", "http://Shop.Example.com/products/1?z=1&a=2",
                         [("Authorization", "Bearer t")])
    assert ok
    assert result["cache"]["key"] == "http://shop.example.com/products/1?a=2&z=1\naccept-language="
    assert "with Authorization only if public" in result["cache"]["decision"]
    assert result["rate_limit"][0]["key"] == "products|127.0.0.1|"
    assert "cache key" in format_explain(ok, result)


def test_route_without_cache_or_rate_limit() -> None:
    config = load_config(CONFIG)
    ok, result = explain(config, "GET", "/api/x", [])
    assert ok and result["cache"] == {"key": None,
                                      "decision": "off (no cache middleware on this route)"}
    assert result["rate_limit"] == []


def test_explain_routes_on_the_normalised_path() -> None:
    """explain routes the way the data plane does: encoded dot segments resolved first."""
    config = load_config(CONFIG)
    ok, plain = explain(config, "GET", "/ping", [])
    assert ok
    ok, dotted = explain(config, "GET", "/nothing/%2e%2E/ping", [])
    assert ok and dotted["route"] == plain["route"]
    assert dotted["request"]["path"] == "/ping"
    ok, refused = explain(config, "GET", "/a%2fb", [])
    assert not ok and refused["error"].startswith("400: ")
