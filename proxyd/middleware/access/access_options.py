"""The options of the authentication and access elements, validated at config load.

Key, user and API-key files are read here, while the config is checked, so that a missing
file or a bad hash is an error with file:line from ``check-config`` instead of a worker that
fails to start; what they gave is kept on the options (private attributes) for the element.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    Field,
    PrivateAttr,
    SecretStr,
    field_validator,
    model_validator,
)

from proxyd.config.types import Duration
from proxyd.middleware.access.keys import (
    ALGORITHMS,
    ASYMMETRIC,
    HMAC_ALGORITHMS,
    KeySet,
    UnusableKey,
    load_key_file,
    secret_key,
)
from proxyd.middleware.access.passwords import hash_problem
from proxyd.middleware.element_options import TYPE, Options

_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")  # a field name (RFC 9110 §5.1)
_QUOTABLE = re.compile(r'^[ !#-\[\]-~]*$')  # printable ASCII but '"' and '\'
API_KEY_HASH = re.compile(r"^sha256:[0-9a-f]{64}$")


def _header_name(value: str | None) -> str | None:
    if value is not None and not _TOKEN.match(value):
        raise ValueError(f"{value!r} is not a valid header name")
    return value


def _realm(value: str) -> str:
    if not _QUOTABLE.match(value):
        raise ValueError("realm: printable ASCII without '\"' or '\\'")
    return value


# A field name (RFC 9110 §5.1), and a realm: quoted in a challenge, so nothing that would end
# the quoted string.
HeaderName = Annotated[str, AfterValidator(_header_name)]
Realm = Annotated[str, AfterValidator(_realm)]


def _read_lines(path: str, what: str) -> list[tuple[int, str, str]]:
    """(line number, name, value) of a ``name:value`` file; blank and # lines skipped."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read(1 << 24)
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read {what} {path}: {exc}") from None
    entries = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, value = line.partition(":")
        if not sep or not name:
            raise ValueError(f"{path}:{number}: expected name:hash")
        entries.append((number, name, value))
    return entries


# -- jwt_auth ----------------------------------------------------------------------------------


