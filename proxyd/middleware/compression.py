"""gzip, brotli (and zstd when the zstandard package is installed), negotiated per request.

Compression streams: each upstream chunk goes through a compressor object and is flushed out
at once (a sync flush: the stream stays one stream), so a large body is never held whole and
server-sent events or NDJSON reach the client as they are written. Buffered bodies (etag,
local answers) are compressed in one call. Bodies below ``min_size``, of types that do not
compress, already encoded, or marked ``no-transform`` pass untouched.
"""

from __future__ import annotations

import zlib
from typing import Any, Final

import brotli

from proxyd.middleware.base import Context, Middleware, Response
from proxyd.middleware.element_options import CompressionOptions
from proxyd.proxy.field_rules import content_length

try:  # optional: only offered when installed
    import zstandard
except ImportError:  # pragma: no cover - depends on the environment
    zstandard = None


TYPE_MEMO: Final = 64


class _Gzip:
    def __init__(self, level: int) -> None:
        self._c = zlib.compressobj(level, zlib.DEFLATED, 31)

    def feed(self, chunk: bytes) -> bytes:
        if not chunk:
            return b""
        return self._c.compress(chunk) + self._c.flush(zlib.Z_SYNC_FLUSH)

    def finish(self) -> bytes:
        return self._c.flush()

    def whole(self, body: bytes) -> bytes:
        return self._c.compress(body) + self._c.flush()


class _Brotli:
    def __init__(self, quality: int) -> None:
        self._c = brotli.Compressor(quality=quality)

    def feed(self, chunk: bytes) -> bytes:
        if not chunk:
            return b""
        return self._c.process(chunk) + self._c.flush()  # type: ignore[no-any-return]

    def finish(self) -> bytes:
        return self._c.finish()  # type: ignore[no-any-return]

    def whole(self, body: bytes) -> bytes:
        return self._c.process(body) + self._c.finish()  # type: ignore[no-any-return]


class _Zstd:
    def __init__(self, level: int) -> None:
        self._c: Any = zstandard.ZstdCompressor(level=level).compressobj()

    def feed(self, chunk: bytes) -> bytes:
        if not chunk:
            return b""
        return (self._c.compress(chunk)  # type: ignore[no-any-return]
                + self._c.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK))

    def finish(self) -> bytes:
        return self._c.flush()  # type: ignore[no-any-return]

    def whole(self, body: bytes) -> bytes:
        return self._c.compress(body) + self._c.flush()  # type: ignore[no-any-return]


def parse_accept_encoding(value: bytes) -> dict[bytes, float]:
    prefs: dict[bytes, float] = {}
    for item in value.lower().split(b","):
        coding, _, params = item.strip().partition(b";")
        q = 1.0
        params = params.strip()
        if params.startswith(b"q="):
            try:
                q = float(params[2:])
            except ValueError:
                q = 0.0
        if coding:
            prefs[coding.strip()] = q
    return prefs


class Compression(Middleware):
    type = "compression"
    options_model = CompressionOptions

    def __init__(self, options: CompressionOptions) -> None:
        super().__init__(options)
        self.min_size = options.min_size
        self.order = [a.encode() for a in options.algorithms]
        self.types = tuple(t.lower().encode() for t in options.types)
        self.o = options
        # Content-Type value -> compressible: a route's responses repeat a few values, and
        # the lookup costs a fraction of lowering and matching each. Bounded: a value may vary
        # (a multipart boundary).
        self._type_ok: dict[bytes, bool] = {}

    def choose(self, accept: bytes) -> bytes | None:
        prefs = parse_accept_encoding(accept)
        star = prefs.get(b"*", 0.0)
        best, best_q = None, 0.0
        for coding in self.order:  # ties go to the server's preference
            q = prefs.get(coding, star)
            if q > best_q:
                best, best_q = coding, q
        return best

    def _make(self, coding: bytes) -> _Gzip | _Brotli | _Zstd:
        if coding == b"br":
            return _Brotli(self.o.brotli_quality)
        if coding == b"zstd":
            return _Zstd(self.o.zstd_level)
        return _Gzip(self.o.gzip_level)

    def on_response(self, ctx: Context, resp: Response) -> None:
        if resp.status < 200 or resp.status in (204, 206, 304) or resp.drop_body:
            return
        ctype = resp.get(b"content-type")
        if ctype is None:
            return
        ok = self._type_ok.get(ctype)
        if ok is None:
            lowered = ctype.lower().lstrip()
            # gRPC frames its own messages (and compresses them itself, grpc-encoding): a
            # compressed body would not be gRPC any more, whatever ``types`` says.
            ok = lowered.startswith(self.types) and not lowered.startswith(b"application/grpc")
            if len(self._type_ok) < TYPE_MEMO:
                self._type_ok[ctype] = ok
        if not ok:
            return
        resp.add_vary(b"Accept-Encoding", b"accept-encoding")
        if resp.has(b"content-encoding"):
            return
        cache_control = resp.get(b"cache-control")
        if cache_control is not None and cache_control.lower().find(b"no-transform") >= 0:
            return
        if resp.body is not None:
            size: int | None = len(resp.body)
        else:
            length = resp.get(b"content-length")
            size = content_length(length) if length else None
        if size is not None and size < self.min_size:
            return
        accept = ctx.header(b"accept-encoding")
        coding = self.choose(accept) if accept else None
        if coding is None:
            return
        compressor = self._make(coding)
        resp.remove(b"content-length")
        resp.add(b"Content-Encoding", coding)
        etag = resp.get(b"etag")
        if etag is not None and not etag.startswith(b"W/"):
            resp.set(b"ETag", b"W/" + etag)  # a transformed representation: weak validator
        if resp.body is not None:
            resp.body = compressor.whole(resp.body)
            resp.add(b"Content-Length", str(len(resp.body)).encode())
        elif ctx.method != b"HEAD":
            resp.filters.append(compressor)
