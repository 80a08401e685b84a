"""The middleware interface: options model, precompute in ``__init__``, per-request calls.

A route's chain is a list of middleware in config order. Request hooks run in that order and
may answer instead of the endpoint; response hooks run in reverse order (onion), and only for
the middleware that stood before the one that answered — so a cache hit or a CORS preflight
skips everything after it. Everything here is synchronous: it runs inside the
protocol callbacks of the data plane.
"""

from __future__ import annotations

import asyncio
import builtins
from collections.abc import Callable
from typing import TYPE_CHECKING, ClassVar, Final, Protocol

from mypy_extensions import mypyc_attr

from proxyd.middleware.element_options import Options

if TYPE_CHECKING:
    from proxyd.middleware.cache_request import CacheRequest
    from proxyd.middleware.rate_limit.gcra import Decision
    from proxyd.middleware.services import Services
    from proxyd.proxy.head import Block
    from proxyd.proxy.router import CompiledRoute


class BodyFilter(Protocol):
    """A streaming transformation of the response body (compression)."""

    def feed(self, chunk: bytes) -> bytes: ...

    def finish(self) -> bytes: ...


class Pending:
    """Returned by a request hook that must wait for I/O; ``future`` yields Response | None."""

    __slots__ = ("future",)

    def __init__(self, future: asyncio.Future[Response | None]) -> None:
        self.future = future


