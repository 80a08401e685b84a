"""basic_auth: hashes only, checks in threads, the success cache, the bound on queued checks."""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path
from typing import Any

import argon2
import bcrypt
import pytest
from pydantic import ValidationError

from proxyd.middleware.access import passwords
from proxyd.middleware.access.basic_auth import BasicAuth, parse_credentials
from proxyd.middleware.base import Pending, Response

from .helpers import make, make_ctx

# Cheap on purpose (the tests check behaviour, not strength): bcrypt cost 4, argon2 1 pass.
ALICE = bcrypt.hashpw(b"wonderland", bcrypt.gensalt(4)).decode()
BOB = argon2.PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1).hash("builder")


def basic(user: str, password: str) -> list[tuple[bytes, bytes]]:
    return [(b"Authorization", b"Basic " + base64.b64encode(f"{user}:{password}".encode()))]


def auth(**options: Any) -> BasicAuth:
    mw = make("basic_auth", realm="ops", users={"alice": ALICE, "bob": BOB}, **options)
    assert isinstance(mw, BasicAuth)
    return mw


async def answer(mw: BasicAuth, headers: list[tuple[bytes, bytes]]) -> tuple[Any, Any]:
    ctx = make_ctx(headers=headers)
    result = mw.on_request(ctx)
    if isinstance(result, Pending):
        async with asyncio.timeout(10):
            result = await result.future
    return result, ctx


def refused(result: object) -> None:
    assert isinstance(result, Response) and result.status == 401
    assert result.get(b"www-authenticate") == b'Basic realm="ops", charset="UTF-8"'


@pytest.mark.parametrize("users, message", [
    ({"alice": "wonderland"}, "plain-text passwords are never accepted"),
    ({"alice": "$2b$12$short"}, "a malformed bcrypt hash"),
    ({"alice": "$argon2id$v=19$garbage"}, "a malformed argon2 hash"),
    ({"a:b": ALICE}, "no ':'"),
    ({}, "no users"),
])
def test_options_refused(users: dict[str, str], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        make("basic_auth", users=users)


def test_users_file(tmp_path: Path) -> None:
    path = tmp_path / "htpasswd"
    path.write_text(f"# ops team\nalice:{ALICE}\n\nbob:{BOB}\n")
    mw = make("basic_auth", users_file=str(path))
    assert isinstance(mw, BasicAuth) and set(mw.users) == {"alice", "bob"}
    path.write_text(f"alice:{ALICE}\ncarol:secret\n")
    with pytest.raises(ValidationError, match=rf"users_file {path}:2: not a bcrypt"):
        make("basic_auth", users_file=str(path))
    path.write_text(f"alice:{ALICE}\n")
    with pytest.raises(ValidationError, match="user 'alice' is given twice"):
        make("basic_auth", users={"alice": ALICE}, users_file=str(path))


def test_htpasswd_2y_hashes_are_accepted() -> None:
    # htpasswd -B writes $2y$; bcrypt reads it as $2b$.
    mw = make("basic_auth", users={"alice": "$2y$" + ALICE[4:]})
    assert isinstance(mw, BasicAuth)
    assert passwords.verify(mw.users["alice"], b"wonderland")


@pytest.mark.parametrize("user, password", [("alice", "wonderland"), ("bob", "builder")])
async def test_right_password_passes_once_checked(user: str, password: str) -> None:
    mw = auth(consumer_header="X-User")
    result, ctx = await answer(mw, basic(user, password))
    assert result is None and ctx.consumer == user
    assert ctx.set_request == [(b"X-User", user.encode())]
    # Neither the password nor a client's own X-User reaches the upstream.
    assert {b"authorization", b"x-user"} <= ctx.remove_request
    # The same credentials again: from the cache, no thread, no wait.
    ctx = make_ctx(headers=basic(user, password))
    assert mw.on_request(ctx) is None and ctx.consumer == user


async def test_wrong_password_unknown_user_and_garbage_are_refused() -> None:
    mw = auth()
    refused((await answer(mw, basic("alice", "looking-glass")))[0])
    refused((await answer(mw, basic("mallory", "wonderland")))[0])
    assert mw.dummy is not None and mw.dummy.startswith("$2b$04$")  # as costly as alice's
    refused((await answer(mw, [(b"Authorization", b"Basic !!!")]))[0])
    refused((await answer(mw, [(b"Authorization", b"Basic " + base64.b64encode(b"nocolon"))]))[0])
    assert len(mw.cache) == 0  # failures are never remembered


async def test_missing_credentials() -> None:
    result, _ = await answer(auth(), [])
    refused(result)
    result, _ = await answer(auth(), [(b"Authorization", b"Bearer x")])
    refused(result)


async def test_queued_checks_are_bounded() -> None:
    mw = auth(max_pending=1)
    first = mw.on_request(make_ctx(headers=basic("alice", "wonderland")))
    assert isinstance(first, Pending)
    busy = mw.on_request(make_ctx(headers=basic("bob", "builder")))
    assert isinstance(busy, Response) and busy.status == 503
    assert busy.get(b"retry-after") == b"1"
    async with asyncio.timeout(10):
        assert await first.future is None
    assert mw.checking == {}


async def test_the_same_credentials_at_once_share_one_check(
        monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[bytes] = []

    def counted(hashed: str, password: bytes) -> bool:
        calls.append(password)
        return passwords.verify(hashed, password)

    monkeypatch.setattr("proxyd.middleware.access.basic_auth.verify", counted)
    mw = auth(max_pending=1)
    # A client opening several connections at once: one hash check, every request answered.
    waiting = [mw.on_request(make_ctx(headers=basic("alice", "wonderland"))) for _ in range(5)]
    wrong = [mw.on_request(make_ctx(headers=basic("alice", "queen")))]  # another: over the bound
    assert isinstance(wrong[0], Response) and wrong[0].status == 503
    async with asyncio.timeout(10):
        for pending in waiting:
            assert isinstance(pending, Pending) and await pending.future is None
    assert calls == [b"wonderland"] and mw.checking == {}


async def test_cache_ttl_zero_checks_every_time() -> None:
    mw = auth(cache_ttl="0s")
    for _ in range(2):
        result = mw.on_request(make_ctx(headers=basic("alice", "wonderland")))
        assert isinstance(result, Pending)
        async with asyncio.timeout(10):
            assert await result.future is None


def test_parse_credentials() -> None:
    assert parse_credentials(base64.b64encode(b"a:b:c")) == ("a", b"b:c")  # first ':' splits
    assert parse_credentials(base64.b64encode("ü:x".encode())) == ("ü", b"x")
    assert parse_credentials(base64.b64encode(b"\xff:x")) is None
    assert parse_credentials(b"YQ") is None  # bad padding


def test_dummy_hash_has_the_scheme_and_cost_of_a_real_one() -> None:
    assert passwords.dummy_hash_like(ALICE).startswith("$2b$04$")
    dummy = passwords.dummy_hash_like(BOB)
    assert dummy.startswith("$argon2id$v=19$m=1024,t=1,p=1$") and dummy != BOB


def test_make_hash_round_trips() -> None:
    for scheme in passwords.SCHEMES:
        hashed = passwords.make_hash("pw", scheme, rounds=4)
        assert passwords.hash_problem(hashed) is None
        assert passwords.verify(hashed, b"pw") and not passwords.verify(hashed, b"px")
    with pytest.raises(ValueError, match="72 bytes"):
        passwords.make_hash("x" * 73, "bcrypt")
