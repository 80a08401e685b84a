"""The master's state file: where the CLI finds the instance that serves a config file."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from proxyd.runtime import read_state, remove_state, write_state


@pytest.fixture
def runtime(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    directory = tmp_path / "run"
    directory.mkdir()
    monkeypatch.setenv("RUNTIME_DIRECTORY", str(directory))
    return directory


def test_written_read_and_removed(runtime: Path, tmp_path: Path) -> None:
    config = str(tmp_path / "gateway.yaml")
    path = write_state(config, "127.0.0.1:9911")
    assert path is not None and path.parent == runtime
    assert read_state(config) == {"pid": os.getpid(), "admin": "127.0.0.1:9911",
                                  "config": config}
    assert read_state(str(tmp_path / "other.yaml")) is None  # keyed by the config's path
    remove_state(config)
    assert read_state(config) is None and not list(runtime.iterdir())


def test_a_relative_path_names_the_same_file(runtime: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    write_state("gateway.yaml", "127.0.0.1:9912")
    assert read_state(str(tmp_path / "gateway.yaml")) is not None


def test_a_dead_master_is_not_found(runtime: Path, tmp_path: Path) -> None:
    config = str(tmp_path / "gateway.yaml")
    child = subprocess.run(  # a master that recorded itself, then died without removing it
        [sys.executable, "-c", "import sys; from proxyd.runtime import write_state; "
         "write_state(sys.argv[1], '127.0.0.1:9913')", config],
        env={**os.environ, "RUNTIME_DIRECTORY": str(runtime)}, check=True, timeout=60)
    assert child.returncode == 0 and list(runtime.iterdir())
    assert read_state(config) is None


def test_a_shared_directory_someone_else_could_write_is_not_trusted(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RUNTIME_DIRECTORY", raising=False)
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    config = str(tmp_path / "gateway.yaml")
    path = write_state(config, "127.0.0.1:9914")
    if path is None or path.parent.parent != tmp_path:
        pytest.skip("written to /run/proxyd on this machine")
    assert read_state(config) is not None
    path.parent.chmod(0o777)  # as if another user had made it for us
    assert read_state(config) is None
