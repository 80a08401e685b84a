"""What /proc says about a process's sockets (Linux only)."""

from __future__ import annotations

import os
import re

_SOCKET = re.compile(r"socket:\[(\d+)\]")
TCP_LISTEN = 0x0A


def socket_inodes(pid: int) -> set[int]:
    """Inodes of every socket the process has open."""
    inodes: set[int] = set()
    fd_dir = f"/proc/{pid}/fd"
    for name in os.listdir(fd_dir):
        try:
            target = os.readlink(f"{fd_dir}/{name}")
        except OSError:
            continue  # closed meanwhile
        if m := _SOCKET.fullmatch(target):
            inodes.add(int(m.group(1)))
    return inodes


def tcp_sockets(port: int) -> dict[int, int]:
    """inode → TCP state of every IPv4/IPv6 socket whose local port is ``port``."""
    found: dict[int, int] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    fields = line.split()
                    local_port = int(fields[1].rsplit(":", 1)[1], 16)
                    inode = int(fields[9])
                    if local_port == port and inode:
                        found[inode] = int(fields[3], 16)
        except FileNotFoundError:
            continue
    return found
