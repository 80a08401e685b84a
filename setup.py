"""Build: the data plane compiled to C with mypyc where a C compiler is at hand.

Everything else about the package is in pyproject.toml. The modules below are the per-request
path (parsers' callbacks, routing, the middleware chain, the relay, metrics, the access log);
compiled, their classes get fixed attribute layouts and their calls to each other become C
calls, which is most of what a request costs in Python (docs/architecture.md, "The compiled
build"). They must be compiled together, as one group: a compiled module uses its group's
classes directly.

PROXYD_PURE=1 at build time skips the compilation; a failed compilation (no compiler, no
Python headers) installs the pure-Python package with a warning. The same variable at run
time makes an installed compiled package load its source instead (proxyd/__init__.py).
"""

from __future__ import annotations

import os
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext

# Not observe/access_log.py: its batch formatting (f-strings with format specs, json's C
# escaper) ran slower compiled than interpreted, by more than the compiled call into it saves
# (docs/performance.md, "Costs behind the code").
COMPILED = [
    "proxyd/cache/fields.py",
    "proxyd/cache/memory.py",
    "proxyd/cache/policy.py",
    "proxyd/cache/store.py",
    "proxyd/middleware/base.py",
    "proxyd/middleware/cache.py",
    "proxyd/middleware/cache_entry.py",
    "proxyd/middleware/cache_request.py",
    "proxyd/middleware/chain.py",
    "proxyd/middleware/client_address.py",
    "proxyd/middleware/compression.py",
    "proxyd/middleware/cors.py",
    "proxyd/middleware/etag.py",
    "proxyd/middleware/headers.py",
    "proxyd/middleware/rate_limit/gcra.py",
    "proxyd/middleware/rate_limit/memory_store.py",
    "proxyd/middleware/rate_limit/middleware.py",
    "proxyd/middleware/security_headers.py",
    "proxyd/middleware/trace_id.py",
    "proxyd/middleware/validation.py",
    "proxyd/observe/metrics.py",
    "proxyd/observe/observer.py",
    "proxyd/observe/request_ids.py",
    "proxyd/proxy/connection.py",
    "proxyd/proxy/downstream.py",
    "proxyd/proxy/exchange.py",
    "proxyd/proxy/head.py",
    "proxyd/proxy/field_rules.py",
    "proxyd/proxy/h2_connection.py",
    "proxyd/proxy/h2_fields.py",
    "proxyd/proxy/h2_state.py",
    "proxyd/proxy/h2_stream.py",
    "proxyd/proxy/h2_upstream.py",
    "proxyd/proxy/lifecycle.py",
    "proxyd/proxy/limits.py",
    "proxyd/proxy/path.py",
    "proxyd/proxy/pipeline.py",
    "proxyd/proxy/request.py",
    "proxyd/proxy/response_fields.py",
    "proxyd/proxy/router.py",
    "proxyd/proxy/timers.py",
    "proxyd/proxy/upstream.py",
    "proxyd/proxy/upstream_conn.py",
]


class OptionalBuildExt(build_ext):
    """A compilation that fails leaves the pure-Python package, which works the same, slower.

    All or nothing: the modules are one group, so what was built before the failure goes too.
    """

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # noqa: BLE001  (compiler and distutils errors vary)
            for path in self.get_outputs():
                if os.path.exists(path):
                    os.remove(path)
            print(f"WARNING: proxyd's compiled data plane was not built ({exc}); "
                  "installing the pure-Python package", file=sys.stderr)
            self.extensions = []

    def get_outputs(self) -> list[str]:
        return super().get_outputs() if self.extensions else []


def ext_modules() -> list:  # type: ignore[type-arg]
    if os.environ.get("PROXYD_PURE") == "1":
        return []
    try:
        from mypyc.build import mypycify
    except ImportError:
        print("WARNING: mypyc not available; installing the pure-Python package",
              file=sys.stderr)
        return []
    # Its own type-checking cache: the developer's .mypy_cache was made with other packages
    # installed and could hide a missing one from the build environment.
    os.environ["MYPY_CACHE_DIR"] = os.path.join("build", "mypy_cache")
    try:
        return mypycify(COMPILED, opt_level="3", group_name="proxyd_compiled")  # type: ignore[no-any-return]
    except BaseException as exc:  # noqa: BLE001  (mypyc exits on a type error)
        print(f"WARNING: mypyc failed ({exc!r}); installing the pure-Python package",
              file=sys.stderr)
        return []


setup(ext_modules=ext_modules(), cmdclass={"build_ext": OptionalBuildExt})
