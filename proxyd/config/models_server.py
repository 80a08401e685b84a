"""The server and admin sections of the config file, and Model, every model's base.

Server: the traffic listeners (TLS terminated there when configured), workers and their
recycling, and the client-side limits and timeouts. Admin: the admin listener and its token.
Every model forbids unknown keys and is frozen: a loaded config is a value that a reload swaps
whole, never edits. Each field carries its description here, next to its code; ``proxyd schema``
and the docs are generated from these models.
"""

from __future__ import annotations

import ipaddress
from typing import Annotated, Any, Final, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    ValidationError,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from proxyd.config.types import ByteSize, Duration, HostPort, HostPortValue, parse_host_port
from proxyd.cpus import worker_choice


class Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class Limits(Model):
    """What a client may send and how slowly: exceeding a size answers the status named."""

    max_body_size: ByteSize = Field("10MiB", description="Largest request body; larger → 413.")  # type: ignore[assignment]
    max_header_size: ByteSize = Field("8KiB", description="Largest request header section → 431.")  # type: ignore[assignment]
    max_uri_size: ByteSize = Field("8KiB", description="Longest request target → 414.")  # type: ignore[assignment]
    max_headers: int = Field(100, ge=1, description="Most header fields in one request → 431.")
    header_timeout: Duration = Field(  # type: ignore[assignment]
        "10s", description="Time a client has to send a complete header section (slowloris)."
    )
    body_timeout: Duration = Field(  # type: ignore[assignment]
        "60s", description="Longest wait between request body bytes from a client; then the "
        "connection closes (408 if nothing was answered yet) and its upstream exchange ends.",
    )
    send_timeout: Duration = Field(  # type: ignore[assignment]
        "60s", description="A client that reads nothing of a response for this long (its socket "
        "buffer full) is disconnected, and its upstream connection with it.",
    )
    max_connections: int = Field(
        10000, ge=0, description="Open client connections per worker; one more is answered 503 "
        "and closed. 0 = no cap.",
    )
    max_keepalive_requests: int = Field(
        1000, ge=0, description="Requests served on one client connection; the last response "
        "carries Connection: close (HTTP/2: streams, then a graceful GOAWAY). 0 = no cap.",
    )


class SNICertificate(Model):
    names: list[str] = Field(
        min_length=1, description='Server names this certificate answers: exact '
        '("api.example.com") or one wildcard label ("*.example.com", not the apex).',
    )
    cert: str = Field(min_length=1, description="PEM certificate chain file (leaf first).")
    key: str = Field(min_length=1, description="PEM private key file.")

    @field_validator("names")
    @classmethod
    def _names(cls, value: list[str]) -> list[str]:
        for name in value:
            bare = name.removeprefix("*.")
            if not bare or "*" in bare or name != name.strip():
                raise ValueError(f"{name!r} is not a server name or a *.domain wildcard")
        return [name.lower() for name in value]


class TLS(Model):
    cert: str = Field(min_length=1, description="PEM certificate chain file (leaf first): the "
                      "default certificate, for clients whose server name no other matches.")
    key: str = Field(min_length=1, description="PEM private key file.")
    min_version: Literal["1.2", "1.3"] = Field("1.2", description="Oldest TLS version accepted.")
    certificates: list[SNICertificate] = Field(
        default_factory=list, description="More certificates, chosen by the server name the "
        "client asks for (SNI): an exact name first, then a wildcard, else the default.",
    )
    client_ca: str | None = Field(
        None, description="PEM file of the CAs whose client certificates are accepted (mutual "
        "TLS). Unset: no client certificate is asked for.",
    )
    client_auth: Literal["required", "optional"] = Field(
        "required", description="With client_ca: required refuses a handshake without a valid "
        "client certificate; optional asks for one and verifies it if sent.",
    )
    client_cert_headers: bool = Field(
        True, description="With client_ca: tell the upstream who the client is, in "
        "X-Client-Cert-Subject and X-Client-Cert-Fingerprint (SHA-256 of the DER certificate); "
        "the same fields from a client are always dropped.",
    )
    session_tickets: bool = Field(
        True, description="Resume sessions with stateless tickets (TLS 1.2 and 1.3); false "
        "leaves only the server's session cache (TLS 1.2) and full handshakes.",
    )

    @field_validator("min_version", mode="before")
    @classmethod
    def _version_number(cls, v: Any) -> Any:
        return str(v) if isinstance(v, float) else v  # YAML reads 1.2 as a number


ANYONE: Final = ("0.0.0.0/0", "::/0")


