"""The ``basic_auth`` element: HTTP Basic authentication (RFC 7617) against bcrypt or argon2
hashes.

A password's hash check is slow on purpose (~0.1-0.3 s of a core), so it never runs on the event
loop: it goes to the worker's hash threads (passwords.py) and the request waits for it (Pending)
while the others are served. A user:password that checked out is remembered, under a keyed
digest, for ``cache_ttl``: a client sending the same credentials on every request pays the hash
once. Failures are never remembered, so every wrong guess costs the guesser a full hash check;
at most ``max_pending`` checks wait per route and worker, and past that requests get 503 at
once instead of queueing without bound. Requests that bring credentials already being checked
wait for that check instead of starting another.

The comparison is the hash library's (constant time); an unknown user is checked against a
dummy hash of the same scheme and cost, so a wrong name takes as long as a wrong password.
"""

from __future__ import annotations

import asyncio
import binascii
import time
from typing import TYPE_CHECKING, Any

from proxyd.middleware.access import outcome
from proxyd.middleware.access.access_options import BasicAuthOptions
from proxyd.middleware.access.outcome import Outcomes, credentials, header_value, quoted
from proxyd.middleware.access.passwords import (
    CredentialDigests,
    dummy_hash_like,
    run_in_thread,
    verify,
)
from proxyd.middleware.access.verified import VerifiedCache
from proxyd.middleware.base import Context, Middleware, Pending, Response, json_response

if TYPE_CHECKING:
    from proxyd.middleware.services import Services
    from proxyd.proxy.router import CompiledRoute


class BasicAuth(Middleware):
    type = "basic_auth"
    options_model = BasicAuthOptions

    def __init__(self, options: BasicAuthOptions) -> None:
        super().__init__(options)
        self.o = options
        self.users = options.all_users
        self.challenge = b"Basic realm=" + quoted(options.realm) + b', charset="UTF-8"'
        self.cache: VerifiedCache[str] = VerifiedCache(
            options.cache_size if options.cache_ttl > 0 else 0)
        self.ttl = options.cache_ttl
        self.digests = CredentialDigests()
        # digest → the hash check in progress for those credentials (queued or running).
        self.checking: dict[bytes, asyncio.Future[bool]] = {}
        self.dummy: str | None = None  # made on the first unknown user, in a hash thread
        self.consumer_header = (options.consumer_header.encode()
                                if options.consumer_header is not None else None)
        remove = set()
        if options.consumer_header is not None:
            remove.add(options.consumer_header.lower().encode())
        if not options.forward_authorization:
            remove.add(b"authorization")
        self.remove = remove
        self.outcomes = Outcomes()

    def bind(self, services: Services, route: CompiledRoute) -> None:
        self.outcomes.bind(services, route.name, self.type)

    def on_request(self, ctx: Context) -> Response | Pending | None:
        if self.remove:
            ctx.remove_request.update(self.remove)
        credential = credentials(ctx, b"basic ")
        if credential is None:
            return self.outcomes.unauthorized(ctx, outcome.MISSING, self.challenge,
                                              "authentication required")
        digest = self.digests.digest(credential)
        user = self.cache.get(digest, time.monotonic())
        if user is not None:
            self._pass(ctx, user)
            return None
        parsed = parse_credentials(credential)
        if parsed is None:
            return self._refuse(ctx)
        user = parsed[0]
        check = self.checking.get(digest)
        if check is None:  # else the same credentials are being checked: wait for that
            if len(self.checking) >= self.o.max_pending:
                self.outcomes.count(outcome.BUSY)
                return json_response(503, "authentication busy", ctx.id(),
                                     [(b"Retry-After", b"1")])
            check = self._start_check(digest, user, parsed[1])
        answer: asyncio.Future[Response | None] = asyncio.get_running_loop().create_future()

        def checked(f: asyncio.Future[bool]) -> None:
            if answer.done():
                return
            if not f.cancelled() and f.exception() is None and f.result():
                assert user is not None
                self._pass(ctx, user)
                answer.set_result(None)
            else:
                answer.set_result(self._refuse(ctx))

        check.add_done_callback(checked)
        return Pending(answer)

    def _start_check(self, digest: bytes, user: str, password: bytes) -> asyncio.Future[bool]:
        """A hash check on the worker's threads, shared by every request that brings the same
        credentials meanwhile (a client opening several connections at once pays one)."""
        hashed = self.users.get(user)
        loop = asyncio.get_running_loop()
        if hashed is None:
            check = run_in_thread(loop, self._check_unknown, password)
        else:
            check = run_in_thread(loop, verify, hashed, password)
        self.checking[digest] = check

        def done(f: asyncio.Future[bool]) -> None:  # runs before the requests' callbacks
            del self.checking[digest]
            if self.ttl > 0 and not f.cancelled() and f.exception() is None and f.result():
                self.cache.put(digest, user, time.monotonic() + self.ttl)

        check.add_done_callback(done)
        return check

    def _check_unknown(self, password: bytes) -> bool:
        """In a hash thread: as long as checking a known user's password, and always False."""
        if self.dummy is None:  # two threads may both make one: either will do
            self.dummy = dummy_hash_like(next(iter(self.users.values())))
        verify(self.dummy, password)
        return False

    def _pass(self, ctx: Context, user: str) -> None:
        ctx.consumer = user
        name = self.consumer_header
        if name is not None:
            value = header_value(user)
            if value is not None:
                ctx.set_request.append((name, value))
        self.outcomes.count(outcome.OK)

    def _refuse(self, ctx: Context) -> Response:
        return self.outcomes.unauthorized(ctx, outcome.INVALID, self.challenge,
                                          "invalid credentials")

    def explain(self, ctx: Context, trusted: Any) -> str:
        """What this element would do with ``ctx`` (the hash is checked here, synchronously)."""
        credential = credentials(ctx, b"basic ")
        if credential is None:
            return f'401: needs Basic credentials (realm "{self.o.realm}")'
        parsed = parse_credentials(credential)
        if parsed is None:
            return "401: malformed Basic credentials"
        user, password = parsed
        hashed = self.users.get(user)
        if hashed is None or not verify(hashed, password):
            return "401: wrong user or password"
        return f"passes; consumer {user}"


def parse_credentials(credential: bytes) -> tuple[str, bytes] | None:
    """(user, password) of a Basic credential (base64 of user:password), or None."""
    try:
        decoded = binascii.a2b_base64(credential, strict_mode=True)
        user_bytes, sep, password = decoded.partition(b":")
        user = user_bytes.decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    if not sep:
        return None
    return user, password
