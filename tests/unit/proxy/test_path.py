"""The normal form of a request path (RFC 3986 §6.2.2): escapes, dot segments, the slash policy."""

from __future__ import annotations

import pytest

from proxyd.config.models import Route
from proxyd.proxy.path import (
    ESCAPES_KEEP,
    ESCAPES_REJECT,
    BadPath,
    needs_normalizing,
    normalize_path,
    remove_dot_segments,
)
from proxyd.proxy.router import Router


def normal(path: bytes, keep: bool = False) -> bytes:
    """What proxyd routes on and forwards for ``path``, as _dispatch computes it."""
    return normalize_path(path, keep) if needs_normalizing(path) else path


@pytest.mark.parametrize("keep", [False, True])
@pytest.mark.parametrize(("raw", "expected"), [
    # The three spellings that reached a catch-all past a /private/ route.
    (b"/public/%2e%2e/private/x", b"/private/x"),
    (b"/public/%2E%2E/private/x", b"/private/x"),
    (b"/public/%2e%2E/private/x", b"/private/x"),
    # Half encoded: still a ".." segment once decoded.
    (b"/public/%2e./private/x", b"/private/x"),
    (b"/public/.%2E/private/x", b"/private/x"),
    (b"/public/%2e/private/x", b"/public/private/x"),
    # Trailing dot segments keep the trailing slash (RFC 3986 §5.2.4, steps 2B and 2C).
    (b"/a/b/%2e%2e", b"/a/"),
    (b"/a/b/..", b"/a/"),
    (b"/a/b/.", b"/a/b/"),
    (b"/a/b/%2E", b"/a/b/"),
    (b"/%2e%2e", b"/"),
    (b"/..", b"/"),
    # Above the root, ".." stays at the root.
    (b"/a/../../../b", b"/b"),
    # §5.2.4's example.
    (b"/a/b/c/./../../g", b"/a/g"),
    # Segments that only look like dot segments are ordinary.
    (b"/a/.../b", b"/a/.../b"),
    (b"/a/..b/c", b"/a/..b/c"),
    (b"/a/.hidden", b"/a/.hidden"),
    (b"/a/%2e%2e%2e/b", b"/a/.../b"),
    # Empty segments are kept ("//" is not "/" to every server).
    (b"//a//b/", b"//a//b/"),
    (b"/a//../b", b"/a/b"),
    (b"//%2e%2e/x", b"/x"),
    # §6.2.2.2: escapes of unreserved characters are decoded, in either case.
    (b"/%7Euser/%41%62c%2D%5f%30", b"/~user/Abc-_0"),
    (b"/%7euser", b"/~user"),
    # §6.2.2.1: other escapes stay encoded, with uppercase hex digits.
    (b"/a%3ab%3Fc%23d%20e", b"/a%3Ab%3Fc%23d%20e"),
    (b"/caf%c3%a9", b"/caf%C3%A9"),
    # "%25" is a literal "%": decoding it would make "%2e" out of "%252e".
    (b"/a/%252e%252e/b", b"/a/%252e%252e/b"),
    (b"/a/%25", b"/a/%25"),
    # Nothing to do.
    (b"/", b"/"),
    (b"/api/v1/users/42", b"/api/v1/users/42"),
    (b"/static/app.min.js", b"/static/app.min.js"),
])
def test_normal_form(raw: bytes, expected: bytes, keep: bool) -> None:
    assert normal(raw, keep) == expected
    assert normal(expected, keep) == expected  # the normal form is its own


@pytest.mark.parametrize(("raw", "expected"), [
    (b"/public/..%2fprivate/x", b"/public/..%2Fprivate/x"),
    (b"/public/..%2Fprivate/x", b"/public/..%2Fprivate/x"),
    (b"/a/%2E%2E%2F..", b"/a/..%2F.."),  # one segment, "..%2F..": not a dot segment
    (b"/a/%2E%2E%2F../b", b"/a/..%2F../b"),
    (b"/a%2f..%2fb", b"/a%2F..%2Fb"),
    (b"/a/..%5cb", b"/a/..%5Cb"),
    (b"/a\\..\\b", b"/a%5C..%5Cb"),
    (b"/a\\b/../c", b"/c"),
    (b"/%5c%5C", b"/%5C%5C"),
])
def test_keep_treats_encoded_slashes_as_ordinary_characters(raw: bytes, expected: bytes) -> None:
    # Never a separator: a dot segment has to be between real "/"s to count.
    assert normal(raw, keep=True) == expected


