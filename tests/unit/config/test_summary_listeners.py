"""check-config's summary says how each listener takes its connections: TLS with its SNI
certificates and client certificates, and the PROXY protocol with whom it comes from."""

from __future__ import annotations

from pathlib import Path

import trustme

from proxyd.config import load_config_text
from proxyd.config.summary import format_summary

ROUTE = "routes:\n  - {name: r, match: {path_prefix: /}, respond: {body: hi}}\n"


def test_listener_options_are_shown(tmp_path: Path) -> None:
    ca = trustme.CA()
    leaf = ca.issue_cert("a.test")
    cert, key, client_ca = tmp_path / "c.pem", tmp_path / "k.pem", tmp_path / "ca.pem"
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    ca.cert_pem.write_to_path(str(client_ca))
    text = (
        "server:\n  listen:\n"
        "    - 127.0.0.1:8080\n"
        "    - {address: 127.0.0.1:8081, proxy_protocol: true, proxy_protocol_from: [10.0.0.0/8]}\n"
        f"    - {{address: 127.0.0.1:8443, tls: {{cert: {cert}, key: {key}, "
        f"client_ca: {client_ca}, client_auth: optional, "
        f"certificates: [{{names: [a.test, '*.b.test'], cert: {cert}, key: {key}}}]}}}}\n"
        + ROUTE)
    summary = format_summary(load_config_text(text, "g.yaml", {}), "g.yaml", [])
    line = next(x for x in summary.splitlines() if x.startswith("listeners:"))
    assert "127.0.0.1:8080, " in line
    assert "127.0.0.1:8081 (PROXY protocol from 10.0.0.0/8)" in line
    assert "1 more by SNI (2 names)" in line
    assert f"client certificates optional ({client_ca})" in line
