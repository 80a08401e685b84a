"""YAML text → plain data, plus the line:column of every key and value in it.

PyYAML's ``safe_load`` throws marks away and silently lets a repeated key win, so we compose the
node graph ourselves and build the data while walking it. Every value is recorded under its
path — ``("routes", 2, "match", "path_prefix")``, the same shape as a pydantic error ``loc`` — so
that any later check (pydantic, semantic) can point at the exact spot in the file.

A config file is untrusted input to a process that must not stall: reading one is bounded in size
(``MAX_FILE_BYTES``), nesting (``MAX_DEPTH``) and nodes (``MAX_NODES``, aliases and merge keys
counted as often as they are expanded). Each limit is checked while the file is read, before the
work it bounds is done, and is refused as one ``file:line:col`` error at the place that crossed it.
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
from yaml.events import AliasEvent, MappingStartEvent, SequenceStartEvent
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode
from yaml.resolver import Resolver

from proxyd.config.interpolate import interpolate
from proxyd.errors import ConfigError, ConfigIssue

Path = tuple[str | int, ...]

_MAP_TAG = "tag:yaml.org,2002:map"
_SEQ_TAG = "tag:yaml.org,2002:seq"
_STR_TAG = "tag:yaml.org,2002:str"
_NULL_TAG = "tag:yaml.org,2002:null"
_MERGE_TAG = "tag:yaml.org,2002:merge"
_PLAIN_KEY = re.compile(r"[A-Za-z0-9_-]+")


# Far beyond what a gateway config needs (3,000 routes take about 270 KiB and 40,000 nodes; the
# schema nests under ten deep), and small enough that the worst file within them is read in a
# second or two and under 150 MB. The depth also keeps composing, three Python frames a level,
# far from the recursion limit (1,000 frames).
MAX_FILE_BYTES = 1024 * 1024
MAX_DEPTH = 64
MAX_NODES = 200_000


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


class _LimitExceeded(Exception):
    def __init__(self, mark: Mark, message: str) -> None:
        super().__init__(message)
        self.mark = mark
        self.message = message


def _too_many(expanding: bool) -> str:
    if expanding:
        return (f"aliases expand the config past {MAX_NODES:,} keys and values (each use of "
                "an alias or merge key repeats its whole anchor)")
    return f"the config holds more than {MAX_NODES:,} keys and values"


_TOO_DEEP = f"nested deeper than {MAX_DEPTH} levels"


class _Composing:
    """What we add to PyYAML's composer, for both loaders: the limits on depth and nodes, the
    explicit tags (``!!str ${PORT}`` must stay a string) and where each alias was written."""

    explicit: set[int]
    # (id(parent node), index in a sequence or id(key node) in a mapping) → the alias's mark:
    # the composer replaces an alias by its anchor's node, and with it, its position.
    aliases: dict[tuple[int, int], Mark]
    depth: int
    nodes: int

    def _init_composing(self) -> None:
        self.explicit = set()
        self.aliases = {}
        self.depth = 0
        self.nodes = 0

    def compose_node(self, parent: Node | None, index: Any) -> Node:
        event = self.peek_event()  # type: ignore[attr-defined]
        compose = super().compose_node  # type: ignore[misc]
        if isinstance(event, AliasEvent):
            # Costs nothing here (the anchor's node is shared); the walker counts its expansion.
            node: Node = compose(parent, index)
            if parent is not None and index is not None:
                key = index if isinstance(index, int) else id(index)
                self.aliases[(id(parent), key)] = _mark(event.start_mark)
            return node
        self.nodes += 1
        if self.nodes > MAX_NODES:
            raise _LimitExceeded(_mark(event.start_mark), _too_many(False))
        if not isinstance(event, MappingStartEvent | SequenceStartEvent):
            return compose(parent, index)  # type: ignore[no-any-return]
        # PyYAML composes recursively: checked before descending, a deep file costs no more
        # than MAX_DEPTH levels of it, and never reaches the recursion limit.
        self.depth += 1
        try:
            if self.depth > MAX_DEPTH:
                raise _LimitExceeded(_mark(event.start_mark), _TOO_DEEP)
            return compose(parent, index)  # type: ignore[no-any-return]
        finally:
            self.depth -= 1

    def compose_scalar_node(self, anchor: Any) -> ScalarNode:
        tagged = self.peek_event().tag is not None  # type: ignore[attr-defined]
        node: ScalarNode = super().compose_scalar_node(anchor)  # type: ignore[misc]
        if node.style == "":
            node.style = None  # libyaml's events say "" for a plain scalar, PyYAML's None
        if tagged:
            self.explicit.add(id(node))
        return node


class _PyLoader(_Composing, yaml.SafeLoader):
    """PyYAML's pure-Python loader: slower, but its syntax errors say more than libyaml's."""

    def __init__(self, stream: str) -> None:
        yaml.SafeLoader.__init__(self, stream)
        self._init_composing()


if getattr(yaml, "__with_libyaml__", False):
    from yaml._yaml import CParser

    class _Loader(_Composing, Composer, CParser, SafeConstructor, Resolver):
        """libyaml scans and parses (~4x faster than PyYAML's scanner); composing stays in
        Python, for the limits, the explicit tags and the marks."""

        def __init__(self, stream: str) -> None:
            CParser.__init__(self, stream)
            Composer.__init__(self)
            SafeConstructor.__init__(self)
            Resolver.__init__(self)
            self._init_composing()

else:  # PyYAML built without libyaml
    _Loader = _PyLoader  # type: ignore[misc,assignment]


def _compose(loader: Any) -> Any:
    try:
        return loader.get_single_node()
    finally:
        loader.dispose()


def _mark(m: Any) -> Mark:
    return Mark(m.line + 1, m.column + 1)


def oversize(head: bytes, filename: str) -> ConfigError | None:
    """The error for a file whose first ``MAX_FILE_BYTES + 1`` bytes are ``head``, if too big.

    It points at the line and column where the limit is crossed: nothing past it is read.
    """
    if len(head) <= MAX_FILE_BYTES:
        return None
    within = head[:MAX_FILE_BYTES].decode("utf-8", "ignore")
    line_start = within.rfind("\n") + 1
    issue = ConfigIssue(filename, within.count("\n") + 1, len(within) - line_start + 1, "",
                        f"config file is larger than {MAX_FILE_BYTES // 1024 // 1024} MiB "
                        f"({MAX_FILE_BYTES:,} bytes); the rest was not read")
    return ConfigError([issue])


def read_yaml(text: str, filename: str, env: Mapping[str, str]) -> Source:
    """Parse ``text``; a syntax error or a limit raises ConfigError at once, everything else
    is collected."""
    # Characters, then (only for text that may be short enough) UTF-8 bytes: a huge string is
    # never encoded whole.
    head = text[:MAX_FILE_BYTES + 1].encode("utf-8", "surrogatepass")[:MAX_FILE_BYTES + 1]
    if (too_big := oversize(head, filename)) is not None:
        raise too_big
    loader: Any = _Loader(text)
    try:
        try:
            root = _compose(loader)
        except yaml.YAMLError as first:
            exc = first
            if _Loader is not _PyLoader:  # type: ignore[comparison-overlap]
                # The same file through PyYAML, for its clearer message. It may stop at a
                # limit instead: libyaml scans ahead of what it composes (up to 1024
                # characters, for a possible key), so its error can lie past a limit.
                try:
                    _compose(_PyLoader(text))
                except yaml.YAMLError as detailed:
                    exc = detailed
            raise _syntax_error(exc, filename) from None
    except _LimitExceeded as limit:
        raise ConfigError([ConfigIssue(filename, limit.mark.line, limit.mark.column, "",
                                       limit.message)]) from None

    walker = _Walker(loader, filename, env)
    if root is None or (isinstance(root, ScalarNode) and root.tag == _NULL_TAG):
        return Source({}, walker.positions, [], set())  # empty file: every default applies
    data = walker.walk(root, ())
    if not isinstance(data, dict):
        issue = ConfigIssue(filename, 1, 1, "", "the top level of a config file must be a mapping "
                            "(server:, routes:, ...)")
        raise ConfigError([issue])
    return Source(data, walker.positions, walker.issues, walker.tainted)


def _syntax_error(exc: yaml.YAMLError, filename: str) -> ConfigError:
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else None
        column = mark.column + 1 if mark else None
        problem = exc.problem or exc.context or "invalid YAML"
        return ConfigError([ConfigIssue(filename, line, column, "",
                                        f"YAML syntax error: {problem}")])
    # Reader errors: control characters, bad encoding.
    return ConfigError([ConfigIssue(filename, None, None, "", f"YAML syntax error: {exc}")])


class _Walker:
    """Builds the data from the node graph, expanding aliases and merge keys: the one place
    where a small file can turn into a large amount of work, so every value it builds counts
    against MAX_NODES and every level against MAX_DEPTH."""

    def __init__(self, loader: Any, filename: str, env: Mapping[str, str]) -> None:
        self.loader = loader
        self.env = env
        self.positions = Positions(filename)
        self.issues: list[ConfigIssue] = []
        self.tainted: set[Path] = set()
        self._active: set[int] = set()  # nodes on the current walk: catches recursive aliases
        self._prepared: set[int] = set()  # mappings checked for duplicates, merge keys flattened
        # id(mapping) → how many of its pairs came from merge keys (they come first), and where
        # the first merge key was written.
        self._merged: dict[int, tuple[int, Mark]] = {}
        self._nodes = 0
        # The aliases being expanded: the outermost is what made a file too big, the innermost
        # what made it too deep.
        self._outer: Mark | None = None
        self._inner: Mark | None = None

    def fail(self, path: Path, node: Node, message: str) -> None:
        self.issues.append(self.positions.issue(path, message, mark=_mark(node.start_mark)))
        self.tainted.add(path)

    def _count(self, n: int, path: Path, mark: Mark, *, merging: bool = False) -> None:
        self._nodes += n
        if self._nodes > MAX_NODES:
            expanding = merging or self._outer is not None
            raise ConfigError([self.positions.issue(path, _too_many(expanding),
                                                    mark=self._outer or mark)])

    def walk(self, node: Node, path: Path, via: Mark | None = None) -> Any:
        mark = _mark(node.start_mark)
        self.positions.values[path] = mark
        outer, inner = self._outer, self._inner
        if via is not None:
            self._outer, self._inner = outer or via, via
        try:
            self._count(1, path, mark)
            if id(node) in self._active:
                self.fail(path, node, "recursive alias: a value cannot contain itself")
                return None
            if isinstance(node, MappingNode | SequenceNode) and len(path) >= MAX_DEPTH:
                # Only aliases get here (composing stopped deeper nesting): each level of
                # anchors can add MAX_DEPTH - 1 more.
                raise ConfigError([self.positions.issue(path, _TOO_DEEP,
                                                        mark=self._inner or mark)])
            self._active.add(id(node))
            try:
                return self._build(node, path)
            finally:
                self._active.discard(id(node))
        finally:
            self._outer, self._inner = outer, inner

    def _build(self, node: Node, path: Path) -> Any:
        if isinstance(node, MappingNode):
            return self._mapping(node, path)
        if isinstance(node, SequenceNode):
            if node.tag != _SEQ_TAG:
                self.fail(path, node, f"unsupported YAML tag {node.tag!r} on a list")
            aliases = self.loader.aliases
            return [self.walk(item, (*path, i), aliases.get((id(node), i)))
                    for i, item in enumerate(node.value)]
        if isinstance(node, ScalarNode):
            return self._scalar(node, path)
        raise TypeError(f"unexpected YAML node {node!r}")

    def _mapping(self, node: MappingNode, path: Path) -> dict[str, Any]:
        if node.tag != _MAP_TAG:
            self.fail(path, node, f"unsupported YAML tag {node.tag!r} on a mapping")
        try:
            self._prepare(node, path, 0)
        except yaml.MarkedYAMLError as exc:
            self.fail(path, node, f"invalid merge key: {exc.problem}")
            return {}
        merged, merge_mark = self._merged.get(id(node), (0, None))
        aliases = self.loader.aliases
        result: dict[str, Any] = {}
        for i, (key_node, value_node) in enumerate(node.value):
            if not isinstance(key_node, ScalarNode):
                self.fail(path, key_node, "mapping keys must be plain strings")
                continue
            # The key's source text, not its YAML 1.1 type: `on:`, `yes:` and `200:` are names
            # here (every key in this schema is a string), never booleans or integers.
            key = key_node.value
            child = (*path, key)
            self.positions.keys[child] = _mark(key_node.start_mark)
            via = merge_mark if i < merged else aliases.get((id(node), id(key_node)))
            result[key] = self.walk(value_node, child, via)
        return result

    def _prepare(self, node: MappingNode, path: Path, depth: int) -> None:
        """Check a mapping for duplicate keys, then flatten its merge keys; once per mapping.

        PyYAML's ``flatten_mapping`` (6.0.3), with a bound on what merging may add and on how
        deep merges of merges may go. Before flattening: only keys written in this mapping
        can clash; a key overriding one merged in from ``<<: *anchor`` is the point of merging.
        """
        if id(node) in self._prepared:
            return
        self._prepared.add(id(node))
        self._check_duplicates(node, path)
        merge: list[tuple[Node, Node]] = []
        merge_mark: Mark | None = None
        seen: set[int] = set()  # merged keys by identity: each source's pairs once
        index = 0
        while index < len(node.value):
            key_node, value_node = node.value[index]
            if key_node.tag == _MERGE_TAG:
                mark = _mark(key_node.start_mark)
                merge_mark = merge_mark or mark
                if depth >= MAX_DEPTH:
                    raise ConfigError([self.positions.issue(path, f"merge keys {_TOO_DEEP}",
                                                            mark=mark)])
                del node.value[index]
                if isinstance(value_node, MappingNode):
                    sources = [value_node]
                elif isinstance(value_node, SequenceNode):
                    sources = value_node.value
                else:
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping", node.start_mark,
                        "expected a mapping or list of mappings for merging, but found "
                        f"{value_node.id}", value_node.start_mark)
                for source in sources:
                    if not isinstance(source, MappingNode):
                        raise yaml.constructor.ConstructorError(
                            "while constructing a mapping", node.start_mark,
                            f"expected a mapping for merging, but found {source.id}",
                            source.start_mark)
                    self._prepare(source, path, depth + 1)
                    for pair in source.value:
                        if id(pair[0].value) not in seen:
                            seen.add(id(pair[0].value))
                            merge.append(pair)
                    self._count(len(source.value), path, mark, merging=True)
            elif key_node.tag == "tag:yaml.org,2002:value":
                key_node.tag = _STR_TAG
                index += 1
            else:
                index += 1
        if merge and merge_mark is not None:
            node.value = merge + node.value
            self._merged[id(node)] = (len(merge), merge_mark)

    def _check_duplicates(self, node: MappingNode, path: Path) -> None:
        first: dict[str, Mark] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, ScalarNode) or key_node.tag == _MERGE_TAG:
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
