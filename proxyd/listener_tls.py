"""TLS termination: an ``ssl.SSLContext`` per TLS listener.

Workers build their contexts after fork, from the files as they are at that moment, so a reload
(SIGHUP) picks up renewed certificates with the new generation of workers. Before a start or a
reload swaps anything, the master loads the same files once (``file_issues``): a missing or
broken certificate is a config error, and the old workers keep serving.
"""

from __future__ import annotations

import hashlib
import logging
import ssl
from typing import Final, cast

from proxyd.config.models import TLS, GatewayConfig
from proxyd.errors import ConfigIssue
from proxyd.observe.metrics import WorkerMetrics
from proxyd.observe.throttle import ThrottledLog

VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


def _no_passphrase() -> bytes:
    # Without a callback OpenSSL would prompt on the terminal for an encrypted key (and hang a
    # daemon); proxyd reads only unencrypted keys, protected by file permissions.
    raise ValueError("the private key is encrypted; give proxyd an unencrypted key file")


def _context(tls: TLS, cert: str, key: str, http2: bool) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = VERSIONS[tls.min_version]
    # h2 first: a client that offers both gets HTTP/2 (the server's preference decides).
    ctx.set_alpn_protocols(["h2", "http/1.1"] if http2 else ["http/1.1"])
    ctx.load_cert_chain(cert, key, password=_no_passphrase)
    if not tls.session_tickets:
        ctx.options |= ssl.OP_NO_TICKET
    if tls.client_ca is not None:
        ctx.load_verify_locations(cafile=tls.client_ca)
        ctx.verify_mode = ssl.CERT_REQUIRED if tls.client_auth == "required" \
            else ssl.CERT_OPTIONAL
    return ctx


class ServerNames:
    """The certificate for a client's server name: exact names, then one-label wildcards
    (``*.example.com`` answers ``a.example.com``, not ``example.com`` or ``a.b.example.com``),
    else the listener's default certificate."""

    def __init__(self, tls: TLS, http2: bool) -> None:
        self.exact: dict[str, ssl.SSLContext] = {}
        self.wildcard: dict[str, ssl.SSLContext] = {}
        for spec in tls.certificates:
            ctx = _context(tls, spec.cert, spec.key, http2)
            for name in spec.names:
                if name.startswith("*."):
                    self.wildcard.setdefault(name[2:], ctx)
                else:
                    self.exact.setdefault(name, ctx)

    def pick(self, name: str) -> ssl.SSLContext | None:
        name = name.lower().rstrip(".")
        ctx = self.exact.get(name)
        if ctx is None:
            _, dot, parent = name.partition(".")
            ctx = self.wildcard.get(parent) if dot else None
        return ctx

    def callback(self, sslobj: ssl.SSLObject, name: str | None, _: ssl.SSLContext) -> None:
        if name is not None and (ctx := self.pick(name)) is not None:
            sslobj.context = ctx  # the handshake goes on with this certificate


def client_cert_fields(sslobj: ssl.SSLObject | None) -> bytes:
    """X-Client-Cert-Subject and -Fingerprint lines for a verified client certificate (none
    if the client sent none): the subject as RFC 4514 writes it, the SHA-256 of the DER."""
    der = sslobj.getpeercert(binary_form=True) if sslobj is not None else None
    if not der or sslobj is None:
        return b""
    subject = cast("tuple[tuple[tuple[str, str], ...], ...]",
                   (sslobj.getpeercert() or {}).get("subject", ()))
    names = {"commonName": "CN", "organizationName": "O", "organizationalUnitName": "OU",
             "countryName": "C", "stateOrProvinceName": "ST", "localityName": "L",
             "emailAddress": "emailAddress", "domainComponent": "DC"}
    parts = []
    for rdn in reversed(subject):  # RFC 4514: the most specific first
        for key, value in rdn:
            value = "".join(c if c.isprintable() else "?" for c in str(value))
            for special in ("\\", ",", "+", '"', "<", ">", ";"):
                value = value.replace(special, "\\" + special)
            parts.append(f"{names.get(key, key)}={value}")
    return (b"X-Client-Cert-Subject: " + ",".join(parts).encode("utf-8", "replace")
            + b"\r\nX-Client-Cert-Fingerprint: " + hashlib.sha256(der).hexdigest().encode()
            + b"\r\n")


def server_context(tls: TLS, http2: bool = True) -> ssl.SSLContext:
    """The listener's context: its default certificate, and the others chosen by SNI.
    ``http2``: offer h2 by ALPN (every context of the listener alike)."""
    ctx = _context(tls, tls.cert, tls.key, http2)
    if tls.certificates:
        ctx.sni_callback = ServerNames(tls, http2).callback
    return ctx


# -- handshakes ----------------------------------------------------------------------------------
# gateway_tls_handshake_errors_total's reasons: a fixed set an operator can alert on, each
# pointing at one cause (a client that speaks HTTP to the port, clients too old for
# min_version, a missing or untrusted client certificate, clients that do not trust proxyd's
# own certificate, slow or silent clients).
PLAIN_HTTP: Final = "plain_http"  # a plain HTTP request on the TLS port
PROTOCOL: Final = "protocol"  # no TLS version, cipher or group in common; not TLS at all
NO_CERTIFICATE: Final = "no_certificate"  # client_auth: required, and the client sent none
BAD_CERTIFICATE: Final = "bad_certificate"  # the client's certificate failed verification
# The client refused proxyd's certificate (an alert: unknown CA, expired, bad): a renewal
# gone wrong, or clients without the right CA.
CERTIFICATE_REFUSED: Final = "certificate_refused"
TIMEOUT: Final = "timeout"  # not done within header_timeout
# The client closed or reset the connection mid-handshake; a TCP port check (connect, close)
# is one. Counted, never logged: load balancers do it all day.
CLOSED: Final = "closed"
OTHER: Final = "other"
HANDSHAKE_REASONS: Final = (PLAIN_HTTP, PROTOCOL, NO_CERTIFICATE, BAD_CERTIFICATE,
                            CERTIFICATE_REFUSED, TIMEOUT, CLOSED, OTHER)

