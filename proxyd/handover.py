"""Handing a master's descriptors to a new master process, which it starts itself.

The running master (the predecessor) starts ``python -P -m proxyd run -c FILE`` with every
listening socket, the admin port's socket, one end of a control socketpair and a copy of its
own stderr as inherited descriptors, named in ``PROXYD_UPGRADE``. The new master's stderr
starts as a pipe the predecessor relays to the log, keeping its tail: whatever it prints before
it can speak on the channel (an import error, a config error) is quoted when it fails. Why
inherited descriptors rather than SCM_RIGHTS: docs/architecture.md, "Upgrading the code". What
the two masters say to each other, and when, is upgrade.py's.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from proxyd import __version__
from proxyd.config.types import HostPort
from proxyd.control import Channel
from proxyd.sockets import SocketSet

ENV = "PROXYD_UPGRADE"
STDERR_TAIL = 4096  # bytes of the successor's early output quoted when it fails

Named = list[tuple[str, int, socket.socket]]  # (host:port, slot, socket)


# -- the successor's side ---------------------------------------------------------------------


@dataclass
class Inheritance:
    """What a successor was handed by its predecessor."""

    channel: socket.socket
    admin: socket.socket | None
    listeners: Named
    stderr: int  # the predecessor's stderr, to write to once it no longer relays ours
    from_pid: int
    from_version: str


def inherited() -> Inheritance | None:
    """The handover named in the environment, if this process is a successor (read once: the
    variable is removed, so a later upgrade or a worker never sees it)."""
    raw = os.environ.pop(ENV, None)
    if not raw:
        return None
    data = json.loads(raw)

    def adopt(fd: int) -> socket.socket:
        sock = socket.socket(fileno=fd)
        sock.set_inheritable(False)
        sock.setblocking(False)
        return sock

    return Inheritance(
        channel=adopt(int(data["channel"])),
        admin=adopt(int(data["admin"])) if data.get("admin") is not None else None,
        listeners=[(str(e["listen"]), int(e["slot"]), adopt(int(e["fd"])))
                   for e in data["listeners"]],
        stderr=int(data["stderr"]), from_pid=int(data["from_pid"]),
        from_version=str(data["from_version"]))


def speak_for_self(inheritance: Inheritance) -> None:
    """Write to the predecessor's stderr from now on, not the pipe it relays: the workers
    forked next inherit it, and they outlive the predecessor."""
    os.dup2(inheritance.stderr, 2)
    os.close(inheritance.stderr)


def adopt_sockets(inheritance: Inheritance, sockets: SocketSet,
                  listeners: Sequence[HostPort]) -> None:
    """Take the predecessor's sockets for the listeners this config has (the same kernel
    sockets its workers accept on); let go of the others (ours is not their last copy)."""
    by_name = {str(listener): listener for listener in listeners}
    for listen, slot, sock in inheritance.listeners:
        listener = by_name.get(listen)
        if listener is None:
            sock.close()
        else:
            sockets.adopt((listener, slot), sock)


def take_over_watchdog(inheritance: Inheritance) -> None:
    """systemd named the predecessor in WATCHDOG_PID; the pings are this process's now."""
    if os.environ.get("WATCHDOG_PID") == str(inheritance.from_pid):
        os.environ["WATCHDOG_PID"] = str(os.getpid())


# -- the predecessor's side ---------------------------------------------------------------------


@dataclass
class Successor:
    """A new master being started by this one."""

    pid: int
    channel: Channel
    exited: asyncio.Future[int]
    stderr_tail: bytearray


def command(config_path: str, pid_file: str | None) -> list[str]:
    """The new master's command line: this one's, with the code installed now. ``-P``: the
    working directory is not searched first (from a source checkout, or wherever an operator
    ran the first master, it would shadow the installed package)."""
    args = [sys.executable, "-P", "-m", "proxyd", "run", "-c", config_path]
    return args + (["--pid-file", pid_file] if pid_file else [])