class Response:
    """A response head (and, when buffered or local, its body) as middleware sees it.

    Hooks change fields with set/add/remove, append to ``headers``, or assign a new list to
    ``headers``; they never replace or delete items of the list in place: the index of
    lowercase names follows the list by its length only.
    """

    __slots__ = ("_headers", "_lnames", "_present", "_vary_at", "_vary_tokens", "blocks",
                 "body", "drop_body", "filters", "reason", "rendered", "status",
                 "upstream_length")
    _headers: list[tuple[bytes, bytes]]
    _lnames: list[bytes]
    # The same names as a set: most questions hooks ask are about fields that are absent
    # (ETag, Content-Encoding, Vary, ...), answered by one hash lookup instead of a scan of
    # every name (a dozen questions a response, over some fifteen fields).
    _present: builtins.set[bytes]
    # (the first n fields already rendered as lines, n): set by whoever has them (a cache
    # hit); any change to those n fields drops it, appended fields do not.
    rendered: tuple[bytes, int] | None
    # Runs of fields appended with their lines rendered (add_block): the relay's rendering
    # uses each run still in place (render_fields checks), so nothing here tracks them.
    blocks: list[Block] | None
    # Where add_vary made the only Vary field, while no field before it has gone and no other
    # Vary has come (-1: unknown): the next token goes there without a scan (cors and
    # compression both add one to nearly every response).
    _vary_at: int
    # While _vary_at holds: that field's tokens, lowercase, as add_vary put them (no
    # lowering and splitting of the value to find whether a token is there).
    _vary_tokens: list[bytes]

    def __init__(
        self, status: int, headers: list[tuple[bytes, bytes]], body: bytes | None = None,
        reason: bytes = b"", lnames: list[bytes] | None = None, upstream_length: int = -1,
    ) -> None:
        self.status = status
        self.reason = reason
        # The upstream's Content-Length as a number, where the relay made this response from
        # an upstream head (-1: none); what hooks do to the field does not change it.
        self.upstream_length = upstream_length
        if lnames is None:
            self.headers = headers  # (name as sent, value); hop-by-hop fields already removed
        else:  # the lowercase names of ``headers``, where the caller has them already
            self._headers = headers
            self._lnames = lnames
            self._present = set(lnames)
            self.rendered = None
            self.blocks = None
            self._vary_at = -1
        self.body = body  # None while streaming
        self.filters: list[BodyFilter] = []
        self.drop_body = False  # turned into a bodiless answer (304) while streaming

    @property
    def headers(self) -> list[tuple[bytes, bytes]]:
        return self._headers

    @headers.setter
    def headers(self, value: list[tuple[bytes, bytes]]) -> None:
        self._headers = value
        self._lnames = []
        self._present = set()
        self.rendered = None
        self.blocks = None
        self._vary_at = -1

    def _index(self) -> list[bytes]:
        """Lowercase names parallel to ``headers``: every hook asks has()/get(), so a name is
        lowered once per response, not once per question. The methods below keep the index
        in step; a hook that appends to ``headers`` directly is caught up here."""
        lnames, headers = self._lnames, self._headers
        n = len(lnames)
        if n != len(headers):
            if n > len(headers):
                lnames.clear()
                self._present.clear()
                self._vary_at = -1
                n = 0
            new = [name.lower() for name, _ in headers[n:]]
            if b"vary" in new:
                self._vary_at = -1
            lnames.extend(new)
            self._present.update(new)
        return lnames

    # The methods below inline _index's in-step test: hooks call them ~30 times a response.
    def get(self, lname: bytes) -> bytes | None:
        lnames = self._lnames
        if len(lnames) != len(self._headers):
            lnames = self._index()
        if lname in self._present:
            return self._headers[lnames.index(lname)][1]
        return None

    def has(self, lname: bytes) -> bool:
        if len(self._lnames) != len(self._headers):
            self._index()
        return lname in self._present

    def set(self, name: bytes, value: bytes, lname: bytes | None = None) -> None:
        """Replace every field of that name by one (in the first one's place), or append;
        ``lname``, the lowercase name, where the caller has it at hand."""
        if lname is None:
            lname = name.lower()
        lnames = self._lnames
        if len(lnames) != len(self._headers):
            lnames = self._index()
        if lname in self._present:
            i = lnames.index(lname)
            self._headers[i] = (name, value)
            self.rendered = None
            if lname == b"vary":
                self._vary_at = -1  # a value add_vary did not make
            if len(self._present) != len(lnames):  # some name repeats: maybe this one
                extra = lnames.count(lname) - 1  # i is the first: the rest come after it
                if extra:
                    self._drop(lname, i + 1, extra)
        else:
            self._headers.append((name, value))
            lnames.append(lname)
            self._present.add(lname)

    def add(self, name: bytes, value: bytes, lname: bytes | None = None) -> None:
        """Append a field; ``lname``, its lowercase name, where the caller has it at hand."""
        lnames = self._lnames
        if len(lnames) != len(self._headers):
            lnames = self._index()
        if lname is None:
            lname = name.lower()
        if self._vary_at >= 0 and lname == b"vary":
            self._vary_at = -1
        lnames.append(lname)
        self._present.add(lname)
        self._headers.append((name, value))

    def lnames(self) -> list[bytes]:
        """The lowercase names, in step with ``headers`` (read-only for callers)."""
        return self._index()

    def names(self) -> builtins.set[bytes]:
        """The lowercase names present, as a set (read-only for callers)."""
        if len(self._lnames) != len(self._headers):
            self._index()
        return self._present

    def has_any(self, lnames: list[bytes]) -> bool:
        """Whether any of those lowercase names is present (one set lookup each)."""
        present = self.names()
        for lname in lnames:  # noqa: SIM110  (any(genexpr) costs more, compiled)
            if lname in present:
                return True
        return False

    def add_block(self, block: FieldBlock) -> None:
        """Append a middleware's constant fields. The relay sends them as their rendered
        lines while they stay in place (security_headers' six: one piece to join, not 24)."""
        lnames = self._lnames
        if len(lnames) != len(self._headers):
            lnames = self._index()
        entry = (len(lnames), block.fields, block.lines)
        if self.blocks is None:
            self.blocks = [entry]
        else:
            self.blocks.append(entry)
        lnames.extend(block.lnames)
        self._present.update(block.names)  # from a set: no hashing, no iterator
        self._headers.extend(block.fields)
        if block.has_vary:
            self._vary_at = -1

    def extend(self, fields: list[tuple[bytes, bytes]], lnames: list[bytes]) -> None:
        """Append ``fields``, whose lowercase names are ``lnames`` (a precomputed block)."""
        self._index().extend(lnames)
        self._present.update(lnames)
        self._headers.extend(fields)
        if b"vary" in lnames:
            self._vary_at = -1

    def remove(self, lname: bytes) -> None:
        lnames = self._lnames
        if len(lnames) != len(self._headers):
            lnames = self._index()
        present = self._present
        if lname not in present:
            return
        # As many distinct names as fields: none repeats, no need to count this one.
        count = 1 if len(present) == len(lnames) else lnames.count(lname)
        present.discard(lname)
        if count == 1:  # the usual case, inline
            i = lnames.index(lname)
            lnames.pop(i)  # (compiled, pop(i) is a direct call; del boxes i for a generic one)
            self._headers.pop(i)
            self.rendered = None
            vary_at = self._vary_at
            if vary_at > i:  # the fields after i moved up by one (headers removes Server)
                self._vary_at = vary_at - 1
            elif vary_at == i:
                self._vary_at = -1
        else:
            self._drop(lname, 0, count)

    def _drop(self, lname: bytes, start: int, count: int) -> None:
        """Remove the ``count`` fields named ``lname`` found from index ``start`` on, in place
        (hooks may hold the list); usually one, so no rebuilt lists."""
        lnames, headers = self._lnames, self._headers
        self.rendered = None
        self._vary_at = -1  # fields move
        for _ in range(count):
            start = lnames.index(lname, start)
            lnames.pop(start)
            headers.pop(start)

    def add_vary(self, token: bytes, ltoken: bytes | None = None) -> None:
        """Add ``token`` to the Vary list unless there; ``ltoken``: it in lowercase, where
        the caller has it at hand."""
        if ltoken is None:
            ltoken = token.lower()
        lnames = self._lnames
        if len(lnames) != len(self._headers):
            lnames = self._index()
        if b"vary" not in self._present:  # the usual case: one Vary field, made here
            self._vary_at = len(lnames)
            self._vary_tokens = [ltoken]
            self._headers.append((b"Vary", token))
            lnames.append(b"vary")
            self._present.add(b"vary")
            return
        i = self._vary_at
        if i >= 0:  # the field add_vary made, and its tokens
            tokens = self._vary_tokens
            if ltoken not in tokens:
                tokens.append(ltoken)
                self._headers[i] = (b"Vary", self._headers[i][1] + b", " + token)
                self.rendered = None
            return
        i = lnames.index(b"vary")
        single = len(self._present) == len(lnames) or lnames.count(b"vary") == 1  # no repeats
        if single:
            current = self._headers[i][1]
        else:  # several Vary fields are one list (RFC 9110 §5.3): all of them count
            current = b", ".join([v for (_, v), n in zip(self._headers, lnames, strict=True)
                                  if n == b"vary"])
        tokens = [t.strip().lower() for t in current.split(b",")]
        if ltoken in tokens:
            return
        if single:  # replaced in place; its tokens are known from now on
            self._headers[i] = (b"Vary", current + b", " + token)
            self.rendered = None
            self._vary_at = i
            tokens.append(ltoken)
            self._vary_tokens = tokens
        else:  # folded into the first field
            self.set(b"Vary", current + b", " + token, b"vary")


