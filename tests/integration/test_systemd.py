"""sd_notify: the datagrams systemd would see, in order, from the master's pid."""

from __future__ import annotations

import contextlib
import signal
import socket
import struct
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.conftest import Origin, Ports, StartProxyd, make_config, wait_until

_UCRED = struct.Struct("iII")  # pid, uid, gid


@dataclass
class Notification:
    pid: int  # the sender, from SCM_CREDENTIALS (systemd's NotifyAccess=main checks it)
    fields: dict[str, str]
    at_usec: int  # CLOCK_MONOTONIC when received

    @property
    def kind(self) -> str:
        for key in ("READY", "RELOADING", "STOPPING", "WATCHDOG"):
            if self.fields.get(key) == "1":
                return key
        return "OTHER"


class NotifySocket:
    """$NOTIFY_SOCKET's receiving end, read all the time as systemd reads it: a unix datagram
    socket holds only net.unix.max_dgram_qlen (10) unread messages, and past that the sender's
    sd_notify blocks, and with it the master's loop (watchdog pings fill it within seconds)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.received: list[Notification] = []
        self._lock = threading.Lock()  # one reader at a time: ``received`` keeps their order
        self._closed = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while not self._closed.is_set():
            with self._lock:
                self._receive(0.05)  # then looks whether it should stop

    def _receive(self, wait: float) -> bool:
        """One datagram into ``received``, waiting up to ``wait`` seconds; False if none."""
        self.sock.settimeout(wait)
        try:
            data, ancdata, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(_UCRED.size))
        except (BlockingIOError, TimeoutError):
            return False
        now = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        pid = -1
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid = _UCRED.unpack(payload[: _UCRED.size])[0]
        fields = dict(line.split("=", 1) for line in data.decode().splitlines() if line)
        self.received.append(Notification(pid, fields, now))
        return True

    def poll(self) -> list[Notification]:
        """Everything received, including what was sent up to now."""
        with self._lock:
            while self._receive(0):
                pass
        return self.received

    def kinds(self, *, watchdog: bool = False) -> list[str]:
        return [n.kind for n in self.poll() if watchdog or n.kind != "WATCHDOG"]

    def close(self) -> None:
        self._closed.set()
        self._reader.join()
        self.sock.close()


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[NotifySocket]:
    directory = tmp_path
    cleanup = None
    if len(str(tmp_path / "notify.sock")) > 100:  # sun_path holds 108 bytes
        cleanup = tempfile.TemporaryDirectory(prefix="proxyd-")
        directory = Path(cleanup.name)
    ns = NotifySocket(directory / "notify.sock")
    try:
        yield ns
    finally:
        ns.close()
        if cleanup is not None:
            with contextlib.suppress(OSError):
                cleanup.cleanup()


async def test_sd_notify_start_reload_stop_and_watchdog(
    origin: Origin, proxyd: StartProxyd, notify_socket: NotifySocket
) -> None:
    ports = Ports()
    env = {"NOTIFY_SOCKET": str(notify_socket.path), "WATCHDOG_USEC": "200000"}
    p = await proxyd(make_config(ports, origin.url), ports=ports, env=env)

    await wait_until(lambda: "READY" in notify_socket.kinds(), 5.0, "READY=1")
    ready = next(n for n in notify_socket.received if n.kind == "READY")
    assert ready.fields.get("MAINPID") == str(p.pid)
    assert ready.fields.get("STATUS"), ready.fields
    # WATCHDOG_USEC=200ms: a ping at least every 100 ms.
    await wait_until(lambda: notify_socket.kinds(watchdog=True).count("WATCHDOG") >= 3, 5.0,
                     "WATCHDOG=1 pings")

    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    p.signal(signal.SIGHUP)
    await p.wait_generation(2)
    await wait_until(lambda: notify_socket.kinds() == ["READY", "RELOADING", "READY"], 5.0,
                     f"RELOADING=1 then READY=1 (got {notify_socket.kinds()})")
    reloading = next(n for n in notify_socket.received if n.kind == "RELOADING")
    stamp = int(reloading.fields["MONOTONIC_USEC"])
    assert before <= stamp <= reloading.at_usec, (before, stamp, reloading.at_usec)
    reready = [n for n in notify_socket.received if n.kind == "READY"][-1]
    assert "generation 2" in reready.fields.get("STATUS", ""), reready.fields

    p.signal(signal.SIGTERM)
    assert await p.wait_exit(15.0) == 0, p.log()
    assert notify_socket.kinds() == ["READY", "RELOADING", "READY", "STOPPING"]
    senders = {n.pid for n in notify_socket.poll()}
    assert senders == {p.pid}, f"notifications from {senders}, not only the master {p.pid}"
