"""What ``/status`` says about the upstreams: active checks next to passive ejections."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol

from proxyd.config.models import GatewayConfig


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
