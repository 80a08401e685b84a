"""What the admin port may ask of the master, and the answers it gets.

The admin server (admin.py) holds a ``MasterApi``, not the master: it reads status, asks for
a reload or a code upgrade and waits for the result, purges the workers' caches. The master
(master.py) satisfies this protocol; neither module imports the other's internals, and this one
imports neither.
"""

from __future__ import annotations

import asyncio
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
