"""TLS towards upstreams: one SSLContext per upstream, built when the pipeline is built.

Verification is on by default (system CAs, or ``tls.ca_file``); the name sent as SNI and
checked against the certificate is ``tls.server_name`` or the target's host. Connections are
made to a resolved address, so that name is always passed explicitly.
"""

from __future__ import annotations

import ssl

from proxyd.config.models import GatewayConfig, Upstream
from proxyd.errors import ConfigIssue


def client_context(cfg: Upstream) -> ssl.SSLContext | None:
    """The context for an upstream with https:// targets; None when it has none."""
    if not any(t.url.lower().startswith("https://") for t in cfg.targets):
        return None
    tls = cfg.tls
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=tls.ca_file)
    if not tls.verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if tls.client_cert is not None:
        ctx.load_cert_chain(tls.client_cert, tls.client_key)
    ctx.set_alpn_protocols(["h2"] if cfg.protocol == "h2" else ["http/1.1"])
    return ctx


def file_issues(config: GatewayConfig, filename: str) -> list[ConfigIssue]:
    """Build every upstream's context once in the master (start, reload, check-config): a
    missing or broken ``ca_file``/``client_cert`` is a config error, not a worker crash."""
    issues = []
    for name, upstream in config.upstreams.items():
        try:
            client_context(upstream)
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            tls = upstream.tls
            files = ", ".join(f for f in (tls.ca_file, tls.client_cert, tls.client_key) if f)
            issues.append(ConfigIssue(filename, None, None, f"upstreams.{name}.tls",
                                      f"cannot load {files}: "
                                      f"{getattr(exc, 'strerror', None) or exc}"))
    return issues
