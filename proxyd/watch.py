"""``server.watch_config``: reload when the config file's content changes.

The watcher only decides *that* the file changed; the reload itself is the SIGHUP path (the
master hands in ``on_change``, which enqueues it), so an invalid edit is rejected exactly as a
bad SIGHUP is: the old generation keeps serving and ``/status`` shows the error.

Polling, not inotify: a Kubernetes ConfigMap volume updates by writing a new timestamped
directory and atomically swapping the ``..data`` symlink that ``gateway.yaml`` resolves through.
Nothing is written to the path itself, and an inotify watch on the old inode would go stale.
Stat-ing the path (following symlinks) once a second sees the new inode, costs one syscall, and
works the same for editors, ``cp``, ``mv`` and ConfigMaps. The content hash is computed only when
the stat key or the ``..data`` target moved, and a reload happens only when the hash differs, so
``touch`` or rewriting identical bytes does nothing.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger("proxyd.watch")

POLL_INTERVAL = 1.0
# A change is acted on once the file has held still this long: an editor that truncates and
# then writes must not get its half-written file reloaded (it would be rejected, then fixed).
SETTLE = 0.2
K8S_DATA_LINK = "..data"


@dataclass(frozen=True)
class FileState:
    """What the watcher knows about the file: cheap keys, and the hash they were taken with."""

    stat_key: tuple[int, int, int, int] | None  # (mtime_ns, size, inode, device)
    data_target: str | None  # where a ConfigMap's ``..data`` symlink points, if there is one
    sha256: str | None  # None while the file cannot be read


def _stat_key(path: str) -> tuple[int, int, int, int] | None:
    try:
        st = os.stat(path)  # follows symlinks: the ConfigMap swap gives a new inode here
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino, st.st_dev)


def _data_target(path: str) -> str | None:
    try:
        return os.readlink(os.path.join(os.path.dirname(path), K8S_DATA_LINK))
    except OSError:
        return None


def _sha256(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    except OSError:
        return None


def snapshot(path: str, previous: FileState | None = None) -> FileState:
    """The file's state now; the hash is reused from ``previous`` when no cheap key moved."""
    stat_key, data_target = _stat_key(path), _data_target(path)
    if (previous is not None and previous.sha256 is not None
            and stat_key == previous.stat_key and data_target == previous.data_target):
        return previous
    return FileState(stat_key, data_target, _sha256(path) if stat_key is not None else None)


def check(path: str, previous: FileState) -> tuple[bool, FileState]:
    """``(content changed since previous, new state)``.

    A file that cannot be read right now (mid-replace, deleted) is not a change: the previous
    state is kept and the next poll looks again.
    """
    current = snapshot(path, previous)
    if current.sha256 is None:
        return False, previous
    return current.sha256 != previous.sha256, current


async def watch_config(path: str, sha256: str, on_change: Callable[[], None],
                       watching: Callable[[], bool], interval: float = POLL_INTERVAL) -> None:
    """Poll ``path``; on a content change, call ``on_change`` (the SIGHUP path) while
    ``watching()`` (the master runs, and its config still asks for watching).

    ``sha256``: the running config's.
    """
    # No stat key: the first poll hashes the file and compares it with the running config's
    # hash, so an edit made between the load and now is not missed.
    state = FileState(None, None, sha256)
    log.info("watching %s for changes (every %.1fs)", path, interval)
    while True:
        await asyncio.sleep(interval)
        changed, candidate = check(path, state)
        if not changed:
            state = candidate
            continue
        await asyncio.sleep(SETTLE)
        if snapshot(path, candidate) != candidate:
            continue  # still being written: decide on the next poll
        state = candidate
        if not watching():
            continue  # stopping, or a reload turned watching off
        log.info("%s changed (sha256 %.12s); reloading", path, state.sha256)
        on_change()
