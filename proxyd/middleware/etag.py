"""Strong ETags for bodies that lack one, and If-None-Match answered with 304.

Only bodies whose Content-Length is known and at most ``max_size`` are buffered to hash;
anything larger streams untouched. A 304 carries the validators but never a body.
"""

from __future__ import annotations

from typing import Final

from xxhash import xxh3_128_hexdigest

from proxyd.cache.fields import weak_match
from proxyd.middleware.base import Context, Middleware, Response
from proxyd.middleware.element_options import EtagOptions
from proxyd.proxy.field_rules import content_length

# Fields a 304 keeps (RFC 9110 §15.4.5); the rest describe a body that is not sent.
_KEEP_ON_304: Final = frozenset({
    b"etag", b"cache-control", b"content-location", b"date", b"expires", b"vary",
    b"last-modified",
})


def body_tag(body: bytes) -> bytes:
    """A strong validator from the body: its XXH3-128 hash.

    Why not a cryptographic digest: a tag only has to change when the body does (it is not a
    signature — nginx and Apache use mtime and size). XXH3 is far cheaper than CRC-32 +
    Adler-32 or BLAKE2b, most of all on large bodies (docs/performance.md). 128 bits leave no
    practical chance of two versions sharing a tag by accident; unlike BLAKE2b, XXH3 does not
    resist bodies crafted to collide — which only matters to an origin serving attacker-chosen
    bodies at one URL to clients that revalidate against each other's tags.
    """
    return b'"%s"' % xxh3_128_hexdigest(body).encode()


class Etag(Middleware):
    type = "etag"
    options_model = EtagOptions
    buffers_body = True

    def __init__(self, options: EtagOptions) -> None:
        super().__init__(options)
        self.max_size = options.max_size

    def wants_body(self, ctx: Context, resp: Response) -> bool:
        # Only GET bodies are buffered (a HEAD's tag comes from the upstream or not at all).
        if resp.status != 200 or ctx.method != b"GET" or resp.has(b"etag"):
            return False
        size = resp.upstream_length  # parsed by the relay already
        if size < 0:
            length = resp.get(b"content-length")
            if length is None:
                return False
            size = content_length(length)
        return size <= self.max_size

    def on_response(self, ctx: Context, resp: Response) -> None:
        if resp.status != 200 or ctx.method not in (b"GET", b"HEAD"):
            return
        etag = resp.get(b"etag")
        if etag is None and resp.body is not None and len(resp.body) <= self.max_size:
            etag = body_tag(resp.body)
            resp.add(b"ETag", etag, b"etag")
        if etag is None:
            return
        inm = ctx.header(b"if-none-match")
        if inm is not None and weak_match(inm, etag):
            resp.status = 304
            resp.reason = b"Not Modified"
            resp.headers = [(n, v) for n, v in resp.headers if n.lower() in _KEEP_ON_304]
            resp.body = b"" if resp.body is not None else None
            resp.drop_body = True
