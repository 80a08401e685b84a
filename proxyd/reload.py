"""A reload as a transaction: a new generation of workers, all READY, or nothing changes.

``new_generation`` reads the file in a child process (config/isolated.py: whatever a file does
to its reader happens there, never on the master's loop), binds the sockets it needs, forks
one worker per slot and waits for every READY. Only then does the master commit (master.py):
it swaps its config and lets the reconcile step drain the old generation. A failure at any
step kills what was started and closes the sockets nobody uses. ``ReloadRecord`` keeps what
``/status``, the metrics and the log say about reloads. The protocol as a whole:
docs/architecture.md, "Reload, recycling and crash recovery".
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from proxyd.config.diff import describe
from proxyd.config.isolated import load_isolated
from proxyd.config.models import GatewayConfig
from proxyd.cpus import worker_choice
from proxyd.errors import ConfigError
from proxyd.observe.metrics import MasterMetrics
from proxyd.worker_process import READY_TIMEOUT, wait_ready
from proxyd.workers import WorkerSet

log = logging.getLogger("proxyd.master")


@dataclass(frozen=True)
class Generation:
    """A new generation, every worker READY, not yet committed."""

    config: GatewayConfig
    sha256: str
    generation: int
    count: int
    reason: str  # why this many workers (cpus.worker_choice)


async def new_generation(config_path: str, generation: int, workers: WorkerSet,
                         still_running: Callable[[], str | None]) -> Generation | str:
    """The generation ``generation`` from the file as it is now, READY; or why not.

    ``still_running``: None while the master runs, else its state (TERM may arrive while the
    file is read).
    """
    try:
        # In a child: a file that takes long or much to read costs the master nothing.
        # Its TLS files are checked there too, before any new worker is forked.
        loaded = await load_isolated(config_path)
    except ConfigError as exc:
        return str(exc)
    if (state := still_running()) is not None:
        return f"not reloading while {state}"
    config = loaded.config
    count, reason = worker_choice(config.server.workers)
    try:
        workers.sockets.ensure(config.server.listen, count, config.server.backlog)
    except OSError as exc:
        return f"cannot listen: {exc}"
    new = [workers.spawn(slot, config, generation) for slot in range(count)]
    if not await wait_ready(new, READY_TIMEOUT):
        for worker in new:
            worker.abandon()
        workers.close_unused_sockets()
        return "new workers did not become ready; old generation kept"
    return Generation(config, loaded.sha256, generation, count, reason)


class ReloadRecord:
    """Every reload's outcome, ok or not: for /status, the metrics and the log."""

    def __init__(self) -> None:
        self.last: dict[str, Any] = {"ok": None, "error": None, "at": None}
        self.counts = {"ok": 0, "failed": 0}

    def record(self, ok: bool, error: str | None, changes: dict[str, Any] | None,
               metrics: MasterMetrics, generation: int) -> None:
        result = "ok" if ok else "failed"
        self.last = {"ok": ok, "error": error, "at": time.time(), "changes": changes}
        self.counts[result] += 1
        metrics.master_counters["gateway_config_reloads_total"][(result,)] = float(
            self.counts[result])
        if ok:
            metrics.master_gauges[
                "gateway_config_last_reload_success_timestamp_seconds"] = time.time()
            log.info("reload complete: generation %d: %s", generation,
                     describe(changes) if changes is not None else "no changes")
        else:
            log.error("reload failed, old configuration keeps serving: %s", error)
