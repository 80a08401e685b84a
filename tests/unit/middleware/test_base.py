"""Response's field methods: the list, its lowercase names and the set of names present stay in
step whatever mix of methods and direct list changes the hooks use."""

from __future__ import annotations

from proxyd.middleware.base import Response


def fields(resp: Response) -> list[tuple[bytes, bytes]]:
    return list(resp.headers)


def consistent(resp: Response) -> None:
    """Every answer agrees with a plain scan of the list."""
    names = [n.lower() for n, _ in resp.headers]
    assert resp.lnames() == names
    assert resp.names() == set(names)
    for lname in {*names, b"absent"}:
        assert resp.has(lname) == (lname in names)
        expect = next((v for n, v in resp.headers if n.lower() == lname), None)
        assert resp.get(lname) == expect


def test_get_and_has_answer_present_and_absent_fields() -> None:
    resp = Response(200, [(b"Content-Type", b"text/plain"), (b"X-A", b"1"), (b"x-a", b"2")])
    assert resp.get(b"x-a") == b"1"  # the first of that name
    assert resp.get(b"etag") is None
    assert resp.has(b"content-type") and not resp.has(b"etag")
    consistent(resp)


def test_seeded_names_are_used_as_given() -> None:
    resp = Response(200, [(b"Date", b"d"), (b"Server", b"s")], None, b"", [b"date", b"server"])
    assert resp.has(b"server") and not resp.has(b"etag")
    consistent(resp)


def test_remove_takes_every_field_of_the_name_and_forgets_it() -> None:
    resp = Response(200, [(b"Server", b"a"), (b"Date", b"d"), (b"server", b"b")])
    resp.remove(b"server")
    assert fields(resp) == [(b"Date", b"d")]
    assert not resp.has(b"server")
    resp.remove(b"absent")  # nothing to do
    consistent(resp)


def test_set_replaces_duplicates_in_the_first_place_and_stays_present() -> None:
    resp = Response(200, [(b"Vary", b"a"), (b"Date", b"d"), (b"vary", b"b")])
    resp.set(b"Vary", b"c")
    assert fields(resp) == [(b"Vary", b"c"), (b"Date", b"d")]
    assert resp.get(b"vary") == b"c"
    resp.set(b"ETag", b'"x"')  # absent: appended
    assert resp.get(b"etag") == b'"x"'
    consistent(resp)


def test_fields_appended_to_the_list_directly_are_seen() -> None:
    resp = Response(200, [(b"Date", b"d")])
    assert not resp.has(b"x-direct")
    resp.headers.append((b"X-Direct", b"1"))
    assert resp.has(b"x-direct") and resp.get(b"x-direct") == b"1"
    resp.add(b"X-Added", b"2")
    resp.extend([(b"X-Block", b"3")], [b"x-block"])
    consistent(resp)


def test_a_new_list_replaces_the_names() -> None:
    resp = Response(200, [(b"Server", b"s"), (b"ETag", b'"e"')])
    assert resp.has(b"server")
    resp.headers = [(b"ETag", b'"e"')]
    assert not resp.has(b"server") and resp.get(b"etag") == b'"e"'
    consistent(resp)


def test_add_vary_makes_merges_and_does_not_repeat_a_token() -> None:
    resp = Response(200, [(b"Date", b"d")])
    resp.add_vary(b"Origin")
    resp.add_vary(b"Accept-Encoding")
    resp.add_vary(b"accept-encoding")  # present, in another case
    assert fields(resp) == [(b"Date", b"d"), (b"Vary", b"Origin, Accept-Encoding")]
    upstream = Response(200, [(b"vary", b"Cookie"), (b"Vary", b"Accept")])
    upstream.add_vary(b"Origin")  # two fields are one list: folded, no token lost
    assert fields(upstream) == [(b"Vary", b"Cookie, Accept, Origin")]
    upstream.headers.append((b"VARY", b"Origin"))
    upstream.add_vary(b"Accept")  # present in one of several fields: nothing to add
    assert fields(upstream) == [(b"Vary", b"Cookie, Accept, Origin"), (b"VARY", b"Origin")]
    consistent(upstream)
    substring = Response(200, [(b"Vary", b"X-Origin-Hint")])
    substring.add_vary(b"Origin")  # a substring of a token is not the token
    assert substring.get(b"vary") == b"X-Origin-Hint, Origin"
    consistent(resp)
