"""Checks that span fields: things each model accepts alone but the whole config cannot mean.

Pure functions of a validated GatewayConfig that return findings as (path, message): no I/O and
no DNS, so a file gets the same answer on every machine. The loader turns paths into
file:line:col with the positions it recorded; a config built in code (tests, a reload from the
admin API) can be checked the same way.
"""

from __future__ import annotations

import difflib
import ipaddress
import re
import warnings
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from proxyd.config.models import GatewayConfig, Match, Route, Upstream, UpstreamTLS
from proxyd.config.redact import redact_url
from proxyd.config.source import Path, format_path
from proxyd.config.types import HostPort

# RFC 9110 §5.6.2 token: what a field name and a method must be.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")
_BAD_FIELD_VALUE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # CR/LF would split the response


@dataclass(frozen=True)
class Finding:
    path: Path
    message: str
    on_key: bool = False  # point at the key itself (a bad header *name*) rather than its value


@dataclass
class Report:
    errors: list[Finding] = field(default_factory=list)
    warnings: list[Finding] = field(default_factory=list)

    def error(self, path: Path, message: str, *, on_key: bool = False) -> None:
        self.errors.append(Finding(path, message, on_key))

    def warn(self, path: Path, message: str, *, on_key: bool = False) -> None:
        self.warnings.append(Finding(path, message, on_key))


def check(config: GatewayConfig) -> Report:
    report = Report()
    _check_listeners(config, report)
    _check_upstreams(config, report)
    _check_routes(config, report)
    if not config.routes:
        report.warn((), "no routes are defined: every request will be answered 404")
    _check_middleware(config, report)
    _check_redis(config, report)
    return report


def uses_redis(config: GatewayConfig) -> bool:
    """Whether anything reads ``redis.url``: the cache's Redis backend, or a Redis rate limit
    (in the middleware list or a route's override of it)."""
    if config.cache.backend == "redis":
        return True
    if any(getattr(entry, "backend", None) == "redis" for entry in config.middleware):
        return True
    return any(isinstance(options, dict) and options.get("backend") == "redis"
               for route in config.routes for options in route.middleware.values())


def _check_redis(config: GatewayConfig, report: Report) -> None:
    # Read as both clients read it (redis-py's URL and TLS reading, for the cache and the
    # rate limiter), so a URL that cannot work fails here, with file:line, not on each
    # request. Only when something reads it: redis-py is a large import, and a worker that
    # never speaks Redis should not carry it.
    if not uses_redis(config):
        return
    from proxyd.middleware.rate_limit.redis_client import RedisTarget

    try:
        RedisTarget(config.redis.url)
    except ValueError as exc:
        report.error(("redis", "url"), str(exc))


def _check_middleware(config: GatewayConfig, report: Report) -> None:
    # Imported here: the registry imports the middleware modules, which import config models.
    from proxyd.middleware import check_middleware

    errors, warnings = check_middleware(config)
    for path, message in errors:
        report.error(path, message)
    for path, message in warnings:
        report.warn(path, message)


# --- listeners ------------------------------------------------------------------------------------

def _host_problem(host: str) -> str | None:
    try:
        ipaddress.ip_address(host)
        return None
    except ValueError:
        pass
    labels = host.rstrip(".").split(".")
    if all(label.isdigit() for label in labels):
        return f"invalid IPv4 address {host!r}"
    if len(host) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
        return f"invalid host name {host!r}"
    return None


def _overlap(a: HostPort, b: HostPort) -> bool:
    """Would binding both fail or split traffic? Same port, and same or wildcard host."""
    if a.port != b.port or a.port == 0:  # port 0 = "any free port": never a clash
        return False
    if a.host.lower() == b.host.lower():
        return True
    try:
        ip_a, ip_b = ipaddress.ip_address(a.host), ipaddress.ip_address(b.host)
    except ValueError:
        return False  # host names resolve at bind time; comparing them here would need DNS
    if ip_a == ip_b:
        return True
    return ip_a.version == ip_b.version and (ip_a.is_unspecified or ip_b.is_unspecified)


