"""sd_notify without libsystemd: one datagram per message to $NOTIFY_SOCKET."""

from __future__ import annotations

import os
import socket
import time


def _address() -> str | None:
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return None
    if addr.startswith("@"):
        return "\0" + addr[1:]  # abstract namespace
    return addr


def notify(*fields: str) -> bool:
    """Send ``FIELD=value`` lines as one datagram; False when not under systemd, or when the
    datagram could not be queued at once. Never blocks: the master's loop sends these, and a
    receiver that stopped reading (a full socket queue) must not stall it — a watchdog ping
    missed is sent again at the next interval."""
    addr = _address()
    if addr is None:
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC
                       | socket.SOCK_NONBLOCK) as sock:
        try:
            sock.sendto("\n".join(fields).encode(), addr)
        except OSError:
            return False
    return True


def monotonic_usec() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def reloading() -> bool:
    return notify("RELOADING=1", f"MONOTONIC_USEC={monotonic_usec()}")


def watchdog_interval() -> float | None:
    """Half of WATCHDOG_USEC, in seconds, when systemd asked for keep-alive pings to this pid."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or not usec.isdigit():
        return None
    if pid and pid.isdigit() and int(pid) != os.getpid():
        return None
    return int(usec) / 2_000_000
