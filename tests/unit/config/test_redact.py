"""Secrets kept out of output: URLs' passwords and the admin token redacted in summaries,
check-config's output and config errors."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from proxyd.cli import main
from proxyd.config import load_config_text
from proxyd.config.redact import redact_text, redact_url
from proxyd.config.summary import format_summary, summarize
from tests.unit.config._load import ROUTE, lines

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