# OpenSSL's reason codes (SSLError.reason) → a reason above.
_REASONS: Final = {
    "HTTP_REQUEST": PLAIN_HTTP, "HTTPS_PROXY_REQUEST": PLAIN_HTTP,
    "UNSUPPORTED_PROTOCOL": PROTOCOL, "WRONG_VERSION_NUMBER": PROTOCOL,
    "VERSION_TOO_LOW": PROTOCOL, "UNKNOWN_PROTOCOL": PROTOCOL,
    "NO_PROTOCOLS_AVAILABLE": PROTOCOL, "NO_SHARED_CIPHER": PROTOCOL,
    "NO_SHARED_GROUPS": PROTOCOL, "NO_SUITABLE_SIGNATURE_ALGORITHM": PROTOCOL,
    "NO_SUITABLE_KEY_SHARE": PROTOCOL, "INAPPROPRIATE_FALLBACK": PROTOCOL,
    "TLSV1_ALERT_PROTOCOL_VERSION": PROTOCOL, "TLSV1_ALERT_INSUFFICIENT_SECURITY": PROTOCOL,
    "SSLV3_ALERT_HANDSHAKE_FAILURE": PROTOCOL, "NO_APPLICATION_PROTOCOL": PROTOCOL,
    "TLSV1_ALERT_NO_APPLICATION_PROTOCOL": PROTOCOL, "RECORD_LAYER_FAILURE": PROTOCOL,
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": NO_CERTIFICATE,
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": NO_CERTIFICATE,
    "CERTIFICATE_VERIFY_FAILED": BAD_CERTIFICATE,
    "TLSV1_ALERT_UNKNOWN_CA": CERTIFICATE_REFUSED,
    "SSLV3_ALERT_BAD_CERTIFICATE": CERTIFICATE_REFUSED,
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": CERTIFICATE_REFUSED,
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": CERTIFICATE_REFUSED,
    "SSLV3_ALERT_CERTIFICATE_REVOKED": CERTIFICATE_REFUSED,
    "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE": CERTIFICATE_REFUSED,
}


def handshake_reason(exc: BaseException) -> str:
    """Why a handshake failed, as one of HANDSHAKE_REASONS. Both event loops (uvloop's and
    asyncio's) end a server-side handshake the same way: the OpenSSL error as raised,
    ConnectionAbortedError for the handshake timeout, ConnectionResetError for a client that
    closed (or reset) before finishing."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return BAD_CERTIFICATE
    if isinstance(exc, ssl.SSLError):
        return _REASONS.get(exc.reason or "", OTHER)
    if isinstance(exc, ConnectionAbortedError):
        return TIMEOUT
    if isinstance(exc, OSError):  # reset, broken pipe, closed
        return CLOSED
    return OTHER


HANDSHAKE_ERRORS: Final = ThrottledLog(logging.getLogger("proxyd.tls"))


class Handshakes:
    """One TLS listener's handshake outcomes: counted (failures by reason, successes by TLS
    version), failures also logged, throttled, with the client's address."""

    __slots__ = ("listener", "metrics")

    def __init__(self, metrics: WorkerMetrics, listener: str) -> None:
        self.metrics = metrics
        self.listener = listener

    def done(self, version: str | None) -> None:
        self.metrics.tls_handshakes.inc((self.listener, version or "unknown"))

    def failed(self, ip: str, exc: BaseException) -> None:
        reason = handshake_reason(exc)
        self.metrics.tls_handshake_errors.inc((self.listener, reason))
        if reason != CLOSED:
            HANDSHAKE_ERRORS.warning("TLS handshake from %s on %s failed (%s): %s", ip,
                                     self.listener, reason, exc)


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
        files = [(f"server.listen[{i}].tls", tls.cert, tls.key)] + [
            (f"server.listen[{i}].tls.certificates[{n}]", spec.cert, spec.key)
            for n, spec in enumerate(tls.certificates)]
        for where, cert, key in files:
            try:
                _context(tls.model_copy(update={"client_ca": None}), cert, key, False)
            except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
                issues.append(ConfigIssue(filename, None, None, where,
                                          f"{listener}: cannot load {cert} / {key}: "
                                          f"{describe(exc)}"))
        if tls.client_ca is not None:
            try:
                ssl.create_default_context(cafile=tls.client_ca)
            except (OSError, ValueError) as exc:
                issues.append(ConfigIssue(filename, None, None,
                                          f"server.listen[{i}].tls.client_ca",
                                          f"{listener}: cannot load {tls.client_ca}: "
                                          f"{describe(exc)}"))
    from proxyd.proxy.upstream_tls import file_issues as upstream_issues  # ca_file, client_cert

    issues.extend(upstream_issues(config, filename))
    return issues
