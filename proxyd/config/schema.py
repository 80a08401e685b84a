"""The config's JSON Schema, as ``proxyd schema`` prints it: what a file may contain, as written.

pydantic describes the models' *validated* types; a file is read before that, so the schema
must also admit what the loader turns into those types:

- any scalar may be a ``${VAR}`` reference (interpolate.py), substituted before validation, so
  ``workers: ${PROXYD_WORKERS:-auto}`` is as valid as ``workers: 4``;
- the short forms that before-validators expand (``targets: ["http://..."]``,
  ``websocket: true``) are declared next to those validators, with ``json_schema_extra``.

An editor that validates with this schema must accept every file ``check-config`` accepts; the
tests hold the shipped configs to that.
"""

from __future__ import annotations

from typing import Any

from proxyd.config.models import GatewayConfig

# A string holding at least one reference: JSON Schema patterns are searched, not anchored.
VARIABLE: dict[str, Any] = {
    "type": "string",
    "pattern": r"\$\{[A-Za-z_][A-Za-z0-9_]*((:-|:\?)[^}]*)?\}",
    "description": "${VAR}, ${VAR:-default} or ${VAR:?message}: substituted before validation",
}
_SCALARS = {"integer", "number", "boolean", "null"}
# Keywords that stay on the outer node when a scalar is wrapped: they describe the field, not
# the value's shape.
_ANNOTATIONS = ("title", "description", "default", "examples", "deprecated")
# Keywords whose values are data, not schemas: never rewritten.
_VALUES = frozenset(("default", "examples", "const", "enum"))
# Keywords whose values map names to schemas (a property may be called "type").
_NAMED = frozenset(("properties", "$defs", "patternProperties", "dependentSchemas"))


def json_schema() -> dict[str, Any]:
    document: dict[str, Any] = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "proxyd gateway configuration",
        **GatewayConfig.model_json_schema(),
    }
    schema: dict[str, Any] = _admit_variables(document)
    return schema


def _constrained_scalar(node: dict[str, Any]) -> bool:
    """Would a ``${VAR}`` string fail this node on its own?"""
    kind = node.get("type")
    kinds = set(kind) if isinstance(kind, list) else {kind} if kind else set()
    if kinds & _SCALARS:
        return True
    if "enum" in node or "const" in node:
        return True
    return "string" in kinds and ("pattern" in node or "format" in node)


def _admit_variables(node: Any) -> Any:
    """The schema ``node`` with every constrained scalar in it also taking a reference."""
    if isinstance(node, list):
        return [_admit_variables(item) for item in node]
    if not isinstance(node, dict):
        return node
    node = {key: value if key in _VALUES
            else {name: _admit_variables(sub) for name, sub in value.items()} if key in _NAMED
            else _admit_variables(value)
            for key, value in node.items()}
    if not _constrained_scalar(node):
        return node
    outer = {key: node.pop(key) for key in _ANNOTATIONS if key in node}
    return {**outer, "anyOf": [node, VARIABLE]}
