"""Secrets never leave the process in what proxyd prints about its config.

The secrets of a config are the admin token and any password inside a URL (``redis.url``;
upstream target URLs may not carry credentials at all). Certificate and key *paths* are not
secret; the files' contents are never read into anything printed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

if TYPE_CHECKING:
    from proxyd.config.models import GatewayConfig

MASK = "***"
SECRET_PATHS = frozenset({("admin", "token"), ("redis", "url")})  # values never echoed


def redact_url(url: str) -> str:
    """``redis://user:pw@host/0`` → ``redis://user:***@host/0``; a URL without one unchanged."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return MASK if "@" in url else url
    if password is None and "@" not in parts.netloc:
        return url
    user = parts.username or ""
    host = parts.netloc.rpartition("@")[2]
    userinfo = f"{user}:{MASK}" if password is not None else (user or MASK)
    return urlunsplit(parts._replace(netloc=f"{userinfo}@{host}"))


def secrets(config: GatewayConfig) -> list[str]:
    """The secret strings of a config, longest first (so a replace never leaves a tail)."""
    found = [config.admin.token]
    for url in (config.redis.url, *(t.url for u in config.upstreams.values() for t in u.targets)):
        try:
            parts = urlsplit(url)
            found += [parts.password or ""]
        except ValueError:
            continue
    return sorted({s for s in found if len(s) >= 3}, key=len, reverse=True)


def redact_text(text: str, config: GatewayConfig) -> str:
    """Any secret of ``config`` that appears in ``text`` replaced by the mask."""
    for secret in secrets(config):
        text = text.replace(secret, MASK)
    return text


def redact_value(value: Any, config: GatewayConfig) -> Any:
    """The same over a JSON-able structure (dicts, lists, strings)."""
    if isinstance(value, str):
        return redact_text(value, config)
    if isinstance(value, dict):
        return {k: redact_value(v, config) for k, v in value.items()}
    if isinstance(value, list):
        return [redact_value(v, config) for v in value]
    return value
