"""Response's field methods: the list, its lowercase names and the set of names present stay in
step whatever mix of methods and direct list changes the hooks use."""

from __future__ import annotations

import random

from proxyd.middleware.base import FieldBlock, Response
from proxyd.proxy.head import render_fields


def fields(resp: Response) -> list[tuple[bytes, bytes]]:
    return list(resp.headers)


def consistent(resp: Response) -> None:
    """Every answer agrees with a plain scan of the list."""
    names = [n.lower() for n, _ in resp.headers]
    assert resp.lnames() == names
    assert resp.names() == set(names)
    assert resp.has_any([b"absent", *names[-1:]]) == bool(names)
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


def test_add_vary_follows_its_field_as_others_go_and_come() -> None:
    """add_vary remembers where its field is and its tokens: a field removed before it moves
    it, a new value set on it (or its removal) makes it look again."""
    resp = Response(200, [(b"Server", b"s"), (b"Date", b"d")])
    resp.add_vary(b"Accept-Encoding", b"accept-encoding")
    resp.remove(b"server")  # before Vary: Vary moves up
    resp.add_vary(b"Origin", b"origin")
    assert fields(resp) == [(b"Date", b"d"), (b"Vary", b"Accept-Encoding, Origin")]
    resp.set(b"Vary", b"Cookie")  # not add_vary's value any more
    resp.add_vary(b"Origin")
    resp.add_vary(b"cookie")
    assert fields(resp) == [(b"Date", b"d"), (b"Vary", b"Cookie, Origin")]
    resp.remove(b"vary")
    resp.add(b"X-A", b"1")
    resp.add_vary(b"Accept")
    assert fields(resp) == [(b"Date", b"d"), (b"X-A", b"1"), (b"Vary", b"Accept")]
    consistent(resp)


def model_add_vary(headers: list[tuple[bytes, bytes]], token: bytes) -> list[tuple[bytes, bytes]]:
    """add_vary's rule, written plainly: every Vary field is one list of tokens; an absent
    token is appended, folding several fields into the first."""
    vary = [i for i, (n, _) in enumerate(headers) if n.lower() == b"vary"]
    if not vary:
        return [*headers, (b"Vary", token)]
    current = b", ".join(headers[i][1] for i in vary)
    if token.lower() in {t.strip().lower() for t in current.split(b",")}:
        return headers
    out = [h for i, h in enumerate(headers) if i not in vary[1:]]
    out[vary[0]] = (b"Vary", current + b", " + token)
    return out


def test_any_sequence_of_changes_matches_a_plain_list() -> None:
    """Random mixes of every way a hook may change the fields (seeded: reproducible), the
    list checked against a plain model after each step — Vary's remembered place included."""
    rng = random.Random(4)
    names = [b"Vary", b"vary", b"ETag", b"Server", b"X-A"]
    tokens = [b"Origin", b"Accept-Encoding", b"origin", b"Cookie"]
    for _ in range(300):
        resp = Response(200, [(rng.choice(names), b"v0") for _ in range(rng.randrange(4))])
        model = list(resp.headers)
        for step in range(12):
            op = rng.randrange(7)
            name = rng.choice(names)
            value = b"v%d" % step
            if op == 0:
                token = rng.choice(tokens)
                resp.add_vary(token)
                model = model_add_vary(model, token)
            elif op == 1:
                resp.add(name, value)
                model.append((name, value))
            elif op == 2:
                resp.remove(name.lower())
                model = [(n, v) for n, v in model if n.lower() != name.lower()]
            elif op == 3:
                resp.set(name, value)
                at = [i for i, (n, _) in enumerate(model) if n.lower() == name.lower()]
                if at:
                    model[at[0]] = (name, value)
                    model = [h for i, h in enumerate(model) if i not in at[1:]]
                else:
                    model.append((name, value))
            elif op == 4:
                resp.headers.append((name, value))  # directly, as hooks may
                model.append((name, value))
            elif op == 5:
                block = FieldBlock([(name, value), (b"X-B", value)])
                if rng.random() < 0.5:
                    resp.add_block(block)
                else:
                    resp.extend(block.fields, block.lnames)
                model += block.fields
            else:
                resp.headers = list(resp.headers)
            assert fields(resp) == model, (op, name)
            consistent(resp)
            # Blocks still in place or not, the bytes are those of the fields.
            assert render_fields(resp.headers, resp.blocks) == render_fields(model)
