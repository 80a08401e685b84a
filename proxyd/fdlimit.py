"""File descriptors: the limit a config needs, raising it at start, noticing when it runs out.

RLIMIT_NOFILE is per process: every worker has a table of that many descriptors of its own. A
worker holds one per client connection and, while it proxies a request, one per upstream
connection. When its table is full, nothing reaches proxyd's code: libuv (under uvloop) meets
EMFILE in accept() and, to keep the listening socket from waking it forever, accepts each
waiting client on a descriptor it keeps in reserve and closes it at once (the client sees its
connection end without an answer); upstream connects fail with EMFILE. So the master compares
the limit with what the config may need when it starts, and each worker checks, as it pushes
its stats, whether a descriptor is free (``ExhaustionWatch``).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import resource
import time
from collections.abc import Callable
from pathlib import Path

from proxyd.config.models import GatewayConfig

log = logging.getLogger("proxyd.worker")

OWN_FDS = 64  # a worker's own: listeners, control channel, event loop, log files, Redis, DNS
LOG_EVERY = 10.0  # seconds between two reports of exhaustion by one worker


def raise_nofile_limit() -> int:
    """Raise the soft limit to the hard one (workers inherit it); the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        # Refused (a container's policy): kept as it is; limit_warnings says if too few.
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def needed_per_worker(config: GatewayConfig) -> int | None:
    """Descriptors one worker may hold at ``max_connections``; None without that cap."""
    cap = config.server.limits.max_connections
    return 2 * cap + OWN_FDS if cap else None  # a client and an upstream connection each


def _file_max() -> int | None:
    try:
        return int(Path("/proc/sys/fs/file-max").read_text())
    except (OSError, ValueError):
        return None


def limit_warnings(config: GatewayConfig, limit: int, workers: int,
                   file_max: int | None = None) -> list[str]:
    """What is short of ``needed_per_worker``: the per-process limit, and the system's table
    (fs.file-max, read here unless given) that all the workers share."""
    need = needed_per_worker(config)
    if need is None:
        return []
    cap = config.server.limits.max_connections
    found = []
    if limit < need:
        found.append(
            f"the file descriptor limit (RLIMIT_NOFILE) is {limit}, below the {need} a worker "
            f"may need at server.limits.max_connections {cap} (a client and an upstream "
            f"connection each, and {OWN_FDS} of its own); a worker out of descriptors closes "
            "new connections without an answer. Raise the limit (systemd LimitNOFILE=, docker "
            "--ulimit nofile=, ulimit -n) or lower max_connections")
    file_max = _file_max() if file_max is None else file_max
    if file_max is not None and file_max < need * workers:
        found.append(
            f"fs.file-max is {file_max}, below the {need * workers} descriptors {workers} "
            f"workers may need together at server.limits.max_connections {cap}")
    return found


def out_of_descriptors() -> bool:
    """Whether this process could open nothing more now (its table, or the system's, full)."""
    try:
        fd = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        return exc.errno in (errno.EMFILE, errno.ENFILE)
    os.close(fd)
    return False


class ExhaustionWatch:
    """A worker's check for a full descriptor table, once a stats interval.

    Each check that finds none free is counted (``count``); the log says so at most every
    LOG_EVERY seconds, with how many checks found it since the last line.
    """

    def __init__(self, count: Callable[[], None],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.count = count
        self.clock = clock
        self.unreported = 0
        self.logged_at = -math.inf

    def check(self) -> bool:
        if not out_of_descriptors():
            return False
        self.count()
        self.unreported += 1
        now = self.clock()
        if now - self.logged_at >= LOG_EVERY:
            limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
            log.error("out of file descriptors (limit %d; checks that found none free since "
                      "the last report: %d): new connections are closed without an answer "
                      "and upstream connects fail. Raise the limit or lower "
                      "server.limits.max_connections", limit, self.unreported)
            self.logged_at, self.unreported = now, 0
        return True
