"""jwt_auth's verification keys: each bound to the algorithms its type can verify.

A key is never chosen by the token's ``alg`` alone. Each key carries the allowed algorithms
that fit its type (an RSA key: RS*/PS*; an EC key: the ES* of its curve; Ed25519/Ed448:
EdDSA; a shared secret: HS*), and a token verifies only with a key whose set holds its ``alg``.
So a token that says HS256 can never be checked against an RSA public key used as an HMAC
secret (the classic confusion), whatever the allow-list says; the options forbid mixing HS*
with public-key algorithms on top of that.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

RSA_ALGORITHMS: Final = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
EC_ALGORITHMS: Final = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}
HMAC_ALGORITHMS: Final = {"HS256": 32, "HS384": 48, "HS512": 64}  # → shortest secret, bytes
ASYMMETRIC: Final = RSA_ALGORITHMS | frozenset(EC_ALGORITHMS.values()) | {"EdDSA"}
ALGORITHMS: Final = tuple(sorted(HMAC_ALGORITHMS)) + tuple(sorted(ASYMMETRIC))
MIN_RSA_BITS: Final = 2048  # RFC 7518 §3.3: smaller keys MUST NOT be used


class UnusableKey(ValueError):
    """A key that cannot be used, with the reason (for the config error or the fetch log)."""


@dataclass(frozen=True, slots=True)
class VerifyKey:
    kid: str | None
    key: Any  # a cryptography public key object, or the HMAC secret as bytes
    algorithms: frozenset[str]  # the allowed algorithms this key can verify


def algorithms_for(key: Any, allowed: Iterable[str]) -> frozenset[str]:
    """The algorithms of ``allowed`` that a public key of this type can verify."""
    allowed = frozenset(allowed)
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            raise UnusableKey(f"an RSA key of {key.key_size} bits (at least {MIN_RSA_BITS})")
        return RSA_ALGORITHMS & allowed
    if isinstance(key, ec.EllipticCurvePublicKey):
        alg = EC_ALGORITHMS.get(key.curve.name)
        return frozenset({alg}) & allowed if alg else frozenset()
    if isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        return frozenset({"EdDSA"}) & allowed
    raise UnusableKey(f"an unsupported key type ({type(key).__name__})")


def _public(key: Any) -> Any:
    """The public half, where a JWK or PEM carried a private key."""
    return key.public_key() if hasattr(key, "private_bytes") else key


def key_from_jwk(jwk: dict[str, Any], allowed: Iterable[str]) -> VerifyKey:
    """One JWK as a verification key; its ``alg``, when given, narrows it to that one."""
    if jwk.get("use", "sig") != "sig":
        raise UnusableKey(f"use {jwk.get('use')!r} (not sig)")
    if jwk.get("kty") == "oct":
        raise UnusableKey("a symmetric (oct) key: shared secrets are given as secret/secret_file")
    try:
        parsed = jwt.PyJWK(jwk)
    except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError, TypeError, KeyError) as exc:
        raise UnusableKey(f"not a usable JWK ({exc})") from None
    key = _public(parsed.key)
    algorithms = algorithms_for(key, allowed)
    if "alg" in jwk:
        algorithms &= {jwk["alg"]}
    kid = jwk.get("kid")
    return VerifyKey(kid if isinstance(kid, str) else None, key, algorithms)


class KeySet:
    """The keys a token may be verified with, found by ``kid``."""

    __slots__ = ("by_kid", "fingerprint", "keys", "unnamed")

    def __init__(self, keys: list[VerifyKey]) -> None:
        self.keys = [k for k in keys if k.algorithms]  # a key no allowed algorithm fits: unused
        self.by_kid = {k.kid: k for k in self.keys if k.kid is not None}
        self.unnamed = [k for k in self.keys if k.kid is None]
        self.fingerprint = frozenset((k.kid, k.algorithms, _material(k.key)) for k in self.keys)

    def __len__(self) -> int:
        return len(self.keys)

    def find(self, kid: str | None, alg: str) -> VerifyKey | None:
        """The key named ``kid`` if it can verify ``alg``; else the one key without a name that
        can (a PEM file or a secret: tokens name a key whether or not the verifier does)."""
        if kid is not None:
            key = self.by_kid.get(kid)
            if key is not None:
                return key if alg in key.algorithms else None
            pool = self.unnamed
        else:  # a token naming no key: only unambiguous when one key fits
            pool = self.unnamed or self.keys
        fits = [k for k in pool if alg in k.algorithms]
        return fits[0] if len(fits) == 1 else None


def _material(key: Any) -> bytes:
    if isinstance(key, bytes):
        return key
    return bytes(key.public_bytes(serialization.Encoding.DER,
                                  serialization.PublicFormat.SubjectPublicKeyInfo))


def parse_jwks(document: Any, allowed: Iterable[str]) -> tuple[KeySet, list[str]]:
    """A JWKS document ({"keys": [...]}, or a single JWK) → (its usable keys, why others
    were skipped)."""
    if isinstance(document, dict) and "keys" not in document and "kty" in document:
        document = {"keys": [document]}
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise UnusableKey('not a JWKS document (expected {"keys": [...]})')
    keys, skipped = [], []
    allowed = frozenset(allowed)
    for i, jwk in enumerate(document["keys"]):
        name = f"key {jwk.get('kid', i)!r}" if isinstance(jwk, dict) else f"key {i}"
        if not isinstance(jwk, dict):
            skipped.append(f"{name}: not an object")
            continue
        try:
            key = key_from_jwk(jwk, allowed)
        except UnusableKey as exc:
            skipped.append(f"{name}: {exc}")
            continue
        if not key.algorithms:
            skipped.append(f"{name}: fits none of the algorithms {', '.join(sorted(allowed))}")
            continue
        keys.append(key)
    return KeySet(keys), skipped


def load_key_file(path: str, allowed: Iterable[str]) -> KeySet:
    """A PEM public key or certificate, or a JWKS document, from ``path``."""
    allowed = frozenset(allowed)
    try:
        with open(path, "rb") as f:
            data = f.read(1 << 20)
    except OSError as exc:
        raise UnusableKey(f"cannot read {path}: {exc.strerror}") from None
    if data.lstrip().startswith(b"{"):
        try:
            document = json.loads(data)
        except ValueError as exc:
            raise UnusableKey(f"{path}: not valid JSON ({exc})") from None
        keys, skipped = parse_jwks(document, allowed)
        if not keys:
            raise UnusableKey(f"{path}: no usable key" + (f" ({'; '.join(skipped)})"
                                                         if skipped else ""))
        return keys
    if b"PRIVATE KEY-----" in data:
        raise UnusableKey(f"{path}: a private key; give the public key "
                        "(openssl pkey -in key.pem -pubout)")
    key: Any
    try:
        if b"-----BEGIN CERTIFICATE-----" in data:
            key = x509.load_pem_x509_certificate(data).public_key()
        else:
            key = serialization.load_pem_public_key(data)
    except ValueError as exc:
        raise UnusableKey(f"{path}: not a PEM public key, certificate or JWKS ({exc})") from None
    algorithms = algorithms_for(key, allowed)
    if not algorithms:
        raise UnusableKey(f"{path}: a {type(key).__name__.removeprefix('_')} fits none of the "
                        f"algorithms {', '.join(sorted(allowed))}")
    return KeySet([VerifyKey(None, key, algorithms)])


def secret_key(secret: bytes, allowed: Iterable[str]) -> KeySet:
    """A shared secret for the HS* algorithms of ``allowed``."""
    return KeySet([VerifyKey(None, secret, frozenset(HMAC_ALGORITHMS) & frozenset(allowed))])
