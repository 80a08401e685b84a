"""What the master reacts to, as values: signals, worker news, requests from the admin port.

Whoever learns of something (a signal handler, a worker's control channel, the supervision
tick, the admin port, the config watcher) only puts one of these on the master's queue; the
master takes them one at a time (master.py, ``Master._handle``).
"""

from __future__ import annotations

import asyncio
import enum
import signal
from dataclasses import dataclass

from proxyd.master_api import ReloadResult, UpgradeResult
from proxyd.worker_process import WorkerProcess


class Event(enum.Enum):
    HUP = "hup"
    TERM = "term"
    INT = "int"
    QUIT = "quit"
    USR1 = "usr1"
    TTIN = "ttin"
    TTOU = "ttou"
    USR2 = "usr2"  # upgrade the code
    CHLD = "chld"  # a child may have exited
    RECONCILE = "reconcile"  # something changed that may call for a spawn or a drain


@dataclass(frozen=True)
class Reload:  # POST /reload: the SIGHUP path, with the result for the caller
    reply: asyncio.Future[ReloadResult]


@dataclass(frozen=True)
class Upgrade:  # POST /upgrade: the SIGUSR2 path, with the result for the caller
    reply: asyncio.Future[UpgradeResult]


@dataclass(frozen=True)
class Retire:  # the worker reached max_requests
    worker: WorkerProcess


@dataclass(frozen=True)
class Unresponsive:  # a ready worker sent nothing for HEARTBEAT_TIMEOUT
    worker: WorkerProcess


Message = Event | Reload | Upgrade | Retire | Unresponsive

SIGNALS: dict[signal.Signals, Event] = {
    signal.SIGHUP: Event.HUP, signal.SIGTERM: Event.TERM, signal.SIGINT: Event.INT,
    signal.SIGQUIT: Event.QUIT, signal.SIGUSR1: Event.USR1, signal.SIGTTIN: Event.TTIN,
    signal.SIGTTOU: Event.TTOU, signal.SIGUSR2: Event.USR2,
}