class ListenSpec(Model):
    """The mapping form of a listener: ``{address: host:port, tls: {cert, key}}``."""

    address: HostPortValue = Field(description="host:port to listen on.")
    tls: TLS | None = Field(None, description="Terminate TLS on this listener.")
    proxy_protocol: bool = Field(
        False, description="Read a PROXY protocol header (v1 or v2, as HAProxy, AWS NLB and "
        "others send it) ahead of each connection: the client address it carries is the one "
        "the access log, rate limits, ip_access and X-Forwarded-For use.",
    )
    proxy_protocol_from: list[str] = Field(
        default_factory=lambda: list(ANYONE),
        description="CIDRs of the peers (load balancers) that must send the PROXY header; a "
        "connection from one without a valid header is closed, and a header from any other "
        "peer closes its connection (a client may not choose its own address). Default: "
        "every peer must send it.",
    )

    http2: bool = Field(
        True, description="Speak HTTP/2 to clients that ask for it: by ALPN (h2) on a TLS "
        "listener, by prior knowledge (h2c: the connection starts with the HTTP/2 preface) on "
        "a cleartext one. false: HTTP/1.1 only.",
    )

    @field_validator("proxy_protocol_from")
    @classmethod
    def _cidrs(cls, value: list[str]) -> list[str]:
        for cidr in value:
            ipaddress.ip_network(cidr, strict=False)  # a ValueError names the bad one
        return value


class Listener(HostPort):
    """A traffic listener: its address (equal to and hashed as that HostPort, so sockets stay
    keyed by address across a reload that adds or drops TLS) plus its TLS and PROXY protocol
    settings, if any."""

    tls: TLS | None = None
    proxy_protocol: bool = False
    proxy_protocol_from: tuple[str, ...] = ANYONE
    http2: bool = True

    @classmethod
    def of(cls, address: HostPort, tls: TLS | None = None, proxy_protocol: bool = False,
           proxy_protocol_from: tuple[str, ...] = ANYONE, http2: bool = True) -> Listener:
        listener = cls(address.host, address.port)
        listener.tls = tls
        listener.proxy_protocol = proxy_protocol
        listener.proxy_protocol_from = proxy_protocol_from
        listener.http2 = http2
        return listener


def _problems(exc: ValidationError) -> str:
    out = []
    for err in exc.errors(include_url=False):
        where = ".".join(str(el) for el in err["loc"])
        if err["type"] == "missing":
            message = "required key is missing"
        elif err["type"] == "extra_forbidden":
            message = "unknown key"
        else:
            message = err["msg"].removeprefix("Value error, ")
        out.append(f"{where}: {message}" if where else message)
    return "; ".join(out)


def parse_listener(value: Any) -> Listener:
    """``"host:port"`` (the contract), or ``{address: "host:port", tls: {...}}``."""
    if isinstance(value, Listener):
        return value
    if isinstance(value, dict):
        try:
            spec = ListenSpec.model_validate(value)
        except ValidationError as exc:
            raise ValueError(_problems(exc)) from None
        return Listener.of(spec.address, spec.tls, spec.proxy_protocol,
                           tuple(spec.proxy_protocol_from), spec.http2)
    return Listener.of(parse_host_port(value))


def _dump_listener(listener: HostPort) -> str | dict[str, Any]:
    tls = getattr(listener, "tls", None)
    proxy = getattr(listener, "proxy_protocol", False)
    http2 = getattr(listener, "http2", True)
    if tls is None and not proxy and http2:
        return str(listener)
    out: dict[str, Any] = {"address": str(listener)}
    if tls is not None:
        out["tls"] = tls.model_dump(exclude_defaults=True)  # as written, short
    if proxy:
        out["proxy_protocol"] = True
        out["proxy_protocol_from"] = list(getattr(listener, "proxy_protocol_from", ANYONE))
    if not http2:
        out["http2"] = False
    return out


ListenerValue = Annotated[
    HostPort,
    PlainValidator(parse_listener),
    PlainSerializer(_dump_listener),
    WithJsonSchema({
        "description": 'address: "host:port", or {address: "host:port", tls: {cert, key, '
                       'min_version}} for a TLS listener',
        "oneOf": [
            {"type": "string"},
            {"type": "object", "additionalProperties": False, "required": ["address"],
             "properties": {
                 "address": {"type": "string"},
                 "tls": {"type": "object", "additionalProperties": False,
                         "required": ["cert", "key"],
                         "properties": {"cert": {"type": "string"}, "key": {"type": "string"},
                                        "min_version": {"enum": ["1.2", "1.3", 1.2, 1.3]}}},
                 "proxy_protocol": {"type": "boolean"},
                 "proxy_protocol_from": {"type": "array", "items": {"type": "string"}},
                 "http2": {"type": "boolean"},
             }},
        ],
    }),
]


class Probes(Model):
    """Liveness and readiness on the traffic port, for Kubernetes probes and load balancers
    that can only reach that port. They are answered before routing, for GET and HEAD only:
    other methods, and every other path, reach the routes. The admin port has its own
    /health and /health/ready, always on."""

    enabled: bool = Field(True, description="false: no probe paths; every request is routed.")
    live: str = Field(
        "/health", description='Answered 200 {"status":"ok"} while the worker runs.')
    ready: str = Field(
        "/health/ready", description='Answered 200 {"ready":true}, or 503 once the worker '
        "drains (reload, stop), so a balancer stops sending it new connections.")

    @field_validator("live", "ready")
    @classmethod
    def _absolute(cls, v: str) -> str:
        if not v.startswith("/") or "?" in v or "#" in v:
            raise ValueError(f"a probe path is a path starting with '/', got {v!r}")
        return v

    @model_validator(mode="after")
    def _distinct(self) -> Probes:
        if self.live == self.ready:
            raise ValueError("live and ready must be different paths")
        return self