class FieldBlock:
    """Fields a middleware appends as they are (Response.add_block), prepared once: their
    lowercase names as a list and as a set, whether Vary is one, and their lines rendered."""

    __slots__ = ("fields", "has_vary", "lines", "lnames", "names")

    def __init__(self, fields: list[tuple[bytes, bytes]]) -> None:
        self.fields = fields
        self.lnames = [name.lower() for name, _ in fields]
        self.names = frozenset(self.lnames)
        self.has_vary = b"vary" in self.names
        self.lines = b"".join(b"%s: %s\r\n" % field for field in fields)


# Up to this many request fields, Context.header scans them instead of indexing them.
FEW_FIELDS: Final = 4


class Context:
    """Per-request state shared by the chain; created only for routes that have a chain."""

    __slots__ = (
        "_by_name",
        "cache",
        "cache_outcome",
        "client_ip",
        "consumer",
        "headers",
        "host",
        "id_bytes",
        "make_request_id",
        "max_body_size",
        "method",
        "path",
        "query",
        "rate_limit",
        "remove_request",
        "request_id",
        "route",
        "scheme",
        "set_request",
    )

    def __init__(
        self, method: bytes, path: bytes, query: bytes, host: bytes | None,
        headers: list[tuple[bytes, bytes, bytes]], client_ip: bytes, route: str,
        request_id: Callable[[], str], scheme: bytes = b"http",
    ) -> None:
        # The scheme the client used: b"https" where proxyd terminated TLS, or where a trusted
        # proxy in front of it says so in X-Forwarded-Proto; else b"http".
        self.scheme = scheme
        self.method = method
        self.path = path
        self.query = query
        self.host = host
        self.headers = headers  # (lowercase name, name, value)
        self.client_ip = client_ip
        self.route = route
        self.request_id: str | None = None
        self.id_bytes: bytes | None = None  # request_id encoded, where trace_id echoes it
        self.make_request_id = request_id
        self.set_request: list[tuple[bytes, bytes]] = []  # added to the upstream request
        self.remove_request: set[bytes] = set()  # lowercase names not forwarded
        # The cache middleware's record of this request (a miss, a bypass, an invalidation;
        # none for a hit), and what became of it ("hit", "miss", ...: cache_request.py) for
        # the access log and the counters.
        self.cache: CacheRequest | None = None
        self.cache_outcome = ""
        self.max_body_size: int | None = None
        # Who an authentication element (api_key, basic_auth, jwt_auth) found the client to
        # be: the key's name, the user, the token's subject; None until one has (rate_limit
        # keys on it).
        self.consumer: str | None = None
        # The rate_limit element's decision (the tightest of its limits), for the RateLimit-*
        # fields it adds to the response; None until one has decided. What one element tells
        # another about a request is a typed attribute here, never a string-keyed dict.
        self.rate_limit: Decision | None = None
        self._by_name: dict[bytes, bytes] | None = None

    def header(self, lname: bytes) -> bytes | None:
        """The first field of that lowercase name. A chain asks ~6 times per request: the
        fields are indexed by name once, at the first question, instead of scanned each time
        — except a few, where the scans cost less than the index (~2 fields, from wrk, curl
        or a health check)."""
        by_name = self._by_name
        if by_name is None:
            headers = self.headers
            if len(headers) <= FEW_FIELDS:
                for key, _, value in headers:
                    if key == lname:
                        return value
                return None
            # reversed: where a name repeats, the first field is the one that stays.
            by_name = self._by_name = {key: value for key, _, value in reversed(self.headers)}
        return by_name.get(lname)

    def id(self) -> str:
        if self.request_id is None:
            self.request_id = self.make_request_id()
        return self.request_id


