"""The ``rate_limit`` middleware: GCRA limits per key, in worker memory or shared in Redis.

Memory: each worker enforces its share (limit / workers), so N workers together allow the
configured limit — approximately, since the kernel spreads connections, not requests, across
workers. Redis: one atomic script per request, exact across workers and instances. When Redis
fails, ``on_backend_error`` decides: allow, deny, or ``local`` (a per-worker bucket of
limit / (workers * instances_hint)). Responses carry RateLimit-Limit/-Remaining/-Reset
(the widely deployed draft-03 names) and 429s carry Retry-After.
"""

from proxyd.middleware.rate_limit.middleware import HEADER_LNAMES, HEADER_NAMES, RateLimit
from proxyd.middleware.rate_limit.rate_limit_options import LimitSpec, RateLimitOptions

__all__ = ["HEADER_LNAMES", "HEADER_NAMES", "LimitSpec", "RateLimit", "RateLimitOptions"]
