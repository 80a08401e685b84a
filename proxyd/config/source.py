"""YAML text → plain data, plus the line:column of every key and value in it.

PyYAML's ``safe_load`` throws marks away and silently lets a repeated key win, so we compose the
node graph ourselves and build the data while walking it. Every value is recorded under its
path — ``("routes", 2, "match", "path_prefix")``, the same shape as a pydantic error ``loc`` — so
that any later check (pydantic, semantic) can point at the exact spot in the file.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml
from yaml.composer import Composer
from yaml.constructor import SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode
from yaml.resolver import Resolver

from proxyd.config.interpolate import interpolate
from proxyd.errors import ConfigError, ConfigIssue

Path = tuple[str | int, ...]

_MAP_TAG = "tag:yaml.org,2002:map"
_SEQ_TAG = "tag:yaml.org,2002:seq"
_STR_TAG = "tag:yaml.org,2002:str"
_NULL_TAG = "tag:yaml.org,2002:null"
_PLAIN_KEY = re.compile(r"[A-Za-z0-9_-]+")


@dataclass(frozen=True)
class Mark:
    line: int  # 1-based, as editors and `file:line:col` consumers count
    column: int


def format_path(path: Path) -> str:
    """``routes[2].match.path_prefix``; keys that would be ambiguous are quoted: ``a["x.y"]``."""
    out = ""
    for el in path:
        if isinstance(el, int):
            out += f"[{el}]"
        elif _PLAIN_KEY.fullmatch(el):
            out += f".{el}" if out else el
        else:
            out += f"[{json.dumps(el)}]"
    return out


@dataclass
class Positions:
    """Where each path was written; turns (path, message) into a located ConfigIssue."""

    filename: str
    keys: dict[Path, Mark] = field(default_factory=dict)
    values: dict[Path, Mark] = field(default_factory=dict)

    def locate(self, path: Path, *, on_key: bool = False) -> Mark | None:
        if on_key and path in self.keys:
            return self.keys[path]
        # A path the user never wrote (a default, a field filled in by a validator) is reported
        # at the nearest thing they did write.
        for n in range(len(path), -1, -1):
            mark = self.values.get(path[:n])
            if mark is not None:
                return mark
        return None

    def issue(self, path: Path, message: str, *, on_key: bool = False,
              mark: Mark | None = None) -> ConfigIssue:
        mark = mark or self.locate(path, on_key=on_key)
        return ConfigIssue(self.filename, mark.line if mark else None,
                           mark.column if mark else None, format_path(path), message)


@dataclass
class Source:
    data: dict[str, Any]
    positions: Positions
    issues: list[ConfigIssue]
    # Values that could not be built (failed interpolation, bad tag). Later checks skip errors
    # at or below these paths: they would only restate the same problem with a worse message.
    tainted: set[Path]

    def is_tainted(self, path: Path) -> bool:
        return any(path[: len(t)] == t for t in self.tainted)


class _Explicit:
    """Remembers which scalars carried an explicit tag: ``!!str ${PORT}`` must stay a string."""

    explicit: set[int]

    def compose_scalar_node(self, anchor: Any) -> ScalarNode:
        tagged = self.peek_event().tag is not None  # type: ignore[attr-defined]
        node: ScalarNode = super().compose_scalar_node(anchor)  # type: ignore[misc]
        if node.style == "":
            node.style = None  # libyaml's events say "" for a plain scalar, PyYAML's None
        if tagged:
            self.explicit.add(id(node))
        return node


class _PyLoader(_Explicit, yaml.SafeLoader):
    """PyYAML's pure-Python loader: slower, but its syntax errors say more than libyaml's."""

    def __init__(self, stream: str) -> None:
        yaml.SafeLoader.__init__(self, stream)
        self.explicit = set()


if getattr(yaml, "__with_libyaml__", False):
    from yaml._yaml import CParser

    class _Loader(_Explicit, Composer, CParser, SafeConstructor, Resolver):
        """libyaml scans and parses (a reload parses the file in the master, which is then
        busy; this is ~4x faster than PyYAML's scanner); composing stays in Python, for the
        explicit tags and the marks."""

        def __init__(self, stream: str) -> None:
            CParser.__init__(self, stream)
            Composer.__init__(self)
            SafeConstructor.__init__(self)
            Resolver.__init__(self)
            self.explicit = set()

else:  # PyYAML built without libyaml
    _Loader = _PyLoader  # type: ignore[misc,assignment]


def _compose(loader: Any) -> Any:
    try:
        return loader.get_single_node()
    finally:
        loader.dispose()


def _mark(m: Any) -> Mark:
    return Mark(m.line + 1, m.column + 1)


def read_yaml(text: str, filename: str, env: Mapping[str, str]) -> Source:
    """Parse ``text``; a syntax error raises ConfigError at once, everything else is collected."""
    loader: Any = _Loader(text)
    try:
        root = _compose(loader)
    except yaml.YAMLError as first:
        exc = first
        if _Loader is not _PyLoader:  # type: ignore[comparison-overlap]
            try:  # the same file through PyYAML, for its clearer message
                _compose(_PyLoader(text))
            except yaml.YAMLError as detailed:
                exc = detailed
        if isinstance(exc, yaml.MarkedYAMLError):
            mark = exc.problem_mark or exc.context_mark
            line = mark.line + 1 if mark else None
            column = mark.column + 1 if mark else None
            problem = exc.problem or exc.context or "invalid YAML"
            raise ConfigError([ConfigIssue(filename, line, column, "",
                                           f"YAML syntax error: {problem}")]) from None
        # Reader errors: control characters, bad encoding.
        raise ConfigError([ConfigIssue(filename, None, None, "",
                                       f"YAML syntax error: {exc}")]) from None

    walker = _Walker(loader, filename, env)
    if root is None or (isinstance(root, ScalarNode) and root.tag == _NULL_TAG):
        return Source({}, walker.positions, [], set())  # empty file: every default applies
    data = walker.walk(root, ())
    if not isinstance(data, dict):
        issue = ConfigIssue(filename, 1, 1, "", "the top level of a config file must be a mapping "
                            "(server:, routes:, ...)")
        raise ConfigError([issue])
    return Source(data, walker.positions, walker.issues, walker.tainted)


class _Walker:
    def __init__(self, loader: Any, filename: str, env: Mapping[str, str]) -> None:
        self.loader = loader
        self.env = env
        self.positions = Positions(filename)
        self.issues: list[ConfigIssue] = []
        self.tainted: set[Path] = set()
        self._active: set[int] = set()  # nodes on the current walk: catches recursive aliases
        self._checked: set[int] = set()  # mappings already checked for duplicate keys

    def fail(self, path: Path, node: Node, message: str) -> None:
        self.issues.append(self.positions.issue(path, message, mark=_mark(node.start_mark)))
        self.tainted.add(path)

    def walk(self, node: Node, path: Path) -> Any:
        self.positions.values[path] = _mark(node.start_mark)
        if id(node) in self._active:
            self.fail(path, node, "recursive alias: a value cannot contain itself")
            return None
        self._active.add(id(node))
        try:
            if isinstance(node, MappingNode):
                return self._mapping(node, path)
            if isinstance(node, SequenceNode):
                if node.tag != _SEQ_TAG:
                    self.fail(path, node, f"unsupported YAML tag {node.tag!r} on a list")
                return [self.walk(item, (*path, i)) for i, item in enumerate(node.value)]
            if isinstance(node, ScalarNode):
                return self._scalar(node, path)
            raise TypeError(f"unexpected YAML node {node!r}")
        finally:
            self._active.discard(id(node))

    def _mapping(self, node: MappingNode, path: Path) -> dict[str, Any]:
        if node.tag != _MAP_TAG:
            self.fail(path, node, f"unsupported YAML tag {node.tag!r} on a mapping")
        if id(node) not in self._checked:
            # Before merge keys are flattened: only keys written in this mapping can clash;
            # a key overriding one merged in from `<<: *anchor` is the point of merging.
            self._checked.add(id(node))
            self._check_duplicates(node, path)
            try:
                self.loader.flatten_mapping(node)
            except yaml.MarkedYAMLError as exc:
                self.fail(path, node, f"invalid merge key: {exc.problem}")
                return {}
        result: dict[str, Any] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, ScalarNode):
                self.fail(path, key_node, "mapping keys must be plain strings")
                continue
            # The key's source text, not its YAML 1.1 type: `on:`, `yes:` and `200:` are names
            # here (every key in this schema is a string), never booleans or integers.
            key = key_node.value
            child = (*path, key)
            self.positions.keys[child] = _mark(key_node.start_mark)
            result[key] = self.walk(value_node, child)
        return result

    def _check_duplicates(self, node: MappingNode, path: Path) -> None:
        first: dict[str, Mark] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            mark = _mark(key_node.start_mark)
            if key_node.value in first:
                self.issues.append(self.positions.issue(
                    (*path, key_node.value),
                    f"duplicate key '{key_node.value}' (first defined on line "
                    f"{first[key_node.value].line})", mark=mark))
            else:
                first[key_node.value] = mark

    def _scalar(self, node: ScalarNode, path: Path) -> Any:
        text, tag = node.value, node.tag
        if "$" in text:
            result = interpolate(text, self.env)
            if result.errors:
                for message in result.errors:
                    self.issues.append(self.positions.issue(path, message,
                                                            mark=_mark(node.start_mark)))
                self.tainted.add(path)
                return text
            text = result.text
            if result.whole and node.style is None and id(node) not in self.loader.explicit:
                if text == "":
                    # `token: ${TOKEN:-}` means "empty", not YAML's null.
                    return ""
                tag = self.loader.resolve(
                    ScalarNode, text, (True, False))
        try:
            return self.loader.construct_object(
                ScalarNode(tag, text, node.start_mark, node.end_mark, style=node.style)
            )
        except (yaml.YAMLError, ValueError, TypeError) as exc:
            problem = getattr(exc, "problem", None) or str(exc)
            self.fail(path, node, f"cannot read {text!r} as {tag.rsplit(':', 1)[-1]}: {problem}")
            return text
