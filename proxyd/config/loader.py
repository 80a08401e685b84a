"""Load a config file: YAML with positions → pydantic models → semantic checks.

Every problem of one load is collected and raised together as one ConfigError whose issues read
``file:line:col: key.path: message`` — an operator fixes a file in one pass, not one error per
run. The only exception is a YAML syntax error: past it the parser cannot know what was meant.
"""

from __future__ import annotations

import difflib
import os
import re
import types
from collections.abc import Mapping
from typing import Annotated, Any, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from proxyd.config import semantic
from proxyd.config.models import GatewayConfig
from proxyd.config.redact import SECRET_PATHS
from proxyd.config.source import MAX_FILE_BYTES, Path, Source, oversize, read_yaml
from proxyd.errors import ConfigError, ConfigIssue

__all__ = [
    "EMPTY_FILE",
    "load_config",
    "load_config_text",
    "load_config_text_with_warnings",
    "load_config_with_warnings",
    "read_config_file",
]


EMPTY_FILE = ("the file sets nothing (empty, or only comments): every setting is its default, "
              "so proxyd listens on 127.0.0.1:8080 and answers every request 404")


def load_config(path: str | os.PathLike[str], env: Mapping[str, str] | None = None
                ) -> GatewayConfig:
    return load_config_with_warnings(path, env)[0]


def load_config_text(text: str, filename: str, env: Mapping[str, str] | None = None
                     ) -> GatewayConfig:
    return load_config_text_with_warnings(text, filename, env)[0]


def load_config_with_warnings(path: str | os.PathLike[str], env: Mapping[str, str] | None = None
                              ) -> tuple[GatewayConfig, list[ConfigIssue]]:
    """The config and its non-fatal findings; raises ConfigError with every problem found."""
    filename = os.fspath(path)
    return load_config_text_with_warnings(read_config_file(filename), filename, env)


def read_config_file(filename: str) -> str:
    """The file's text; never reads more than one byte past the size limit."""
    try:
        with open(filename, "rb") as f:
            head = f.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise ConfigError([ConfigIssue(filename, None, None, "",
                                       f"cannot read config file: {reason}")]) from None
    if (too_big := oversize(head, filename)) is not None:
        raise too_big
    try:
        return head.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError([ConfigIssue(filename, None, None, "",
                                       f"config file is not UTF-8: {exc.reason}")]) from None


def load_config_text_with_warnings(text: str, filename: str,
                                   env: Mapping[str, str] | None = None
                                   ) -> tuple[GatewayConfig, list[ConfigIssue]]:
    source = read_yaml(text, filename, os.environ if env is None else env)
    issues = list(source.issues)
    warnings: list[ConfigIssue] = []
    config: GatewayConfig | None = None
    try:
        config = GatewayConfig.model_validate(source.data)
    except ValidationError as exc:
        issues.extend(_translate(exc, source))
    if config is not None:
        # Semantic checks need a well-typed config, so they run only once the models accept
        # the file; structural problems (duplicates, unset variables) do not stop them.
        report = semantic.check(config)
        pos = source.positions
        issues.extend(pos.issue(f.path, f.message, on_key=f.on_key)
                      for f in report.errors if not source.is_tainted(f.path))
        warnings = [pos.issue(f.path, f.message, on_key=f.on_key) for f in report.warnings]
    if issues or config is None:
        raise ConfigError(_in_file_order(issues))
    if not source.data:
        # Valid, and easy to mistake for a file that was read: a mount that came up empty, a
        # config written to another path. Say so before anything else.
        warnings.insert(0, ConfigIssue(filename, None, None, "", EMPTY_FILE))
    return config, _in_file_order(warnings)


def _in_file_order(issues: list[ConfigIssue]) -> list[ConfigIssue]:
    unique = list(dict.fromkeys(issues))  # union branches can repeat one problem verbatim
    return sorted(unique, key=lambda i: (i.line or 0, i.column or 0))


# --- pydantic errors → located issues -----------------------------------------------------------

def _translate(exc: ValidationError, source: Source) -> list[ConfigIssue]:
    issues: list[ConfigIssue] = []
    pos = source.positions
    for err in exc.errors(include_url=False):
        path, on_key = _data_path(err, source.data)
        if source.is_tainted(path):
            continue
        kind = err["type"]
        if kind == "missing":
            # Point at the mapping that lacks the key: its own key line if it has one.
            parent = path[:-1]
            mark = pos.keys.get(parent) or pos.locate(parent)
            issues.append(pos.issue(path, "required key is missing", mark=mark))
        elif kind == "extra_forbidden":
            issues.append(pos.issue(path, _unknown_key(path), on_key=True))
        elif path in SECRET_PATHS:
            # The message would quote the value: say what is wrong without the secret.
            message = _message(err).split(", got ")[0]
            hint = "; quote it to make it a string" if kind == "string_type" else ""
            issues.append(pos.issue(path, f"{message} (the value is a secret: not shown{hint})",
                                    on_key=on_key))
        else:
            issues.append(pos.issue(path, _message(err), on_key=on_key))
    return issues


