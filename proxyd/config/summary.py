"""What a loaded config will do, in one screen: ``proxyd check-config`` prints this.

The summary is built from the validated models (never from the YAML), so it shows what the
proxy will actually run with: defaults filled in, variables substituted, ``workers: auto``
resolved on this machine.
"""

from __future__ import annotations

from typing import Any

from proxyd.config.models import GatewayConfig, Match, Route
from proxyd.config.redact import redact_text, redact_url, redact_value
from proxyd.config.semantic import uses_redis
from proxyd.cpus import worker_choice
from proxyd.errors import ConfigIssue


def _match_fields(match: Match) -> dict[str, Any]:
    return match.model_dump(exclude_none=True)


def _target(route: Route) -> dict[str, Any]:
    if route.respond is not None:
        return {"respond": route.respond.status}
    return {"upstream": route.upstream}


def _tls(config: GatewayConfig) -> dict[str, Any]:
    return {str(a): tls.model_dump() for a in config.server.listen
            if (tls := getattr(a, "tls", None)) is not None}


def _workers(config: GatewayConfig) -> dict[str, Any]:
    count, reason = worker_choice(config.server.workers)
    return {"configured": config.server.workers, "effective": count, "reason": reason}


def summarize(config: GatewayConfig) -> dict[str, Any]:
    """A JSON-ready description of the config (``check-config --format json``); secrets
    (admin token, URL passwords) never appear in it."""
    summary: dict[str, Any] = redact_value(_summary(config), config)
    return summary


def _summary(config: GatewayConfig) -> dict[str, Any]:
    server = config.server
    return {
        "listeners": [str(a) for a in server.listen],
        "tls": _tls(config),
        **({"redis": redact_url(config.redis.url)} if uses_redis(config) else {}),
        "backlog": server.backlog,
        "workers": _workers(config),
        "admin": {"listen": str(config.admin.listen), "token_set": bool(config.admin.token)},
        "routes": [
            {"name": r.name, "match": _match_fields(r.match), **_target(r),
             **({"strip_prefix": r.strip_prefix} if r.strip_prefix else {}),
             **({"websocket": True} if r.websocket.enabled else {})}
            for r in config.routes
        ],
        "upstreams": {
            name: {"balance": u.balance, "protocol": u.protocol,
                   "targets": [{"url": t.url, "weight": t.weight} for t in u.targets]}
            for name, u in config.upstreams.items()
        },
        "middleware": [entry.type for entry in config.middleware],
        "cache": {"backend": config.cache.backend, "max_entries": config.cache.max_entries,
                  "routes": dict(_cache_routes(config))},
        "access_log": {"format": config.access_log.format, "path": config.access_log.path,
                       "enabled": config.access_log.enabled},
        "metrics": config.metrics.enabled,
    }


def _cache_routes(config: GatewayConfig) -> list[tuple[str, str]]:
    """(route, which freshness its cache applies) for each route whose chain has the cache:
    whether responses without freshness of their own are stored, and for how long."""
    from proxyd.middleware import route_entries  # the middleware registry imports config
    from proxyd.middleware.cache import describe_freshness

    rows = []
    for route in config.routes:
        entries, _ = route_entries(config, route)
        if any(data.get("type") == "cache" and data.get("enabled", True) is not False
               for data, _ in entries):
            rows.append((route.name, describe_freshness(config, route.cache)))
    return rows


def _describe_match(match: Match) -> str:
    parts: list[str] = []
    for key, value in _match_fields(match).items():
        if key == "methods":
            parts.append("methods=" + ",".join(value))
        elif key == "headers":
            parts.extend(f"header {k}={v}" for k, v in value.items())
        else:
            parts.append(f"{key}={value}")
    return "  ".join(parts) or "(any request)"


def _describe_target(route: Route) -> str:
    if route.respond is not None:
        return f"respond {route.respond.status}"
    extra = f" (strip {route.strip_prefix})" if route.strip_prefix else ""
    return f"upstream {route.upstream}{extra}"


def _table(rows: list[tuple[str, str, str]], sep: str) -> list[str]:
    """Rows aligned on their first two columns: a summary is read by scanning down them."""
    w0 = max((len(r[0]) for r in rows), default=0)
    w1 = max((len(r[1]) for r in rows), default=0)
    sep = f" {sep} " if sep else "  "
    return [f"  {a:<{w0}}  {b:<{w1}}{sep}{c}".rstrip() for a, b, c in rows]


def _listener(address: object) -> str:
    parts = []
    tls = getattr(address, "tls", None)
    if tls is not None:
        parts.append(f"TLS {tls.min_version}+, cert {tls.cert}")
        if tls.certificates:
            names = sum(len(c.names) for c in tls.certificates)
            parts.append(f"{len(tls.certificates)} more by SNI ({names} names)")
        if tls.client_ca is not None:
            parts.append(f"client certificates {tls.client_auth} ({tls.client_ca})")
    if getattr(address, "proxy_protocol", False):
        parts.append("PROXY protocol from " + ", ".join(address.proxy_protocol_from))  # type: ignore[attr-defined]
    if not getattr(address, "http2", True):
        parts.append("HTTP/1.1 only")
    return f"{address} ({'; '.join(parts)})" if parts else str(address)


def format_summary(config: GatewayConfig, filename: str, warnings: list[ConfigIssue]) -> str:
    server = config.server
    count, reason = worker_choice(server.workers)
    workers = f"auto: {count} on this machine ({reason.removeprefix('auto: ')})" \
        if server.workers == "auto" else str(count)
    token = "token set" if config.admin.token else "no token"
    lines = [
        f"{filename}: configuration OK"
        + (" (every setting is its default)" if config == GatewayConfig() else ""),
        f"listeners:  {', '.join(_listener(a) for a in server.listen)} "
        f"(backlog {server.backlog})",
        f"workers:    {workers}",
        f"admin:      {config.admin.listen} ({token})",
        *([f"redis:      {redact_url(config.redis.url)}"] if uses_redis(config) else []),
        f"routes ({len(config.routes)}):",
        *_table([(r.name, _describe_match(r.match), _describe_target(r))
                 for r in config.routes], "->"),
        f"upstreams ({len(config.upstreams)}):",
        *_table([(name, u.balance, ", ".join(
                    t.url if t.weight == 1 else f"{t.url} (weight {t.weight})"
                    for t in u.targets) + ("" if u.protocol == "http1" else f" ({u.protocol})"))
                 for name, u in config.upstreams.items()], ""),
        "middleware: " + (" -> ".join(e.type for e in config.middleware) or "(none)"),
    ]
    cached = _cache_routes(config)
    if cached:
        lines.append(f"cache:      {config.cache.backend}, on {len(cached)} route(s):")
        lines.extend(_table([(name, "", freshness) for name, freshness in cached], ""))
    if warnings:
        lines.append(f"warnings ({len(warnings)}):")
        lines.extend(f"  {w}" for w in warnings)
    return redact_text("\n".join(lines), config)
