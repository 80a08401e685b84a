"""sd_notify: datagrams to $NOTIFY_SOCKET, and never a blocked caller."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from proxyd.systemd import notify


def test_not_under_systemd(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert notify("READY=1") is False


@pytest.mark.timeout(10)
def test_a_receiver_that_stops_reading_never_blocks_the_sender(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
        receiver.bind(str(path))
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        assert notify("READY=1", "STATUS=up")
        assert receiver.recv(4096) == b"READY=1\nSTATUS=up"
        # Nobody reads now: the queue fills (about ten datagrams), and then each send
        # says so at once instead of waiting for room.
        results = [notify("WATCHDOG=1") for _ in range(200)]
        assert results[0] is True
        assert results[-1] is False
