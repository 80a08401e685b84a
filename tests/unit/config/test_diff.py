"""What changed between two configs, by name: what a reload and check-config --diff report."""

from __future__ import annotations

from proxyd.config import load_config_text
from proxyd.config.diff import comparable, config_diff, describe, diff, is_empty

BASE = """
admin: {token: first-secret}
upstreams:
  a: {targets: ["http://127.0.0.1:9001"]}
  b: {targets: ["http://127.0.0.1:9002"]}
routes:
  - {name: one, match: {path: /1}, upstream: a}
  - {name: two, match: {path: /2}, upstream: b}
  - {name: three, match: {path: /3}, upstream: a}
"""


def load(text: str) -> object:
    return load_config_text(text, "g.yaml", {})


def test_no_changes() -> None:
    changes = config_diff(load(BASE), load(BASE))  # type: ignore[arg-type]
    assert is_empty(changes) and describe(changes) == "no changes"


def test_routes_and_upstreams_by_name() -> None:
    edited = (BASE.replace("{name: two, match: {path: /2}, upstream: b}",
                           "{name: two, match: {path: /two}, upstream: b}")
              .replace("  - {name: three, match: {path: /3}, upstream: a}\n", "")
              .replace('  b: {targets: ["http://127.0.0.1:9002"]}',
                       '  b: {targets: ["http://127.0.0.1:9003"]}\n'
                       '  c: {targets: ["http://127.0.0.1:9004"]}')
              + "  - {name: four, match: {path: /4}, upstream: c}\n"
              + "server: {backlog: 128}\n")
    changes = config_diff(load(BASE), load(edited))  # type: ignore[arg-type]
    assert changes["routes"] == {"added": ["four"], "removed": ["three"], "changed": ["two"],
                                 "reordered": False}
    assert changes["upstreams"] == {"added": ["c"], "removed": [], "changed": ["b"]}
    assert changes["sections"] == ["server"]
    assert describe(changes) == ("routes: +four -three ~two; upstreams: +c ~b; "
                                 "changed: server")


def test_a_new_order_is_a_change() -> None:
    swapped = BASE.replace("  - {name: one, match: {path: /1}, upstream: a}\n", "").replace(
        "  - {name: three", "  - {name: one, match: {path: /1}, upstream: a}\n  - {name: three")
    changes = config_diff(load(BASE), load(swapped))  # type: ignore[arg-type]
    assert changes["routes"]["reordered"] is True and not changes["routes"]["changed"]
    assert describe(changes) == "routes: (reordered)"


def test_secrets_never_appear() -> None:
    config = load(BASE)
    assert "first-secret" not in str(comparable(config))  # type: ignore[arg-type]
    # Masked on both sides: a changed secret alone is not seen by check-config --diff.
    other = load(BASE.replace("first-secret", "second-secret"))
    assert is_empty(diff(comparable(config), comparable(other)))  # type: ignore[arg-type]
