"""Pipeline.next_request_id: "<prefix>-<counter in hex>", whatever took counter values between."""

from __future__ import annotations

import asyncio
import re

from proxyd.config.models import GatewayConfig
from proxyd.proxy.pipeline import Pipeline


def test_request_ids_are_the_counter_in_hex_across_the_table_boundaries() -> None:
    loop = asyncio.new_event_loop()
    try:
        p = Pipeline(GatewayConfig.model_validate({"server": {"listen": ["127.0.0.1:0"]}}), loop)
    finally:
        loop.close()
    prefix = p.next_request_id().partition("-")[0]
    assert re.fullmatch(r"[0-9a-f]{8}", prefix)
    seen = {f"{prefix}-1"}
    made = 1
    for n in range(2, 70_000):
        if n % 997 == 0:
            p._id_count += 300  # the access log takes counter values for its own ids
            continue
        rid = p.next_request_id()
        assert rid == f"{prefix}-{p._id_count:x}", (n, rid)
        seen.add(rid)
        made += 1
    assert len(seen) == made  # no id twice