@pytest.mark.parametrize("raw", [
    b"/public/..%2fprivate/x",
    b"/public/..%2Fprivate/x",
    b"/a/%2E%2E%2F..",
    b"/a%5cb",
    b"/a%5Cb",
    b"/a\\b",
    b"\\",
])
def test_reject_refuses_encoded_slashes(raw: bytes) -> None:
    assert needs_normalizing(raw)
    with pytest.raises(BadPath, match="backslash"):
        normalize_path(raw, False)


@pytest.mark.parametrize("keep", [False, True])
@pytest.mark.parametrize(("raw", "why"), [
    (b"/a%00b", "NUL"),
    (b"/a%", "malformed"),
    (b"/a%2", "malformed"),
    (b"/a%2/b", "malformed"),
    (b"/a%zz", "malformed"),
    (b"/a%+1", "malformed"),  # int() would take "+1" as hex; the table does not
    (b"/a% 1", "malformed"),
    (b"/a%%41", "malformed"),
])
def test_always_refused(raw: bytes, why: str, keep: bool) -> None:
    with pytest.raises(BadPath, match=why):
        normalize_path(raw, keep)


@pytest.mark.parametrize(("raw", "expected"), [
    (b"/", False),
    (b"/api/v1/x.json", False),
    (b"/a.b/c.", False),
    (b"", False),
    (b"*", False),
    (b"/.", True),
    (b"/a/..", True),
    (b"/a/.well-known", True),  # a false alarm, resolved to itself
    (b"/a%20b", True),
    (b"/a\\b", True),
])
def test_needs_normalizing(raw: bytes, expected: bool) -> None:
    assert needs_normalizing(raw) is expected


def test_escape_tables() -> None:
    # Every pair of hex digits in either case, less what each policy refuses.
    assert len(ESCAPES_KEEP) == 22 * 22 - 1  # less 00 (NUL)
    assert len(ESCAPES_REJECT) == len(ESCAPES_KEEP) - 4  # less 2f 2F 5c 5C
    assert b"2f" not in ESCAPES_REJECT and ESCAPES_KEEP[b"2f"] == b"%2F"
    for digits, normal_form in ESCAPES_KEEP.items():
        octet = int(digits, 16)
        if len(normal_form) == 1:  # decoded: unreserved characters only
            assert normal_form[0] == octet
            assert normal_form.isalnum() or normal_form in (b"-", b".", b"_", b"~")
        else:
            assert normal_form == b"%%%02X" % octet


def test_remove_dot_segments() -> None:
    # RFC 3986 §5.2.4 on absolute paths, without decoding.
    assert remove_dot_segments(b"/a/b/c/./../../g") == b"/a/g"
    assert remove_dot_segments(b"/a/%2e%2e/b") == b"/a/%2e%2e/b"


def test_configured_paths_are_matched_in_normal_form() -> None:
    # A route written with escapes matches the requests for it, which arrive normalised.
    routes = [Route.model_validate({"name": name, "upstream": "u", "match": match})
              for name, match in (("tilde", {"path_prefix": "/%7euser/"}),
                                  ("cafe", {"path": "/caf%c3%a9"}),
                                  ("dots", {"path": "/a/./b/../c"}))]
    router = Router(routes)
    assert [r.prefix or r.path for r in router.routes] == [b"/~user/", b"/caf%C3%A9", b"/a/c"]
    for raw, name in ((b"/%7Euser/x", "tilde"), (b"/caf%C3%a9", "cafe"), (b"/a/%2e/c", "dots")):
        route, _ = router.match(b"GET", None, normal(raw), {})
        assert route is not None and route.name == name, raw
