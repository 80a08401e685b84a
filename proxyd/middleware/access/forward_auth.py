"""The ``forward_auth`` element: an auth service decides whether each request may pass (the
subrequest of nginx's auth_request, Traefik's ForwardAuth, Envoy's ext_authz).

The request waits (Pending) while the element asks the service, with the client's credential
headers and where the request was going (X-Forwarded-*), never its body. A 2xx answer lets it
through, with the answer's chosen headers set on the upstream request; any other answer goes
back to the client as the service gave it (its status, headers and a bounded body: the 401's
WWW-Authenticate, the 302's Location to a login page). A service that is down, too slow or
answers 5xx is not an answer: ``on_error`` decides, and by default the request is refused
(503), since letting it through would make an outage of the auth service an open door.

With ``cache_ttl``, a pass or a plain refusal (401, 403) is reused for the same credentials,
and requests that bring credentials already being asked about wait for that answer.

At most ``max_pending`` subrequests are in flight per route and worker; a request that would
start one more gets 503 with Retry-After at once (counted as ``busy``), so a stalled service
holds a bounded number of requests and sockets instead of everything that arrives meanwhile.
That refusal ignores ``on_error: allow``: Envoy's ext_authz lets failure_mode_allow cover an
overflowing auth cluster too, but then whoever can send enough concurrent requests gets past
the service unauthenticated.

The subrequest goes through the auth upstream's pool like any request to it
(proxy/subrequest.py): its balancer, the master's health checks and this worker's outlier
detection choose the target; its circuit breaker, admission, connect and read timeouts and
retries apply; outcomes are reported back to it; and the subrequest rides that pool's
keep-alive connections, counted in its connection metrics.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any, Final

from proxyd.middleware.access import outcome
from proxyd.middleware.access.forward_auth_options import ForwardAuthOptions
from proxyd.middleware.access.outcome import Outcomes
from proxyd.middleware.access.passwords import CredentialDigests
from proxyd.middleware.access.verified import VerifiedCache
from proxyd.middleware.base import Context, Middleware, Pending, Response, json_response
from proxyd.proxy.field_rules import RESPONSE_DROP
from proxyd.proxy.subrequest import ERROR_TOO_LARGE, Subrequest, SubrequestError

if TYPE_CHECKING:
    from proxyd.middleware.services import Services
    from proxyd.proxy.router import CompiledRoute

# The most of a refusal's body relayed to the client: an auth service's 401 or login
# redirect is small, and the answer is held in memory (and in the cache) whole.
MAX_BODY: Final = 64 * 1024


class AuthDecision:
    """What the auth service answered, in the form the element applies to a request: fields
    for the upstream request (a pass), or the answer for the client (a refusal)."""

    __slots__ = ("body", "headers", "oversize", "reason", "status")

    def __init__(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes = b"",
                 reason: bytes = b"", oversize: bool = False) -> None:
        self.status = status
        self.headers = headers
        self.body = body
        self.reason = reason
        # A refusal whose body was too large to hold: each client gets an error body of ours
        # (with its own request id) in its place.
        self.oversize = oversize

    @property
    def passes(self) -> bool:
        return 200 <= self.status < 300

    @property
    def shareable(self) -> bool:
        """Whether the answer holds for any request with the same credentials: a pass or a
        plain refusal. A redirect, or anything that sets a cookie, may carry one client's
        state (a login flow's), and is never handed to another."""
        return (self.passes or self.status in (401, 403)) and not self.oversize and not any(
            name.lower() == b"set-cookie" for name, _ in self.headers)


class ForwardAuth(Middleware):
    type = "forward_auth"
    options_model = ForwardAuthOptions

    def __init__(self, options: ForwardAuthOptions) -> None:
        super().__init__(options)
        self.o = options
        self.send = [(name.lower().encode(), name) for name in options.request_headers]
        self.copy = [(name.lower().encode(), name.encode()) for name in options.response_headers]
        # The service's fields, never the client's: inbound ones of those names go.
        self.remove = {lname for lname, _ in self.copy}
        self.ttl = options.cache_ttl
        self.cache: VerifiedCache[AuthDecision] = VerifiedCache(
            options.cache_size if options.cache_ttl > 0 else 0)
        self.digests = CredentialDigests()
        self.deny_on_error = options.on_error == "deny"
        self.outcomes = Outcomes()
        self.pool: Any = None
        self.trusted: Any = ()
        self.tasks: set[asyncio.Task[Response | None]] = set()  # held: the loop keeps none
        # Requests that hold a subrequest slot (at most max_pending): taken in on_request,
        # before the task runs, so a burst within one turn of the loop cannot overshoot.
        self.in_flight = 0
        self.max_pending = options.max_pending
        # With cache_ttl: credentials → the subrequest in flight for them. Requests that bring
        # the same credentials meanwhile wait for its answer instead of asking again (a
        # page's burst of requests costs the service one).
        self.asking: dict[bytes, asyncio.Task[AuthDecision | None]] = {}

    def bind(self, services: Services, route: CompiledRoute) -> None:
        self.outcomes.bind(services, route.name, self.type)
        self.pool = services.pools[self.o.upstream]
        self.trusted = services.trusted

    # -- per request ---------------------------------------------------------------------------
    def on_request(self, ctx: Context) -> Response | Pending | None:
        if self.remove:
            ctx.remove_request.update(self.remove)
        credentials = self._credentials(ctx)
        key = None
        if self.ttl > 0:
            key = self._key(credentials)
            hit = self.cache.get(key, time.monotonic())
            if hit is not None:
                return self._apply(ctx, hit)
        asks = key is None or key not in self.asking  # else it waits for that subrequest
        if asks:
            if self.in_flight >= self.max_pending:
                self.outcomes.count(outcome.BUSY)
                return json_response(503, "authentication busy", ctx.id(),
                                     [(b"Retry-After", b"1")])
            self.in_flight += 1
        task = asyncio.get_running_loop().create_task(self._decide(ctx, credentials, key))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        if asks:
            task.add_done_callback(self._release)
        return Pending(task)

    def _release(self, _: asyncio.Task[Response | None]) -> None:
        self.in_flight -= 1

    def _credentials(self, ctx: Context) -> list[tuple[str, bytes | None]]:
        """(name, value) of each request_headers field; repeated fields joined as a proxy
        may join them (RFC 9110 §5.3; cookies with '; ', RFC 6265 §5.4)."""
        found: list[tuple[str, bytes | None]] = []
        for lname, name in self.send:
            values = [value for key, _, value in ctx.headers if key == lname]
            if not values:
                found.append((name, None))
            else:
                found.append((name, (b"; " if lname == b"cookie" else b", ").join(values)))
        return found

    def _key(self, credentials: list[tuple[str, bytes | None]]) -> bytes:
        # Length-prefixed, with absent told from empty: two different sets of fields never
        # run together into the same bytes.
        parts = []
        for _, value in credentials:
            parts.append(b"-" if value is None else b"%d:%b" % (len(value), value))
        return self.digests.digest(b"|".join(parts))

    async def _decide(self, ctx: Context, credentials: list[tuple[str, bytes | None]],
                      key: bytes | None) -> Response | None:
        if key is None:
            decision = await self._ask(ctx, credentials)
        else:
            decision = await self._shared(ctx, credentials, key)
        if decision is None:
            if self.deny_on_error:
                self.outcomes.count(outcome.UNAVAILABLE)
                return json_response(503, "authentication unavailable", ctx.id())
            self.outcomes.count(outcome.ERROR_ALLOWED)
            return None
        return self._apply(ctx, decision)

    async def _shared(self, ctx: Context, credentials: list[tuple[str, bytes | None]],
                      key: bytes) -> AuthDecision | None:
        """The answer for these credentials: from the subrequest already in flight for them,
        or from a new one, which then goes into the cache if it is shareable."""
        task = self.asking.get(key)
        if task is not None:
            # shield: a request that stops waiting must not cancel the others' subrequest.
            decision = await asyncio.shield(task)
            if decision is None or decision.shareable:
                return decision
            return await self._ask(ctx, credentials)  # not for this client: its own
        task = asyncio.get_running_loop().create_task(self._ask(ctx, credentials))
        self.asking[key] = task

        def done(f: asyncio.Task[AuthDecision | None]) -> None:  # before the waiters resume
            if self.asking.get(key) is f:
                del self.asking[key]
            if not f.cancelled() and f.exception() is None:
                decision = f.result()
                if decision is not None and decision.shareable:
                    self.cache.put(key, decision, time.monotonic() + self.ttl)

        task.add_done_callback(done)
        return await asyncio.shield(task)

    def _apply(self, ctx: Context, decision: AuthDecision) -> Response | None:
        if decision.passes:
            ctx.set_request.extend(decision.headers)
            self.outcomes.count(outcome.OK)
            return None
        self.outcomes.count(outcome.DENIED)
        if decision.oversize:
            error = json_response(decision.status, "refused by the auth service", ctx.id())
            error.headers.extend(decision.headers)
            return error
        # A new list each time: response hooks change the fields of the Response they get.
        return Response(decision.status, list(decision.headers), decision.body,
                        decision.reason)

    # -- the subrequest ------------------------------------------------------------------------
    def _subrequest_headers(self, ctx: Context, credentials: list[tuple[str, bytes | None]]
                            ) -> list[tuple[bytes, bytes]]:
        # The field bytes the client sent are the bytes the service gets.
        headers = [(name.encode(), value) for name, value in credentials if value is not None]
        ip = ctx.client_ip
        trusted = ip.decode() in self.trusted
        inbound_xff = ctx.header(b"x-forwarded-for")
        xff = inbound_xff + b", " + ip if trusted and inbound_xff else ip
        inbound_host = ctx.header(b"x-forwarded-host")
        host = inbound_host if trusted and inbound_host else ctx.host
        uri = ctx.path + b"?" + ctx.query if ctx.query else ctx.path
        headers += [(b"X-Forwarded-Method", ctx.method),
                    (b"X-Forwarded-Uri", uri),
                    (b"X-Forwarded-Proto", ctx.scheme),
                    (b"X-Forwarded-For", xff)]
        if host:
            headers.append((b"X-Forwarded-Host", host))
        return headers

    async def _ask(self, ctx: Context,
                   credentials: list[tuple[str, bytes | None]]) -> AuthDecision | None:
        """The service's answer, or None where it gave none that counts (down, too slow,
        5xx, no target up, or its circuit breaker open: then it is not asked at all)."""
        o = self.o
        sub = Subrequest(self.pool, o.method.encode(), o.path.encode(),
                         self._subrequest_headers(ctx, credentials), timeout=o.timeout,
                         max_body=MAX_BODY)
        whole = True
        try:
            answer = await sub.start()
        except SubrequestError as exc:
            if exc.kind != ERROR_TOO_LARGE or exc.head is None:
                return None
            answer = exc.head
            whole = False
        status = answer.status
        if status >= 500:
            return None
        fields = answer.headers
        if 200 <= status < 300:
            wanted = {lname: name for lname, name in self.copy}
            return AuthDecision(status, [(wanted[lname], value) for lname, value in _lower(fields)
                                     if lname in wanted])
        headers = _relayed(fields)
        if not whole:
            # Too large to hold: the client gets the status and the fields that matter
            # (WWW-Authenticate, Location) with an error body of ours instead.
            kept = [(n, v) for n, v in headers
                    if n.lower() not in (b"content-type", b"content-encoding")]
            return AuthDecision(status, kept, reason=answer.reason, oversize=True)
        return AuthDecision(status, headers, answer.body, answer.reason)

    # -- proxyd explain ------------------------------------------------------------------------
    def explain(self, ctx: Context, trusted: Any) -> str:
        """What this element would do (the auth service is not asked)."""
        o = self.o
        sends = ", ".join(o.request_headers) or "no client headers"
        copies = ", ".join(o.response_headers) or "no headers"
        on_error = ("503" if o.on_error == "deny" else "passes unauthenticated")
        text = (f"asks upstream {o.upstream}: {o.method} {o.path} with {sends} and "
                f"X-Forwarded-*, within {o.timeout:g}s; 2xx passes, copying {copies}; any "
                f"other answer goes back to the client; down, slow or 5xx: {on_error}")
        if o.cache_ttl > 0:
            text += f"; answers reused for {o.cache_ttl:g}s per credentials"
        text += (f"; at most {o.max_pending} subrequests in flight per worker, beyond that "
                 "503 with Retry-After")
        return text


def _lower(fields: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    return [(name.lower(), value) for name, value in fields]


def _relayed(fields: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """A refusal's fields for the client: those about the service's connection to proxyd,
    and those its Connection field names, stay behind (RFC 9110 §7.6.1); the data plane
    frames the body itself."""
    named = {token.strip().lower() for name, value in fields if name.lower() == b"connection"
             for token in value.split(b",")}
    return [(name, value) for name, value in fields
            if name.lower() not in RESPONSE_DROP and name.lower() not in named]
