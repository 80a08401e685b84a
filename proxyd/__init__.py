"""proxyd: a declarative, YAML-configured reverse proxy and API gateway daemon."""

from __future__ import annotations

import os
import sys
from importlib.machinery import SOURCE_SUFFIXES, FileFinder, ModuleSpec, SourceFileLoader
from typing import Any

__version__ = "0.1.0"


class _SourceOnly:
    """PROXYD_PURE=1: proxyd's modules load from their source even where the compiled data
    plane sits beside it (setup.py). For profiling Python (py-spy sees no compiled frames),
    for a test run of the pure package, and for a developer who edits a compiled module and
    has not rebuilt. All or nothing: compiled modules use each other's classes directly."""

    @staticmethod
    def find_spec(name: str, path: Any = None, target: Any = None) -> ModuleSpec | None:
        if not name.startswith("proxyd.") or path is None:
            return None
        for entry in path:
            spec = FileFinder(entry, (SourceFileLoader, SOURCE_SUFFIXES)).find_spec(name)
            if spec is not None:
                return spec
        return None


if os.environ.get("PROXYD_PURE") == "1" and _SourceOnly not in sys.meta_path:
    sys.meta_path.insert(0, _SourceOnly)


def compiled() -> bool:
    """Whether the data plane runs compiled (``proxyd --version``, /status): where its
    modules load from, found without importing them."""
    from importlib.util import find_spec

    spec = find_spec("proxyd.proxy.connection")
    return spec is not None and spec.origin is not None and not spec.origin.endswith(".py")


def build() -> str:
    """The build's name as operators see it: setup.py compiled it, or PROXYD_PURE=1 / no
    compiler left it pure."""
    return "compiled" if compiled() else "pure-Python"
