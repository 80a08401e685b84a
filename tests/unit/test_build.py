"""The compiled data plane (setup.py): what is compiled runs compiled, stale builds are caught,
and PROXYD_PURE=1 brings back the source.

``.ci/run`` sets PROXYD_REQUIRE_COMPILED=1, so CI fails if its install fell back to pure
Python; elsewhere (no C compiler) the pure package is a valid install and these tests say so.
"""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import proxyd

REPO = Path(__file__).resolve().parents[2]
COMPILED = re.findall(r'"(proxyd/[\w/]+\.py)"', (REPO / "setup.py").read_text())


def module_name(path: str) -> str:
    return path.removesuffix(".py").replace("/", ".")


def test_the_list_names_existing_modules_of_the_data_plane() -> None:
    assert len(COMPILED) >= 20, COMPILED
    for path in COMPILED:
        assert (REPO / path).is_file(), path
    assert "proxyd/proxy/connection.py" in COMPILED


def test_compiled_or_pure_as_a_whole() -> None:
    """All or nothing: compiled modules use each other's classes directly, so a mix of
    compiled and source modules of the group would make two kinds of every class."""
    kinds = {path: importlib.import_module(module_name(path)).__file__ for path in COMPILED}
    compiled = {path for path, file in kinds.items() if file and not file.endswith(".py")}
    assert compiled in (set(), set(COMPILED)), sorted(compiled)
    assert proxyd.compiled() == bool(compiled)
    if os.environ.get("PROXYD_REQUIRE_COMPILED") == "1":
        assert proxyd.compiled(), "the install fell back to pure Python (see its warnings)"
    if os.environ.get("PROXYD_PURE") == "1":
        assert not proxyd.compiled()


@pytest.mark.skipif(not proxyd.compiled(), reason="pure-Python install")
def test_no_compiled_module_is_older_than_its_source() -> None:
    """An edited module that was not rebuilt would run its old code: rebuild with
    ``pip install -e .`` (or run with PROXYD_PURE=1)."""
    # The code is in the group's library; each module's own extension is a stub that loads
    # it, which an in-place rebuild (setup.py build_ext --inplace) may leave untouched.
    group = importlib.import_module("proxyd_compiled__mypyc").__file__
    assert group is not None
    built = Path(group).stat().st_mtime
    stale = []
    for path in COMPILED:
        binary = importlib.import_module(module_name(path)).__file__
        assert binary is not None
        if (REPO / path).stat().st_mtime > max(built, Path(binary).stat().st_mtime):
            stale.append(path)
    assert not stale, f"rebuild: {stale}"


def test_no_compiled_module_left_from_an_older_list() -> None:
    """A module taken off the list keeps its old extension file in an editable tree, which
    would shadow the source (and fail to import from the new group)."""
    listed = {str(REPO / path.removesuffix(".py")) for path in COMPILED}
    extra = [str(f) for f in (REPO / "proxyd").rglob("*.so")
             if str(f).split(".", 1)[0] not in listed]
    assert not extra, f"remove: {extra}"


def test_proxyd_pure_loads_the_source() -> None:
    code = ("import proxyd, proxyd.proxy.connection as d, proxyd.middleware.chain as c; "
            "print(proxyd.compiled(), d.__file__, c.__file__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "PROXYD_PURE": "1"}, cwd=REPO, check=True).stdout
    flag, *files = out.split()
    assert flag == "False"
    assert all(f.endswith(".py") for f in files), files