def _data_path(err: ErrorDetails, data: Any) -> tuple[Path, bool]:
    """The pydantic ``loc`` without union-branch tags; plus whether it names a key."""
    path: list[str | int] = []
    node: Any = data
    on_key = False
    for el in err["loc"]:
        in_dict = isinstance(node, dict) and el in node
        if in_dict or (isinstance(node, list) and isinstance(el, int) and 0 <= el < len(node)):
            node = node[el]
        elif el == "[key]":
            on_key = True
            continue
        elif err["type"] == "missing" or _model_has_field(tuple(path), el):
            node = None  # beyond what the user wrote: a missing key, or a field a validator added
        else:
            continue  # a union tag such as 'int' or "literal['auto']": not a place in the file
        path.append(el)
    return tuple(path), on_key


def _unwrap(tp: Any) -> Any:
    """Strip Annotated and Optional so the walk below sees the container or model type."""
    while True:
        origin = get_origin(tp)
        if origin is Annotated:
            tp = get_args(tp)[0]
        elif origin in (Union, types.UnionType):
            args = [a for a in get_args(tp) if a is not type(None)]
            structured = [a for a in args if get_origin(a) in (list, dict) or _is_model(a)]
            tp = (structured or args)[0]
        else:
            return tp


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _model_at(path: Path) -> type[BaseModel] | None:
    """The model class that validates the mapping at ``path`` (for its valid key names)."""
    tp: Any = GatewayConfig
    for el in path:
        tp = _unwrap(tp)
        if _is_model(tp) and isinstance(el, str) and el in tp.model_fields:
            tp = tp.model_fields[el].annotation
        elif get_origin(tp) is list and isinstance(el, int):
            tp = get_args(tp)[0]
        elif get_origin(tp) is dict and isinstance(el, str):
            tp = get_args(tp)[1]
        else:
            return None
    tp = _unwrap(tp)
    return tp if _is_model(tp) else None


def _model_has_field(path: Path, name: str | int) -> bool:
    model = _model_at(path)
    return model is not None and isinstance(name, str) and name in model.model_fields


def _unknown_key(path: Path) -> str:
    key = str(path[-1])
    model = _model_at(path[:-1])
    valid = sorted(model.model_fields) if model else []
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    if close:
        return f"unknown key '{key}', did you mean '{close[0]}'?"
    if valid:
        return f"unknown key '{key}' (valid keys: {', '.join(valid)})"
    return f"unknown key '{key}'"


def _describe(value: Any) -> str:
    if value is None:
        return "an empty value"
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str):
        return repr(value)
    kind = "an integer" if isinstance(value, int) else type(value).__name__
    return f"{value!r} ({kind})"


_EXPECTED = {
    "model_type": "a mapping", "model_attributes_type": "a mapping", "dict_type": "a mapping",
    "list_type": "a list", "string_type": "a string", "int_type": "an integer",
    "int_parsing": "an integer", "int_from_float": "a whole number", "float_type": "a number",
    "float_parsing": "a number", "bool_type": "true or false", "bool_parsing": "true or false",
}


_BOUNDS = {"greater_than_equal": "at least", "greater_than": "greater than",
           "less_than_equal": "at most", "less_than": "less than"}


def _message(err: ErrorDetails) -> str:
    kind, value = err["type"], err.get("input")
    if kind in _EXPECTED:
        hint = " (quote it to make it a string)" if kind == "string_type" else ""
        return f"expected {_EXPECTED[kind]}, got {_describe(value)}{hint}"
    if kind == "literal_error":
        expected = str((err.get("ctx") or {}).get("expected", ""))
        message = f"got {_describe(value)}, expected {expected}"
        options = re.findall(r"'([^']*)'", expected)
        close = difflib.get_close_matches(str(value), options, n=1, cutoff=0.6)
        return f"{message}; did you mean '{close[0]}'?" if close else message
    ctx = err.get("ctx") or {}
    if kind in _BOUNDS:
        bound = next(iter(ctx.values()), "?")
        return f"must be {_BOUNDS[kind]} {bound}, got {value!r}"
    if kind == "too_short" and "min_length" in ctx:
        n = ctx["min_length"]
        return "must not be empty" if n == 1 else f"needs at least {n} items"
    message = err["msg"]
    # Our own parsers' ValueErrors already say what is wrong; pydantic's prefix adds nothing.
    return message.removeprefix("Value error, ")