def _check_listeners(config: GatewayConfig, report: Report) -> None:
    listen = config.server.listen
    for i, addr in enumerate(listen):
        if problem := _host_problem(addr.host):
            report.error(("server", "listen", i), problem)
            continue
        for j in range(i):
            if _overlap(addr, listen[j]):
                report.error(("server", "listen", i),
                             f"{addr} clashes with server.listen[{j}] ({listen[j]})")
                break
    admin = config.admin.listen
    if problem := _host_problem(admin.host):
        report.error(("admin", "listen"), problem)
        return
    for j, addr in enumerate(listen):
        if _overlap(admin, addr):
            report.error(("admin", "listen"),
                         f"admin address {admin} clashes with traffic listener "
                         f"server.listen[{j}] ({addr})")
            break
    if not config.admin.token and not _is_loopback(admin.host):
        report.warn(("admin", "listen"),
                    f"admin listens on {admin.host} without a token: anyone who can reach it "
                    "can reload or stop the proxy; set admin.token or listen on 127.0.0.1")


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host.lower() == "localhost"


# --- upstreams ------------------------------------------------------------------------------------

def _url_problem(url: str) -> str | None:
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        return f"invalid target URL {url!r}: {exc}"
    if parts.scheme not in ("http", "https"):
        return f"target URL {url!r} must start with http:// or https://"
    if not parts.hostname:
        return f"target URL {url!r} has no host"
    if parts.username is not None or parts.password is not None:
        return f"target URL {url!r} must not contain credentials"
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        return (f"target URL {url!r} must be scheme://host[:port] only "
                "(no path or query; use strip_prefix or rewrite to change paths)")
    if port == 0:
        return f"target URL {url!r} has port 0"
    return _host_problem(parts.hostname)


def _check_upstreams(config: GatewayConfig, report: Report) -> None:
    used = {route.upstream for route in config.routes}
    # An auth service (forward_auth's upstream) is used by the routes its element is on.
    used |= {getattr(entry, "upstream", None) for entry in config.middleware}
    used |= {override.get("upstream") for route in config.routes
             for override in route.middleware.values() if isinstance(override, dict)}
    for name, upstream in config.upstreams.items():
        for k, target in enumerate(upstream.targets):
            if problem := _url_problem(target.url):
                # The message quotes the URL: never with the password it must not contain.
                problem = problem.replace(target.url, redact_url(target.url))
                report.error(("upstreams", name, "targets", k, "url"), problem)
        if upstream.health_check and not upstream.health_check.path.startswith("/"):
            report.error(("upstreams", name, "health_check", "path"),
                         "health check path must start with '/'")
        _check_resilience(name, upstream, report)
        _check_protocol(name, upstream, report)
        if name not in used:
            report.warn(("upstreams", name), f"upstream '{name}' is not used by any route",
                        on_key=True)


def _check_protocol(name: str, upstream: Upstream, report: Report) -> None:
    at = ("upstreams", name, "protocol")
    if upstream.protocol == "http1":
        return
    scheme = "https" if upstream.protocol == "h2" else "http"
    for target in upstream.targets:
        if not target.url.lower().startswith(scheme + "://"):
            report.error(at, f"protocol {upstream.protocol} needs {scheme}:// targets "
                         f"({'h2 is over TLS' if scheme == 'https' else 'h2c is cleartext'})")
            break
    if upstream.proxy_protocol != "off":
        report.error(("upstreams", name, "proxy_protocol"), "a PROXY protocol header names one "
                     "client; an HTTP/2 connection carries many: not with protocol "
                     f"{upstream.protocol}")


def _check_resilience(name: str, upstream: Upstream, report: Report) -> None:
    """Balancing, retries, outlier detection and TLS options that only make sense together."""
    at: Path = ("upstreams", name)
    if upstream.hash_key is not None and upstream.balance != "hash":
        report.warn((*at, "hash_key"), f"hash_key has no effect with balance: {upstream.balance} "
                    "(only with balance: hash)", on_key=True)
    for k, method in enumerate(upstream.retries.methods):
        if not _TOKEN.fullmatch(method):
            report.error((*at, "retries", "methods", k), f"invalid HTTP method {method!r}")
    if "POST" in upstream.retries.methods or "PATCH" in upstream.retries.methods:
        report.warn((*at, "retries", "methods"),
                    "POST/PATCH are not idempotent: a retry may apply the request twice")
    outlier = upstream.outlier_detection
    if outlier.max_ejection < outlier.base_ejection:
        report.error((*at, "outlier_detection", "max_ejection"),
                     "max_ejection must not be shorter than base_ejection")
    tls = upstream.tls
    https = any(t.url.lower().startswith("https://") for t in upstream.targets)
    if tls != UpstreamTLS() and not https:
        report.warn((*at, "tls"), "tls options have no effect: no target is https://",
                    on_key=True)
    if tls.client_key is not None and tls.client_cert is None:
        report.error((*at, "tls", "client_key"), "client_key needs client_cert")
    if https and not tls.verify:
        report.warn((*at, "tls", "verify"),
                    "upstream certificates are not verified (tls.verify: false)")


