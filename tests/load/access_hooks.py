"""What each access element's request hook costs by itself, in microseconds per request.

    python tests/load/access_hooks.py

bench.py's access scenarios measure a whole route against the same route without the element,
which also counts what any chain costs (a Context, the chain's calls, the credential's bytes
parsed and forwarded) and swings with whatever else runs. This times only ``on_request`` on a
prepared Context, minus the Context's own making, best of 5 rounds, with the settings of
bench.py's scenarios (an RS256 token with iss, aud and one claim forwarded; bcrypt cost 12;
metrics counting on).
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import timeit
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "load"))

import bench  # noqa: E402

from proxyd.config.models import GatewayConfig  # noqa: E402
from proxyd.middleware import REGISTRY  # noqa: E402
from proxyd.middleware.base import Context, Pending  # noqa: E402
from proxyd.middleware.services import Fallbacks, Services, WorkerCount  # noqa: E402
from proxyd.observe.metrics import WorkerMetrics  # noqa: E402
from proxyd.proxy.field_rules import TrustedProxies  # noqa: E402
from proxyd.proxy.router import CompiledRoute  # noqa: E402

COMMON = [(b"host", b"Host", b"127.0.0.1:8080"), (b"user-agent", b"User-Agent", b"wrk")]


def element(entry: dict[str, Any]) -> Any:
    cls = REGISTRY[entry["type"]]
    return cls(cls.options_model.model_validate(entry))


async def measure(name: str, mw: Any, headers: dict[str, str], rounds: int) -> float:
    fields = COMMON + [(k.lower().encode(), k.encode(), v.encode()) for k, v in headers.items()]
    config = GatewayConfig.model_validate({})
    services = Services(config, asyncio.get_running_loop(), WorkerMetrics(), True,
                        TrustedProxies(["127.0.0.1/32"]), {}, None, WorkerCount(1), Fallbacks())
    mw.bind(services, CompiledRoute(name="all", upstream=None))

    def ctx() -> Context:
        return Context(b"GET", b"/", b"", b"127.0.0.1:8080", fields, b"127.0.0.1", "all",
                       lambda: "id")

    first = mw.on_request(ctx())  # basic_auth: the one hash check, in its thread
    if isinstance(first, Pending):
        first = await first.future
    assert first is None and mw.on_request(ctx()) is None, f"{name} refused the request"
    hook = min(timeit.repeat(lambda: mw.on_request(ctx()), number=rounds, repeat=5))
    base = min(timeit.repeat(ctx, number=rounds, repeat=5))
    return (hook - base) / rounds * 1e6


async def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        material = bench.access_material(Path(tmp))
        for scenario in bench.ACCESS_SCENARIOS:
            entry, headers = material[scenario]
            rounds = 2_000 if scenario == "jwt_sig" else 200_000
            cost = await measure(scenario, element(entry), headers, rounds)
            print(f"{scenario:10} {entry['type']:11} {cost:8.2f} µs per request")


if __name__ == "__main__":
    asyncio.run(main())