# Each worker is a whole Python process (tens of MiB, its own pools and caches): far beyond
# any host's CPU count, more of them only cost memory and descriptors. A number above this is
# a typo, and forking it would exhaust the host before a single request is served.
MAX_WORKERS = 1024


def _workers_schema(schema: dict[str, Any]) -> None:
    # _workers_form also takes the number as a string ("4", what ${VAR} substitution yields).
    schema["anyOf"] = [{"type": "integer", "minimum": 1, "maximum": MAX_WORKERS},
                       {"const": "auto"}, {"type": "string", "pattern": r"^\s*\d+\s*$"}]


class Server(Model):
    listen: list[ListenerValue] = Field(
        default_factory=lambda: ["127.0.0.1:8080"], min_length=1,  # type: ignore[arg-type]
        description='Traffic listeners: "host:port", or {address, tls: {cert, key, '
                    'min_version}} to terminate TLS there.',
    )
    workers: int | Literal["auto"] = Field(
        "auto", json_schema_extra=_workers_schema,
        description=f"Worker processes, 1 to {MAX_WORKERS}; auto = the CPUs this process may "
        "use: those in its affinity mask, or fewer when its cgroup has a CPU quota (Docker "
        "--cpus, a Kubernetes CPU limit): the quota rounded up. check-config, /status and the "
        "log at start say what auto chose and why.",
    )
    backlog: int = Field(4096, ge=1, description="listen() backlog of every traffic socket.")
    keepalive_timeout: Duration = Field("5s", description="Idle keep-alive connection lifetime.")  # type: ignore[assignment]
    max_requests: int = Field(
        10000, ge=0, description="Recycle a worker after N requests; 0 = never."
    )
    max_requests_jitter: int = Field(1000, ge=0, description="Random extra requests per worker.")
    drain_timeout: Duration = Field(  # type: ignore[assignment]
        "30s", description="Time in-flight requests get on reload/stop."
    )
    limits: Limits = Field(
        default_factory=Limits, description="Client-side size limits and timeouts, per request "
        "and per connection.")
    trusted_proxies: list[str] = Field(
        default_factory=list,
        description="CIDRs whose X-Forwarded-* headers are trusted and extended, not replaced.",
    )
    encoded_slashes: Literal["reject", "keep"] = Field(
        "reject",
        description="Request paths with an encoded slash or backslash (%2F, %5C) or a raw "
        "backslash, which servers split into segments differently. reject: answer 400. keep: "
        "route on them as ordinary characters of a segment, never as separators, and forward "
        "them encoded (a raw backslash as %5C). Every path is normalised before routing, and "
        "that form is what the upstream receives: escapes of unreserved characters decoded, "
        "other escapes' hex digits uppercased, dot segments (also encoded ones, %2e%2e) "
        "removed; %00 and malformed escapes are always answered 400.",
    )
    headers_with_underscores: Literal["drop", "reject", "allow"] = Field(
        "drop",
        description="Request header fields whose name has an underscore (X_Forwarded_For), "
        "which some servers and frameworks (CGI, WSGI) read as the dashed name. drop: remove "
        "them before forwarding (nginx's underscores_in_headers off). reject: answer 400. "
        "allow: forward them.",
    )
    probes: Probes = Field(
        default_factory=Probes,
        description="Probe paths answered on the traffic port before any route (GET, HEAD).",
    )
    watch_config: bool = Field(
        False,
        description="Poll the config file about once a second and reload (the SIGHUP path) "
        "when its content changes; follows Kubernetes ConfigMap symlink swaps. Read at start.",
    )

    @field_validator("workers", mode="before")
    @classmethod
    def _workers_form(cls, v: Any) -> Any:
        # One clear message instead of pydantic's two (one per branch of the union).
        if v == "auto" or (isinstance(v, int) and not isinstance(v, bool)):
            return v
        if isinstance(v, str) and v.strip().isdigit():
            return int(v)
        raise ValueError(f"workers must be auto or a positive integer, got {v!r}")

    @field_validator("workers")
    @classmethod
    def _workers_positive(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v < 1:
            raise ValueError("workers must be at least 1 (or auto)")
        if isinstance(v, int) and v > MAX_WORKERS:
            raise ValueError(f"workers must be at most {MAX_WORKERS} (or auto), got {v}: each "
                             "worker is a process of its own")
        return v

    @field_validator("trusted_proxies")
    @classmethod
    def _cidrs(cls, v: list[str]) -> list[str]:
        for cidr in v:
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError:
                raise ValueError(f"invalid CIDR {cidr!r}") from None
        return v

    def worker_count(self) -> int:
        return worker_choice(self.workers)[0]


class Admin(Model):
    listen: HostPortValue = Field("127.0.0.1:9901", description="Admin HTTP server address.")  # type: ignore[assignment]
    token: str = Field("", description="Bearer token required by mutating endpoints when set.")
    protect_reads: bool = Field(
        False, description="With a token set, also require it for /status and /metrics."
    )