# --- routes ---------------------------------------------------------------------------------------

def _match_key(match: Match) -> tuple[object, ...]:
    """Equal keys ⇔ the two matches accept exactly the same requests (as written)."""
    return (
        match.host.lower() if match.host else None, match.path, match.path_prefix,
        match.path_regex, frozenset(match.methods) if match.methods is not None else None,
        frozenset((k.lower(), v) for k, v in match.headers.items())
        if match.headers is not None else None,
    )


def _check_routes(config: GatewayConfig, report: Report) -> None:
    names: dict[str, int] = {}
    matches: dict[tuple[object, ...], int] = {}
    for i, route in enumerate(config.routes):
        at: Path = ("routes", i)
        if route.name in names:
            report.error((*at, "name"), f"duplicate route name '{route.name}' "
                         f"(also {format_path(('routes', names[route.name]))})")
        else:
            names[route.name] = i
        key = _match_key(route.match)
        if key in matches:
            j = matches[key]
            report.error((*at, "match"),
                         f"route '{route.name}' has the same match as route "
                         f"'{config.routes[j].name}' (routes[{j}]) and can never be reached")
        else:
            matches[key] = i
            _check_shadowed(config.routes, i, report)
        _check_target(config, route, at, report)
        _check_probe_paths(config, route, at, report)
        _check_match(route.match, (*at, "match"), report)
        _check_paths(route, at, report)
        if route.respond is not None:
            for name, value in route.respond.headers.items():
                _check_field_name(name, (*at, "respond", "headers", name), report)
                if _BAD_FIELD_VALUE.search(value):
                    report.error((*at, "respond", "headers", name),
                                 "header value must not contain control characters")


def _check_shadowed(routes: list[Route], i: int, report: Report) -> None:
    """Routes match first to last: a route whose every request an earlier one takes (a
    catch-all, a shorter prefix on the same host) is never used, whatever its order was
    meant to say."""
    later = routes[i].match
    for j in range(i):
        if _covers(routes[j].match, later):
            report.warn(("routes", i, "match"),
                        f"route '{routes[i].name}' can never match: route '{routes[j].name}' "
                        f"(routes[{j}]) comes first and takes every request it would; move "
                        "the more specific route above it")
            return


def _check_probe_paths(config: GatewayConfig, route: Route, at: Path, report: Report) -> None:
    probes = config.server.probes
    path = route.match.path
    if not probes.enabled or path not in (probes.live, probes.ready):
        return
    which = "live" if path == probes.live else "ready"
    methods = _methods(route.match)
    if methods is not None and not methods - {"GET", "HEAD"}:
        report.warn((*at, "match", "path"),
                    f"route '{route.name}' can never match: GET and HEAD {path} are answered "
                    f"by server.probes.{which} before routing (move the probe, or set "
                    "server.probes.enabled: false)")
    elif methods is None or methods & {"GET", "HEAD"}:
        report.warn((*at, "match", "path"),
                    f"GET and HEAD {path} are answered by server.probes.{which} before routing: "
                    f"route '{route.name}' only gets the other methods")


def _methods(match: Match) -> frozenset[str] | None:
    if match.methods is None:
        return None
    methods = frozenset(match.methods)
    return methods | {"HEAD"} if "GET" in methods else methods  # as the router adds it


