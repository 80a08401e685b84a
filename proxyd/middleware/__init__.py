"""The explicit registry of middleware types, and per-route chain compilation.

No registration by import side effect: a type exists because it is listed here, so what a config
can name never depends on which modules happen to be imported.
"""

from __future__ import annotations

import difflib
from typing import Any

from pydantic import ValidationError

from proxyd.config.models import GatewayConfig, Route
from proxyd.middleware.access import ACCESS_TYPES
from proxyd.middleware.base import Middleware
from proxyd.middleware.cache import Cache
from proxyd.middleware.chain import Chain
from proxyd.middleware.compression import Compression
from proxyd.middleware.cors import Cors
from proxyd.middleware.element_options import Options
from proxyd.middleware.etag import Etag
from proxyd.middleware.headers import Headers
from proxyd.middleware.rate_limit import RateLimit
from proxyd.middleware.security_headers import SecurityHeaders
from proxyd.middleware.trace_id import TraceId
from proxyd.middleware.validation import Validation

REGISTRY: dict[str, type[Middleware]] = {
    cls.type: cls
    for cls in (Cors, SecurityHeaders, Validation, TraceId, Headers, RateLimit, Cache, Etag,
                Compression, *ACCESS_TYPES)
}
# The elements that name the client (Context.consumer), and all that decide who may pass.
AUTHENTICATING = ("jwt_auth", "basic_auth", "api_key")
ACCESS = (*AUTHENTICATING, "ip_access", "forward_auth")

Problem = tuple[tuple[str | int, ...], str]  # (key path, message)


def unknown_type_message(name: str) -> str:
    close = difflib.get_close_matches(name, REGISTRY, n=1)
    hint = f", did you mean '{close[0]}'?" if close else f"; known types: {', '.join(REGISTRY)}"
    return f"unknown middleware type '{name}'{hint}"


def _validate(data: dict[str, Any], at: tuple[str | int, ...]) -> tuple[Options | None,
                                                                         list[Problem]]:
    cls = REGISTRY.get(str(data.get("type", "")))
    if cls is None:
        return None, [((*at, "type"), unknown_type_message(str(data.get("type", ""))))]
    try:
        return cls.options_model.model_validate(data), []
    except ValidationError as exc:
        problems: list[Problem] = []
        for err in exc.errors():
            message = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                field = str(err["loc"][-1])
                known = [f for f in cls.options_model.model_fields if f != "type"]
                close = difflib.get_close_matches(field, known, n=1)
                message = f"unknown option '{field}' for {cls.type}" + (
                    f", did you mean '{close[0]}'?" if close else f"; options: {', '.join(known)}"
                )
            problems.append(((*at, *err["loc"]), message))
        return None, problems


def route_entries(config: GatewayConfig, route: Route, index: int | None = None
                  ) -> tuple[list[tuple[dict[str, Any], tuple[str | int, ...]]], list[Problem]]:
    """The route's entries: the global list with the route's overrides merged in by type."""
    problems: list[Problem] = []
    by_type = {entry.type: i for i, entry in enumerate(config.middleware)}
    overrides = route.middleware
    at_route: tuple[str | int, ...] = ("routes", index, "middleware") if index is not None else ()
    for name in overrides:
        if name not in by_type:
            problems.append(((*at_route, name),
                             f"route overrides middleware '{name}', which is not in the "
                             "top-level middleware list (add it there to set its position)"))
    entries = []
    for i, entry in enumerate(config.middleware):
        data = entry.model_dump()
        at: tuple[str | int, ...] = ("middleware", i)
        if entry.type in overrides:
            data = {**data, **overrides[entry.type], "type": entry.type}
            at = (*at_route, entry.type)
        entries.append((data, at))
    return entries, problems


