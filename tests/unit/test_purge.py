"""The master's side of an admin purge: the counts of the workers that answer, in time."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from proxyd.purge import Purges


@dataclass
class Channel:
    sent: list[dict[str, Any]] = field(default_factory=list)

    def send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)


@dataclass
class Handle:
    pid: int
    channel: Channel | None = field(default_factory=Channel)


async def test_the_counts_add_up_and_one_worker_purges_the_shared_store() -> None:
    purges = Purges()
    workers = [Handle(10), Handle(11), Handle(12, None)]  # the last has no channel yet
    run = asyncio.ensure_future(purges.run(workers, "k", None))
    await asyncio.sleep(0)
    sent = [w.channel.sent[0] for w in workers[:2] if w.channel is not None]
    assert [m["shared"] for m in sent] == [True, False]
    assert {m["type"] for m in sent} == {"purge"} and sent[0]["id"] == sent[1]["id"]
    purges.answered(10, {"type": "purged", "id": sent[0]["id"], "removed": 3})
    purges.answered(11, {"type": "purged", "id": sent[0]["id"], "removed": 2,
                         "deferred": True})
    purges.answered(11, {"type": "purged", "id": 999, "removed": 50})  # not this purge
    assert await run == {"purged": 5, "workers": 2, "answered": 2, "deferred": True}


async def test_a_worker_that_does_not_answer_is_left_out_and_said_to_be() -> None:
    purges = Purges()
    workers = [Handle(10), Handle(11)]
    run = asyncio.ensure_future(purges.run(workers, None, "p", timeout=0.05))
    await asyncio.sleep(0)
    assert workers[0].channel is not None
    purges.answered(10, {"type": "purged", "id": workers[0].channel.sent[0]["id"],
                         "removed": 1})
    assert await run == {"purged": 1, "workers": 2, "answered": 1, "deferred": False}
    late = {"type": "purged", "id": workers[0].channel.sent[0]["id"], "removed": 7}
    purges.answered(11, late)  # too late: nothing waits for it, nothing breaks
