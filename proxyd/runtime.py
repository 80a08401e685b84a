"""Where a running master says how to reach it: a small state file per config file.

``proxyd reload -c FILE`` (the systemd unit's ExecReload) must find the instance that serves
FILE even when FILE is the broken edit it is about to reload: reading the admin address from
FILE itself would then fail, and the reload would be reported as "unreachable" instead of as
the rejection it is. So the master writes its pid and admin address at start and after each
reload (the admin port may move), keyed by the config file's absolute path, and removes the
file when it stops. The CLI reads it first, then FILE, then the default address.

The directory is systemd's RuntimeDirectory ($RUNTIME_DIRECTORY, set for ExecStart and
ExecReload alike) when there is one, else a directory of the user's own.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any


def _directories() -> list[Path]:
    """Where a state file may be, the preferred first."""
    found = []
    if runtime := os.environ.get("RUNTIME_DIRECTORY"):
        found.append(Path(runtime.split(":")[0]))
    found.append(Path("/run/proxyd"))
    if xdg := os.environ.get("XDG_RUNTIME_DIR"):
        found.append(Path(xdg) / "proxyd")
    found.append(Path(tempfile.gettempdir()) / f"proxyd-{os.getuid()}")
    return found


def _name(config_path: str) -> str:
    digest = hashlib.sha256(os.path.abspath(config_path).encode()).hexdigest()[:16]
    return f"master-{digest}.json"


def write_state(config_path: str, admin: str) -> Path | None:
    """Record this process as the master serving ``config_path``; None if no directory
    could take the file (the CLI then reads the config file, as before)."""
    data = json.dumps({"pid": os.getpid(), "admin": admin,
                       "config": os.path.abspath(config_path)})
    for directory in _directories():
        try:
            if directory.name.startswith("proxyd-"):  # ours alone: others may not plant one
                directory.mkdir(mode=0o700, exist_ok=True)
                if not _ours(directory):
                    continue
            path = directory / _name(config_path)
            temporary = path.with_suffix(f".{os.getpid()}.tmp")
            temporary.write_text(data)
            temporary.replace(path)  # whole or not at all, for a reader at any moment
            return path
        except OSError:
            continue
    return None


def remove_state(config_path: str) -> None:
    for directory in _directories():
        path = directory / _name(config_path)
        with contextlib.suppress(OSError, ValueError):
            if json.loads(path.read_text()).get("pid") == os.getpid():
                path.unlink()


def read_state(config_path: str) -> dict[str, Any] | None:
    """The running master's record for ``config_path``: {pid, admin, config}; None when there
    is none, or its process is gone."""
    for directory in _directories():
        try:
            if directory.name.startswith("proxyd-") and not _ours(directory):
                continue  # a directory someone else made could point the token elsewhere
            data = json.loads((directory / _name(config_path)).read_text())
        except (OSError, ValueError):
            continue
        if (isinstance(data, dict) and isinstance(data.get("pid"), int)
                and isinstance(data.get("admin"), str) and _alive(data["pid"])
                and data.get("config") == os.path.abspath(config_path)):
            return data
    return None


def write_pid_file(path: str) -> None:
    """``--pid-file``: this process is the master (at start, or once an upgrade handed over)."""
    stage_pid_file(path).replace(path)


def stage_pid_file(path: str) -> Path:
    """The pid file's content, written beside it: renamed over ``path`` it is the pid file, in
    one step that cannot fail for want of room or permission (a new master checks so before
    its predecessor lets go)."""
    temporary = Path(f"{path}.{os.getpid()}.tmp")
    temporary.write_text(f"{os.getpid()}\n")
    return temporary


def remove_pid_file(path: str) -> None:
    """Remove the pid file if it still names this process (after an upgrade it names the new
    master, which outlives this one)."""
    with contextlib.suppress(OSError, ValueError):
        if int(Path(path).read_text().strip()) == os.getpid():
            Path(path).unlink()


def _ours(directory: Path) -> bool:
    """A directory in the shared temporary directory: ours, and writable by us alone."""
    info = directory.stat()
    return info.st_uid == os.getuid() and not info.st_mode & 0o022


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's (the service's): alive
    return True