def check_middleware(config: GatewayConfig) -> tuple[list[Problem], list[Problem]]:
    """(errors, warnings) for the middleware list and every route's overrides."""
    errors: list[Problem] = []
    warnings: list[Problem] = []
    for i, entry in enumerate(config.middleware):
        options, problems = _validate(entry.model_dump(), ("middleware", i))
        errors += problems + _references(config, options, ("middleware", i))
    seen: dict[str, int] = {}
    for i, entry in enumerate(config.middleware):
        if entry.type in seen:
            errors.append((("middleware", i, "type"),
                           f"middleware '{entry.type}' is listed twice (also at "
                           f"middleware[{seen[entry.type]}])"))
        seen.setdefault(entry.type, i)
    if "etag" in seen and "compression" in seen and seen["etag"] > seen["compression"]:
        warnings.append((("middleware", seen["etag"], "type"),
                         "etag after compression: ETags are computed before compressing, so "
                         "compressed responses only get weak ETags; put etag before compression"))
    if "rate_limit" in seen:
        entry = config.middleware[seen["rate_limit"]]
        workers = config.server.worker_count()
        if getattr(entry, "backend", "memory") == "memory" and workers > 1:
            warnings.append((("middleware", seen["rate_limit"], "backend"),
                             f"rate_limit backend memory: each of the {workers} workers enforces "
                             f"1/{workers} of the limit on its own connections; use backend redis "
                             "for an exact shared limit"))
    if "cache" in seen and "compression" in seen and seen["cache"] < seen["compression"]:
        warnings.append((("middleware", seen["cache"], "type"),
                         "cache before compression: entries are stored compressed, one variant "
                         "per Accept-Encoding (fine); responses refreshed in the background by "
                         "stale-while-revalidate are stored uncompressed"))
    warnings += _access_warnings(config, seen)
    for r, route in enumerate(config.routes):
        entries, problems = route_entries(config, route, r)
        errors += problems
        for data, at in entries:
            if at[0] == "routes":
                options, problems = _validate(data, at)
                errors += problems + _references(config, options, at)
    return errors, warnings


def _references(config: GatewayConfig, options: Options | None, at: tuple[str | int, ...]
                ) -> list[Problem]:
    """Names an element's options give that the rest of the config must define."""
    upstream = getattr(options, "upstream", None)
    if options is None or options.type != "forward_auth" or upstream in config.upstreams:
        return []
    defined = sorted(config.upstreams)
    close = difflib.get_close_matches(str(upstream), defined, n=1, cutoff=0.6)
    hint = (f", did you mean '{close[0]}'?" if close
            else f" (defined: {', '.join(defined)})" if defined
            else " (no upstreams are defined)")
    return [((*at, "upstream"), f"unknown upstream '{upstream}' for forward_auth{hint}")]


def _access_warnings(config: GatewayConfig, seen: dict[str, int]) -> list[Problem]:
    """Orders and settings that leave the access elements weaker than they look."""
    warnings: list[Problem] = []
    if "cache" in seen:
        for name in ACCESS:
            if name in seen and seen[name] > seen["cache"]:
                warnings.append((("middleware", seen["cache"], "type"),
                                 f"cache before {name}: cache hits are answered before {name} "
                                 f"runs, to any client; put {name} before cache"))
    if "rate_limit" in seen:
        entry = config.middleware[seen["rate_limit"]]
        key = getattr(entry, "key", "client_ip")
        if "consumer" in ([key] if isinstance(key, str) else key) and not any(
                seen.get(name, len(seen)) < seen["rate_limit"] for name in AUTHENTICATING):
            warnings.append((("middleware", seen["rate_limit"], "key"),
                             "rate_limit keyed on consumer without api_key, basic_auth or "
                             "jwt_auth before it: every request counts under one empty name"))
    if "jwt_auth" in seen:
        url = getattr(config.middleware[seen["jwt_auth"]], "jwks_url", None)
        if isinstance(url, str) and url.startswith("http://") and not _loopback(url):
            warnings.append((("middleware", seen["jwt_auth"], "jwks_url"),
                             "jwks_url over plain http: anyone on the path can substitute keys "
                             "and sign tokens; use https"))
    return warnings


def _loopback(url: str) -> bool:
    import ipaddress
    from urllib.parse import urlsplit

    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def build_chain(config: GatewayConfig, route: Route) -> Chain:
    """Instantiate a route's chain; disabled entries are left out. Config must be valid."""
    entries, _ = route_entries(config, route)
    middleware = []
    for data, _at in entries:
        cls = REGISTRY[data["type"]]
        options = cls.options_model.model_validate(data)
        if options.enabled:
            middleware.append(cls(options))
    return Chain(middleware)
