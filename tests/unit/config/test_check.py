"""What check-config says about files that load: routes that can never match, worker counts
no host can run, empty files, and what the JSON summary reports per route."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from proxyd.cli import main
from proxyd.config import ConfigError, load_config_text, load_config_text_with_warnings
from proxyd.config.loader import EMPTY_FILE
from proxyd.config.models_server import MAX_WORKERS

UPSTREAM = "upstreams: {app: {targets: ['http://127.0.0.1:9001']}}\n"


def warnings_of(routes: str) -> list[str]:
    _, warnings = load_config_text_with_warnings(UPSTREAM + "routes:\n" + routes, "g.yaml", {})
    return [str(w) for w in warnings]


@pytest.mark.parametrize("routes", [
    # a catch-all first
    "  - {name: all, match: {path_prefix: /}, upstream: app}\n"
    "  - {name: api, match: {path_prefix: /api/}, upstream: app}\n",
    # no match at all is a catch-all too
    "  - {name: all, upstream: app}\n"
    "  - {name: api, match: {path: /api, methods: [GET]}, upstream: app}\n",
    # a shorter prefix on every host, then a longer one on one host
    "  - {name: api, match: {path_prefix: /api}, upstream: app}\n"
    "  - {name: v1, match: {host: a.example.com, path_prefix: /api/v1/}, upstream: app}\n",
    # a wildcard host, then one of its names
    "  - {name: any, match: {host: '*.example.com'}, upstream: app}\n"
    "  - {name: one, match: {host: a.example.com, path: /x}, upstream: app}\n",
    # the methods of the second are all taken (GET brings HEAD)
    "  - {name: reads, match: {path_prefix: /, methods: [GET, POST]}, upstream: app}\n"
    "  - {name: head, match: {path: /h, methods: [HEAD]}, upstream: app}\n",
    # fewer required headers take more requests
    "  - {name: v2, match: {headers: {X-V: '2'}}, upstream: app}\n"
    "  - {name: v2p, match: {path: /p, headers: {x-v: '2', X-W: '1'}}, upstream: app}\n",
])
def test_shadowed_route_is_reported(routes: str) -> None:
    (warning,) = warnings_of(routes)
    assert "routes[1].match:" in warning and "can never match" in warning
    assert "(routes[0]) comes first" in warning


@pytest.mark.parametrize("routes", [
    # the specific route first: both are used
    "  - {name: api, match: {path_prefix: /api/}, upstream: app}\n"
    "  - {name: all, match: {path_prefix: /}, upstream: app}\n",
    # other methods still reach the second
    "  - {name: reads, match: {path_prefix: /, methods: [GET]}, upstream: app}\n"
    "  - {name: all, match: {path_prefix: /api}, upstream: app}\n",
    # another host
    "  - {name: a, match: {host: a.example.com}, upstream: app}\n"
    "  - {name: b, match: {host: b.example.com}, upstream: app}\n",
    # the apex is not under its wildcard
    "  - {name: any, match: {host: '*.example.com'}, upstream: app}\n"
    "  - {name: apex, match: {host: example.com}, upstream: app}\n",
    # a regex can take anything: no claim either way
    "  - {name: re, match: {path_regex: '^/a'}, upstream: app}\n"
    "  - {name: p, match: {path_prefix: /a}, upstream: app}\n",
    # a header condition the second does not have
    "  - {name: v2, match: {headers: {X-V: '2'}}, upstream: app}\n"
    "  - {name: all, match: {path_prefix: /}, upstream: app}\n",
])
def test_reachable_routes_are_not_reported(routes: str) -> None:
    assert warnings_of(routes) == []


@pytest.mark.parametrize("workers", [2000, 10**23, MAX_WORKERS + 1])
def test_absurd_worker_counts_are_refused(workers: int) -> None:
    with pytest.raises(ConfigError) as info:
        load_config_text(f"server: {{workers: {workers}}}\n", "g.yaml", {})
    (issue,) = info.value.issues
    assert str(issue).startswith("g.yaml:1:19: server.workers: workers must be at most 1024")


def test_largest_worker_count_loads() -> None:
    config = load_config_text(f"server: {{workers: {MAX_WORKERS}}}\n", "g.yaml", {})
    assert config.server.worker_count() == MAX_WORKERS


@pytest.fixture
def runner(monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    monkeypatch.delenv("PROXYD_CONFIG", raising=False)
    return CliRunner()


@pytest.mark.parametrize("text", ["", "# nothing yet\n", "---\n"])
def test_empty_file_says_so(runner: CliRunner, tmp_path: Path, text: str) -> None:
    path = tmp_path / "g.yaml"
    path.write_text(text)
    result = runner.invoke(main, ["check-config", "-c", str(path)])
    assert result.exit_code == 0, result.output
    first = result.stdout.splitlines()[0]
    assert first == f"{path}: configuration OK (every setting is its default)"
    assert f"{path}: {EMPTY_FILE}" in result.stdout
    result = runner.invoke(main, ["check-config", "-c", str(path), "--format", "json"])
    assert json.loads(result.stdout)["warnings"][0]["message"] == EMPTY_FILE


def test_a_file_with_settings_is_not_called_empty(runner: CliRunner, tmp_path: Path) -> None:
    path = tmp_path / "g.yaml"
    path.write_text("server: {backlog: 128}\n")
    result = runner.invoke(main, ["check-config", "-c", str(path)])
    assert result.stdout.splitlines()[0] == f"{path}: configuration OK"
    assert EMPTY_FILE not in result.stdout


def test_json_summary_reports_websocket_only_where_enabled(runner: CliRunner,
                                                           tmp_path: Path) -> None:
    path = tmp_path / "g.yaml"
    path.write_text(UPSTREAM + "routes:\n"
                    "  - {name: plain, match: {path: /}, upstream: app}\n"
                    "  - {name: ws, match: {path: /ws}, upstream: app, websocket: true}\n"
                    "  - {name: nope, match: {path: /o}, upstream: app, websocket: false}\n"
                    "  - {name: opts, match: {path: /w}, upstream: app,"
                    " websocket: {idle_timeout: 5s}}\n")
    result = runner.invoke(main, ["check-config", "-c", str(path), "--format", "json"])
    assert result.exit_code == 0, result.output
    routes = json.loads(result.stdout)["summary"]["routes"]
    assert {r["name"]: r.get("websocket", False) for r in routes} == {
        "plain": False, "ws": True, "nope": False, "opts": True}


def test_json_summary_says_how_workers_were_chosen(runner: CliRunner, tmp_path: Path) -> None:
    path = tmp_path / "g.yaml"
    path.write_text("server: {workers: 3}\n")
    result = runner.invoke(main, ["check-config", "-c", str(path), "--format", "json"])
    assert json.loads(result.stdout)["summary"]["workers"] == {
        "configured": 3, "effective": 3, "reason": "configured"}
    path.write_text("server: {workers: auto}\n")
    result = runner.invoke(main, ["check-config", "-c", str(path), "--format", "json"])
    workers = json.loads(result.stdout)["summary"]["workers"]
    assert workers["configured"] == "auto" and workers["effective"] >= 1
    assert workers["reason"].startswith("auto: ") and "affinity mask" in workers["reason"]


def test_zstd_without_zstandard_names_the_extra(runner: CliRunner, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from proxyd.middleware import element_options

    monkeypatch.setattr(element_options, "zstandard", None)  # as on an install without the extra
    path = tmp_path / "g.yaml"
    path.write_text("middleware: [{type: compression, algorithms: [zstd, gzip]}]\n")
    result = runner.invoke(main, ["check-config", "-c", str(path)])
    assert result.exit_code == 1
    assert "zstandard" in result.stderr and "pip install 'proxyd[zstd]'" in result.stderr


def test_zstd_extra_is_declared() -> None:
    import tomllib

    pyproject = tomllib.loads((Path(__file__).resolve().parents[3] / "pyproject.toml")
                              .read_text())
    extras = pyproject["project"]["optional-dependencies"]
    assert any(dep.startswith("zstandard") for dep in extras["zstd"])


def test_routes_on_probe_paths_are_reported() -> None:
    (never,) = warnings_of("  - {name: h, match: {path: /health, methods: [GET]}, upstream: app}\n")
    assert "can never match: GET and HEAD /health are answered by server.probes.live" in never
    (some,) = warnings_of("  - {name: r, match: {path: /health/ready}, upstream: app}\n")
    assert "server.probes.ready" in some and "only gets the other methods" in some
    assert warnings_of("  - {name: p, match: {path: /health, methods: [POST]}, upstream: app}\n"
                       ) == []
    _, warnings = load_config_text_with_warnings(
        "server: {probes: {enabled: false}}\n" + UPSTREAM
        + "routes: [{name: h, match: {path: /health}, upstream: app}]\n", "g.yaml", {})
    assert warnings == []


@pytest.mark.parametrize(("probes", "message"), [
    ("{live: health}", "a probe path is a path starting with '/'"),
    ("{ready: '/r?x=1'}", "a probe path is a path starting with '/'"),
    ("{live: /p, ready: /p}", "live and ready must be different paths"),
])
def test_probe_paths_are_checked(probes: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config_text(f"server: {{probes: {probes}}}\n", "g.yaml", {})
