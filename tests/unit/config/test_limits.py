"""The reader's limits: a small file must never become a large amount of work.

Each hostile file is read by a real ``load_config`` in its own Python process, under a deadline
and a cap on its address space: a reader that lost its bounds fails the test (timeout, memory
error, or a traceback instead of a located error) without taking the machine down with it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from proxyd.config import ConfigError, load_config_text
from proxyd.config.source import MAX_DEPTH, MAX_FILE_BYTES, MAX_NODES

DEADLINE = 60.0  # seconds for the whole child process; a bounded read takes one or two
WITHIN = 15.0  # seconds for the read itself, measured in the child
CAP = 2 * 1024 * 1024 * 1024  # address space; a bounded read needs a fraction of it

READ = textwrap.dedent("""
    import dataclasses, json, resource, sys, time
    cap = int(sys.argv[2])
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS,
                       (cap if hard == resource.RLIM_INFINITY else min(cap, hard), hard))
    from proxyd.config import ConfigError, load_config
    started = time.monotonic()
    try:
        load_config(sys.argv[1], {})
        issues = None
    except ConfigError as exc:
        issues = [dataclasses.asdict(issue) for issue in exc.issues]
    print(json.dumps({"issues": issues, "seconds": time.monotonic() - started}))
""")


def refused(path: Path) -> dict[str, Any]:
    """The one issue ``load_config`` raised for ``path``, read in a bounded child process."""
    try:
        done = subprocess.run([sys.executable, "-c", READ, str(path), str(CAP)],
                              capture_output=True, text=True, timeout=DEADLINE, check=False)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"reading {path.name} did not end within {DEADLINE}s") from None
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert result["seconds"] < WITHIN, result
    assert result["issues"] is not None, f"{path.name} was accepted"
    (issue,) = result["issues"]
    assert issue["file"] == str(path)
    assert isinstance(issue["line"], int) and isinstance(issue["column"], int), issue
    return dict(issue)


def char_at(text: str, issue: dict[str, Any]) -> str:
    return text.splitlines()[issue["line"] - 1][issue["column"] - 1]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "gateway.yaml"
    path.write_text(text)
    return path


def test_alias_bomb(tmp_path: Path) -> None:
    # 350 bytes; 9 ** 8 (43 million) values once expanded.
    lines = ["a0: &a0 [x,x,x,x,x,x,x,x,x]"]
    lines += [f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 9)]
    text = "\n".join(lines) + "\n"
    assert len(text) < 400
    issue = refused(write(tmp_path, text))
    assert issue["message"].startswith(f"aliases expand the config past {MAX_NODES:,} keys")
    assert char_at(text, issue) == "*"  # the alias whose expansion went over


def test_billion_laughs(tmp_path: Path) -> None:
    lines = ['lol: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for prev, name in zip("abcdefgh", "bcdefghi", strict=True):
        lines.append(f"{name}: &{name} [" + ",".join([f"*{prev}"] * 9) + "]")
    text = "\n".join(lines) + "\n"
    issue = refused(write(tmp_path, text))
    assert "aliases expand" in issue["message"]
    assert char_at(text, issue) == "*"


def test_merge_keys_count_as_expansion(tmp_path: Path) -> None:
    # One mapping of 1,000 keys merged into 250 others: 250,000 pairs from 12 KiB.
    keys = ", ".join(f"k{i}: {i}" for i in range(1000))
    text = f"base: &base {{{keys}}}\n" + "".join(
        f"m{i}: {{<<: *base}}\n" for i in range(250))
    issue = refused(write(tmp_path, text))
    assert "aliases expand" in issue["message"]
    assert issue["line"] > 1


def test_deep_flow_nesting(tmp_path: Path) -> None:
    text = "x: " + "[" * 50_000 + "]" * 50_000 + "\n"
    issue = refused(write(tmp_path, text))
    assert issue["message"] == f"nested deeper than {MAX_DEPTH} levels"
    # The top-level mapping is the first level: the first bracket past the limit.
    assert (issue["line"], issue["column"]) == (1, len("x: ") + MAX_DEPTH)


def test_deep_block_sequences(tmp_path: Path) -> None:
    text = "x:\n  " + "- " * 50_000 + "leaf\n"
    issue = refused(write(tmp_path, text))
    assert issue["message"] == f"nested deeper than {MAX_DEPTH} levels"
    assert (issue["line"], issue["column"]) == (2, 3 + 2 * (MAX_DEPTH - 1))


def test_deep_block_mappings(tmp_path: Path) -> None:
    text = "".join(" " * level + f"k{level}:\n" for level in range(200)) + " " * 200 + "leaf\n"
    issue = refused(write(tmp_path, text))
    assert issue["message"] == f"nested deeper than {MAX_DEPTH} levels"
    # The mapping at depth MAX_DEPTH + 1 starts at its first key.
    assert (issue["line"], issue["column"]) == (MAX_DEPTH + 1, MAX_DEPTH + 1)


def test_aliases_cannot_nest_past_the_depth_limit(tmp_path: Path) -> None:
    # Each anchor is within the limit; an alias inside another puts the leaf 100 deep.
    inner = "[" * 50 + "leaf" + "]" * 50
    outer = "[" * 50 + "*inner" + "]" * 50
    text = f"a: &inner {inner}\nb: {outer}\n"
    issue = refused(write(tmp_path, text))
    assert issue["message"] == f"nested deeper than {MAX_DEPTH} levels"
    assert char_at(text, issue) == "*"
    assert issue["line"] == 2


def test_too_many_values_without_aliases(tmp_path: Path) -> None:
    text = "x: [" + ",".join(["1"] * (MAX_NODES + 10)) + "]\n"
    assert len(text.encode()) < MAX_FILE_BYTES
    issue = refused(write(tmp_path, text))
    assert issue["message"] == f"the config holds more than {MAX_NODES:,} keys and values"
    assert issue["line"] == 1


def test_oversize_file(tmp_path: Path) -> None:
    line = "# " + "padding " * 10 + "\n"
    text = line * (MAX_FILE_BYTES // len(line) + 10)
    issue = refused(write(tmp_path, text))
    assert issue["message"].startswith("config file is larger than 1 MiB")
    within = text.encode()[:MAX_FILE_BYTES].decode()
    assert issue["line"] == within.count("\n") + 1
    assert issue["column"] == len(within) - within.rfind("\n")


def test_a_huge_file_is_not_read(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    with open(path, "wb") as f:
        f.truncate(8 * 1024 * 1024 * 1024)  # sparse: 8 GiB of zeros, no disk used
    issue = refused(path)
    assert issue["message"].startswith("config file is larger than 1 MiB")
    assert (issue["line"], issue["column"]) == (1, MAX_FILE_BYTES + 1)


def test_text_over_the_size_limit() -> None:
    text = "# é\n" * (MAX_FILE_BYTES // 5 + 10)  # 5 bytes a line: under the limit in characters
    assert len(text) <= MAX_FILE_BYTES < len(text.encode())
    with pytest.raises(ConfigError) as info:
        load_config_text(text, "g.yaml", {})
    (issue,) = info.value.issues
    assert issue.message.startswith("config file is larger than 1 MiB")
    # The first MAX_FILE_BYTES bytes end one byte into a line: its second character crosses.
    assert (issue.line, issue.column) == (MAX_FILE_BYTES // 5 + 1, 2)


def test_a_large_real_config_is_within_the_limits() -> None:
    routes = "".join(
        f"  - name: r{i}\n    match: {{path_prefix: /p{i}/, methods: [GET, POST]}}\n"
        f"    upstream: origin\n"
        for i in range(3000))
    text = ("upstreams:\n  origin:\n    targets: ['http://127.0.0.1:1']\n"
            f"routes:\n{routes}")
    assert len(text.encode()) > MAX_FILE_BYTES // 8
    config = load_config_text(text, "g.yaml", {})
    assert len(config.routes) == 3000
