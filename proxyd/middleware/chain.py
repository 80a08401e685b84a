"""A route's compiled middleware chain and the onion order it runs in."""

from __future__ import annotations

from collections.abc import Sequence

from proxyd.middleware.base import Context, Middleware, Pending, Response


class Chain:
    def __init__(self, middleware: Sequence[Middleware]) -> None:
        self.middleware = list(middleware)
        self.size = len(self.middleware)
        self._request = [(i, m) for i, m in enumerate(self.middleware) if m.hooks()[0]]
        self._response = [(i, m) for i, m in enumerate(self.middleware) if m.hooks()[1]]
        self._response.reverse()  # innermost first on the way out
        self._response_all = [m for _, m in self._response]  # the usual case: no index test
        self._buffering = [m for m in self.middleware if m.buffers_body]

    def __bool__(self) -> bool:
        return self.size > 0

    @property
    def names(self) -> list[str]:
        return [m.type for m in self.middleware]

    def request(self, ctx: Context, start: int = 0) -> tuple[Response | Pending | None, int]:
        """Run request hooks in order from index ``start``.

        Returns (answer, index of the middleware that answered), (None, size) when the request
        goes on to the endpoint, or (Pending, index) when a hook needs I/O (Redis): the caller
        waits for the future and calls ``resume``.
        """
        for i, mw in self._request:
            if i < start:
                continue
            answer = mw.on_request(ctx)
            if answer is not None:
                return answer, i
        return None, self.size

    def resume(self, ctx: Context, index: int, result: Response | None
               ) -> tuple[Response | Pending | None, int]:
        """Continue after a Pending hook at ``index`` settled with ``result``."""
        if result is not None:
            return result, index
        return self.request(ctx, index + 1)

    def wants_body(self, ctx: Context, resp: Response) -> bool:
        for mw in self._buffering:  # noqa: SIM110  (any(genexpr) costs more: every response)
            if mw.wants_body(ctx, resp):
                return True
        return False

    def response(self, ctx: Context, resp: Response, upto: int | None = None) -> None:
        """Response hooks, innermost first, of the middleware standing before ``upto``."""
        if upto is None:
            for mw in self._response_all:
                mw.on_response(ctx, resp)
            return
        for i, mw in self._response:
            if i < upto:
                mw.on_response(ctx, resp)
