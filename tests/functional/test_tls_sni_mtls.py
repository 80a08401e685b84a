"""TLS listeners with several certificates chosen by SNI, and client certificates (mutual TLS):
checked with curl and openssl as clients, through a real worker and origin."""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import ssl
import subprocess
from pathlib import Path
from typing import Any

import pytest
import trustme

from tests.functional.conftest import CATCH_ALL, StartProxy, Upstreams

pytestmark = pytest.mark.skipif(shutil.which("curl") is None or shutil.which("openssl") is None,
                                reason="curl and openssl are the clients here")


class Pki:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.ca = trustme.CA()
        self.client_ca = trustme.CA()
        self.ca_file = self.write("ca.pem", self.ca.cert_pem.bytes())
        self.client_ca_file = self.write("client-ca.pem", self.client_ca.cert_pem.bytes())

    def write(self, name: str, data: bytes) -> str:
        path = self.root / name
        path.write_bytes(data)
        return str(path)

    def leaf(self, name: str, *hosts: str) -> dict[str, str]:
        cert = self.ca.issue_cert(*hosts)
        chain = b"".join(b.bytes() for b in cert.cert_chain_pems)
        return {"cert": self.write(f"{name}.pem", chain),
                "key": self.write(f"{name}.key", cert.private_key_pem.bytes())}

    def client(self, name: str, ca: trustme.CA | None = None) -> tuple[str, str, bytes]:
        cert = (ca or self.client_ca).issue_cert(f"{name}@example.com", common_name=name)
        pem = self.write(f"client-{name}.pem", cert.cert_chain_pems[0].bytes())
        key = self.write(f"client-{name}.key", cert.private_key_pem.bytes())
        der = ssl.PEM_cert_to_DER_cert(cert.cert_chain_pems[0].bytes().decode())
        return pem, key, der


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path)


async def curl(port: int, name: str, pki: Pki, *extra: str) -> tuple[int, str]:
    cmd = ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "10",
           "--cacert", pki.ca_file, "--resolve", f"{name}:{port}:127.0.0.1",
           f"https://{name}:{port}/", *extra]
    done = await asyncio.to_thread(subprocess.run, cmd, capture_output=True, text=True)
    return int(done.stdout or 0), done.stderr


async def presented(port: int, name: str | None) -> str:
    """The subject of the certificate the server presents, as openssl s_client sees it."""
    cmd = ["openssl", "s_client", "-connect", f"127.0.0.1:{port}"]
    cmd += ["-servername", name] if name else ["-noservername"]
    done = await asyncio.to_thread(subprocess.run, cmd, input="", capture_output=True,
                                   text=True, timeout=10)
    pem = done.stdout[done.stdout.index("-----BEGIN CERTIFICATE-----"):
                      done.stdout.index("-----END CERTIFICATE-----") + 25]
    text = await asyncio.to_thread(subprocess.run, ["openssl", "x509", "-noout", "-ext",
                                                    "subjectAltName"],
                                   input=pem, capture_output=True, text=True)
    return text.stdout


async def tls_proxy(proxy: StartProxy, upstreams: Upstreams, tls: dict[str, Any]) -> Any:
    up = await upstreams.aiohttp()
    p = await proxy(CATCH_ALL, {"backend": up.url},
                    server={"listen": [{"address": "127.0.0.1:1", "tls": tls}]})
    return p, up


async def test_certificates_by_server_name(proxy: StartProxy, upstreams: Upstreams,
                                           pki: Pki) -> None:
    tls = {**pki.leaf("default", "default.test"), "certificates": [
        {"names": ["api.test"], **pki.leaf("api", "api.test")},
        {"names": ["*.wild.test"], **pki.leaf("wild", "*.wild.test")},
    ]}
    p, _ = await tls_proxy(proxy, upstreams, tls)
    assert "DNS:api.test" in await presented(p.port, "api.test")
    assert "DNS:*.wild.test" in await presented(p.port, "a.wild.test")
    assert "DNS:default.test" in await presented(p.port, "b.a.wild.test")  # one label only
    assert "DNS:default.test" in await presented(p.port, "wild.test")  # not the apex
    assert "DNS:default.test" in await presented(p.port, None)
    for name in ("api.test", "x.wild.test", "default.test"):
        status, err = await curl(p.port, name, pki)
        assert status == 200, (name, err)


async def test_client_certificate_required(proxy: StartProxy, upstreams: Upstreams,
                                           pki: Pki) -> None:
    tls = {**pki.leaf("server", "server.test"), "client_ca": pki.client_ca_file}
    p, up = await tls_proxy(proxy, upstreams, tls)
    pem, key, der = pki.client("alice")
    status, err = await curl(p.port, "server.test", pki, "--cert", pem, "--key", key,
                             "-H", "X-Client-Cert-Subject: CN=mallory")
    assert status == 200, err
    seen = up.seen[-1]
    (subject,) = seen.header_all("X-Client-Cert-Subject")  # the client's, not the forged one
    assert subject.startswith("CN=alice,") and "O=trustme" in subject
    assert seen.header("X-Client-Cert-Fingerprint") == hashlib.sha256(der).hexdigest()
    # No certificate, or one from another CA: the handshake fails, nothing reaches the origin.
    before = len(up.seen)
    status, _ = await curl(p.port, "server.test", pki)
    assert status == 0
    stranger_pem, stranger_key, _ = pki.client("eve", trustme.CA())
    status, _ = await curl(p.port, "server.test", pki, "--cert", stranger_pem,
                           "--key", stranger_key)
    assert status == 0
    assert len(up.seen) == before


async def test_client_certificate_optional(proxy: StartProxy, upstreams: Upstreams,
                                           pki: Pki) -> None:
    tls = {**pki.leaf("server", "server.test"), "client_ca": pki.client_ca_file,
           "client_auth": "optional", "session_tickets": False}
    p, up = await tls_proxy(proxy, upstreams, tls)
    status, err = await curl(p.port, "server.test", pki,
                             "-H", "X-Client-Cert-Fingerprint: forged")
    assert status == 200, err
    assert up.seen[-1].header("X-Client-Cert-Fingerprint") is None  # dropped, none sent
    pem, key, _ = pki.client("bob")
    status, err = await curl(p.port, "server.test", pki, "--cert", pem, "--key", key)
    assert status == 200, err
    assert (up.seen[-1].header("X-Client-Cert-Subject") or "").startswith("CN=bob,")
