"""Small parsers for the packaging files (no third-party parsers for these formats)."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "systemd" / "proxyd.service"
PACKAGING = REPO / "packaging"
DOCKERFILE = PACKAGING / "Dockerfile"
README = REPO / "README.md"

Unit = dict[str, dict[str, list[str]]]


def parse_unit(text: str) -> Unit:
    """systemd.syntax(7): sections, ``Key=value`` (repeatable), ``#``/``;`` comments, ``\\``."""
    unit: Unit = {}
    section: dict[str, list[str]] | None = None
    pending = ""
    for raw in text.splitlines():
        line = pending + raw.strip()
        pending = ""
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            section = unit.setdefault(line[1:-1], {})
            continue
        if section is None or "=" not in line:
            raise ValueError(f"not a unit file line: {raw!r}")
        key, _, value = line.partition("=")
        section.setdefault(key.strip(), []).append(value.strip())
    return unit


def systemd_seconds(value: str) -> float:
    """``45s``, ``2min``, ``1min 30s``, ``500ms`` or a bare number of seconds."""
    units = {"ms": 0.001, "s": 1, "sec": 1, "min": 60, "m": 60, "h": 3600}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", value):
        total += float(number) * units[unit or "s"]
    return total


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` in order, with continuation lines joined."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue  # comment lines inside a continued instruction are dropped
        line = pending + stripped
        if line.endswith("\\"):
            pending = line[:-1].rstrip() + " "
            continue
        pending = ""
        instruction, _, args = line.partition(" ")
        out.append((instruction.upper(), args.strip()))
    return out


def exec_form(args: str) -> list[str] | None:
    """The argv of an exec-form (JSON array) ENTRYPOINT/CMD, None for shell form."""
    try:
        value = json.loads(args)
    except ValueError:
        return None
    return value if isinstance(value, list) and all(isinstance(v, str) for v in value) else None


def container_command() -> list[str]:
    """What the image runs: ENTRYPOINT followed by CMD (both exec form)."""
    entrypoint: list[str] = []
    cmd: list[str] = []
    for instruction, args in dockerfile_instructions(DOCKERFILE.read_text()):
        if instruction == "ENTRYPOINT":
            parsed = exec_form(args)
            assert parsed is not None, "ENTRYPOINT must be exec form: proxyd has to be PID 1"
            entrypoint = parsed
        elif instruction == "CMD":
            parsed = exec_form(args)
            assert parsed is not None, "CMD must be exec form"
            cmd = parsed
    return entrypoint + cmd


def markdown_section(text: str, heading: str) -> str:
    """The body under ``heading`` (e.g. ``### Docker``) up to the next heading of its level."""
    level = len(heading) - len(heading.lstrip("#"))
    lines = text.splitlines()
    start = lines.index(heading) + 1
    end = len(lines)
    in_code = False
    for i in range(start, len(lines)):
        if lines[i].startswith("```"):
            in_code = not in_code
        m = re.match(r"^(#+) ", lines[i])
        if not in_code and m and len(m.group(1)) <= level:
            end = i
            break
    return "\n".join(lines[start:end])


def shell_commands(markdown: str) -> list[list[str]]:
    """argv of each command in the ```sh blocks of ``markdown`` (continuations joined)."""
    commands: list[list[str]] = []
    for block in re.findall(r"```sh\n(.*?)```", markdown, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.split(" #", 1)[0].strip()
            if line and not line.startswith("#"):
                commands.append(shlex.split(line))
    return commands
