"""Golden config files: every valid one loads; every invalid one fails with exactly the errors in
its sibling ``NAME.expected`` (``{file}`` stands for the file's path)."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxyd.config import ConfigError, load_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
REPO = CONFIGS.parents[1]
# A fixed environment: the outcome must not depend on the machine running the tests.
ENV = {"GOLDEN_PORT": "8081"}

VALID = sorted((CONFIGS / "valid").glob("*.yaml"))
INVALID = sorted((CONFIGS / "invalid").glob("*.yaml"))
SHIPPED = [REPO / "config" / "gateway.yaml", *sorted((REPO / "config" / "examples").glob("*.yaml"))]


def test_enough_golden_files() -> None:
    assert len(VALID) >= 6
    assert len(INVALID) >= 15


@pytest.mark.parametrize("path", VALID, ids=lambda p: p.name)
def test_valid(path: Path) -> None:
    load_config(path, env=ENV)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_configs_are_valid(path: Path) -> None:
    load_config(path, env={})


@pytest.mark.parametrize("path", INVALID, ids=lambda p: p.name)
def test_invalid(path: Path) -> None:
    expected_file = path.with_suffix(".expected")
    assert expected_file.exists(), f"{path.name} has no .expected file"
    expected = expected_file.read_text().replace("{file}", str(path)).splitlines()
    with pytest.raises(ConfigError) as info:
        load_config(path, env=ENV)
    assert [str(issue) for issue in info.value.issues] == expected
