"""The command line, through click's CliRunner (no subprocess, no sockets)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from proxyd import __version__, compiled
from proxyd.cli import main

REPO = Path(__file__).resolve().parents[2]
GATEWAY = REPO / "config" / "gateway.yaml"
MISSPELLED = "server:\n  workers: 2\n  listn: ['127.0.0.1:8080']\n"


@pytest.fixture
def runner(monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    monkeypatch.delenv("PROXYD_CONFIG", raising=False)
    monkeypatch.delenv("PROXYD_ADMIN_TOKEN", raising=False)
    return CliRunner()


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "gateway.yaml"
    path.write_text(text)
    return str(path)


def test_version(runner: CliRunner) -> None:
    result = runner.invoke(main, ["--version"])
    assert result.exit_code == 0
    assert __version__ in result.output
    assert ("(compiled build)" if compiled() else "(pure-Python build)") in result.output


def test_check_config_default_file_passes(runner: CliRunner) -> None:
    result = runner.invoke(main, ["check-config", "-c", str(GATEWAY)])
    assert result.exit_code == 0, result.output
    for name in ("hello", "example", "backend", "127.0.0.1:8080", "127.0.0.1:9901"):
        assert name in result.stdout


def test_check_config_reads_proxyd_config_env(runner: CliRunner) -> None:
    result = runner.invoke(main, ["check-config"], env={"PROXYD_CONFIG": str(GATEWAY)})
    assert result.exit_code == 0, result.output
    assert "configuration OK" in result.stdout


def test_check_config_invalid(runner: CliRunner, tmp_path: Path) -> None:
    path = write(tmp_path, MISSPELLED)
    result = runner.invoke(main, ["check-config", "--config", path])
    assert result.exit_code == 1
    assert f"{path}:3:3: server.listn: unknown key 'listn', did you mean 'listen'?" \
        in result.stderr.splitlines()
    assert ":3:" in result.output and "listn" in result.output and "did you mean" in result.output
    assert result.stdout == ""


def test_check_config_prints_every_error(runner: CliRunner, tmp_path: Path) -> None:
    path = write(tmp_path, "server:\n  listn: []\n  backlog: x\n  drain_timeout: soon\n")
    result = runner.invoke(main, ["check-config", "-c", path])
    assert result.exit_code == 1
    assert [line.split(": ")[1] for line in result.stderr.splitlines()[:3]] == [
        "server.listn", "server.backlog", "server.drain_timeout"]


def test_check_config_missing_file(runner: CliRunner, tmp_path: Path) -> None:
    result = runner.invoke(main, ["check-config", "-c", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 1
    assert "cannot read config file" in result.stderr


def test_check_config_json_ok(runner: CliRunner) -> None:
    result = runner.invoke(main, ["check-config", "-c", str(GATEWAY), "--format", "json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["ok"] is True and doc["errors"] == []
    assert [r["name"] for r in doc["summary"]["routes"]] == ["hello", "example"]
    assert doc["summary"]["upstreams"]["backend"]["targets"][0]["url"] == "http://127.0.0.1:9001"


def test_check_config_json_errors(runner: CliRunner, tmp_path: Path) -> None:
    path = write(tmp_path, MISSPELLED)
    result = runner.invoke(main, ["check-config", "-c", path, "--format", "json"])
    assert result.exit_code == 1
    doc = json.loads(result.stdout)
    assert doc["ok"] is False and doc["summary"] is None
    assert doc["errors"] == [{"file": path, "line": 3, "column": 3, "key": "server.listn",
                              "message": "unknown key 'listn', did you mean 'listen'?"}]


def test_check_config_shows_warnings(runner: CliRunner, tmp_path: Path) -> None:
    path = write(tmp_path, "admin: {listen: '0.0.0.0:9901'}\n")
    result = runner.invoke(main, ["check-config", "-c", path])
    assert result.exit_code == 0
    assert "warnings (2):" in result.stdout
    assert "without a token" in result.stdout and "no routes" in result.stdout


def test_schema(runner: CliRunner) -> None:
    result = runner.invoke(main, ["schema"])
    assert result.exit_code == 0
    schema = json.loads(result.stdout)
    assert "server" in schema["properties"]
    assert "routes" in schema["properties"]


def test_run_with_invalid_config_exits_1(runner: CliRunner, tmp_path: Path) -> None:
    result = runner.invoke(main, ["run", "-c", write(tmp_path, MISSPELLED)])
    assert result.exit_code == 1
    assert "did you mean 'listen'?" in result.stderr
