"""What the admin port may ask of the master, the answers it gets, and what ``/status`` says.

The admin server (admin.py) holds a ``MasterApi``, not the master: it reads status, asks for
a reload or a code upgrade and waits for the result, purges the workers' caches. The master
(master.py) satisfies this protocol; neither module imports the other's internals, and this one
imports neither. ``upstreams_status`` renders the status document's upstreams: active checks
next to passive ejections.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from proxyd.config.models import GatewayConfig


@dataclass(frozen=True)
class ReloadResult:
    ok: bool
    error: str | None
    generation: int
    changes: dict[str, Any] | None = None  # what the reload changed (config/diff.py)


@dataclass(frozen=True)
class UpgradeResult:
    ok: bool
    error: str | None
    pid: int | None = None  # the master serving now
    version: str | None = None  # the code it runs


class MasterApi(Protocol):
    @property
    def config(self) -> GatewayConfig: ...

    @property
    def config_path(self) -> str: ...

    @property
    def sha256(self) -> str: ...

    @property
    def generation(self) -> int: ...

    @property
    def state(self) -> str: ...

    def status(self) -> dict[str, Any]: ...

    def is_ready(self) -> bool: ...

    def request_reload(self) -> asyncio.Future[ReloadResult]: ...

    def request_upgrade(self) -> asyncio.Future[UpgradeResult]: ...

    async def purge(self, key: str | None, prefix: str | None) -> dict[str, Any]: ...

    def metrics_text(self) -> bytes: ...


# -- the status document ---------------------------------------------------------------------


class Ejecting(Protocol):
    @property
    def slot(self) -> int: ...

    @property
    def ejected(self) -> list[list[str]]: ...


def upstreams_status(config: GatewayConfig, active: dict[str, Any],
                     workers: Iterable[Ejecting]) -> dict[str, Any]:
    """Per target of every upstream: the active check's results (``checked`` false and
    ``healthy`` null without one), next to passive outlier detection: which of the live
    ready ``workers`` eject it now (each ejects on its own failures)."""
    live = list(workers)
    result: dict[str, Any] = {}
    for name, upstream in config.upstreams.items():
        result[name] = {}
        for target in upstream.targets:
            state = active.get(name, {}).get(target.url) or {}
            if not state.get("checked"):  # no active check: nothing it could say
                state = {"checked": False, "healthy": None}
            result[name][target.url] = {
                **state, "outlier_detection": upstream.outlier_detection.enabled,
                "ejected_by_workers": 0, "ejected_slots": [], "workers": len(live)}
    for worker in live:
        for name, url in worker.ejected:
            target = result.get(name, {}).get(url)
            if target is not None:
                target["ejected_by_workers"] += 1
                target["ejected_slots"].append(worker.slot)
    return result
