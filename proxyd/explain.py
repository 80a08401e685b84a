"""``proxyd explain``: what the running config would do with one request, without sending it."""

from __future__ import annotations

import difflib
from typing import Any
from urllib.parse import urlsplit

from proxyd.config.models import GatewayConfig
from proxyd.middleware import build_chain
from proxyd.proxy.router import Router, normalize_host, remove_dot_segments


def explain(config: GatewayConfig, method: str, url: str,
            headers: list[tuple[str, str]]) -> tuple[bool, dict[str, Any]]:
    if "://" not in url:
        url = "http://localhost" + (url if url.startswith("/") else "/" + url)
    parts = urlsplit(url)
    host = parts.netloc.encode() if parts.netloc else None
    for name, value in headers:
        if name.lower() == "host":
            host = value.encode()
    raw_path = (parts.path or "/").encode()
    path = remove_dot_segments(raw_path) if b"/." in raw_path else raw_path
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
    lines = [f"request   {req['method']} {req['host'] or '-'} {req['path']}"
             + (f"?{req['query']}" if req["query"] else "")]
    if not ok:
        lines.append(f"result    {result['error']}")
        lines.append("nearest   " + ", ".join(result["nearest_routes"]))
        return "\n".join(lines)
    lines.append(f"route     {result['route']['name']}  {result['route']['match']}")
    lines.append("chain     " + (" → ".join(result["chain"]) or "(none)") + " → endpoint")
    endpoint = result["endpoint"]
    if "respond" in endpoint:
        lines.append(f"endpoint  respond {endpoint['respond']}")
    else:
        lines.append(f"endpoint  upstream {endpoint['upstream']} ({endpoint['balance']}): "
                     + ", ".join(endpoint["targets"]))
        lines.append(f"forwards  {endpoint['forwarded_path']}")
    for key in ("cache", "rate_limit"):
        if key in result:
            lines.append(f"{key:<9} {result[key]}")
    return "\n".join(lines)