def _covers(first: Match, then: Match) -> bool:
    """Does every request ``then`` accepts also match ``first``? Conservative: False when it
    cannot tell (a regex against anything but no path condition at all)."""
    if first.host is not None:
        host, other = first.host.lower(), (then.host or "").lower()
        if not other:
            return False
        if host.startswith("*."):
            if not other.endswith(host[1:]):
                return False
        elif host != other:
            return False
    if first.path is not None and first.path != then.path:
        return False
    if first.path_prefix is not None:
        paths = [p for p in (then.path, then.path_prefix) if p is not None]
        if not any(p.startswith(first.path_prefix) for p in paths):
            return False
    if first.path_regex is not None and first.path_regex != then.path_regex:
        return False
    first_methods, then_methods = _methods(first), _methods(then)
    if first_methods is not None and (then_methods is None or not then_methods <= first_methods):
        return False
    wanted = {k.lower(): v for k, v in (first.headers or {}).items()}
    given = {k.lower(): v for k, v in (then.headers or {}).items()}
    return all(given.get(name) == value for name, value in wanted.items())


def _check_target(config: GatewayConfig, route: Route, at: Path, report: Report) -> None:
    if route.upstream is None and route.respond is None:
        report.error(at, f"route '{route.name}' needs either 'upstream' (proxy the request) "
                     "or 'respond' (answer directly)")
    elif route.upstream is not None and route.respond is not None:
        report.error((*at, "respond"), f"route '{route.name}' has both 'upstream' and "
                     "'respond'; use one", on_key=True)
    if route.upstream is not None and route.upstream not in config.upstreams:
        defined = sorted(config.upstreams)
        close = difflib.get_close_matches(route.upstream, defined, n=1, cutoff=0.6)
        hint = (f", did you mean '{close[0]}'?" if close
                else f" (defined: {', '.join(defined)})" if defined
                else " (no upstreams are defined)")
        report.error((*at, "upstream"), f"unknown upstream '{route.upstream}'{hint}")
    upstream = config.upstreams.get(route.upstream or "")
    if upstream is not None and upstream.protocol != "http1" and route.websocket.enabled:
        report.error((*at, "websocket"), f"route '{route.name}' relays WebSocket upgrades, "
                     f"which upstream '{route.upstream}' cannot take over HTTP/2")
    if route.respond is not None:
        for key in ("strip_prefix", "rewrite", "timeouts"):
            if getattr(route, key) is not None:
                report.warn((*at, key), f"{key} has no effect on a route that uses 'respond'",
                            on_key=True)


def _check_match(match: Match, at: Path, report: Report) -> None:
    for key in ("path", "path_prefix"):
        value = getattr(match, key)
        if value is not None and not value.startswith("/"):
            report.error((*at, key), f"{key} must start with '/'")
    if match.path_regex is not None:
        _check_regex(match.path_regex, (*at, "path_regex"), report)
    for k, method in enumerate(match.methods or []):
        if not _TOKEN.fullmatch(method):
            report.error((*at, "methods", k), f"invalid HTTP method {method!r}")
    for name in match.headers or {}:
        _check_field_name(name, (*at, "headers", name), report)


def _check_paths(route: Route, at: Path, report: Report) -> None:
    if route.rewrite is not None:
        _check_regex(route.rewrite.regex, (*at, "rewrite", "regex"), report)
    prefix = route.strip_prefix
    if prefix is None:
        return
    bases = [p for p in (route.match.path_prefix, route.match.path) if p is not None]
    if not prefix.startswith("/") or not any(base.startswith(prefix) for base in bases):
        # Stripping a prefix the request may not have would forward a different path for
        # some requests than for others; demand the match guarantees it.
        report.error((*at, "strip_prefix"),
                     f"strip_prefix {prefix!r} needs a match.path_prefix or match.path that "
                     "starts with it")


def _check_regex(pattern: str, at: Path, report: Report) -> None:
    # `re` reports doubtful syntax (e.g. a possible nested set "[[") as a FutureWarning; the
    # operator should see it at check time rather than as stderr noise from every worker.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            re.compile(pattern)
        except re.error as exc:
            report.error(at, f"invalid regular expression: {exc}")
    for warning in caught:
        report.warn(at, f"regular expression: {warning.message}")


def _check_field_name(name: str, at: Path, report: Report) -> None:
    if not _TOKEN.fullmatch(name):
        report.error(at, f"invalid header name {name!r}", on_key=True)
