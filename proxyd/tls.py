"""TLS termination: an ``ssl.SSLContext`` per TLS listener.

Workers build their contexts after fork, from the files as they are at that moment, so a reload
(SIGHUP) picks up renewed certificates with the new generation of workers. Before a start or a
reload swaps anything, the master loads the same files once (``file_issues``): a missing or
broken certificate is a config error, and the old workers keep serving.
"""

from __future__ import annotations

import ssl

from proxyd.config.models import TLS, GatewayConfig
from proxyd.errors import ConfigIssue

VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


def _no_passphrase() -> bytes:
    # Without a callback OpenSSL would prompt on the terminal for an encrypted key (and hang a
    # daemon); proxyd reads only unencrypted keys, protected by file permissions.
    raise ValueError("the private key is encrypted; give proxyd an unencrypted key file")


def server_context(tls: TLS) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = VERSIONS[tls.min_version]
    ctx.set_alpn_protocols(["http/1.1"])
    ctx.load_cert_chain(tls.cert, tls.key, password=_no_passphrase)
    return ctx


def describe(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError):
        reason = exc.reason or exc.__class__.__name__
        return f"not a valid PEM certificate chain and matching private key ({reason})"
    if isinstance(exc, OSError):
        where = f": {exc.filename}" if exc.filename else ""
        return f"{exc.strerror or exc}{where}"
    return str(exc)


def file_issues(config: GatewayConfig, filename: str) -> list[ConfigIssue]:
    """Load every TLS listener's certificate and key; one issue per listener that fails."""
    issues = []
    for i, listener in enumerate(config.server.listen):
        tls: TLS | None = getattr(listener, "tls", None)
        if tls is None:
            continue
        try:
            server_context(tls)
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            issues.append(ConfigIssue(filename, None, None, f"server.listen[{i}].tls",
                                      f"{listener}: cannot load {tls.cert} / {tls.key}: "
                                      f"{describe(exc)}"))
    from proxyd.proxy.tls import file_issues as upstream_issues  # ca_file, client_cert

    issues.extend(upstream_issues(config, filename))
    return issues
