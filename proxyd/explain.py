"""``proxyd explain``: what the running config would do with one request, without sending it."""

from __future__ import annotations

import difflib
from typing import Any
from urllib.parse import urlsplit

from proxyd.cache import policy
from proxyd.config.models import GatewayConfig
from proxyd.middleware import build_chain
from proxyd.middleware.access import ACCESS_TYPES
from proxyd.middleware.base import Context
from proxyd.middleware.cache import SAFE, Cache, describe_freshness
from proxyd.middleware.chain import Chain
from proxyd.middleware.rate_limit import RateLimit
from proxyd.proxy.field_rules import TrustedProxies
from proxyd.proxy.path import BadPath, needs_normalizing, normalize_path
from proxyd.proxy.router import Router, normalize_host

EXPLAIN_CLIENT_IP = "127.0.0.1"  # the peer address assumed when none is given


def explain(config: GatewayConfig, method: str, url: str,
            headers: list[tuple[str, str]],
            client_ip: str = EXPLAIN_CLIENT_IP) -> tuple[bool, dict[str, Any]]:
    if "://" not in url:
        url = "http://localhost" + (url if url.startswith("/") else "/" + url)
    parts = urlsplit(url)
    host = parts.netloc.encode() if parts.netloc else None
    for name, value in headers:
        if name.lower() == "host":
            host = value.encode()
    path = (parts.path or "/").encode()
    if needs_normalizing(path):  # routed in the one form the data plane routes on
        try:
            path = normalize_path(path, config.server.encoded_slashes == "keep")
        except BadPath as exc:
            return False, {"request": {"method": method.upper(), "path": path.decode()},
                           "error": f"400: {exc.message}"}
    hdrs = {n.lower().encode(): v.encode() for n, v in headers}
    router = Router(config.routes)
    route, wrong_method = router.match(method.upper().encode(), normalize_host(host), path, hdrs)
    result: dict[str, Any] = {"request": {"method": method.upper(), "host": host and host.decode(),
                                          "path": path.decode(), "query": parts.query}}
    if route is None:
        if wrong_method is not None:
            allowed = wrong_method.allow_header.decode().removeprefix("Allow: ").strip()
            result["error"] = (f"405: route '{wrong_method.name}' matches but allows only "
                               f"{allowed}")
        else:
            result["error"] = "404: no route matches"
        result["nearest_routes"] = nearest_routes(config, path.decode())
        return False, result
    cfg = route.config
    assert cfg is not None
    forwarded = route.rewrite_path(path) if route.strip_prefix or route.rewrite else path
    chain = build_chain(config, cfg)
    result["route"] = {"name": route.name, "match": cfg.match.model_dump(exclude_none=True)}
    result["chain"] = chain.names
    # The Context the data plane would build for this request (downstream._dispatch): the
    # request line's path and raw query, the Host as sent, every header in order.
    sent = [(n.lower().encode(), n.encode(), v.encode()) for n, v in headers]
    if host is not None and not any(lname == b"host" for lname, _, _ in sent):
        sent.insert(0, (b"host", b"Host", host))
    ctx = Context(method.upper().encode(), path, parts.query.encode(), host, sent,
                  client_ip.encode(), route.name, lambda: "explain")
    result["cache"] = _cache(config, cfg, chain, ctx)
    result["rate_limit"] = _rate_limits(config, route.name, chain, ctx)
    access = _access(config, chain, ctx)
    if access:
        result["access"] = access
    if cfg.respond is not None:
        result["endpoint"] = {"respond": cfg.respond.status}
    else:
        upstream = config.upstreams[cfg.upstream or ""]
        result["endpoint"] = {
            "upstream": cfg.upstream, "balance": upstream.balance,
            "targets": [t.url for t in upstream.targets],
            "forwarded_path": forwarded.decode() + (f"?{parts.query}" if parts.query else ""),
        }
    return True, result


