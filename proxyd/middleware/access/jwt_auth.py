"""The ``jwt_auth`` element: bearer tokens (RFC 6750) that are JWTs, verified with PyJWT.

A token passes when its signature verifies with a configured key whose type fits the token's
``alg`` (keys.py), ``alg`` is on the allow-list, and exp, nbf, iat (with ``leeway``), iss, aud
and the required claims check out. Then the chosen claims go to the upstream as request
headers, and the consumer claim names the client for rate_limit.

Verification (a signature check, tens of microseconds) happens once per token: the result is
remembered, under the token's SHA-256, until the token's exp or until the keys change. Later
requests with the same token cost a digest and a lookup. (SHA-256, not a keyed digest as for
passwords: a token is long and random, so its digest gives nothing back, and it is the
cheapest digest here, ~1 µs for a 600-byte token.)

Refusals are 401 with ``WWW-Authenticate: Bearer realm="..."``, plus ``error="invalid_token"``
when a token was sent (RFC 6750 §3.1: none when the request carried no credentials). With
jwks_url, a request waits only while the worker's first fetch is in flight, or while a fetch
for a kid it lacks (a rotation) is; with no keys at all it gets 503.
"""

from __future__ import annotations

import asyncio
import json
import time
from hashlib import sha256
from typing import TYPE_CHECKING, Any, Final, NamedTuple

import jwt

from proxyd.middleware.access import outcome
from proxyd.middleware.access.access_options import JwtAuthOptions
from proxyd.middleware.access.jwks import JwksSource
from proxyd.middleware.access.keys import KeySet
from proxyd.middleware.access.outcome import Outcomes, credentials, header_value, quoted
from proxyd.middleware.access.verified import VerifiedCache
from proxyd.middleware.base import Context, Middleware, Pending, Response, json_response

if TYPE_CHECKING:
    from proxyd.middleware.services import Services
    from proxyd.proxy.router import CompiledRoute

# How long a verified token without exp is remembered (only where require drops exp).
NO_EXP_TTL: Final = 300.0


class Verified(NamedTuple):
    """What a verified token gives every request that carries it."""

    headers: list[tuple[bytes, bytes]]  # for the upstream request
    consumer: str | None
    generation: int  # of the keys it verified with


class Refusal(NamedTuple):
    result: str  # outcome.INVALID, EXPIRED, ...
    description: str  # error_description


