"""``proxyd schema``: every file check-config accepts validates against it, and it still
refuses what check-config refuses for its shape (unknown keys, wrong types)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from click.testing import CliRunner

from proxyd.cli import main
from proxyd.config import load_config_text

REPO = Path(__file__).resolve().parents[3]
SHIPPED = [
    REPO / "config" / "gateway.yaml",
    *sorted((REPO / "config" / "examples").glob("*.yaml")),
    REPO / "packaging" / "docker" / "gateway.yaml",
    *sorted((REPO / "tests" / "configs" / "valid").glob("*.yaml")),
]


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft202012Validator:
    result = CliRunner().invoke(main, ["schema"])
    assert result.exit_code == 0, result.output
    schema = json.loads(result.stdout)
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def configmap_text() -> str:
    doc = yaml.safe_load((REPO / "packaging" / "kubernetes" / "configmap.yaml").read_text())
    text: str = doc["data"]["gateway.yaml"]
    return text


def problems(validator: jsonschema.Draft202012Validator, data: Any) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
            for e in validator.iter_errors(data)]


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(REPO)))
def test_shipped_configs_validate(validator: jsonschema.Draft202012Validator,
                                  path: Path) -> None:
    data = yaml.safe_load(path.read_text()) or {}
    assert problems(validator, data) == []


def test_kubernetes_configmap_validates(validator: jsonschema.Draft202012Validator) -> None:
    assert problems(validator, yaml.safe_load(configmap_text())) == []


SHORT_FORMS = """
server:
  workers: "4"
  listen: [{address: "0.0.0.0:8443", tls: {cert: c.pem, key: k.pem, min_version: 1.3}}]
upstreams:
  app: {targets: ["http://127.0.0.1:9001", {url: "http://127.0.0.1:9002", weight: 2}]}
routes:
  - {name: ws, match: {path: /ws}, upstream: app, websocket: true}
  - {name: ws2, match: {path: /ws2}, upstream: app, websocket: {idle_timeout: 10s}}
"""

VARIABLES = """
server:
  workers: ${WORKERS:-auto}
  backlog: ${BACKLOG:-4096}
  keepalive_timeout: ${KEEPALIVE}
  watch_config: ${WATCH:-false}
  encoded_slashes: ${SLASHES:-keep}
admin: {listen: "${ADMIN:-127.0.0.1:9901}", protect_reads: "${PROTECT:?say}"}
upstreams:
  app: {targets: [{url: "${URL}", weight: "${WEIGHT:-1}"}]}
routes:
  - {name: a, match: {path: /}, upstream: app}
"""


def test_short_forms_validate(validator: jsonschema.Draft202012Validator) -> None:
    load_config_text(SHORT_FORMS, "short.yaml")  # what check-config accepts ...
    assert problems(validator, yaml.safe_load(SHORT_FORMS)) == []  # ... the schema does too


def test_any_scalar_may_be_a_variable(validator: jsonschema.Draft202012Validator) -> None:
    load_config_text(VARIABLES, "vars.yaml", env={
        "KEEPALIVE": "5s", "PROTECT": "true", "URL": "http://127.0.0.1:9001"})
    assert problems(validator, yaml.safe_load(VARIABLES)) == []


@pytest.mark.parametrize(("data", "where"), [
    ({"server": {"listn": []}}, ""),  # an unknown key
    ({"server": {"workers": "many"}}, "server.workers"),
    ({"server": {"workers": 2000}}, "server.workers"),
    ({"server": {"backlog": "4k"}}, "server.backlog"),  # text that is no reference
    ({"server": {"keepalive_timeout": "soon"}}, "server.keepalive_timeout"),
    ({"upstreams": {"a": {"targets": [42]}}}, "upstreams.a.targets.0"),
    ({"routes": [{"name": "r", "websocket": "yes"}]}, "routes.0.websocket"),
])
def test_schema_still_refuses(validator: jsonschema.Draft202012Validator, data: Any,
                              where: str) -> None:
    errors = list(validator.iter_errors(data))
    assert errors, f"the schema accepted {data}"
    assert any(".".join(map(str, e.absolute_path)).startswith(where) for e in errors)
