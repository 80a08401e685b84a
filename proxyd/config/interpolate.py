"""``${VAR}`` substitution in config scalars.

Forms (shell semantics, as operators already know them from compose files and unit files):

- ``${NAME}``            the variable's value; an error when it is unset (empty is a value)
- ``${NAME:-default}``   ``default`` when NAME is unset *or empty*
- ``${NAME:?message}``   an error carrying ``message`` when NAME is unset or empty
- ``$$``                 a literal ``$``

A ``$`` followed by anything else stays literal, so regexes such as ``^/users/\\d+$`` need no
escaping. Substitution is not recursive: a value containing ``${X}`` is taken as text, never
expanded again, so the environment cannot inject references.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

# Order matters: "$$" before "${...}", and a closed reference before the unterminated "${".
_TOKEN = re.compile(r"\$\$|\$\{(?P<body>[^}]*)\}|(?P<open>\$\{)")
_BODY = re.compile(r"(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:-|:\?)(?P<arg>.*))?", re.S)
_WHOLE = re.compile(r"\$\{[^}]*\}")


@dataclass
class Interpolated:
    text: str
    # True when the scalar was exactly one reference: only then may the substituted text be
    # re-typed by YAML's resolver (``port: ${PORT:-8080}`` becomes an int, "a${X}" stays a str).
    whole: bool = False
    errors: list[str] = field(default_factory=list)


def interpolate(text: str, env: Mapping[str, str]) -> Interpolated:
    """Substitute every reference in ``text``; problems are collected, never raised."""
    result = Interpolated(text=text)
    if "$" not in text:
        return result

    def replace(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        if m.group("open") is not None:
            result.errors.append(
                f"unterminated variable reference in {text!r} (write $$ for a literal $)"
            )
            return m.group(0)
        return _expand(m.group("body"), env, result.errors)

    result.text = _TOKEN.sub(replace, text)
    result.whole = bool(_WHOLE.fullmatch(text)) and not result.errors
    return result


def _expand(body: str, env: Mapping[str, str], errors: list[str]) -> str:
    m = _BODY.fullmatch(body)
    if m is None:
        errors.append(
            f"invalid variable reference '${{{body}}}': expected ${{NAME}}, "
            "${NAME:-default} or ${NAME:?message}"
        )
        return ""
    name, op, arg = m.group("name"), m.group("op"), m.group("arg") or ""
    value = env.get(name)
    if op == ":-":
        return value if value else arg
    if op == ":?":
        if value:
            return value
        errors.append(f"environment variable {name} is required: {arg}" if arg
                      else f"environment variable {name} is required but not set")
        return ""
    if value is None:
        errors.append(
            f"environment variable {name} is not set (use ${{{name}:-default}} for a default)"
        )
        return ""
    return value