class JwtAuth(Middleware):
    type = "jwt_auth"
    options_model = JwtAuthOptions

    def __init__(self, options: JwtAuthOptions) -> None:
        super().__init__(options)
        self.o = options
        self.allowed = frozenset(options.algorithms)
        self.static_keys: KeySet | None = options.keys
        self.source: JwksSource | None = None  # jwks_url: the worker's, once bound
        self.issuer: str | list[str] | None = options.issuer
        self.audience: str | list[str] | None = options.audience
        # verify_aud stays on without an audience: a token that names one is then refused.
        self.decode_options: dict[str, Any] = {
            "require": list(options.require), "enforce_minimum_key_length": True,
        }
        # (claim, header name) for the upstream; their names never come from the client.
        self.claim_headers = [(claim, name.encode())
                              for claim, name in options.claims_to_headers.items()]
        remove = {name.lower().encode() for name in options.claims_to_headers.values()}
        if not options.forward_token:
            remove.add(b"authorization")
        self.remove = remove
        realm = b"Bearer realm=" + quoted(options.realm)
        self.challenge = realm
        self.invalid_challenge = realm + b', error="invalid_token"'
        self.cache: VerifiedCache[Verified] = VerifiedCache(options.cache_size)
        self.outcomes = Outcomes()

    def bind(self, services: Services, route: CompiledRoute) -> None:
        self.outcomes.bind(services, route.name, self.type)
        o = self.o
        if o.jwks_url is not None:
            metrics = services.metrics if services.metrics_enabled else None
            assert services.loop is not None
            self.source = JwksSource.acquire(services.loop, o.jwks_url, o.jwks_refresh,
                                             o.jwks_timeout, o.jwks_min_interval, self.allowed,
                                             metrics)
            services.closers.append(self.source.release)

    # -- per request ---------------------------------------------------------------------------
    def on_request(self, ctx: Context) -> Response | Pending | None:
        if self.remove:
            ctx.remove_request.update(self.remove)
        token = credentials(ctx, b"bearer ")
        if token is None:
            return self.outcomes.unauthorized(ctx, outcome.MISSING, self.challenge,
                                              "authentication required")
        digest = sha256(token).digest()
        hit = self.cache.get(digest, time.time())
        if hit is not None:
            source = self.source
            if source is None or hit.generation == source.generation:
                self._pass(ctx, hit)
                return None
        return self._verify(ctx, token, digest, True)

    def generation(self) -> int:
        source = self.source
        return source.generation if source is not None else 0

    def _pass(self, ctx: Context, verified: Verified) -> None:
        if verified.headers:
            ctx.set_request.extend(verified.headers)
        if verified.consumer is not None:
            ctx.consumer = verified.consumer
        self.outcomes.count(outcome.OK)

    def _refuse(self, ctx: Context, refusal: Refusal) -> Response:
        challenge = self.invalid_challenge + b', error_description=' + quoted(refusal.description)
        return self.outcomes.unauthorized(ctx, refusal.result, challenge, "invalid token")

    def _verify(self, ctx: Context, token: bytes, digest: bytes, may_wait: bool
                ) -> Response | Pending | None:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError:
            return self._refuse(ctx, Refusal(outcome.INVALID, "malformed token"))
        alg, kid = header.get("alg"), header.get("kid")
        if not isinstance(alg, str) or alg not in self.allowed:
            return self._refuse(ctx, Refusal(outcome.INVALID, "algorithm not allowed"))
        if kid is not None and not isinstance(kid, str):
            return self._refuse(ctx, Refusal(outcome.INVALID, "malformed token"))
        source = self.source
        keys = self.static_keys if source is None else source.keys
        if keys is None:  # jwks_url: no fetch has succeeded yet
            if source is not None and may_wait and source.fetching:
                return self._wait(ctx, source, token, digest)
            self.outcomes.count(outcome.UNAVAILABLE)
            return json_response(503, "token keys unavailable", ctx.id(),
                                 [(b"Retry-After", b"5")])
        key = keys.find(kid, alg)
        if key is None:
            if source is not None and may_wait and kid is not None and source.fetch_soon():
                return self._wait(ctx, source, token, digest)  # perhaps a rotation
            return self._refuse(ctx, Refusal(outcome.INVALID, "unknown key"))
        generation = self.generation()
        result = self.check(token, key.key, alg, generation)
        if isinstance(result, Refusal):
            return self._refuse(ctx, result)
        verified, expires = result
        self.cache.put(digest, verified, expires)
        self._pass(ctx, verified)
        return None

    def check(self, token: bytes, key: Any, alg: str, generation: int
              ) -> tuple[Verified, float] | Refusal:
        """Signature and claims: (what the token gives, when to forget it) or why not."""
        o = self.o
        try:
            claims = jwt.decode(token, key, algorithms=[alg], issuer=self.issuer,
                                audience=self.audience, leeway=o.leeway,
                                options=self.decode_options)  # type: ignore[arg-type]
        except jwt.ExpiredSignatureError:
            return Refusal(outcome.EXPIRED, "token expired")
        except jwt.ImmatureSignatureError:
            return Refusal(outcome.INVALID, "token not yet valid")
        except jwt.MissingRequiredClaimError as exc:
            return Refusal(outcome.INVALID, f"missing claim {exc.claim}")
        except jwt.InvalidAudienceError:
            return Refusal(outcome.INVALID, "wrong audience")
        except jwt.InvalidIssuerError:
            return Refusal(outcome.INVALID, "wrong issuer")
        except jwt.InvalidSignatureError:
            return Refusal(outcome.INVALID, "bad signature")
        except (jwt.InvalidTokenError, jwt.InvalidKeyError):
            return Refusal(outcome.INVALID, "invalid token")
        headers = []
        for claim, name in self.claim_headers:
            value = render_claim(claims.get(claim))
            if value is not None:
                headers.append((name, value))
        consumer = None
        if o.consumer_claim is not None:
            value = claims.get(o.consumer_claim)
            if isinstance(value, str | int) and not isinstance(value, bool):
                consumer = str(value)
        exp = claims.get("exp")
        expires = (float(exp) + o.leeway if isinstance(exp, int | float)
                   else time.time() + NO_EXP_TTL)
        return Verified(headers, consumer, generation), expires

    def _wait(self, ctx: Context, source: JwksSource, token: bytes, digest: bytes) -> Pending:
        """Answer once the source's fetch in flight has ended: verified then, or refused."""
        future: asyncio.Future[Response | None] = asyncio.get_running_loop().create_future()

        def fetched() -> None:
            if future.done():
                return
            answer = self._verify(ctx, token, digest, False)
            future.set_result(answer if isinstance(answer, Response) else None)

        source.when_fetched(fetched)
        return Pending(future)

    # -- explain -------------------------------------------------------------------------------
    def explain(self, ctx: Context, trusted: Any) -> str:
        """What this element would do with ``ctx``, offline (no JWKS is fetched)."""
        where = self.o.key_source
        token = credentials(ctx, b"bearer ")
        if token is None:
            return f"401: needs a bearer token ({', '.join(self.o.algorithms)}; {where})"
        if self.static_keys is None:
            try:
                claims = jwt.decode(token, options={"verify_signature": False})
            except jwt.InvalidTokenError:
                return "401: a malformed token"
            return (f"token not verified offline (keys from {where}); its claims say "
                    + ", ".join(f"{k}={v}" for k, v in sorted(claims.items())
                                if k in ("sub", "iss", "aud", "exp")))
        answer = self._verify(ctx, token, sha256(token).digest(), False)
        if answer is None:
            return f"passes ({where}); consumer {ctx.consumer}"
        assert isinstance(answer, Response)
        challenge = dict(answer.headers).get(b"WWW-Authenticate", b"").decode()
        description = challenge.partition("error_description=")[2].strip('"')
        return f"{answer.status}: {description or 'refused'}"


def render_claim(value: Any) -> bytes | None:
    """A claim's value as a header value: strings as they are, lists of scalars joined with
    ', ', anything else as JSON; None where absent or unfit for a header."""
    if value is None:
        return None
    if isinstance(value, str):
        return header_value(value)
    if isinstance(value, list) and all(isinstance(v, str | int | float) for v in value):
        return header_value(", ".join(json.dumps(v) if not isinstance(v, str) else v
                                      for v in value))
    return header_value(json.dumps(value, separators=(",", ":"), ensure_ascii=False))
