"""Password hashes for basic_auth: bcrypt and argon2, checked off the event loop.

Only hashes are accepted, never plain text: a config or users file that leaks then gives an
attacker a slow offline search per password, not the passwords. Two schemes because each is
worth it: bcrypt is what ``htpasswd -B`` writes (existing users files work as they are) and
needs 4 KiB per check; argon2id is the current recommendation for new hashes (memory-hard,
so GPU searches cost far more), at 64 MiB per check with its defaults. Both libraries compare
in constant time and release the GIL while hashing, so a check runs in a worker thread while
the event loop serves other requests.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import os
import re
from collections.abc import Callable
from typing import Any, Final

import argon2
import bcrypt

BCRYPT_PREFIXES: Final = ("$2a$", "$2b$", "$2y$")
ARGON2_PREFIXES: Final = ("$argon2id$", "$argon2i$", "$argon2d$")
_BCRYPT: Final = re.compile(r"^\$2[aby]\$(\d\d)\$[./A-Za-z0-9]{53}$")
SCHEMES: Final = ("bcrypt", "argon2id")

# Threads for hash checks, per worker process: each check keeps a core busy for the hash's
# whole cost (~0.1-0.3 s at the usual settings), so more threads than this would only take
# CPU from the requests that are already authenticated.
CHECK_THREADS: Final = 2
_executor: concurrent.futures.ThreadPoolExecutor | None = None
_executor_pid = 0


def hash_problem(value: str) -> str | None:
    """Why ``value`` is not a usable bcrypt or argon2 hash; None when it is one."""
    if value.startswith(BCRYPT_PREFIXES):
        if not _BCRYPT.match(value):
            return "a malformed bcrypt hash (expected $2b$NN$ and 53 characters)"
        if not 4 <= int(value[4:6]) <= 31:
            return "a bcrypt hash with a cost outside 4-31"
        return None
    if value.startswith(ARGON2_PREFIXES):
        try:
            argon2.extract_parameters(value)
        except (argon2.exceptions.InvalidHashError, ValueError) as exc:
            return f"a malformed argon2 hash ({exc})"
        return None
    return ("not a bcrypt ($2b$...) or argon2 ($argon2id$...) hash; plain-text passwords are "
            "never accepted: make a hash with `proxyd hash-password`")


def verify(hashed: str, password: bytes) -> bool:
    """Whether ``password`` matches ``hashed`` (slow by design: run it in check_in_thread)."""
    if hashed.startswith(BCRYPT_PREFIXES):
        try:
            return bcrypt.checkpw(password, hashed.encode())
        except ValueError:  # a NUL in the password, or a hash bcrypt refuses
            return False
    try:
        return argon2.PasswordHasher().verify(hashed, password)
    except argon2.exceptions.VerificationError:
        return False
    except argon2.exceptions.InvalidHashError:
        return False


def make_hash(password: str, scheme: str = "bcrypt", rounds: int = 12) -> str:
    """A new salted hash of ``password`` (``proxyd hash-password``)."""
    if scheme == "bcrypt":
        if len(password.encode()) > 72:  # bcrypt reads no further: refuse, don't truncate
            raise ValueError("bcrypt uses at most 72 bytes of a password; use argon2id")
        return bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds)).decode()
    if scheme == "argon2id":
        return argon2.PasswordHasher().hash(password)
    raise ValueError(f"unknown scheme {scheme!r}; known: {', '.join(SCHEMES)}")


def dummy_hash_like(hashed: str) -> str:
    """A hash of a random password made with the same scheme and cost as ``hashed``: checked
    for unknown users, so that a wrong user name costs as long as a wrong password and the
    timing tells nothing about which names exist."""
    secret = os.urandom(16).hex().encode()
    if hashed.startswith(BCRYPT_PREFIXES):
        return bcrypt.hashpw(secret, bcrypt.gensalt(int(hashed[4:6]))).decode()
    params = argon2.extract_parameters(hashed)
    return argon2.PasswordHasher.from_parameters(params).hash(secret)


def run_in_thread(loop: asyncio.AbstractEventLoop, check: Callable[..., bool], *args: Any
                  ) -> asyncio.Future[bool]:
    """``check(*args)`` (verify, or a check of the same cost) on the worker's hash threads, as
    a future of the event loop."""
    global _executor, _executor_pid
    if _executor is None or _executor_pid != os.getpid():  # threads do not survive a fork
        _executor = concurrent.futures.ThreadPoolExecutor(
            CHECK_THREADS, thread_name_prefix="proxyd-password")
        _executor_pid = os.getpid()
    return loop.run_in_executor(_executor, check, *args)


class CredentialDigests:
    """Keyed digests of presented credentials, for caches that must not hold them in clear.

    The key is random per process, so a memory dump of a cache gives neither the passwords
    nor digests that could be searched offline for them.
    """

    __slots__ = ("_key",)

    def __init__(self) -> None:
        self._key = os.urandom(32)

    def digest(self, credential: bytes) -> bytes:
        return hashlib.blake2b(credential, key=self._key, digest_size=16).digest()
