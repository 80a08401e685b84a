"""jwt_auth: options, keys bound to their algorithms, claim checks, the verification cache.

Tokens are real: signed here with RSA, EC and HMAC keys made for the test run. The JWKS URL
side (fetching, rotation, outages) runs against a real server in tests/functional/test_auth.py.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from pydantic import ValidationError

from proxyd.middleware.access.jwt_auth import JwtAuth, render_claim
from proxyd.middleware.access.keys import KeySet, UnusableKey, load_key_file, parse_jwks
from proxyd.middleware.base import Response

from .helpers import make, make_ctx

SECRET = "s" * 32


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def pem(key: Any) -> bytes:
    return bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))


def key_file(tmp_path: Path, key: Any, name: str = "key.pem") -> str:
    path = tmp_path / name
    path.write_bytes(pem(key))
    return str(path)


def claims(**extra: Any) -> dict[str, Any]:
    return {"sub": "alice", "exp": int(time.time()) + 300, **extra}


def bearer(token: str) -> list[tuple[bytes, bytes]]:
    return [(b"Authorization", b"Bearer " + token.encode())]


def refused(answer: object, description: str | None = None) -> Response:
    assert isinstance(answer, Response), answer
    assert answer.status == 401
    challenge = answer.get(b"www-authenticate")
    assert challenge is not None
    if description is None:  # no credentials: no error code (RFC 6750 §3.1)
        assert challenge == b'Bearer realm="api"'
    else:
        assert challenge == (b'Bearer realm="api", error="invalid_token", '
                             b'error_description="' + description.encode() + b'"')
    assert json.loads(answer.body or b"")["request_id"] == "rid-generated"
    return answer


def hs(**options: Any) -> JwtAuth:
    mw = make("jwt_auth", algorithms=["HS256"], secret=SECRET, realm="api", **options)
    assert isinstance(mw, JwtAuth)
    return mw


# -- options ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("options, message", [
    ({"algorithms": ["none"], "secret": SECRET}, "'none' is never accepted"),
    ({"algorithms": ["NONE"], "secret": SECRET}, "'none' is never accepted"),
    ({"algorithms": ["HS256", "RS256"], "jwks_url": "https://idp.test/jwks"},
     "HS* (shared secret) cannot be listed with public-key algorithms"),
    ({"algorithms": ["RS1"], "jwks_url": "https://idp.test/jwks"}, "unknown algorithm 'RS1'"),
    ({"algorithms": []}, "list at least one algorithm"),
    ({"algorithms": ["HS256"]}, "give exactly one of secret"),
    ({"algorithms": ["HS256"], "secret": SECRET, "jwks_url": "https://idp.test/jwks"},
     "got secret, jwks_url"),
    ({"algorithms": ["RS256"], "secret": SECRET}, "secret does not fit the algorithms RS256"),
    ({"algorithms": ["HS256"], "jwks_url": "https://idp.test/k"}, "jwks_url does not fit"),
    ({"algorithms": ["HS256"], "secret": "short"}, "the secret is 5 bytes"),
    ({"algorithms": ["HS512"], "secret": SECRET}, "need at least 64"),
    ({"algorithms": ["RS256"], "jwks_url": "ftp://idp.test/k"}, "expected an http(s):// URL"),
    ({"algorithms": ["RS256"], "key_file": "/nonexistent.pem"}, "cannot read /nonexistent.pem"),
    ({"algorithms": ["HS256"], "secret": SECRET, "claims_to_headers": {"sub": "X User"}},
     "not a valid header name"),
    ({"algorithms": ["HS256"], "secret": SECRET, "realm": 'a"b'}, "realm"),
])
def test_options_refused(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message.replace("(", r"\(").replace(")", r"\)")
                       .replace("*", r"\*")):
        make("jwt_auth", **options)


def test_secret_is_not_shown_by_the_options() -> None:
    mw = hs()
    assert SECRET not in repr(mw.options) and SECRET not in str(mw.options.model_dump())


def test_secret_file_drops_one_trailing_newline(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    path.write_text(SECRET + "\n")
    mw = make("jwt_auth", algorithms=["HS256"], secret_file=str(path))
    token = jwt.encode(claims(), SECRET, algorithm="HS256")
    assert mw.on_request(make_ctx(headers=bearer(token))) is None


def test_key_file_private_key_refused(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> None:
    path = tmp_path / "private.pem"
    path.write_bytes(rsa_key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    with pytest.raises(ValidationError, match="a private key; give the public key"):
        make("jwt_auth", algorithms=["RS256"], key_file=str(path))


def test_key_file_of_another_type_than_the_algorithms(tmp_path: Path,
                                                       ec_key: ec.EllipticCurvePrivateKey) -> None:
    with pytest.raises(ValidationError, match="fits none of the algorithms RS256"):
        make("jwt_auth", algorithms=["RS256"], key_file=key_file(tmp_path, ec_key))


def test_small_rsa_keys_are_refused(tmp_path: Path) -> None:
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    with pytest.raises(ValidationError, match="an RSA key of 1024 bits"):
        make("jwt_auth", algorithms=["RS256"], key_file=key_file(tmp_path, small))


# -- keys --------------------------------------------------------------------------------------


def jwk(key: Any, kid: str, **extra: Any) -> dict[str, Any]:
    algorithm = jwt.algorithms.RSAAlgorithm if isinstance(key, rsa.RSAPrivateKey) \
        else jwt.algorithms.ECAlgorithm
    return {**json.loads(algorithm.to_jwk(key.public_key())), "kid": kid, **extra}


def test_jwks_keys_are_bound_to_the_algorithms_of_their_type(
        rsa_key: rsa.RSAPrivateKey, ec_key: ec.EllipticCurvePrivateKey) -> None:
    keys, skipped = parse_jwks({"keys": [
        jwk(rsa_key, "r"), jwk(ec_key, "e"), jwk(rsa_key, "enc", use="enc"),
        {"kty": "oct", "k": "c2VjcmV0", "kid": "o"}, jwk(rsa_key, "ps", alg="PS256"),
    ]}, ["RS256", "ES256", "PS256"])
    assert keys.by_kid["r"].algorithms == {"RS256", "PS256"}
    assert keys.by_kid["e"].algorithms == {"ES256"}
    assert keys.by_kid["ps"].algorithms == {"PS256"}  # its alg narrows it
    assert len(skipped) == 2 and "use 'enc'" in skipped[0] and "oct" in skipped[1]
    assert keys.find("r", "ES256") is None  # an RSA key never checks an EC signature
    assert keys.find("e", "ES256") is keys.by_kid["e"]
    assert keys.find("nope", "ES256") is None
    assert keys.find(None, "ES256") is keys.by_kid["e"]  # the one key that fits
    assert keys.find(None, "PS256") is None  # two fit: ambiguous


def test_jwks_file_and_certificate(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> None:
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [jwk(rsa_key, "k1")]}))
    keys = load_key_file(str(path), ["RS256"])
    assert list(keys.by_kid) == ["k1"]
    path.write_text(json.dumps({"keys": [{"kty": "RSA"}]}))
    with pytest.raises(UnusableKey, match="no usable key"):
        load_key_file(str(path), ["RS256"])


def test_a_pem_key_answers_tokens_whatever_kid_they_name(rsa_key: rsa.RSAPrivateKey,
                                                         tmp_path: Path) -> None:
    mw = make("jwt_auth", algorithms=["RS256"], key_file=key_file(tmp_path, rsa_key))
    token = jwt.encode(claims(), rsa_key, algorithm="RS256", headers={"kid": "2024"})
    assert mw.on_request(make_ctx(headers=bearer(token))) is None


# -- tokens ----------------------------------------------------------------------------------------


def test_rs256_token_passes_with_claims_as_headers(rsa_key: rsa.RSAPrivateKey,
                                                   tmp_path: Path) -> None:
    mw = make("jwt_auth", algorithms=["RS256"], key_file=key_file(tmp_path, rsa_key),
              issuer="https://idp.test", audience="api",
              claims_to_headers={"sub": "X-User", "roles": "X-Roles", "org": "X-Org"})
    token = jwt.encode(claims(iss="https://idp.test", aud=["api", "other"], roles=["a", "b"],
                              org={"id": 7}), rsa_key, algorithm="RS256")
    ctx = make_ctx(headers=[*bearer(token), (b"X-User", b"mallory")])
    assert mw.on_request(ctx) is None
    assert ctx.set_request == [(b"X-User", b"alice"), (b"X-Roles", b"a, b"),
                               (b"X-Org", b'{"id":7}')]
    assert ctx.consumer == "alice"
    # The client's own X-User never reaches the upstream, with or without a claim for it.
    assert {b"x-user", b"x-roles", b"x-org"} <= ctx.remove_request
    assert b"authorization" not in ctx.remove_request  # forward_token defaults to true


def test_es256_token_passes(ec_key: ec.EllipticCurvePrivateKey, tmp_path: Path) -> None:
    mw = make("jwt_auth", algorithms=["ES256"], key_file=key_file(tmp_path, ec_key))
    token = jwt.encode(claims(), ec_key, algorithm="ES256")
    assert mw.on_request(make_ctx(headers=bearer(token))) is None


def test_hs_rs_confusion_is_refused(rsa_key: rsa.RSAPrivateKey, tmp_path: Path) -> None:
    # The classic attack: the RSA public key (public, after all) used as an HMAC secret.
    mw = make("jwt_auth", algorithms=["RS256"], key_file=key_file(tmp_path, rsa_key),
              realm="api")
    token = hs256_by_hand(claims(), pem(rsa_key))  # PyJWT itself refuses to make it
    refused(mw.on_request(make_ctx(headers=bearer(token))), "algorithm not allowed")


def hs256_by_hand(payload: dict[str, Any], secret: bytes) -> str:
    def b64(data: bytes) -> bytes:
        return base64.urlsafe_b64encode(data).rstrip(b"=")

    signing_input = b64(b'{"alg":"HS256","typ":"JWT"}') + b"." + b64(json.dumps(payload).encode())
    signature = hmac.new(secret, signing_input, hashlib.sha256).digest()
    return (signing_input + b"." + b64(signature)).decode()


def test_unsigned_token_is_refused() -> None:
    token = jwt.encode(claims(), None, algorithm="none")
    refused(hs().on_request(make_ctx(headers=bearer(token))), "algorithm not allowed")


def test_a_key_never_verifies_an_algorithm_of_another_type(
        rsa_key: rsa.RSAPrivateKey, ec_key: ec.EllipticCurvePrivateKey, tmp_path: Path) -> None:
    mw = make("jwt_auth", algorithms=["RS256", "ES256"], key_file=key_file(tmp_path, rsa_key),
              realm="api")
    token = jwt.encode(claims(), ec_key, algorithm="ES256")
    refused(mw.on_request(make_ctx(headers=bearer(token))), "unknown key")


@pytest.mark.parametrize("payload, options, description", [
    ({"exp": -120}, {}, "token expired"),
    ({"nbf": 120}, {}, "token not yet valid"),
    ({"sub": "alice"}, {}, "missing claim exp"),
    (claims(iss="https://evil.test"), {"issuer": "https://idp.test"}, "wrong issuer"),
    (claims(), {"issuer": "https://idp.test"}, "missing claim iss"),
    (claims(aud="other"), {"audience": "api"}, "wrong audience"),
    (claims(aud="api"), {}, "wrong audience"),  # an aud, and this API names none
])
def test_claims_are_checked(payload: dict[str, Any], options: dict[str, Any],
                            description: str) -> None:
    if set(payload) <= {"exp", "nbf"}:  # offsets from now, applied now
        payload = claims(**{k: int(time.time()) + v for k, v in payload.items()})
    else:
        payload = {**payload, "exp": int(time.time()) + 300} if "exp" in payload else payload
    token = jwt.encode(payload, SECRET, algorithm="HS256")
    refused(hs(**options).on_request(make_ctx(headers=bearer(token))), description)


def test_leeway_allows_a_little_clock_skew() -> None:
    token = jwt.encode(claims(exp=int(time.time()) - 10, nbf=int(time.time()) + 10), SECRET,
                       algorithm="HS256")
    assert hs(leeway="30s").on_request(make_ctx(headers=bearer(token))) is None
    refused(hs(leeway="0s").on_request(make_ctx(headers=bearer(token))), "token not yet valid")


def test_issuer_list_and_audience_list() -> None:
    mw = hs(issuer=["https://a.test", "https://b.test"], audience=["api", "api2"])
    token = jwt.encode(claims(iss="https://b.test", aud="api2"), SECRET, algorithm="HS256")
    assert mw.on_request(make_ctx(headers=bearer(token))) is None


def test_bad_signature_and_garbage() -> None:
    mw = hs()
    other = jwt.encode(claims(), "t" * 32, algorithm="HS256")
    refused(mw.on_request(make_ctx(headers=bearer(other))), "bad signature")
    refused(mw.on_request(make_ctx(headers=bearer("a.b.c"))), "malformed token")


def test_no_credentials_get_the_bare_challenge() -> None:
    mw = hs()
    refused(mw.on_request(make_ctx()))
    refused(mw.on_request(make_ctx(headers=[(b"Authorization", b"Basic YTpi")])))


def test_scheme_is_case_insensitive() -> None:
    token = jwt.encode(claims(), SECRET, algorithm="HS256")
    ctx = make_ctx(headers=[(b"Authorization", b"bEaReR " + token.encode())])
    assert hs().on_request(ctx) is None


def test_forward_token_false_removes_authorization() -> None:
    token = jwt.encode(claims(), SECRET, algorithm="HS256")
    ctx = make_ctx(headers=bearer(token))
    assert hs(forward_token=False).on_request(ctx) is None
    assert b"authorization" in ctx.remove_request


def test_claim_values_that_cannot_be_headers_are_dropped() -> None:
    assert render_claim("a\r\nX-Admin: yes") is None
    assert render_claim("ünïcode") == "ünïcode".encode()
    assert render_claim([1, "b"]) == b"1, b"
    assert render_claim(True) == b"true"
    assert render_claim(None) is None
    mw = hs(claims_to_headers={"name": "X-Name"})
    token = jwt.encode(claims(name="x\nInjected: 1"), SECRET, algorithm="HS256")
    ctx = make_ctx(headers=bearer(token))
    assert mw.on_request(ctx) is None and ctx.set_request == []


def test_consumer_claim() -> None:
    token = jwt.encode(claims(client_id="ci-bot"), SECRET, algorithm="HS256")
    ctx = make_ctx(headers=bearer(token))
    assert hs(consumer_claim="client_id").on_request(ctx) is None
    assert ctx.consumer == "ci-bot"


# -- the verification cache --------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def time(self) -> float:
        return self.now


def counting_decode(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = jwt.decode

    def decode(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(jwt, "decode", decode)
    return calls


def test_a_token_is_verified_once_until_its_exp(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = counting_decode(monkeypatch)
    clock = Clock()
    monkeypatch.setattr("proxyd.middleware.access.jwt_auth.time", clock)
    mw = hs(leeway="0s", claims_to_headers={"sub": "X-User"})
    token = jwt.encode(claims(exp=int(clock.now) + 60), SECRET, algorithm="HS256")
    for _ in range(3):
        ctx = make_ctx(headers=bearer(token))
        assert mw.on_request(ctx) is None
        assert ctx.set_request == [(b"X-User", b"alice")] and ctx.consumer == "alice"
    assert len(calls) == 1
    clock.now += 61  # past exp: forgotten, so checked again (PyJWT's clock finds it valid)
    assert mw.on_request(make_ctx(headers=bearer(token))) is None
    assert len(calls) == 2


def test_failures_are_not_remembered_and_the_cache_is_bounded(
        monkeypatch: pytest.MonkeyPatch) -> None:
    calls = counting_decode(monkeypatch)
    mw = hs(cache_size=2)
    bad = jwt.encode(claims(), "t" * 32, algorithm="HS256")
    for _ in range(2):
        mw.on_request(make_ctx(headers=bearer(bad)))
    assert len(calls) == 2 and len(mw.cache) == 0
    tokens = [jwt.encode(claims(n=i), SECRET, algorithm="HS256") for i in range(3)]
    for token in (*tokens, tokens[2], tokens[0]):
        assert mw.on_request(make_ctx(headers=bearer(token))) is None
    # Three distinct tokens into two places: the oldest went, and came back at a cost.
    assert len(mw.cache) == 2 and len(calls) == 2 + 4


def test_cache_size_zero_verifies_every_time(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = counting_decode(monkeypatch)
    mw = hs(cache_size=0)
    token = jwt.encode(claims(), SECRET, algorithm="HS256")
    for _ in range(2):
        assert mw.on_request(make_ctx(headers=bearer(token))) is None
    assert len(calls) == 2


def test_key_set_fingerprint_tells_changed_keys(rsa_key: rsa.RSAPrivateKey,
                                                ec_key: ec.EllipticCurvePrivateKey) -> None:
    a, _ = parse_jwks({"keys": [jwk(rsa_key, "a")]}, ["RS256", "ES256"])
    b, _ = parse_jwks({"keys": [jwk(rsa_key, "a")]}, ["RS256", "ES256"])
    c, _ = parse_jwks({"keys": [jwk(rsa_key, "a"), jwk(ec_key, "e")]}, ["RS256", "ES256"])
    assert isinstance(a, KeySet) and a.fingerprint == b.fingerprint != c.fingerprint