# An extension point: types outside the compiled group (rate_limit, tests) subclass it.
@mypyc_attr(allow_interpreted_subclasses=True)
class Middleware:
    type: ClassVar[str]
    # builtins.type: the class attribute ``type`` above hides the builtin in this body.
    options_model: ClassVar[builtins.type[Options]]
    # Whether the response hook wants the whole body before the head is sent (etag).
    buffers_body: ClassVar[bool] = False

    def __init__(self, options: Options) -> None:
        self.options = options

    def on_request(self, ctx: Context) -> Response | Pending | None:
        """Return a Response to answer without the endpoint (and without later middleware).

        A hook that needs I/O returns Pending; the request waits for it, nothing else does.
        Subclasses keep this return type even when they never wait: compiled, a narrower one
        puts a glue function in every call.
        """
        return None

    def on_response(self, ctx: Context, resp: Response) -> None:
        """Adjust the response head; ``resp.body`` is bytes when buffered or local."""

    def bind(self, services: Services, route: CompiledRoute) -> None:
        """After fork, in the worker: take shared resources (cache store, Redis client)."""

    def wants_body(self, ctx: Context, resp: Response) -> bool:
        """Asked on the upstream's head: should the body be buffered for on_response?"""
        return False

    @classmethod
    def hooks(cls) -> tuple[bool, bool]:
        """(has on_request, has on_response): a chain only calls what a type overrides."""
        return (cls.on_request is not Middleware.on_request,
                cls.on_response is not Middleware.on_response)


def json_response(status: int, message: str, request_id: str,
                  headers: list[tuple[bytes, bytes]] | None = None) -> Response:
    import json

    body = json.dumps({"error": message, "request_id": request_id}).encode()
    # The id in the header too, as on errors of routes without a chain: a client correlates
    # by header whether or not the chain has trace_id (whose echo then finds it present).
    return Response(status, [(b"Content-Type", b"application/json"),
                             (b"X-Request-ID", request_id.encode()), *(headers or [])], body)
