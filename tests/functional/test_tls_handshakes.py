"""Every TLS handshake on a listener ends counted: failures by a reason an operator can alert
on (and logged, throttled, with the client's address), successes by TLS version. Real clients
(curl, openssl s_client, raw sockets) against a real worker, on both event loops."""

from __future__ import annotations

import asyncio
import logging
import shutil
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest
import trustme

from proxyd import listener_tls
from proxyd.observe.throttle import ThrottledLog
from tests.functional.conftest import CATCH_ALL, Proxy, StartProxy, Upstreams, wait_for
from tests.functional.test_tls_sni_mtls import Pki, curl

pytestmark = pytest.mark.skipif(shutil.which("curl") is None or shutil.which("openssl") is None,
                                reason="curl and openssl are the clients here")


@pytest.fixture(name="pki")
def pki_fixture(tmp_path: Path) -> Pki:
    return Pki(tmp_path)


@pytest.fixture
def logged(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
           ) -> pytest.LogCaptureFixture:
    """Handshake failure lines, from a throttle of this test's own (other tests' failures in
    this process must not have used up its lines)."""
    monkeypatch.setattr(listener_tls, "HANDSHAKE_ERRORS",
                        ThrottledLog(logging.getLogger("proxyd.tls")))
    caplog.set_level(logging.WARNING, logger="proxyd.tls")
    return caplog


async def mtls_proxy(proxy: StartProxy, upstreams: Upstreams, pki: Pki,
                     **limits: Any) -> Proxy:
    up = await upstreams.aiohttp()
    listen = {"address": "127.0.0.1:1", "tls": {**pki.leaf("server", "server.test"),
                                                "client_ca": pki.client_ca_file}}
    return await proxy(CATCH_ALL, {"backend": up.url}, server={"listen": [listen]},
                       limits=limits)


def errors(p: Proxy) -> dict[str, float]:
    """gateway_tls_handshake_errors_total of the proxy's one listener, by reason."""
    listener = str(p.worker.config.server.listen[0])
    series = p.pipeline.metrics.counters["gateway_tls_handshake_errors_total"]
    return {reason: n for (name, reason), n in series.items() if name == listener}


def completed(p: Proxy) -> dict[str, float]:
    listener = str(p.worker.config.server.listen[0])
    series = p.pipeline.metrics.counters["gateway_tls_handshakes_total"]
    return {version: n for (name, version), n in series.items() if name == listener}


async def s_client(port: int, *args: str) -> str:
    cmd = ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername",
           "server.test", *args]
    done = await asyncio.to_thread(subprocess.run, cmd, input="", capture_output=True,
                                   text=True, timeout=20)
    return done.stdout + done.stderr


async def counted(p: Proxy, reason: str, n: float) -> None:
    await wait_for(lambda: errors(p).get(reason) == n, timeout=10,
                   what=f"{n:g} handshake errors counted as {reason}: {errors(p)}")


async def test_failed_handshakes_are_counted_by_reason_and_logged(
        proxy: StartProxy, upstreams: Upstreams, pki: Pki,
        logged: pytest.LogCaptureFixture) -> None:
    p = await mtls_proxy(proxy, upstreams, pki)
    pem, key, _ = pki.client("alice")
    status, err = await curl(p.port, "server.test", pki, "--cert", pem, "--key", key)
    assert status == 200, err

    # Plain HTTP to the TLS port.
    cmd = ["curl", "-sS", "--max-time", "10", f"http://127.0.0.1:{p.port}/"]
    done = await asyncio.to_thread(subprocess.run, cmd, capture_output=True)
    assert not done.stdout.startswith(b"HTTP/")
    await counted(p, "plain_http", 1)

    # A TLS 1.0 client against a listener of TLS 1.2 and later (where this openssl still
    # speaks TLS 1.0 at all, at security level 0).
    out = await s_client(p.port, "-tls1", "-cipher", "DEFAULT@SECLEVEL=0", "-CAfile",
                         pki.ca_file)
    if "no protocols available" not in out:
        await counted(p, "protocol", 1)

    # client_auth: required, and no client certificate.
    await s_client(p.port, "-CAfile", pki.ca_file)
    await counted(p, "no_certificate", 1)

    # A client certificate from another CA.
    stranger_pem, stranger_key, _ = pki.client("eve", trustme.CA())
    await s_client(p.port, "-CAfile", pki.ca_file, "-cert", stranger_pem, "-key", stranger_key)
    await counted(p, "bad_certificate", 1)

    # A client that does not trust proxyd's certificate (curl without its CA).
    cmd = ["curl", "-sS", "--max-time", "10", "--resolve", f"server.test:{p.port}:127.0.0.1",
           "--cert", pem, "--key", key, f"https://server.test:{p.port}/"]
    await asyncio.to_thread(subprocess.run, cmd, capture_output=True)
    await counted(p, "certificate_refused", 1)

    # A port check: connect, close. Counted, not logged.
    with socket.create_connection(("127.0.0.1", p.port)):
        pass
    await counted(p, "closed", 1)

    lines = [r.getMessage() for r in logged.records if r.name == "proxyd.tls"]
    for reason in ("plain_http", "no_certificate", "bad_certificate", "certificate_refused"):
        assert any(f"from 127.0.0.1 on 127.0.0.1:1 failed ({reason})" in line
                   for line in lines), (reason, lines)
    assert not any("(closed)" in line for line in lines)

    # The listener serves on, and each completed handshake is counted by version.
    before = sum(completed(p).values())
    status, err = await curl(p.port, "server.test", pki, "--cert", pem, "--key", key)
    assert status == 200, err
    await wait_for(lambda: sum(completed(p).values()) == before + 1, what="a handshake counted")
    assert set(completed(p)) <= {"TLSv1.2", "TLSv1.3"}
    assert set(errors(p)) <= set(listener_tls.HANDSHAKE_REASONS)


async def test_a_handshake_not_done_within_header_timeout_is_counted_as_timeout(
        proxy: StartProxy, upstreams: Upstreams, pki: Pki,
        logged: pytest.LogCaptureFixture) -> None:
    p = await mtls_proxy(proxy, upstreams, pki, header_timeout="500ms")
    with socket.create_connection(("127.0.0.1", p.port)) as silent:
        silent.sendall(b"\x16\x03\x01")  # the start of a ClientHello, and no more
        await counted(p, "timeout", 1)
    assert any("failed (timeout)" in r.getMessage() for r in logged.records)
    pem, key, _ = pki.client("alice")
    status, err = await curl(p.port, "server.test", pki, "--cert", pem, "--key", key)
    assert status == 200, err
