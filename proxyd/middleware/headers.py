"""Set, add and remove request and response headers, with {placeholders}.

Templates are split once at config load into literal bytes and placeholder names, so a header
without placeholders costs nothing per request beyond appending it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from proxyd.middleware.base import Context, Middleware, Pending, Response
from proxyd.middleware.element_options import (
    PLACEHOLDER,
    PLACEHOLDER_NAMES,
    HeaderOps,
    HeadersOptions,
)

if TYPE_CHECKING:
    from proxyd.middleware.services import Services
    from proxyd.proxy.router import CompiledRoute

PLACEHOLDERS: dict[str, Callable[[Context], bytes]] = {
    "client_ip": lambda c: c.client_ip,
    "request_id": lambda c: c.id().encode(),
    "route": lambda c: c.route.encode(),
    "method": lambda c: c.method,
    "path": lambda c: c.path,
    "host": lambda c: c.host or b"",
}
# The options accept exactly these names (they are validated before this module runs).
assert tuple(PLACEHOLDERS) == PLACEHOLDER_NAMES


Template = bytes | list[bytes | Callable[[Context], bytes]]


def compile_template(template: str) -> Template:
    parts: list[bytes | Callable[[Context], bytes]] = []
    pos = 0
    for m in PLACEHOLDER.finditer(template):
        if m.start() > pos:
            parts.append(template[pos:m.start()].encode())
        parts.append(PLACEHOLDERS[m.group(1)])
        pos = m.end()
    if pos < len(template):
        parts.append(template[pos:].encode())
    return _template(parts)


def resolve_route(template: Template, route: bytes) -> Template:
    """``{route}`` is the same for every request of a route's chain: filled in at bind."""
    if isinstance(template, bytes):
        return template
    route_part = PLACEHOLDERS["route"]
    return _template([route if part is route_part else part for part in template])


def _template(parts: list[bytes | Callable[[Context], bytes]]) -> Template:
    """Literal parts only: one bytes value, which costs nothing to render."""
    if all(isinstance(p, bytes) for p in parts):
        return b"".join(p for p in parts if isinstance(p, bytes))
    return parts


def render(template: Template, ctx: Context) -> bytes:
    if isinstance(template, bytes):
        return template
    return b"".join(p if isinstance(p, bytes) else p(ctx) for p in template)


class CompiledOps:
    def __init__(self, ops: HeaderOps) -> None:
        # "set" is remove-then-append, "add" is append: one list of fields to append, set's
        # first (their order on the wire is the config's), and one set of names to remove.
        self.append = [(k.encode(), k.lower().encode(), compile_template(v))
                       for k, v in (*ops.set.items(), *ops.add.items())]
        self.remove = {k.lower().encode() for k in (*ops.remove, *ops.set)}
        self.remove_list = sorted(self.remove)  # iterated per response: a list is cheaper
        self.empty = not (self.append or self.remove)

    def bind_route(self, route: str) -> None:
        name = route.encode()
        self.append = [(n, ln, resolve_route(t, name)) for n, ln, t in self.append]


class Headers(Middleware):
    type = "headers"
    options_model = HeadersOptions

    def __init__(self, options: HeadersOptions) -> None:
        super().__init__(options)
        self.request = CompiledOps(options.request)
        self.response = CompiledOps(options.response)

    def bind(self, services: Services, route: CompiledRoute) -> None:
        self.request.bind_route(route.name)
        self.response.bind_route(route.name)

    def on_request(self, ctx: Context) -> Response | Pending | None:
        ops = self.request
        if not ops.empty:
            ctx.remove_request |= ops.remove
            for name, _, template in ops.append:
                ctx.set_request.append((name, render(template, ctx)))
        return None

    def on_response(self, ctx: Context, resp: Response) -> None:
        ops = self.response
        if ops.empty:
            return
        # In place through the response's index of lowercase names: a new list would make
        # every later hook lower all the names again.
        for lname in ops.remove_list:
            resp.remove(lname)  # a set lookup when absent
        for name, lname, template in ops.append:
            resp.add(name, render(template, ctx), lname)