def _cache(config: GatewayConfig, route: Any, chain: Chain, ctx: Context) -> dict[str, Any]:
    """What the cache middleware (proxyd/middleware/cache.py) would do with the request.

    Whether a response is stored depends on that response too (status, Cache-Control, Vary,
    Set-Cookie): for a request the cache would look up, the answer is "if the response allows".
    """
    mw = next((m for m in chain.middleware if isinstance(m, Cache)), None)
    if mw is None:
        return {"key": None, "decision": "off (no cache middleware on this route)"}
    route_cache = route.cache
    if route_cache is not None and not route_cache.enabled:
        return {"key": None, "decision": "off (cache.enabled: false on this route)"}
    key = mw.primary(ctx)
    method = ctx.method
    if method not in (b"GET", b"HEAD"):
        decision = f"not cacheable (method {method.decode()})"
        if method not in SAFE:
            decision += ("; a 2xx/3xx answer invalidates the key and the Location and "
                         "Content-Location URIs of the same origin")
        return {"key": key, "decision": decision}
    request_headers = mw.pairs(ctx)
    if "no-store" in policy.cache_control(request_headers):
        return {"key": key, "decision": "bypass (no-store)"}
    freshness = describe_freshness(config, route_cache)
    if method == b"HEAD":
        decision = "lookup only: a HEAD is answered from a stored GET, never stored itself"
    else:
        statuses = config.cache.statuses
        decision = "cacheable if the response allows" + (
            " (statuses " + ", ".join(str(s) for s in statuses) + ")" if statuses is not None
            else "")
        if policy.header(request_headers, b"authorization") is not None:
            decision += "; with Authorization only if public, s-maxage or must-revalidate"
        decision += "; " + freshness
    wants = policy.RequestDirectives(request_headers)
    if wants.revalidate:
        decision += "; the client asks for revalidation (no-cache)"
    elif not wants.stale_ok:
        decision += "; the client accepts no stale response (max-age, min-fresh)"
    if policy.header(request_headers, b"range") is not None and method == b"GET":
        decision += "; a Range is answered from a complete stored response (206)"
    return {"key": key, "decision": decision}


def _rate_limits(config: GatewayConfig, route_name: str, chain: Chain, ctx: Context
                 ) -> list[dict[str, Any]]:
    """The key each rate_limit middleware would count the request under, and its limits."""
    found = []
    for mw in chain.middleware:
        if not isinstance(mw, RateLimit):
            continue
        # What bind() sets without making limiters: the route name, and the trusted proxies
        # that decide which X-Forwarded-For hop is the client.
        mw.route_name = route_name
        mw.trusted = TrustedProxies(config.server.trusted_proxies)
        found.append({"key": mw.key(ctx), "backend": mw.o.backend,
                      "limits": [f"{limit.count}/{limit.period:g}s burst {limit.burst}"
                                 for limit in mw.limits]})
    return found


def _access(config: GatewayConfig, chain: Chain, ctx: Context) -> list[dict[str, str]]:
    """What each access element (jwt_auth, basic_auth, api_key, ip_access, forward_auth)
    would decide, in chain order; jwt_auth verifies only with keys from the config (a JWKS is
    not fetched), and forward_auth says what it would ask (the auth service is not asked)."""
    trusted = TrustedProxies(config.server.trusted_proxies)
    return [{"element": mw.type, "decision": mw.explain(ctx, trusted)}
            for mw in chain.middleware if isinstance(mw, ACCESS_TYPES)]


def nearest_routes(config: GatewayConfig, path: str, n: int = 3) -> list[str]:
    candidates = {}
    for route in config.routes:
        m = route.match
        key = m.path or m.path_prefix or m.path_regex or "/"
        candidates[route.name] = key
    scored = sorted(candidates, key=lambda name: -difflib.SequenceMatcher(
        None, path, candidates[name]).ratio())
    return [f"{name} ({candidates[name]})" for name in scored[:n]]


def format_explain(ok: bool, result: dict[str, Any]) -> str:
    req = result["request"]

    def line(label: str, text: str) -> str:
        return f"{label:<10} {text}"

    lines = [line("request", f"{req['method']} {req['host'] or '-'} {req['path']}"
                  + (f"?{req['query']}" if req["query"] else ""))]
    if not ok:
        lines.append(line("result", result["error"]))
        lines.append(line("nearest", ", ".join(result["nearest_routes"])))
        return "\n".join(lines)
    lines.append(line("route", f"{result['route']['name']}  {result['route']['match']}"))
    lines.append(line("chain", (" → ".join(result["chain"]) or "(none)") + " → endpoint"))
    endpoint = result["endpoint"]
    if "respond" in endpoint:
        lines.append(line("endpoint", f"respond {endpoint['respond']}"))
    else:
        lines.append(line("endpoint", f"upstream {endpoint['upstream']} "
                          f"({endpoint['balance']}): " + ", ".join(endpoint["targets"])))
        lines.append(line("forwards", endpoint["forwarded_path"]))
    if (cache := result.get("cache")) is not None:
        if cache["key"] is not None:
            # key_headers join the key on new lines: shown as \n, one line.
            lines.append(line("cache key", cache["key"].replace("\n", "\\n")))
        lines.append(line("cache", cache["decision"]))
    for limit in result.get("rate_limit", []):
        lines.append(line("rate_limit", f"key {limit['key']}  ({limit['backend']}: "
                          + ", ".join(limit["limits"]) + ")"))
    if result.get("rate_limit") == []:
        lines.append(line("rate_limit", "none on this route"))
    for element in result.get("access", []):
        lines.append(line("access", f"{element['element']}: {element['decision']}"))
    return "\n".join(lines)