class JwtAuthOptions(Options):
    type: Literal["jwt_auth"] = Field("jwt_auth", description=TYPE)
    algorithms: list[str] = Field(
        description="The token algorithms (alg) accepted: HS256/384/512 with a shared secret, or "
        "RS*, PS*, ES256/384/512, EdDSA with public keys; never none, and never HS* together "
        "with a public-key algorithm.")
    issuer: str | list[str] | None = Field(
        None, description="Required iss value (or any of a list); unset: iss is not checked.")
    audience: str | list[str] | None = Field(
        None, description="This API's audience: the token's aud must name it (or one of a "
        "list). Unset: tokens that carry an aud are refused (RFC 7519 §4.1.3).")
    leeway: Duration = Field(  # type: ignore[assignment]  # parsed: validate_default
        "30s", description="Clock skew allowed on exp, nbf and iat.")
    require: list[str] = Field(
        default_factory=lambda: ["exp"],
        description="Claims a token must carry; exp by default, so no token is valid forever.")
    secret: SecretStr | None = Field(
        None, description="HS*: the shared secret (use ${ENV} interpolation, or secret_file); "
        "at least as long as the hash (32 bytes for HS256, RFC 7518 §3.2).")
    secret_file: str | None = Field(
        None, description="HS*: a file holding the shared secret (one trailing newline ignored).")
    key_file: str | None = Field(
        None, description="Public-key algorithms: a PEM public key or certificate, or a JWKS "
        "document, read at load.")
    jwks_url: str | None = Field(
        None, description="Public-key algorithms: the issuer's JWKS, fetched by each worker at "
        "start and every jwks_refresh in the background; keys are found by kid; a failed "
        "fetch keeps the last good keys.")
    jwks_refresh: Duration = Field(  # type: ignore[assignment]
        "5m", description="How often the JWKS is fetched again (1s at the least).")
    jwks_timeout: Duration = Field(  # type: ignore[assignment]
        "5s", description="Longest wait for a JWKS fetch.")
    jwks_min_interval: Duration = Field(  # type: ignore[assignment]
        "30s", description="A token naming a kid the JWKS lacks makes it fetched again at "
        "once (a rotation), at most this often; also the first wait after a failed fetch.")
    claims_to_headers: dict[str, str] = Field(
        default_factory=dict,
        description="Claim name → request header set for the upstream (lists joined with "
        "', ', objects as JSON). Inbound fields of those names are always removed.")
    consumer_claim: str | None = Field(
        "sub", description="The claim that names the consumer (rate_limit key: consumer).")
    forward_token: bool = Field(
        True, description="Forward the Authorization header to the upstream.")
    realm: Realm = Field(
        "proxyd", description='The realm in WWW-Authenticate: Bearer realm="..."')
    cache_size: int = Field(
        10000, ge=0, description="Verified tokens remembered per route and worker (least "
        "recently used go first), each until its exp; 0: every request verifies.")

    _keys: KeySet | None = PrivateAttr(None)

    @field_validator("algorithms")
    @classmethod
    def _algorithms(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("list at least one algorithm")
        for alg in v:
            if alg.lower() == "none":
                raise ValueError("'none' is never accepted: an unsigned token proves nothing")
            if alg not in ALGORITHMS:
                raise ValueError(f"unknown algorithm {alg!r}; known: {', '.join(ALGORITHMS)}")
        if set(v) & set(HMAC_ALGORITHMS) and set(v) & ASYMMETRIC:
            raise ValueError("HS* (shared secret) cannot be listed with public-key algorithms: "
                             "a public key could then be taken for an HMAC secret")
        return v

    @field_validator("jwks_url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is not None:
            parts = urlsplit(v)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(f"{v!r}: expected an http(s):// URL")
        return v

    @field_validator("claims_to_headers")
    @classmethod
    def _claim_headers(cls, v: dict[str, str]) -> dict[str, str]:
        for name in v.values():
            _header_name(name)
        return v

    @model_validator(mode="after")
    def _key_source(self) -> JwtAuthOptions:
        sources = [name for name in ("secret", "secret_file", "key_file", "jwks_url")
                   if getattr(self, name) is not None]
        if len(sources) != 1:
            raise ValueError("give exactly one of secret, secret_file (HS*), key_file, jwks_url "
                             f"(public keys); got {', '.join(sources) or 'none'}")
        hmac = bool(set(self.algorithms) & set(HMAC_ALGORITHMS))
        if hmac != (sources[0] in ("secret", "secret_file")):
            raise ValueError(f"{sources[0]} does not fit the algorithms "
                             f"{', '.join(self.algorithms)}: HS* take secret or secret_file, "
                             "public-key algorithms key_file or jwks_url")
        try:
            if hmac:
                secret = self._secret_bytes()
                shortest = max(HMAC_ALGORITHMS[a] for a in self.algorithms)
                if len(secret) < shortest:
                    raise ValueError(f"the secret is {len(secret)} bytes; "
                                     f"{'/'.join(self.algorithms)} need at least {shortest} "
                                     "(RFC 7518 §3.2)")
                self._keys = secret_key(secret, self.algorithms)
            elif self.key_file is not None:
                self._keys = load_key_file(self.key_file, self.algorithms)
        except UnusableKey as exc:
            raise ValueError(f"key_file: {exc}") from None
        return self

    def _secret_bytes(self) -> bytes:
        if self.secret is not None:
            return self.secret.get_secret_value().encode()
        assert self.secret_file is not None
        try:
            with open(self.secret_file, "rb") as f:
                data = f.read(1 << 16)
        except OSError as exc:
            raise ValueError(f"secret_file: cannot read {self.secret_file}: "
                             f"{exc.strerror}") from None
        return data[:-1] if data.endswith(b"\n") else data

    @property
    def keys(self) -> KeySet | None:
        """The keys of secret, secret_file or key_file (None with jwks_url)."""
        return self._keys

    @property
    def key_source(self) -> str:
        """Where the keys come from, for explain."""
        if self.jwks_url is not None:
            return f"JWKS {self.jwks_url}"
        if self.key_file is not None:
            return f"key_file {self.key_file}"
        return "shared secret"


# -- basic_auth --------------------------------------------------------------------------------


class BasicAuthOptions(Options):
    type: Literal["basic_auth"] = Field("basic_auth", description=TYPE)
    realm: Realm = Field(
        "proxyd", description='The realm in WWW-Authenticate: Basic realm="..."')
    users: dict[str, str] = Field(
        default_factory=dict, description="User → bcrypt or argon2 hash (`proxyd "
        "hash-password`); plain text is refused.")
    users_file: str | None = Field(
        None, description="A file of user:hash lines (htpasswd -B writes them), read at load.")
    consumer_header: HeaderName | None = Field(
        None, description="Request header that carries the user's name to the upstream "
        "(an inbound field of that name is always removed).")
    forward_authorization: bool = Field(
        False, description="Forward the Authorization header (the password) to the upstream.")
    cache_ttl: Duration = Field(  # type: ignore[assignment]
        "5m", description="How long a verified user:password skips the hash check; 0: never.")
    cache_size: int = Field(1024, ge=0, description="Verified credentials remembered per "
                            "route and worker (least recently used go first).")
    max_pending: int = Field(
        64, ge=1, description="Hash checks queued per route and worker; beyond it requests "
        "get 503 at once (each check takes a core for the hash's cost).")

    _users: dict[str, str] = PrivateAttr(default_factory=dict)

    @field_validator("users")
    @classmethod
    def _hashes(cls, v: dict[str, str]) -> dict[str, str]:
        for user, hashed in v.items():
            _check_user(user, hashed, f"user {user!r}")
        return v

    @model_validator(mode="after")
    def _load(self) -> BasicAuthOptions:
        users = dict(self.users)
        if self.users_file is not None:
            for number, user, hashed in _read_lines(self.users_file, "users_file"):
                where = f"users_file {self.users_file}:{number}"
                _check_user(user, hashed, where)
                if user in users:
                    raise ValueError(f"{where}: user {user!r} is given twice")
                users[user] = hashed
        if not users:
            raise ValueError("no users: give users or users_file")
        self._users = users
        return self

    @property
    def all_users(self) -> dict[str, str]:
        """users and users_file together."""
        return self._users


def _check_user(user: str, hashed: str, where: str) -> None:
    if ":" in user or not user.isprintable():
        raise ValueError(f"{where}: a user name has no ':' or control characters (RFC 7617)")
    problem = hash_problem(hashed)
    if problem is not None:
        raise ValueError(f"{where}: {problem}")


# -- api_key -----------------------------------------------------------------------------------


class ApiKeyOptions(Options):
    type: Literal["api_key"] = Field("api_key", description=TYPE)
    header: HeaderName | None = Field(
        "X-API-Key", description="Request header holding the key.")
    query: str | None = Field(
        None, description="Query parameter holding the key (tried after the header; it "
        "stays in the forwarded URL and in logs, so prefer the header).")
    keys: dict[str, str] = Field(
        default_factory=dict, description="Name → sha256:<hex> of the key "
        "(printf %s KEY | sha256sum); the name is the consumer (rate_limit key: consumer).")
    keys_file: str | None = Field(None, description="A file of name:sha256:<hex> lines, "
                                  "read at load.")
    consumer_header: HeaderName | None = Field(
        None, description="Request header that carries the key's name to the upstream "
        "(an inbound field of that name is always removed).")
    forward_key: bool = Field(False, description="Forward the key's header to the upstream.")
    realm: Realm = Field(
        "proxyd", description='The realm in WWW-Authenticate: ApiKey realm="..."')

    _by_digest: dict[bytes, str] = PrivateAttr(default_factory=dict)

    @model_validator(mode="after")
    def _load(self) -> ApiKeyOptions:
        if self.header is None and self.query is None:
            raise ValueError("set header or query (or both): where the key is read from")
        entries = [(f"keys.{name}", name, value) for name, value in self.keys.items()]
        if self.keys_file is not None:
            entries += [(f"keys_file {self.keys_file}:{n}", name, value)
                        for n, name, value in _read_lines(self.keys_file, "keys_file")]
        by_digest: dict[bytes, str] = {}
        names: set[str] = set()
        for where, name, value in entries:
            value = value.strip().lower()
            if not API_KEY_HASH.match(value):
                raise ValueError(f"{where}: expected sha256:<64 hex digits> (the key's SHA-256: "
                                 "printf %s KEY | sha256sum); plain keys are never accepted")
            if name in names:
                raise ValueError(f"{where}: the name {name!r} is given twice")
            digest = bytes.fromhex(value[7:])
            if digest in by_digest:
                raise ValueError(f"{where}: the same key as {by_digest[digest]!r}")
            names.add(name)
            by_digest[digest] = name
        if not by_digest:
            raise ValueError("no keys: give keys or keys_file")
        self._by_digest = by_digest
        return self

    @property
    def by_digest(self) -> dict[bytes, str]:
        """SHA-256 of a key → its name, from keys and keys_file."""
        return self._by_digest


# -- ip_access ---------------------------------------------------------------------------------


class IpAccessOptions(Options):
    type: Literal["ip_access"] = Field("ip_access", description=TYPE)
    allow: list[str] = Field(
        default_factory=list, description="CIDRs allowed; when given, every other address is "
        "refused (403).")
    deny: list[str] = Field(
        default_factory=list, description="CIDRs refused (403); deny wins over allow.")

    @field_validator("allow", "deny")
    @classmethod
    def _cidrs(cls, v: list[str]) -> list[str]:
        for cidr in v:
            try:
                ipaddress.ip_network(cidr, strict=True)
            except ValueError as exc:
                raise ValueError(f"{cidr!r}: {exc}") from None
        return v

    @model_validator(mode="after")
    def _some(self) -> IpAccessOptions:
        if not self.allow and not self.deny:
            raise ValueError("give allow or deny (or both)")
        return self

