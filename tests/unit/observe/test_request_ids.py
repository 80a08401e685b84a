"""Request ids: "<prefix>-<counter in hex>", whatever took counter values between."""

from __future__ import annotations

import re

from proxyd.observe.request_ids import RequestIds


def test_request_ids_are_the_counter_in_hex_across_the_table_boundaries() -> None:
    ids = RequestIds()
    prefix = ids.next().partition("-")[0]
    assert re.fullmatch(r"[0-9a-f]{8}", prefix) and prefix == ids.prefix
    seen = {f"{prefix}-1"}
    made = 1
    for n in range(2, 70_000):
        if n % 997 == 0:
            for _ in range(300):  # the access log takes counter values for its own ids
                ids.deferred()
            continue
        rid = ids.next()
        assert rid == f"{prefix}-{ids.count:x}", (n, rid)
        seen.add(rid)
        made += 1
    assert len(seen) == made  # no id twice


def test_two_workers_do_not_share_a_prefix() -> None:
    assert RequestIds().prefix != RequestIds().prefix
