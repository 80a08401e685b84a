"""What changed between two configs, by the names an operator gave things.

Routes and upstreams are compared by name (added, removed, changed; routes also when their
order changed, since the first match wins); every other top-level section only as changed or
not. A reload reports this in the log and in /status; ``check-config --diff`` compares a file
with the running configuration (GET /config on the admin port).

Secrets never appear: a reload compares the configs in the master and reports names only;
``/config`` gives the running config with its secrets masked (redact.py), and the file's are
masked the same way before comparing, so a change of a secret alone is not seen there.
"""

from __future__ import annotations

from typing import Any

from proxyd.config.models import GatewayConfig
from proxyd.config.redact import redact_value

NAMED = ("routes", "upstreams")


def comparable(config: GatewayConfig) -> dict[str, Any]:
    """The config as JSON-able data, secrets masked: what GET /config serves."""
    data: dict[str, Any] = redact_value(config.model_dump(mode="json"), config)
    return data


def diff(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """{"routes": {"added", "removed", "changed", "reordered"}, "upstreams": {"added",
    "removed", "changed"}, "sections": [other top-level sections that changed]}."""
    old_routes = {r["name"]: r for r in old.get("routes", [])}
    new_routes = {r["name"]: r for r in new.get("routes", [])}
    kept = [name for name in old_routes if name in new_routes]
    result: dict[str, Any] = {
        "routes": {
            **_named(old_routes, new_routes),
            "reordered": kept != [name for name in new_routes if name in old_routes],
        },
        "upstreams": _named(old.get("upstreams", {}), new.get("upstreams", {})),
        "sections": sorted(key for key in set(old) | set(new)
                           if key not in NAMED and old.get(key) != new.get(key)),
    }
    return result


def config_diff(old: GatewayConfig, new: GatewayConfig) -> dict[str, Any]:
    return diff(comparable(old), comparable(new))


def _named(old: dict[str, Any], new: dict[str, Any]) -> dict[str, list[str]]:
    return {
        "added": [name for name in new if name not in old],
        "removed": [name for name in old if name not in new],
        "changed": [name for name in new if name in old and old[name] != new[name]],
    }


def is_empty(changes: dict[str, Any]) -> bool:
    routes, upstreams = changes["routes"], changes["upstreams"]
    return not (any(routes[k] for k in ("added", "removed", "changed", "reordered"))
                or any(upstreams.values()) or changes["sections"])


def describe(changes: dict[str, Any]) -> str:
    """One line: ``routes: +a -b ~c (reordered); upstreams: +x; changed: server, cache``."""
    if is_empty(changes):
        return "no changes"
    parts = []
    for kind in NAMED:
        entry = changes[kind]
        names = ([f"+{n}" for n in entry["added"]] + [f"-{n}" for n in entry["removed"]]
                 + [f"~{n}" for n in entry["changed"]])
        if entry.get("reordered"):
            names.append("(reordered)")
        if names:
            parts.append(f"{kind}: {' '.join(names)}")
    if changes["sections"]:
        parts.append(f"changed: {', '.join(changes['sections'])}")
    return "; ".join(parts)
