"""Authentication and access control: who the client is, and whether it may pass.

``jwt_auth`` (bearer JWTs), ``basic_auth`` (passwords against bcrypt/argon2 hashes),
``api_key`` (hashed keys in a header or query parameter), ``ip_access`` (allow/deny
networks on the client's address) and ``forward_auth`` (an auth service asked per
request). The authenticating ones name the client in ``Context.consumer``, which rate_limit
can key on; each counts its outcomes in ``gateway_auth_total{route, element, result}``.
They are not compiled (setup.py): their per-request work is a digest and a lookup, or I/O,
and the rest is in C already (hashlib, PyJWT's cryptography, bcrypt, argon2).
"""

from proxyd.middleware.access.api_key import ApiKey
from proxyd.middleware.access.basic_auth import BasicAuth
from proxyd.middleware.access.forward_auth import ForwardAuth
from proxyd.middleware.access.ip_access import IpAccess
from proxyd.middleware.access.jwt_auth import JwtAuth

ACCESS_TYPES = (JwtAuth, BasicAuth, ApiKey, IpAccess, ForwardAuth)

__all__ = ["ACCESS_TYPES", "ApiKey", "BasicAuth", "ForwardAuth", "IpAccess", "JwtAuth"]
