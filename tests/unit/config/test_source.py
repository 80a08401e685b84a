"""read_yaml's two loaders: libyaml (used when PyYAML has it) and pure PyYAML (syntax errors).

They must agree on everything the loader reports — data, the position of every key and value,
explicit tags, issues — so that which one parsed a file never shows.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from proxyd.config import source
from proxyd.errors import ConfigError

CONFIGS = [*sorted((Path(__file__).parents[2] / "configs").glob("*/*.yaml")),
           Path(__file__).parents[3] / "config" / "gateway.yaml"]
ENV = {"PORT": "8080", "TOKEN": "t0k", "UPSTREAM_HOST": "127.0.0.1"}

TRICKY = """
anchors: &base {timeout: 5s, retries: 2}
merged:
  <<: *base
  retries: 3
port: !!str ${PORT}
plain_port: ${PORT}
quoted: "${PORT}"
empty: ${NOTSET:-}
on: yes
list: [1, 2.5, null, ~, true, "x"]
block: |
  two
  lines
"""


def read(loader: type, text: str) -> source.Source | str:
    saved = source._Loader
    source._Loader = loader  # type: ignore[misc]
    try:
        return source.read_yaml(text, "f.yaml", ENV)
    except ConfigError as exc:
        return str(exc)
    finally:
        source._Loader = saved  # type: ignore[misc]


@pytest.mark.skipif(not getattr(yaml, "__with_libyaml__", False), reason="no libyaml")
def test_libyaml_is_used_when_present() -> None:
    assert source._Loader is not source._PyLoader
    assert any(c.__name__ == "CParser" for c in source._Loader.__mro__)


@pytest.mark.parametrize("text", [TRICKY, *(p.read_text() for p in CONFIGS)],
                         ids=["tricky", *(p.name for p in CONFIGS)])
def test_both_loaders_agree(text: str) -> None:
    fast, slow = read(source._Loader, text), read(source._PyLoader, text)
    if isinstance(slow, str):
        assert fast == slow  # a syntax error: the message is PyYAML's either way
        return
    assert isinstance(fast, source.Source)
    assert fast.data == slow.data
    assert fast.positions.keys == slow.positions.keys
    assert fast.positions.values == slow.positions.values
    assert [str(i) for i in fast.issues] == [str(i) for i in slow.issues]
    assert fast.tainted == slow.tainted


def test_tricky_values() -> None:
    data = read(source._Loader, TRICKY)
    assert isinstance(data, source.Source)
    d = data.data
    assert d["merged"] == {"timeout": "5s", "retries": 3}
    assert d["port"] == "8080" and d["plain_port"] == 8080 and d["quoted"] == "8080"
    assert d["empty"] == "" and d["on"] is True
    assert d["list"] == [1, 2.5, None, None, True, "x"]
    assert d["block"] == "two\nlines\n"
    assert data.positions.keys[("merged", "retries")].line == 5


def test_syntax_errors_keep_pyyaml_wording() -> None:
    message = read(source._Loader, "a:\n  b: 1\n c: 2\n")
    assert isinstance(message, str)
    assert "f.yaml:3:2: YAML syntax error: expected <block end>" in message
