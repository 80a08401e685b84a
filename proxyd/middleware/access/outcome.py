"""What the access elements share: their outcomes, counted, and their refusals.

Every element counts each request it decides in ``gateway_auth_total{route, element, result}``
(allowed ones too: the rate of each outcome is what an operator alerts on). A refusal is the
usual JSON error; a 401 carries the challenge its scheme defines (RFC 9110 §11.6.1). Only
jwt_auth's challenge says which check failed (RFC 6750's error_description, for the client's
developer: every check is on what the client itself sent); a password or key refusal never
says whether the name or the secret was wrong.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from proxyd.middleware.base import Context, Response, json_response

if TYPE_CHECKING:
    from proxyd.middleware.services import Services
    from proxyd.observe.metrics import WorkerMetrics

# gateway_auth_total's results.
OK: Final = "ok"  # authenticated, or an address allowed
MISSING: Final = "missing"  # no credentials
INVALID: Final = "invalid"  # wrong, malformed, unknown, or failed a claim check
EXPIRED: Final = "expired"  # a token past its exp
DENIED: Final = "denied"  # ip_access: an address refused; forward_auth: the service said no
# jwt_auth: no keys yet (the JWKS never fetched); forward_auth: the service failed, and the
# request was refused (on_error: deny)
UNAVAILABLE: Final = "unavailable"
# basic_auth: too many hash checks queued; forward_auth: max_pending subrequests in flight
BUSY: Final = "busy"
ERROR_ALLOWED: Final = "error_allowed"  # forward_auth: the service failed, on_error: allow
RESULTS: Final = (OK, MISSING, INVALID, EXPIRED, DENIED, UNAVAILABLE, BUSY, ERROR_ALLOWED)


class Outcomes:
    """One element's series of gateway_auth_total on one route: label tuples made once."""

    __slots__ = ("_labels", "_metrics")

    def __init__(self) -> None:
        self._metrics: WorkerMetrics | None = None
        self._labels: dict[str, tuple[str, str, str]] = {}

    def bind(self, services: Services, route: str, element: str) -> None:
        """In the worker: count into its metrics, unless metrics are off."""
        if services.metrics_enabled:
            self._metrics = services.metrics
        self._labels = {result: (route, element, result) for result in RESULTS}

    def count(self, result: str) -> None:
        metrics = self._metrics
        if metrics is not None:
            metrics.auth.inc(self._labels[result])

    def unauthorized(self, ctx: Context, result: str, challenge: bytes,
                     message: str) -> Response:
        """A 401 with the scheme's challenge, counted as ``result``."""
        self.count(result)
        return json_response(401, message, ctx.id(), [(b"WWW-Authenticate", challenge)])


def credentials(ctx: Context, scheme: bytes) -> bytes | None:
    """What follows ``scheme`` (lowercase, with its space: b"basic ") in the request's
    Authorization field, or None without a field of that scheme (schemes are
    case-insensitive, RFC 9110 §11.1)."""
    auth = ctx.header(b"authorization")
    if auth is None or auth[:len(scheme)].lower() != scheme:
        return None
    return auth[len(scheme):].strip()


def quoted(value: str) -> bytes:
    """An auth-param value as a quoted string (the options allow no '"' or '\\' in it)."""
    return b'"' + value.encode() + b'"'


def forbidden(ctx: Context) -> Response:
    return json_response(403, "forbidden", ctx.id())


def header_value(value: str) -> bytes | None:
    """``value`` as a header field value, or None where it cannot be one (CR, LF, NUL and
    other controls would end or corrupt the field: such a value is never forwarded)."""
    if not value.isprintable() and any((c < " " and c != "\t") or c == "\x7f" for c in value):
        return None
    return value.encode()
