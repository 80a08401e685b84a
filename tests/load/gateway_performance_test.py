"""A locust scenario: a browsing mix through the gateway (not a pytest module).

    locust -f tests/load/gateway_performance_test.py --headless \\
        --users 50 --spawn-rate 10 --run-time 30s --host http://127.0.0.1:8080

Each simulated user, between short pauses, picks one of:

* weight 6 - a **cached GET**: ``{LOCUST_CACHED_PATH}/<1..LOCUST_CACHED_KEYS>``, a small key set,
  so behind a cache nearly all of them are hits (the ``X-Cache`` / ``Cache-Status`` answers are
  tallied and the hit ratio printed at the end);
* weight 3 - an **uncached GET**: ``{LOCUST_UNCACHED_PATH}/<random id>?nonce=<random>``, a new
  URL every time, so it always reaches the upstream;
* weight 1 - a **POST with a JSON body** to ``{LOCUST_POST_PATH}``.

Any non-2xx answer, or a connection error, is a failure; locust exits non-zero when there were
failures (``--exit-code-on-error``, default 1). The paths must be routed by the proxyd config
under test, e.g. a cached route for ``/api/products/`` and a plain one for ``/api/``
(tests/load/test_locust_smoke.py builds such a config and runs this file for a few seconds in CI).

Environment: ``LOCUST_CACHED_PATH`` (/api/products), ``LOCUST_CACHED_KEYS`` (20),
``LOCUST_UNCACHED_PATH`` (/api/users), ``LOCUST_POST_PATH`` (/api/orders),
``LOCUST_WAIT_MIN`` / ``LOCUST_WAIT_MAX`` seconds between tasks (0.05 / 0.5).
"""

from __future__ import annotations

import collections
import os
import random
import uuid
from typing import Any

from locust import HttpUser, between, events, task

CACHED_PATH = os.environ.get("LOCUST_CACHED_PATH", "/api/products").rstrip("/")
CACHED_KEYS = int(os.environ.get("LOCUST_CACHED_KEYS", "20"))
UNCACHED_PATH = os.environ.get("LOCUST_UNCACHED_PATH", "/api/users").rstrip("/")
POST_PATH = os.environ.get("LOCUST_POST_PATH", "/api/orders")
WAIT_MIN = float(os.environ.get("LOCUST_WAIT_MIN", "0.05"))
WAIT_MAX = float(os.environ.get("LOCUST_WAIT_MAX", "0.5"))

cache_answers: collections.Counter[str] = collections.Counter()


def cache_outcome(headers: Any) -> str:
    """HIT, MISS or none, from X-Cache or RFC 9211 Cache-Status."""
    x_cache = headers.get("X-Cache")
    if x_cache:
        return str(x_cache).split(",")[0].strip().upper()
    status = headers.get("Cache-Status")
    if status:
        return "HIT" if "hit" in str(status).lower() else "MISS"
    return "none"


class GatewayUser(HttpUser):
    wait_time = between(WAIT_MIN, WAIT_MAX)

    @task(6)
    def cached_get(self) -> None:
        key = random.randint(1, CACHED_KEYS)
        with self.client.get(f"{CACHED_PATH}/{key}", name=f"GET {CACHED_PATH}/[key] (cached)",
                             catch_response=True) as resp:
            if not 200 <= resp.status_code < 300:
                resp.failure(f"status {resp.status_code}")
                return
            cache_answers[cache_outcome(resp.headers)] += 1
            resp.success()

    @task(3)
    def uncached_get(self) -> None:
        ident = random.randint(1, 1_000_000)
        with self.client.get(f"{UNCACHED_PATH}/{ident}", params={"nonce": uuid.uuid4().hex},
                             name=f"GET {UNCACHED_PATH}/[id] (uncached)",
                             catch_response=True) as resp:
            if not 200 <= resp.status_code < 300:
                resp.failure(f"status {resp.status_code}")
            else:
                resp.success()

    @task(1)
    def post_json(self) -> None:
        order = {"order_id": uuid.uuid4().hex, "item": random.randint(1, CACHED_KEYS),
                 "quantity": random.randint(1, 5), "note": "locust"}
        with self.client.post(POST_PATH, json=order, name=f"POST {POST_PATH} (json)",
                              catch_response=True) as resp:
            if not 200 <= resp.status_code < 300:
                resp.failure(f"status {resp.status_code}")
            else:
                resp.success()


@events.quitting.add_listener
def report_cache(environment: Any, **_kwargs: Any) -> None:
    total = sum(cache_answers.values())
    if total:
        hits = cache_answers["HIT"]
        print(f"cached GETs: {hits}/{total} hits ({hits / total:.0%}); "
              f"answers {dict(cache_answers)}")