async def spawn(config_path: str, pid_file: str | None,
                listeners: Named, admin: socket.socket | None,
                exited: asyncio.Future[int]) -> Successor:
    """Start the new master with the sockets; its stderr is a pipe relayed to ours."""
    ours, theirs = socket.socketpair()
    read_end, write_end = os.pipe()
    stderr = os.dup(2)
    passed = [theirs.fileno(), stderr, *(s.fileno() for _, _, s in listeners)]
    if admin is not None:
        passed.append(admin.fileno())
    handover = {"channel": theirs.fileno(), "stderr": stderr,
                "admin": admin.fileno() if admin is not None else None,
                "listeners": [{"listen": listen, "slot": slot, "fd": s.fileno()}
                              for listen, slot, s in listeners],
                "from_pid": os.getpid(), "from_version": __version__}
    env = {**os.environ, ENV: json.dumps(handover)}
    try:
        for fd in passed:
            os.set_inheritable(fd, True)
        pid = os.posix_spawn(sys.executable, command(config_path, pid_file), env,
                             file_actions=[(os.POSIX_SPAWN_DUP2, write_end, 2)],
                             setsigdef=(signal.SIGPIPE,))
    finally:
        for fd in passed:
            with contextlib.suppress(OSError):
                os.set_inheritable(fd, False)
        os.close(write_end)
        os.close(stderr)
        theirs.close()
    tail = bytearray()
    _relay(read_end, tail)
    return Successor(pid, await Channel.open(ours), exited, tail)


def watch_exit(pid: int, exited: Callable[[], None]) -> None:
    """Learn of the successor's exit at once (a pidfd), not at the master's next tick."""
    with contextlib.suppress(AttributeError, OSError):
        pidfd = os.pidfd_open(pid)
        loop = asyncio.get_running_loop()

        def readable() -> None:
            loop.remove_reader(pidfd)
            os.close(pidfd)
            exited()

        loop.add_reader(pidfd, readable)


def _relay(fd: int, tail: bytearray) -> None:
    """Copy the successor's early output to our stderr, keeping its last bytes."""
    loop = asyncio.get_running_loop()
    os.set_blocking(fd, False)

    def readable() -> None:
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            loop.remove_reader(fd)
            os.close(fd)
            return
        with contextlib.suppress(OSError):
            os.write(2, data)
        tail.extend(data)
        del tail[:-STDERR_TAIL]

    loop.add_reader(fd, readable)


async def wait_ready(successor: Successor, timeout: float) -> dict[str, Any] | str:
    """The successor's ``ready`` message, or why it will not come."""
    receive = asyncio.ensure_future(successor.channel.receive())
    either: set[asyncio.Future[Any]] = {receive, successor.exited}
    try:
        done, _ = await asyncio.wait(either, timeout=timeout,
                                     return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not receive.done():
            receive.cancel()
    if receive in done and (message := receive.result()) is not None:
        if message.get("type") == "ready":
            return message
        return str(message.get("error") or f"the new master said {message!r}")
    if not done:
        return f"the new master was not ready within {timeout:.0f}s"
    if receive in done:  # the channel closed: its exit follows
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(successor.exited), 5.0)
    code = successor.exited.result() if successor.exited.done() else None
    said = _said(successor.stderr_tail)
    how = f"exited with status {code}" if code is not None else "closed its channel"
    return f"the new master (pid {successor.pid}) {how} before it was ready" + (
        f": {said}" if said else "")


def _said(tail: bytearray) -> str:
    lines = [line for line in tail.decode(errors="replace").splitlines() if line.strip()]
    return "\n".join(lines[-12:])


def stop(successor: Successor) -> None:
    """Stop a successor given up on: it drains what its workers took, then exits. (Not once
    reaped: its pid may name another process by now.)"""
    if not successor.exited.done():
        with contextlib.suppress(ProcessLookupError):
            os.kill(successor.pid, signal.SIGTERM)
    successor.channel.close()


