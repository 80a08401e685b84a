"""Listening sockets owned by the master: one SO_REUSEPORT socket per (listener, worker slot).

The master creates each socket once and holds it for its lifetime; workers inherit their slot's
sockets across fork and only ever close() their own copy. Closing the last fd of a socket in the
group would reset the connections queued on it, so a socket is closed only when its
listener or slot is gone. The master then lets go of it at once, even while a draining worker
still holds it: that worker's close is the last, and the socket leaves the group as soon as
nobody accepts on it rather than when the worker exits.

A new socket is only bound here; the worker's server listen()s on it when it starts serving.
A TCP socket joins the group at listen(), so connections are never hashed to a slot whose
worker is still starting, or never starts (a failed reload would reset them).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterable, Sequence

from proxyd.config.types import HostPort

Key = tuple[HostPort, int]  # (listener, slot)


def listen_socket(host: str, port: int, backlog: int, *, listen: bool = True) -> socket.socket:
    """A non-blocking socket in the SO_REUSEPORT group of its address (bound only: not yet)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        if listen:
            sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def socket_inode(sock: socket.socket) -> int:
    return os.fstat(sock.fileno()).st_ino


def is_listening(sock: socket.socket) -> bool:
    return bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))


class SocketSet:
    def __init__(self) -> None:
        self._socks: dict[Key, socket.socket] = {}

    def ensure(self, listeners: Sequence[HostPort], slots: int, backlog: int) -> None:
        """Bind what is missing; re-listen listening ones so a changed backlog applies.

        All-or-nothing: if one bind fails, the sockets opened by this call are closed again.
        """
        opened: list[Key] = []
        try:
            for listener in listeners:
                for slot in range(slots):
                    key = (listener, slot)
                    sock = self._socks.get(key)
                    if sock is None:
                        self._socks[key] = listen_socket(
                            listener.host, listener.port, backlog, listen=False
                        )
                        opened.append(key)
                    elif is_listening(sock):
                        sock.listen(backlog)
        except OSError:
            for key in opened:
                self._socks.pop(key).close()
            raise

    def adopt(self, key: Key, sock: socket.socket) -> None:
        """A socket handed over by the master this one upgrades (upgrade.py): the same kernel
        socket, bound and listening, that the predecessor's workers accept on."""
        self._socks[key] = sock

    def named(self) -> list[tuple[str, int, socket.socket]]:
        """(listener as text, slot, socket) for each socket: what an upgrade hands over."""
        return [(str(listener), slot, sock) for (listener, slot), sock in self._socks.items()]

    def for_slot(self, listeners: Sequence[HostPort], slot: int) -> list[socket.socket]:
        return [self._socks[(listener, slot)] for listener in listeners]

    def keys(self) -> list[Key]:
        return list(self._socks)

    def close_unused(self, wanted: Iterable[Key]) -> list[Key]:
        """Close sockets of listeners/slots that neither the config nor a live worker uses."""
        keep = set(wanted)
        gone = [key for key in self._socks if key not in keep]
        for key in gone:
            self._socks.pop(key).close()
        return gone

    def describe(self) -> list[dict[str, object]]:
        return [
            {"listen": str(listener), "slot": slot, "fd": sock.fileno(),
             "inode": socket_inode(sock), "listening": is_listening(sock)}
            for (listener, slot), sock in sorted(self._socks.items(), key=lambda kv: kv[0][1])
        ]

    def close_all(self) -> None:
        for sock in self._socks.values():
            sock.close()
        self._socks.clear()
