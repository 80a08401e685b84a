"""proxyd against nginx, in the same pass: throughput, latency at a fixed rate, errors, RSS.

    python tests/load/bench.py [--duration 10] [--passes 5] [--workers 2]
                               [--scenarios plain big chain chain_gz seed mw cache recycle]
                               [--seed-probe-duration 20] [--json out.json]

What it starts (all on free 127.0.0.1 ports, all stopped by process group when it ends):

* an **origin**: nginx (``--origin-workers``, default 2) serving static files, no ETag:
  ``/`` 1 KiB, ``/big`` 64 KiB, ``/cacheable`` 1 KiB with ``Cache-Control: max-age=300``;
  ``/tagged``, the 1 KiB with nginx's ETag (for nginx-chain), and ``/echo``, which answers with
  the request fields a proxy adds (for the likeness check). Without nginx, a Python aiohttp
  origin with the first three routes (and then no nginx reference);
* **nginx as the reference reverse proxy** (``nginx``, "nginx-plain"): 2 workers,
  ``reuseport``, upstream keepalive 64, HTTP/1.1 upstream, no access log, no cache;
* **nginx with the chain's equivalent** (``nginx_chain``, for chain, chain_gz and seed): the
  same proxy, and for each piece of proxyd's chain what nginx has for it:

  - cors: ``Access-Control-Allow-Origin`` for the allowed origin (a ``map``), ``Vary: Origin``
    (no preflight answers: nothing here sends one);
  - security_headers: the same three fields, ``add_header ... always``;
  - validation: nothing to configure (nginx's own request checks);
  - trace_id: ``$request_id`` as X-Request-ID both ways, a client's kept when it is visible
    ASCII of at most 200 bytes; a W3C ``traceparent`` upstream, a valid incoming one continued
    with a new parent id, else one started from ``$request_id``;
  - rate_limit (memory): ``limit_req`` per client address, a zone of 10000000 r/s, burst
    10000000, nodelay (never refuses here); nginx cannot send the RateLimit-* fields it would
    compute, so the four proxyd sends are added with fixed values: the same bytes for the
    client, not the same work;
  - etag: nginx hashes no proxied body; ``/`` is proxied to the origin's ``/tagged``, whose
    ETag (mtime and size) passes through, so the client gets an ETag from both at nginx's cost;
  - compression: ``gzip`` level 6 (proxyd's gzip_level), min length 1024, the same types,
    ``gzip_proxied any``; ``Vary: Accept-Encoding, Origin`` as proxyd sends it; upstream asked
    for ``Accept-Encoding: identity``, as proxyd asks; proxyd prefers br, so the benchmark's
    requests that accept an encoding (chain_gz) accept gzip only;
  - JSON access log to a file: ``log_format ... escape=json`` with proxyd's fields,
    ``access_log ... buffer=64k flush=1s``;
  - metrics: nginx counts always (``stub_status`` at ``/nginx_status``); it has no per-route
    duration histogram, which proxyd's metrics keep;
  - proxyd's forwarding fields (X-Forwarded-For/-Proto/-Host, Via, the client's Host) set
    the same way; ``keepalive_requests 1000`` as proxyd's ``max_keepalive_requests``.

  Before the first pass, the benchmark fetches ``/`` (plain, and with ``Accept-Encoding: gzip``
  and an allowed ``Origin``) and ``/echo`` from proxyd's chain and from nginx-chain and notes
  the response fields, the body sizes and the fields the origin got that only one of them
  sends (a WARNING when the chain's fields or the gzip body size, ±20 %, differ);
* **proxyd** (``python -m proxyd run -c <generated yaml>``), ``server.workers: --workers``,
  a fresh one per scenario and pass, access log off unless the scenario says, metrics default.

Scenarios:

=========  ==========================================================================
plain      no middleware, GET /
big        no middleware, GET /big (64 KiB)
chain      the full chain: cors, security_headers, validation, trace_id,
           [rate_limit memory, only if proxyd has it; its rate set so high it never limits],
           etag, compression (min_size 1KiB), JSON access log to a file, metrics; GET /
           with no Accept-Encoding (wrk's), so nothing is compressed
chain_gz   chain, every request with Accept-Encoding: gzip (1 KiB compressed to ~100 B)
seed       chain with the seed config's server defaults (config/gateway.yaml): worker
           recycling (max_requests 10000, jitter 1000), keepalive_timeout 5s,
           max_keepalive_requests 1000, drain_timeout 30s; its probe runs
           --seed-probe-duration (20 s) and watches proxyd's workers: the latency of the
           requests due while one is replaced (from 50 ms before the successor's start to
           250 ms after the old worker's exit) against the others' (recycle's probe too)
mw         the middleware alone: cors, security_headers, validation, trace_id,
           headers (one request field set, upstream Server removed, one response field
           with {route}), etag, compression on a body below its min_size (2KiB); no
           access log, metrics default; GET /
cache      the cache middleware, GET /cacheable (cache hits); nginx proxies without a cache
recycle    plain with ``max_requests: 10000`` (default jitter)
jwt        plain behind jwt_auth: every request carries the same valid RS256 token, so
           its verification is remembered (the steady state of a client with a token);
           the sub claim forwarded as a request header
jwt_sig    jwt with cache_size 0: the signature and claims checked on every request
basic      plain behind basic_auth, the same user:password (bcrypt cost 12) on every
           request, so the hash is checked once and remembered
apikey     plain behind api_key, the key in X-API-Key (a SHA-256 and a lookup a request)
ipaccess   plain behind ip_access with an allow list that takes 127.0.0.1, 127.0.0.1 a
           trusted proxy (the benchmark's requests carry no X-Forwarded-For)
=========  ==========================================================================

Each access scenario is measured against plain in the same pass: the lines after the table
give its throughput as a fraction of plain's and its CPU per request over plain's, the cost of
the element alone on that route. nginx gets the same headers and checks nothing.

Each pass, for each scenario: ``wrk -t1 -c64`` (closed loop, after a 1 s warm-up) against each
candidate back to back (proxyd, nginx and, for the chain scenarios, nginx-chain; the order
rotates from pass to pass, so each goes first, second and third in turn), then an open-loop
probe at ``--rate`` (2000 req/s) on ``--probe-conns`` (64) keep-alive connections against the
origin directly and each candidate, in the same order. The probe is this file's own (uvloop,
one process): wrk2 is not packaged for Debian 12, and h2load's ``--rps`` paces each client
without saying from when it times a request that had to wait. Request i goes to connection i
mod N (so the connections are staggered) at its scheduled time, up to 1 ms early to absorb
timer granularity; a connection carries one request at a time (no pipelining), and a request
due on a busy connection waits there. Latency is measured from the scheduled time or the real
send, whichever is earlier, so a stall is not hidden by coordinated omission (a proxy that
cannot keep up shows huge latencies, not a lower rate). A request on a reused connection that
the server closes before any byte of the answer is retried once, as real clients do, and shown
as "retried", not as an error.
"p95 added" = proxy p95 - origin-direct p95 at the same rate in the same pass (it can come out
negative in noise). Errors = wrk's socket errors and non-2xx/3xx + the probe's failures. RSS is
summed over the master and all its descendants from /proc right after the wrk run, with each
worker's in brackets (during recycling, draining workers show up too). CPU µs per request is
the candidate's CPU time (all its processes, from /proc) during the wrk run over the requests
wrk counted. The table shows medians over ``--passes`` with the range (min-max) in brackets;
errors are summed over passes. ``--json`` keeps every raw measurement.

On a small machine the load generators, the proxies and the origin share the CPUs: only the
ratios to nginx measured in the same pass mean anything, never absolute numbers from elsewhere.
Close what else runs; take ``--passes 5`` at least; keep the JSON with the table.

Results, and how each was made: docs/performance.md (raw JSON in docs/performance/results/).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import datetime
import http.client
import json
import os
import platform
import pwd
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httptools
import uvloop
import yaml

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

ACCESS_SCENARIOS = ("jwt", "jwt_sig", "basic", "apikey", "ipaccess")
# The scenarios of the full chain, measured against nginx-chain as well.
CHAIN_SCENARIOS = ("chain", "chain_gz", "seed")
SCENARIOS = ("plain", "big", *CHAIN_SCENARIOS, "mw", "cache", "recycle", *ACCESS_SCENARIOS)
PATHS = {"plain": "/", "big": "/big", "chain": "/", "chain_gz": "/", "seed": "/", "mw": "/",
         "cache": "/cacheable", "recycle": "/", **{s: "/" for s in ACCESS_SCENARIOS}}
# The candidates, in the table's order.
TARGETS = ("nginx", "nginx_chain", "proxyd")
NAMES = {"nginx": "nginx-plain", "nginx_chain": "nginx-chain", "proxyd": "proxyd"}
# The mw scenario's chain: the middleware alone (no rate limit, access log or extra metrics).
MW_CHAIN: list[dict[str, Any]] = [
    {"type": "cors", "allow_origins": ["https://app.example.com"]},
    {"type": "security_headers"},
    {"type": "validation"},
    {"type": "trace_id", "header": "X-Request-ID"},
    {"type": "headers", "request": {"set": {"X-Gateway": "proxyd"}},
     "response": {"remove": ["Server"], "set": {"X-Route": "{route}"}}},
    {"type": "etag"},
    {"type": "compression", "min_size": "2KiB"},
]
# 1 KiB of compressible text, and 64 KiB of it.
LINE = b"proxyd benchmark body: the quick brown fox jumps over the lazy dog 0123456789.\n"
SMALL = (LINE * 16)[:1023] + b"\n"
BIG = (LINE * 1024)[: 64 * 1024 - 1] + b"\n"
assert len(SMALL) == 1024 and len(BIG) == 65536

WRK_LUA = r"""
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests": %d, "duration_us": %d, "bytes": %d, "connect": %d, "read": %d, ' ..
    '"write": %d, "status": %d, "timeout": %d, "p50_us": %.1f, "p95_us": %.1f, ' ..
    '"p99_us": %.1f}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status,
    e.timeout, latency:percentile(50), latency:percentile(95), latency:percentile(99)))
end
"""

PY_ORIGIN = r"""
import sys
from aiohttp import web
small, big = open(sys.argv[2], "rb").read(), open(sys.argv[3], "rb").read()
async def root(request):
    return web.Response(body=small, content_type="text/plain")
async def large(request):
    return web.Response(body=big, content_type="text/plain")
async def cacheable(request):
    return web.Response(body=small, content_type="text/plain",
                        headers={"Cache-Control": "max-age=300"})
app = web.Application()
app.router.add_get("/", root)
app.router.add_get("/big", large)
app.router.add_get("/cacheable", cacheable)
try:
    import uvloop
    uvloop.install()
except ImportError:
    pass
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None,
            backlog=4096)
"""


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- processes -------------------------------------------------------------------------------------


class Proc:
    """A subprocess in its own session (so its whole process group can be stopped)."""

    def __init__(self, name: str, argv: list[str], logfile: Path, stop_signal: int,
                 env: dict[str, str] | None = None) -> None:
        self.name, self.logfile, self.stop_signal = name, logfile, stop_signal
        with open(logfile, "ab") as out:
            self.popen = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, start_new_session=True,
                                          env=env)
        self.pid = self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.logfile.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def stop(self, timeout: float = 10.0) -> None:
        """The stop signal to the leader, wait, then SIGKILL whatever is left of the group."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, self.stop_signal)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(5)


def children(pid: int) -> list[int]:
    """Direct children of ``pid``, from /proc."""
    kids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()
        if int(fields[1]) == pid:
            kids.append(int(entry))
    return kids


def rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def cpu_seconds(pid: int) -> float:
    """CPU time of a master and every process under it: the master's own and that of the
    children it reaped (recycled workers), plus what its live descendants have used so far."""
    ticks, todo = 0, [pid]
    while todo:
        p = todo.pop()
        with contextlib.suppress(OSError):
            stat = Path(f"/proc/{p}/stat").read_text()
            # After the name: utime, stime, cutime, cstime at 11-14 (fields 14-17 of stat(5)).
            fields = stat[stat.rfind(")") + 2:].split()
            ticks += sum(int(x) for x in fields[11:15 if p == pid else 13])
        todo.extend(children(p))
    return ticks / os.sysconf("SC_CLK_TCK")


def rss_tree(pid: int) -> dict[str, Any]:
    """RSS (MiB) of a master and its workers (all descendants)."""
    procs, todo = [], [pid]
    while todo:
        p = todo.pop()
        procs.append(p)
        todo.extend(children(p))
    master = rss_kib(pid) / 1024
    workers = [rss_kib(p) / 1024 for p in procs[1:]]
    workers = [w for w in workers if w > 0]
    return {"total": master + sum(workers), "master": master, "workers": workers}


def http_get(port: int, path: str, headers: dict[str, str] | None = None,
             timeout: float = 2.0) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path, headers=headers or {})
        resp = conn.getresponse()
        body = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, body
    finally:
        conn.close()


def wait_ready(port: int, path: str, proc: Proc | None, what: str, timeout: float = 30.0,
               headers: dict[str, str] | None = None) -> None:
    """Poll ``GET path`` until it answers 200; fail with the process's log after ``timeout``."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        if proc is not None and not proc.alive():
            raise RuntimeError(f"{what} exited ({proc.popen.returncode}):\n{proc.log_tail()}")
        try:
            status, _, _ = http_get(port, path, headers, timeout=1.0)
            if status == 200:
                return
            last = status
        except (OSError, http.client.HTTPException) as exc:
            last = exc
        time.sleep(0.05)
    tail = proc.log_tail() if proc else ""
    raise RuntimeError(f"{what} not ready on :{port}{path} after {timeout}s ({last!r})\n{tail}")


# -- nginx -----------------------------------------------------------------------------------------


def nginx_conf(tmp: Path, name: str, workers: int, server: str) -> Path:
    temp = tmp / f"{name}-temp"
    temp.mkdir(exist_ok=True)
    temp.chmod(0o777)
    temps = "\n".join(f"  {kind}_temp_path {temp}/{kind};"
                      for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    conf = tmp / f"{name}.conf"
    # As root, nginx's workers switch to "nobody"; a bare image may lack that user.
    user = ""
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("nobody")
        except KeyError:
            user = "user root;"
    conf.write_text(f"""
daemon off;
{user}
worker_processes {workers};
pid {tmp}/{name}.pid;
error_log {tmp}/{name}-error.log warn;
worker_rlimit_nofile 65536;
events {{ worker_connections 8192; }}
http {{
  access_log off;
  default_type text/plain;
  sendfile on;
  tcp_nopush on;
  tcp_nodelay on;
  keepalive_timeout 60s;
  keepalive_requests 1000000;
{temps}
{server}
}}
""")
    return conf


def start_nginx(nginx: str, tmp: Path, name: str, workers: int, server: str) -> Proc:
    conf = nginx_conf(tmp, name, workers, server)
    argv = [nginx, "-p", str(tmp), "-e", str(tmp / f"{name}-error.log"), "-c", str(conf)]
    return Proc(name, argv, tmp / f"{name}.log", signal.SIGTERM)


# The request fields a proxy adds or changes, as the origin's /echo answers them: one
# "name=value" line each (an absent field: an empty value).
ECHO_FIELDS = ("host", "x-request-id", "traceparent", "x-forwarded-for", "x-forwarded-proto",
               "x-forwarded-host", "via", "accept-encoding", "connection")
ECHO_BODY = "".join(f"{name}=$http_{name.replace('-', '_')}\\n" for name in ECHO_FIELDS)
# The response fields the likeness check compares (what the chain's elements add).
CHAIN_FIELDS = ("content-type", "content-encoding", "vary", "etag", "x-request-id",
                "x-content-type-options", "x-frame-options", "referrer-policy",
                "access-control-allow-origin", "ratelimit-policy", "ratelimit-limit",
                "ratelimit-remaining", "ratelimit-reset")
ALLOWED_ORIGIN = "https://app.example.com"


def origin_server(port: int, www: Path) -> str:
    return f"""
  server {{
    listen 127.0.0.1:{port} reuseport backlog=4096;
    root {www};
    etag off;
    location = / {{ try_files /index.txt =404; }}
    location = /big {{ try_files /big.txt =404; }}
    location = /cacheable {{
      add_header Cache-Control "max-age=300";
      try_files /index.txt =404;
    }}
    location = /tagged {{
      etag on;
      try_files /index.txt =404;
    }}
    location = /echo {{ return 200 "{ECHO_BODY}"; }}
    location / {{ return 404; }}
  }}"""


def proxy_server(port: int, origin: int) -> str:
    return f"""
  upstream origin {{
    server 127.0.0.1:{origin};
    keepalive 64;
    keepalive_requests 1000000;
  }}
  server {{
    listen 127.0.0.1:{port} reuseport backlog=4096;
    location / {{
      proxy_pass http://origin;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffer_size 8k;
      proxy_buffers 16 8k;
    }}
  }}"""


def chain_proxy_server(port: int, origin: int, tmp: Path) -> str:
    """nginx with the equivalent of proxyd's full chain (the docstring's list, piece by piece).
    Everything is set at the server level, so both locations inherit it; ``/`` goes to the
    origin's ``/tagged`` (its ETag), anything else as it is (``/echo``)."""
    return f"""
  upstream origin_chain {{
    server 127.0.0.1:{origin};
    keepalive 64;
    keepalive_requests 1000000;
  }}
  # trace_id: a client's X-Request-ID kept when it is visible ASCII, at most 200 bytes.
  map $http_x_request_id $bench_rid {{
    "~^[\x21-\x7e]{{1,200}}$" $http_x_request_id;
    default $request_id;
  }}
  map $request_id $bench_span {{
    "~^(?<span>[0-9a-f]{{16}})" $span;
  }}
  # W3C traceparent: a valid one keeps its trace id and flags with a new parent id.
  map $http_traceparent $bench_traceparent {{
    "~^00-(?<tid>[0-9a-f]{{32}})-[0-9a-f]{{16}}-(?<flags>[0-9a-f]{{2}})$"
        "00-$tid-$bench_span-$flags";
    default "00-$request_id-$bench_span-01";
  }}
  map $http_origin $bench_cors_origin {{
    "{ALLOWED_ORIGIN}" $http_origin;
    default "";
  }}
  limit_req_zone $binary_remote_addr zone=bench:1m rate=10000000r/s;
  log_format bench_json escape=json '{{"ts":$msec,"request_id":"$bench_rid",'
    '"client_ip":"$remote_addr","method":"$request_method","host":"$http_host","path":"$uri",'
    '"query":"$args","status":$status,"bytes_in":$request_length,"bytes_out":$bytes_sent,'
    '"duration_ms":$request_time,"upstream":"origin","upstream_ms":"$upstream_response_time",'
    '"user_agent":"$http_user_agent","referer":"$http_referer","protocol":"$server_protocol",'
    '"upstream_addr":"$upstream_addr","tries":1,"tls_version":"$ssl_protocol","cache":"",'
    '"route":"all","pid":$pid}}';
  server {{
    listen 127.0.0.1:{port} reuseport backlog=4096;
    keepalive_requests 1000;
    access_log {tmp}/nginx-chain-access.log bench_json buffer=64k flush=1s;
    # cors
    add_header Access-Control-Allow-Origin $bench_cors_origin always;
    add_header Vary "Accept-Encoding, Origin" always;
    # security_headers
    add_header X-Content-Type-Options nosniff always;
    add_header X-Frame-Options DENY always;
    add_header Referrer-Policy strict-origin-when-cross-origin always;
    # trace_id
    add_header X-Request-ID $bench_rid always;
    proxy_set_header X-Request-ID $bench_rid;
    proxy_set_header traceparent $bench_traceparent;
    # rate_limit: refuses nothing here; its fields with fixed values (nginx computes none)
    limit_req zone=bench burst=10000000 nodelay;
    add_header RateLimit-Policy "10000000;w=1;burst=10000000" always;
    add_header RateLimit-Limit 10000000 always;
    add_header RateLimit-Remaining 9999999 always;
    add_header RateLimit-Reset 1 always;
    # etag: the origin's (see /tagged); nginx's own applies to files it serves
    etag on;
    # compression
    gzip on;
    gzip_comp_level 6;
    gzip_min_length 1024;
    gzip_proxied any;
    gzip_vary off;
    gzip_types text/plain application/json application/javascript application/xml
               application/xhtml+xml application/rss+xml application/atom+xml
               application/problem+json application/ld+json image/svg+xml
               application/wasm application/x-ndjson;
    # the proxy, with proxyd's forwarding fields
    proxy_http_version 1.1;
    proxy_set_header Connection "";
    proxy_set_header Host $http_host;
    proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
    proxy_set_header X-Forwarded-Proto $scheme;
    proxy_set_header X-Forwarded-Host $http_host;
    proxy_set_header Via "1.1 nginx";
    proxy_set_header Accept-Encoding identity;
    proxy_buffer_size 8k;
    proxy_buffers 16 8k;
    location = / {{ proxy_pass http://origin_chain/tagged; }}
    location / {{ proxy_pass http://origin_chain; }}
    # metrics
    location = /nginx_status {{ stub_status; }}
  }}"""


# -- proxyd ----------------------------------------------------------------------------------------


def rate_limit_entry() -> tuple[dict[str, Any] | None, str]:
    """The full chain's rate_limit entry (never limiting), if this proxyd has the type."""
    try:
        from proxyd.middleware import REGISTRY
    except Exception as exc:
        return None, f"could not import proxyd.middleware ({exc!r}); rate_limit left out"
    if "rate_limit" not in REGISTRY:
        return None, "rate_limit is not in proxyd.middleware.REGISTRY: left out of the chain"
    entry = {"type": "rate_limit", "backend": "memory", "rate": "10000000/s",
             "burst": 10000000, "key": "client_ip"}
    try:
        REGISTRY["rate_limit"].options_model.model_validate(entry)
    except Exception as exc:
        return None, f"rate_limit options not accepted ({exc}); left out of the chain"
    return entry, "rate_limit (memory, 10000000/s, so it never limits) included"


def proxyd_config(scenario: str, port: int, admin: int, origin: int, workers: int,
                  tmp: Path, rate_limit: dict[str, Any] | None) -> dict[str, Any]:
    server: dict[str, Any] = {
        "listen": [f"127.0.0.1:{port}"], "workers": workers, "backlog": 4096,
        "max_requests": 10000 if scenario == "recycle" else 0, "drain_timeout": "3s",
        "keepalive_timeout": "60s",
    }
    config: dict[str, Any] = {
        "server": server,
        "admin": {"listen": f"127.0.0.1:{admin}"},
        "upstreams": {"origin": {"targets": [f"http://127.0.0.1:{origin}"]}},
        "routes": [{"name": "all", "match": {"path_prefix": "/"}, "upstream": "origin"}],
        "access_log": {"enabled": False},
    }
    if scenario == "seed":  # the seed config's server defaults (config/gateway.yaml)
        for key in ("max_requests", "keepalive_timeout", "drain_timeout"):
            del server[key]
    if scenario in CHAIN_SCENARIOS:
        chain: list[dict[str, Any]] = [
            {"type": "cors", "allow_origins": ["https://app.example.com"]},
            {"type": "security_headers"},
            {"type": "validation"},
            {"type": "trace_id", "header": "X-Request-ID"},
        ]
        if rate_limit is not None:
            chain.append(rate_limit)
        chain += [{"type": "etag"},
                  {"type": "compression", "min_size": "1KiB", "algorithms": ["br", "gzip"]}]
        config["middleware"] = chain
        config["access_log"] = {"format": "json", "path": str(tmp / "access.log")}
        config["metrics"] = {"enabled": True}
    elif scenario == "mw":
        config["middleware"] = [dict(entry) for entry in MW_CHAIN]
    elif scenario == "cache":
        config["middleware"] = [{"type": "cache"}]
        config["cache"] = {"backend": "memory"}
    elif scenario in ACCESS_SCENARIOS:
        config["middleware"] = [access_material(tmp)[scenario][0]]
        if scenario == "ipaccess":  # as behind a load balancer: the checks can test a refusal
            server["trusted_proxies"] = ["127.0.0.1/32"]
    return config


_ACCESS: dict[Path, dict[str, tuple[dict[str, Any], dict[str, str]]]] = {}


def access_material(tmp: Path) -> dict[str, tuple[dict[str, Any], dict[str, str]]]:
    """Each access scenario's middleware entry and the headers its requests carry; the keys,
    hashes and token are made once per run (an RSA key, a bcrypt hash: ~0.5 s)."""
    if tmp in _ACCESS:
        return _ACCESS[tmp]
    import base64
    import hashlib

    import bcrypt
    import jwt
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = tmp / "jwt-public.pem"
    pem.write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    token = jwt.encode({"sub": "bench", "iss": "https://idp.bench", "aud": "api",
                        "exp": int(time.time()) + 7 * 86400}, key, algorithm="RS256")
    jwt_entry = {"type": "jwt_auth", "algorithms": ["RS256"], "key_file": str(pem),
                 "issuer": "https://idp.bench", "audience": "api",
                 "claims_to_headers": {"sub": "X-User"}}
    bearer = {"Authorization": f"Bearer {token}"}
    password = bcrypt.hashpw(b"bench-password", bcrypt.gensalt(12)).decode()
    api_key = "k-" + "0123456789abcdef" * 2
    _ACCESS[tmp] = {
        "jwt": (jwt_entry, bearer),
        "jwt_sig": ({**jwt_entry, "cache_size": 0}, bearer),
        "basic": ({"type": "basic_auth", "users": {"bench": password}},
                  {"Authorization": "Basic " + base64.b64encode(b"bench:bench-password").decode()}),
        "apikey": ({"type": "api_key",
                    "keys": {"bench": "sha256:" + hashlib.sha256(api_key.encode()).hexdigest()}},
                   {"X-API-Key": api_key}),
        "ipaccess": ({"type": "ip_access", "allow": ["127.0.0.0/8"]}, {}),
    }
    return _ACCESS[tmp]


def scenario_headers(tmp: Path, scenario: str) -> dict[str, str]:
    """The headers every request of ``scenario`` carries (credentials), else none."""
    if scenario == "chain_gz":
        return {"Accept-Encoding": "gzip"}
    return access_material(tmp)[scenario][1] if scenario in ACCESS_SCENARIOS else {}


def start_proxyd(tmp: Path, scenario: str, workers: int, origin: int,
                 rate_limit: dict[str, Any] | None) -> tuple[Proc, int, int]:
    port, admin = free_port(), free_port()
    cfg = tmp / f"proxyd-{scenario}.yaml"
    cfg.write_text(yaml.safe_dump(
        proxyd_config(scenario, port, admin, origin, workers, tmp, rate_limit), sort_keys=False))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}
    proc = Proc(f"proxyd-{scenario}", [sys.executable, "-m", "proxyd", "run", "-c", str(cfg)],
                tmp / f"proxyd-{scenario}.log", signal.SIGTERM, env=env)
    try:
        wait_ready(admin, "/health/ready", proc, f"proxyd ({scenario}) admin")
        wait_ready(port, PATHS[scenario], proc, f"proxyd ({scenario})",
                   headers=scenario_headers(tmp, scenario))
    except BaseException:
        proc.stop()
        raise
    return proc, port, admin


# -- load generators -------------------------------------------------------------------------------


def run_wrk(wrk: str, lua: Path, port: int, path: str, duration: float, conns: int,
            threads: int = 1, headers: dict[str, str] | None = None) -> dict[str, Any]:
    argv = [wrk, f"-t{threads}", f"-c{conns}", f"-d{max(1, round(duration))}s", "-s", str(lua)]
    for name, value in (headers or {}).items():
        argv += ["-H", f"{name}: {value}"]
    argv.append(f"http://127.0.0.1:{port}{path}")
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True, text=True)
    try:
        out, _ = proc.communicate(timeout=duration + 60)
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    line = next((x for x in out.splitlines() if x.startswith("WRKJSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk gave no summary (rc {proc.returncode}):\n{out}")
    data: dict[str, Any] = json.loads(line[len("WRKJSON "):])
    data["rps"] = data["requests"] / (data["duration_us"] / 1e6)
    data["errors"] = sum(data[k] for k in ("connect", "read", "write", "status", "timeout"))
    return data


class ProbeConn(asyncio.Protocol):
    """One keep-alive connection of the probe: at most one request in flight, FIFO backlog."""

    def __init__(self, probe: Probe, slot: int) -> None:
        self.probe, self.slot = probe, slot
        self.transport: Any = None  # uvloop's transports are not asyncio.Transport subclasses
        self.parser = httptools.HttpResponseParser(self)
        self.inflight: float | None = None  # start time of the request in flight
        self.answered = 0  # responses on this connection
        self.got_bytes = False  # any byte of the in-flight request's response
        self.backlog: collections.deque[float] = collections.deque()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def send(self, scheduled: float) -> None:
        self.backlog.append(scheduled)  # if it has to wait, it counts from its scheduled time
        self.pump()

    def pump(self) -> None:
        if self.inflight is None and self.transport is not None and self.backlog:
            self.inflight = min(self.backlog.popleft(), time.monotonic())
            self.got_bytes = False
            self.transport.write(self.probe.request)

    def data_received(self, data: bytes) -> None:
        self.got_bytes = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.probe.error(f"parse: {exc}")
            if self.transport is not None:
                self.transport.close()

    def on_message_complete(self) -> None:
        now = time.monotonic()
        status = self.parser.get_status_code()
        if self.inflight is not None:
            if status == 200:
                self.probe.latencies.append(now - self.inflight)
                self.probe.starts.append(self.inflight)
            else:
                self.probe.error(f"status {status}")
            self.inflight = None
        self.answered += 1
        if not self.parser.should_keep_alive():
            if self.transport is not None:
                self.transport.close()  # connection_lost reconnects
            return
        self.pump()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.inflight is not None:
            if self.answered and not self.got_bytes and not self.probe.closing:
                # A reused keep-alive connection closed before any byte of the answer (the
                # server closed it as idle just as we sent): retry once on a new connection,
                # as browsers, nginx and aiohttp do for idempotent requests. Its latency still
                # counts from the first send. Counted apart from errors.
                self.backlog.appendleft(self.inflight)
                self.probe.retried += 1
            else:
                self.probe.error(f"connection lost: {exc!r}")
            self.inflight = None
        self.transport = None
        self.probe.lost(self)


def worker_pids(master: int) -> set[int]:
    """The master's children: /proc/PID/task/*/children (cheap), else a scan of /proc."""
    pids: set[int] = set()
    try:
        for task in os.listdir(f"/proc/{master}/task"):
            with open(f"/proc/{master}/task/{task}/children") as f:
                pids.update(int(x) for x in f.read().split())
    except OSError:
        return set(children(master))
    return pids


def recycle_windows(events: list[tuple[float, str, int]], end: float, before: float = 0.05,
                    after: float = 0.25) -> list[tuple[float, float]]:
    """From the watcher's (time, "start" | "exit", pid) events: for each worker started during
    the probe, the time from its start to the next exit of another worker (the one it
    replaces; ``end`` if none), from ``before`` it to ``after`` it (the clients of the old
    worker reconnect, the new one serves its first requests). An exit whose start came before
    the probe: from ``before`` + 0.2 s before it to ``after`` it."""
    windows, matched = [], set()
    for i, (t, kind, pid) in enumerate(events):
        if kind != "start":
            continue
        gone = next(((t2, p2) for t2, k2, p2 in events[i + 1:]
                     if k2 == "exit" and p2 != pid and p2 not in matched), None)
        if gone is not None:
            matched.add(gone[1])
        windows.append((t - before, (gone[0] if gone else end) + after))
    windows += [(t - before - 0.2, t + after) for t, kind, pid in events
                if kind == "exit" and pid not in matched]
    return sorted(windows)


class Probe:
    """Open-loop GETs at a fixed rate over ``conns`` staggered keep-alive connections.

    With ``watch`` (a master's pid), its children are polled every 10 ms during the run, and
    the summary splits the latencies into those of requests due while a worker was being
    replaced (``recycle_windows``) and the others ("steady")."""

    def __init__(self, port: int, path: str, rate: float, duration: float, conns: int,
                 headers: dict[str, str] | None = None, watch: int | None = None) -> None:
        self.port, self.rate, self.duration, self.nconns = port, rate, duration, conns
        extra = "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
        self.request = (f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                        f"User-Agent: proxyd-bench\r\n{extra}\r\n").encode()
        self.latencies: list[float] = []
        self.starts: list[float] = []  # when each answered request was due (or sent)
        self.watch = watch
        self.worker_events: list[tuple[float, str, int]] = []
        self.errors: collections.Counter[str] = collections.Counter()
        self.sent = 0
        self.retried = 0
        self.slots: list[ProbeConn] = []
        self.reconnecting: set[asyncio.Task[None]] = set()
        self.closing = False

    def error(self, what: str) -> None:
        self.errors[what] += 1

    async def connect(self, slot: int) -> ProbeConn:
        loop = asyncio.get_running_loop()
        _, proto = await loop.create_connection(lambda: ProbeConn(self, slot),
                                                "127.0.0.1", self.port)
        return proto

    def lost(self, old: ProbeConn) -> None:
        """A connection closed (Connection: close, a recycled worker): open its replacement."""
        if self.closing:
            return

        async def reconnect() -> None:
            try:
                new = await self.connect(old.slot)
            except OSError as exc:
                self.error(f"connect: {exc!r}")
                self.errors["lost with the connection"] += len(old.backlog)
                old.backlog.clear()
                return
            new.backlog.extend(old.backlog)
            self.slots[old.slot] = new
            new.pump()

        task = asyncio.ensure_future(reconnect())
        self.reconnecting.add(task)
        task.add_done_callback(self.reconnecting.discard)

    async def watch_workers(self) -> None:
        assert self.watch is not None
        known = worker_pids(self.watch)
        while True:
            await asyncio.sleep(0.01)
            now, pids = time.monotonic(), worker_pids(self.watch)
            self.worker_events += [(now, "start", p) for p in sorted(pids - known)]
            self.worker_events += [(now, "exit", p) for p in sorted(known - pids)]
            known = pids

    async def run(self) -> dict[str, Any]:
        self.slots = [await self.connect(k) for k in range(self.nconns)]
        watcher = (asyncio.ensure_future(self.watch_workers()) if self.watch is not None
                   else None)
        interval = 1.0 / self.rate
        total = int(self.rate * self.duration)
        lead = 0.001  # send up to 1 ms early rather than late: timers have ms granularity
        start = time.monotonic() + 0.02
        i = 0
        while i < total:
            now = time.monotonic()
            while i < total and start + i * interval <= now + lead:
                self.slots[i % self.nconns].send(start + i * interval)  # staggered
                i += 1
            if i < total:
                await asyncio.sleep(max(0.0, start + i * interval - lead - time.monotonic()))
        self.sent = total
        elapsed = time.monotonic() - start
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline and (
                self.reconnecting or any(c.inflight is not None or c.backlog
                                         for c in self.slots)):
            await asyncio.sleep(0.01)
        if watcher is not None:
            watcher.cancel()
        self.closing = True
        for c in self.slots:
            pending = len(c.backlog) + (c.inflight is not None)
            if pending:
                self.errors["no answer in 10s"] += pending
            c.inflight = None
            if c.transport is not None:
                c.transport.close()
        await asyncio.sleep(0)
        return self.summary(elapsed, time.monotonic())

    def summary(self, elapsed: float, end: float) -> dict[str, Any]:
        def pct(values: list[float], q: float) -> float:
            lat = sorted(values)
            return lat[min(len(lat) - 1, int(q * len(lat)))] * 1000 if lat else float("nan")

        lat = self.latencies
        out = {"rate": self.rate, "sent": self.sent, "ok": len(lat),
               "achieved_rps": len(lat) / elapsed if elapsed else 0.0,
               "p50": pct(lat, 0.50), "p95": pct(lat, 0.95), "p99": pct(lat, 0.99),
               "max": pct(lat, 1.0),
               "errors": sum(self.errors.values()), "error_kinds": dict(self.errors),
               "retried": self.retried}
        if self.watch is not None:
            windows = recycle_windows(self.worker_events, end)
            during = [x for x, t in zip(lat, self.starts, strict=True)
                      if any(a <= t <= b for a, b in windows)]
            steady = [x for x, t in zip(lat, self.starts, strict=True)
                      if not any(a <= t <= b for a, b in windows)]
            t0 = min(self.starts, default=0.0)
            out["recycle"] = {
                "recycles": len(windows),
                "windows_s": [(round(a - t0, 3), round(b - t0, 3)) for a, b in windows],
                "requests": len(during), "p50": pct(during, 0.50), "p99": pct(during, 0.99),
                "max": pct(during, 1.0),
                "steady_requests": len(steady), "steady_p50": pct(steady, 0.50),
                "steady_p99": pct(steady, 0.99)}
        return out


def run_probe(port: int, path: str, rate: float, duration: float, conns: int,
              headers: dict[str, str] | None = None, watch: int | None = None
              ) -> dict[str, Any]:
    return uvloop.run(Probe(port, path, rate, duration, conns, headers, watch).run())


# -- the benchmark ---------------------------------------------------------------------------------


@dataclass
class Env:
    tmp: Path
    nginx: str | None
    wrk: str | None
    lua: Path
    origin_port: int
    proxy_port: int | None
    procs: list[Proc] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    chain_port: int | None = None  # nginx with the chain's equivalent
    compared: bool = False  # the likeness check of the chains has run

    def pid(self, name: str) -> int:
        return next(p.pid for p in self.procs if p.name == name)


def checks(env: Env, scenario: str, port: int) -> None:
    """Functional checks worth a note: is the 1 KiB body compressed, are cache hits hits,
    does an access element refuse a request without credentials and pass the benchmark's."""
    if scenario in ACCESS_SCENARIOS:
        bare, _, _ = http_get(port, "/", {"X-Forwarded-For": "192.0.2.1"})
        passed, _, _ = http_get(port, "/", scenario_headers(env.tmp, scenario))
        env.notes.append(f"{scenario}: GET / without credentials (from 192.0.2.1) → {bare}, "
                         f"with the benchmark's → {passed}")
        if passed != 200 or bare == 200:
            env.notes.append(f"WARNING: the {scenario} scenario is not exercising its element")
    if scenario == "chain":
        _, headers, body = http_get(port, "/", {"Accept-Encoding": "br, gzip"})
        coding = headers.get("content-encoding")
        outcome = f"compressed ({coding}, {len(body)} B)" if coding else "not compressed"
        env.notes.append(
            f"chain: GET / (1024 B body, compression min_size 1KiB) with Accept-Encoding: "
            f"br, gzip {outcome}; wrk and the probe send no Accept-Encoding in chain and seed, "
            "gzip in chain_gz")
    if scenario in CHAIN_SCENARIOS and env.chain_port is not None and not env.compared:
        env.compared = True
        env.notes.extend(compare_chains(port, env.chain_port))
    if scenario == "cache":
        # One keep-alive connection, so one worker: each worker has its own memory cache.
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2.0)
        try:
            for _ in range(2):
                conn.request("GET", "/cacheable")
                resp = conn.getresponse()
                resp.read()
        finally:
            conn.close()
        status = resp.getheader("Cache-Status") or resp.getheader("X-Cache") or "no cache header"
        env.notes.append(f"cache: second GET /cacheable on one connection → {status}")
        if "hit" not in status.lower():
            env.notes.append("WARNING: the cache scenario is not answering from the cache")


def compare_chains(proxyd: int, nginx: int) -> list[str]:
    """Do proxyd's chain and nginx-chain do the same work, as the client and the origin see
    it? The response fields of CHAIN_FIELDS, the body sizes (plain, and gzip with an allowed
    Origin), and the request fields the origin got (ECHO_FIELDS, present or absent)."""
    notes, warn = [], False
    for label, hdrs in (("GET /", {}),
                        ("GET / gzip+Origin", {"Accept-Encoding": "gzip",
                                               "Origin": ALLOWED_ORIGIN})):
        got = {}
        for name, port in (("proxyd", proxyd), ("nginx-chain", nginx)):
            status, fields, body = http_get(port, "/", hdrs)
            got[name] = (status, {k for k in fields if k in CHAIN_FIELDS}, len(body),
                         fields.get("content-encoding"))
        (ps, pf, pn, pc), (ns, nf, nn, nc) = got["proxyd"], got["nginx-chain"]
        same = sorted(pf & nf)
        notes.append(f"likeness, {label}: proxyd {ps} {pn} B{' ' + pc if pc else ''}, "
                     f"nginx-chain {ns} {nn} B{' ' + nc if nc else ''}; both send "
                     f"{', '.join(same)}; only proxyd: {', '.join(sorted(pf - nf)) or '-'}; "
                     f"only nginx-chain: {', '.join(sorted(nf - pf)) or '-'}")
        warn |= ps != ns or pf != nf or pc != nc or abs(pn - nn) > 0.2 * max(pn, nn)
    upstream = {}
    for name, port in (("proxyd", proxyd), ("nginx-chain", nginx)):
        _, _, body = http_get(port, "/echo", {"Origin": ALLOWED_ORIGIN})
        lines = dict(line.partition("=")[::2] for line in body.decode().splitlines())
        upstream[name] = {k for k, v in lines.items() if v}
    only_p = sorted(upstream["proxyd"] - upstream["nginx-chain"])
    only_n = sorted(upstream["nginx-chain"] - upstream["proxyd"])
    notes.append(f"likeness, what the origin got: both send "
                 f"{', '.join(sorted(upstream['proxyd'] & upstream['nginx-chain']))}; "
                 f"only proxyd: {', '.join(only_p) or '-'}; only nginx-chain: "
                 f"{', '.join(only_n) or '-'}")
    warn |= bool(only_p or only_n)
    if warn:
        notes.append("WARNING: proxyd's chain and nginx-chain differ (the lines above)")
    return notes


def one_scenario(env: Env, args: argparse.Namespace, scenario: str, pass_no: int,
                 rate_limit: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    path = PATHS[scenario]
    headers = scenario_headers(env.tmp, scenario)
    results: dict[str, dict[str, Any]] = {}
    probe_duration = args.seed_probe_duration if scenario == "seed" else args.probe_duration
    proc, port, _admin = start_proxyd(env.tmp, scenario, args.workers, env.origin_port,
                                      rate_limit)
    try:
        if pass_no == 0:
            checks(env, scenario, port)
        targets: list[tuple[str, int, int | None]] = [("proxyd", port, proc.pid)]
        if env.proxy_port is not None:
            targets.append(("nginx", env.proxy_port, env.pid("nginx-proxy")))
        if env.chain_port is not None and scenario in CHAIN_SCENARIOS:
            targets.append(("nginx_chain", env.chain_port, env.pid("nginx-chain")))
        k = pass_no % len(targets)  # rotate who goes first
        targets = targets[k:] + targets[:k]
        for name, tport, pid in targets:
            row: dict[str, Any] = {}
            if env.wrk:
                run_wrk(env.wrk, env.lua, tport, path, 1.0, args.connections,
                        args.wrk_threads, headers)  # warm-up
                cpu = cpu_seconds(pid) if pid else 0.0
                row["wrk"] = run_wrk(env.wrk, env.lua, tport, path, args.duration,
                                     args.connections, args.wrk_threads, headers)
                if pid:  # the proxy's CPU (all its processes) per request served
                    row["cpu_us"] = ((cpu_seconds(pid) - cpu) * 1e6
                                     / max(1, row["wrk"]["requests"]))
            row["rss"] = rss_tree(pid) if pid else None
            results[name] = row
        results["origin"] = {"probe": run_probe(env.origin_port, path, args.rate,
                                                probe_duration, args.probe_conns, headers)}
        for name, tport, pid in targets:
            watch = pid if name == "proxyd" and scenario in ("seed", "recycle") else None
            results[name]["probe"] = run_probe(tport, path, args.rate, probe_duration,
                                               args.probe_conns, headers, watch)
        if not proc.alive():
            raise RuntimeError(f"proxyd ({scenario}) died:\n{proc.log_tail()}")
    finally:
        proc.stop()
        for log_file in (env.tmp / "access.log", env.tmp / "nginx-chain-access.log"):
            with contextlib.suppress(OSError):  # nginx appends: truncating is enough
                os.truncate(log_file, 0)
    for name in TARGETS:
        row = results.get(name)
        if row is None:
            continue
        o, p = results["origin"]["probe"], row["probe"]
        row["p95_added"] = p["p95"] - o["p95"]
        row["errors"] = p["errors"] + (row["wrk"]["errors"] if "wrk" in row else 0)
        row["retried"] = p["retried"]
        for ref, key in (("nginx", "ratio"), ("nginx_chain", "ratio_chain")):
            if ref in results and "wrk" in row and "wrk" in results[ref]:
                row[key] = row["wrk"]["rps"] / results[ref]["wrk"]["rps"]
                if row.get("cpu_us") and results[ref].get("cpu_us"):
                    row[key.replace("ratio", "cpu_ratio")] = (row["cpu_us"]
                                                              / results[ref]["cpu_us"])
    return results


def chain_cost(passes: list[dict[str, dict[str, dict[str, Any]]]], scenarios: list[str]
               ) -> list[str]:
    """What a chain (the mw scenario), an access element or worker recycling costs proxyd
    against plain, pass by pass: throughput as a fraction of plain's, and CPU per request over
    plain's (recycle's counts the workers it replaced, through the master's reaped-children
    times)."""
    lines = []
    for scenario in ("mw", "chain", "chain_gz", "seed", "recycle", *ACCESS_SCENARIOS):
        if scenario not in scenarios or "plain" not in scenarios:
            continue
        rps, cpu = [], []
        for p in passes:
            base, mw = p["plain"]["proxyd"], p[scenario]["proxyd"]
            if "wrk" in base and "wrk" in mw:
                rps.append(mw["wrk"]["rps"] / base["wrk"]["rps"])
            if base.get("cpu_us") and mw.get("cpu_us"):
                cpu.append(mw["cpu_us"] / base["cpu_us"] - 1)
        if rps:
            lines.append(
                f"{scenario} vs plain, proxyd: throughput {median(rps):.2f}x "
                f"({', '.join(f'{r:.2f}' for r in rps)}); CPU per request "
                f"{median(cpu):+.0%} ({', '.join(f'{c:+.0%}' for c in cpu)})")
    return lines


def median(values: list[float]) -> float:
    values = [v for v in values if v == v]
    return statistics.median(values) if values else float("nan")


def spread(values: list[float]) -> dict[str, float]:
    """Median, min and max of the values that are numbers (NaN when none)."""
    values = [v for v in values if v == v]
    if not values:
        return {"median": float("nan"), "min": float("nan"), "max": float("nan")}
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summarize(passes: list[dict[str, dict[str, dict[str, Any]]]], scenarios: list[str]
              ) -> list[dict[str, Any]]:
    rows = []
    for scenario in scenarios:
        for target in TARGETS:
            runs = [p[scenario][target] for p in passes if target in p.get(scenario, {})]
            if not runs:
                continue
            rss = [r["rss"] for r in runs if r.get("rss")]
            rows.append({
                "scenario": scenario, "target": target,
                "rps": spread([r["wrk"]["rps"] for r in runs if "wrk" in r]),
                "ratio": spread([r["ratio"] for r in runs if "ratio" in r]),
                "ratio_chain": spread([r["ratio_chain"] for r in runs if "ratio_chain" in r]),
                "cpu_ratio": spread([r["cpu_ratio"] for r in runs if "cpu_ratio" in r]),
                "cpu_ratio_chain": spread([r["cpu_ratio_chain"] for r in runs
                                           if "cpu_ratio_chain" in r]),
                "wrk_p95": median([r["wrk"]["p95_us"] / 1000 for r in runs if "wrk" in r]),
                "p50": median([r["probe"]["p50"] for r in runs]),
                "p95": spread([r["probe"]["p95"] for r in runs]),
                "p99": spread([r["probe"]["p99"] for r in runs]),
                "p95_added": median([r["p95_added"] for r in runs]),
                "errors": sum(r["errors"] for r in runs),
                "retried": sum(r.get("retried", 0) for r in runs),
                "cpu_us": spread([r["cpu_us"] for r in runs if "cpu_us" in r]),
                "rss_total": median([x["total"] for x in rss]),
                "rss_workers": [median([x["workers"][i] for x in rss if len(x["workers"]) > i])
                                for i in range(max((len(x["workers"]) for x in rss), default=0))],
            })
    return rows


def num(v: float, fmt: str) -> str:
    return "—" if v != v else format(v, fmt)


def ranged(s: dict[str, float], fmt: str, unit: str = "") -> str:
    """``median (min-max)``, or a dash."""
    if s["median"] != s["median"]:
        return "—"
    return (f"{format(s['median'], fmt)}{unit} "
            f"({format(s['min'], fmt)}-{format(s['max'], fmt)})")


def table(rows: list[dict[str, Any]], rate: float) -> str:
    out = [f"| scenario | target | req/s | ratio to nginx-plain | ratio to nginx-chain "
           f"| CPU µs/req | CPU / nginx-chain's | wrk p95 ms | p50 ms @{rate:g} | p95 ms @{rate:g} "
           f"| p99 ms @{rate:g} | p95 added | errors | RSS MiB total (per worker) |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        workers = "/".join(f"{w:.0f}" for w in r["rss_workers"])
        errors = str(r["errors"]) + (f" ({r['retried']} retried)" if r["retried"] else "")
        out.append(
            f"| {r['scenario']} | {NAMES[r['target']]} | {ranged(r['rps'], ',.0f')} "
            f"| {ranged(r['ratio'], '.2f', 'x')} | {ranged(r['ratio_chain'], '.2f', 'x')} "
            f"| {ranged(r['cpu_us'], '.1f')} | {ranged(r['cpu_ratio_chain'], '.2f', 'x')} "
            f"| {num(r['wrk_p95'], '.2f')} | {num(r['p50'], '.2f')} "
            f"| {ranged(r['p95'], '.2f')} | {ranged(r['p99'], '.2f')} "
            f"| {num(r['p95_added'], '+.2f')} | {errors} "
            f"| {num(r['rss_total'], '.0f')} ({workers}) |")
    return "\n".join(out)


def latency_lines(passes: list[dict[str, dict[str, dict[str, Any]]]], scenarios: list[str]
                  ) -> list[str]:
    """The fixed-rate goals: proxyd's p95 against nginx-chain's (the chain scenarios), and
    the p99 of requests sent during a worker recycle against the others' (seed, recycle)."""
    lines = []
    for scenario in scenarios:
        runs = [p[scenario] for p in passes if scenario in p]
        pairs = [(r["proxyd"]["probe"]["p95"], r["nginx_chain"]["probe"]["p95"])
                 for r in runs if "nginx_chain" in r]
        if pairs:
            diff = [a - b for a, b in pairs]
            lines.append(
                f"{scenario}: p95 at the fixed rate, proxyd - nginx-chain: "
                f"{median(diff):+.2f} ms (per pass {', '.join(f'{d:+.2f}' for d in diff)}; "
                f"proxyd {', '.join(f'{a:.2f}' for a, _ in pairs)}, nginx-chain "
                f"{', '.join(f'{b:.2f}' for _, b in pairs)} ms)")
        rec = [r["proxyd"]["probe"]["recycle"] for r in runs
               if "recycle" in r["proxyd"].get("probe", {})]
        if rec and not any(x["requests"] for x in rec):
            lines.append(f"{scenario}: no proxyd worker recycle during the probes (a longer "
                         "probe, --seed-probe-duration, sees some)")
        elif rec:
            n = sum(x["recycles"] for x in rec)
            ratios = [x["p99"] / x["steady_p99"] for x in rec if x["requests"]]
            lines.append(
                f"{scenario}: proxyd worker recycles during the probes: {n} "
                f"({', '.join(str(x['recycles']) for x in rec)} per pass); p99 of the "
                f"requests sent during one {median([x['p99'] for x in rec]):.2f} ms "
                f"(per pass {', '.join(num(x['p99'], '.2f') for x in rec)}; "
                f"{sum(x['requests'] for x in rec)} requests), steady "
                f"{median([x['steady_p99'] for x in rec]):.2f} ms "
                f"({', '.join(num(x['steady_p99'], '.2f') for x in rec)}); during/steady "
                f"{median(ratios):.2f}x ({', '.join(f'{r:.2f}' for r in ratios)})")
    return lines


def tool_version(argv: list[str]) -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        text = (out.stdout + out.stderr).strip().splitlines()
        return text[0] if text else ""
    return ""


def git_rev() -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "proxyd"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return rev + ("+dirty" if dirty else "")
    return "unknown"


@contextlib.contextmanager
def environment(args: argparse.Namespace) -> Iterator[Env]:
    nginx = None if args.no_nginx else (shutil.which("nginx") or
                                        next((p for p in ("/usr/sbin/nginx",)
                                              if os.access(p, os.X_OK)), None))
    wrk = shutil.which("wrk")
    with tempfile.TemporaryDirectory(prefix="proxyd-vs-nginx-") as name:
        tmp = Path(name)
        tmp.chmod(0o755)  # nginx workers may run as another user (nobody) when we are root
        www = tmp / "www"
        www.mkdir()
        (www / "index.txt").write_bytes(SMALL)
        (www / "big.txt").write_bytes(BIG)
        for f in www.iterdir():
            f.chmod(0o644)
        www.chmod(0o755)
        lua = tmp / "report.lua"
        lua.write_text(WRK_LUA)
        env = Env(tmp, nginx, wrk, lua, free_port(), None)
        if nginx is None:
            env.notes.append("nginx not found: Python aiohttp origin, no nginx reference "
                             "(ratios omitted)")
        if wrk is None:
            env.notes.append("wrk not found: no closed-loop req/s, fixed-rate probe only")
        try:
            if nginx:
                env.procs.append(start_nginx(nginx, tmp, "origin", args.origin_workers,
                                             origin_server(env.origin_port, www)))
            else:
                env.procs.append(Proc("origin", [sys.executable, "-c", PY_ORIGIN,
                                                 str(env.origin_port), str(www / "index.txt"),
                                                 str(www / "big.txt")],
                                      tmp / "origin.log", signal.SIGTERM))
            wait_ready(env.origin_port, "/", env.procs[0], "origin")
            if nginx:
                env.proxy_port = free_port()
                workers = getattr(args, "nginx_workers", 2)  # soak.py etc. pass their own args
                env.procs.append(start_nginx(nginx, tmp, "nginx-proxy", workers,
                                             proxy_server(env.proxy_port, env.origin_port)))
                wait_ready(env.proxy_port, "/", env.procs[-1], "nginx proxy")
                if set(getattr(args, "scenarios", ())) & set(CHAIN_SCENARIOS):
                    env.chain_port = free_port()
                    env.procs.append(start_nginx(nginx, tmp, "nginx-chain", workers,
                                                 chain_proxy_server(env.chain_port,
                                                                    env.origin_port, tmp)))
                    wait_ready(env.chain_port, "/", env.procs[-1], "nginx chain proxy")
            yield env
        finally:
            for proc in reversed(env.procs):
                proc.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=10.0, help="wrk seconds (10)")
    parser.add_argument("--probe-duration", type=float, default=None,
                        help="fixed-rate probe seconds (default: --duration)")
    parser.add_argument("--passes", type=int, default=5)
    parser.add_argument("--workers", type=int, default=2, help="proxyd workers (2)")
    parser.add_argument("--nginx-workers", type=int, default=2,
                        help="workers of the nginx reference proxy (2)")
    parser.add_argument("--origin-workers", type=int, default=2)
    parser.add_argument("--connections", type=int, default=64, help="wrk -c (64)")
    parser.add_argument("--wrk-threads", type=int, default=1,
                        help="wrk -t (1); raise it where one wrk thread cannot saturate")
    parser.add_argument("--rate", type=float, default=2000.0, help="probe req/s (2000)")
    parser.add_argument("--probe-conns", type=int, default=64,
                        help="probe connections, one request in flight each (64)")
    parser.add_argument("--seed-probe-duration", type=float, default=20.0,
                        help="the seed scenario's probe seconds (20): long enough for several "
                        "worker recycles at --rate")
    parser.add_argument("--scenarios", nargs="+", choices=SCENARIOS, default=list(SCENARIOS))
    parser.add_argument("--no-nginx", action="store_true", help="act as if nginx were missing")
    parser.add_argument("--json", type=Path, help="write every measurement here")
    args = parser.parse_args()
    if args.probe_duration is None:
        args.probe_duration = args.duration

    def terminate(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)  # run the finally blocks: stop what we started

    signal.signal(signal.SIGTERM, terminate)
    signal.signal(signal.SIGHUP, terminate)

    rate_limit, rl_note = (rate_limit_entry() if set(args.scenarios) & set(CHAIN_SCENARIOS)
                           else (None, ""))
    passes: list[dict[str, dict[str, dict[str, Any]]]] = []
    started = datetime.datetime.now(datetime.UTC)
    with environment(args) as env:
        if rl_note:
            env.notes.append(f"chain: {rl_note}")
        for notice in env.notes:
            log(notice)
        for pass_no in range(args.passes):
            results: dict[str, dict[str, dict[str, Any]]] = {}
            for scenario in args.scenarios:
                log(f"pass {pass_no + 1}/{args.passes}: {scenario}")
                results[scenario] = one_scenario(env, args, scenario, pass_no, rate_limit)
                for target in TARGETS:
                    if target in results[scenario]:
                        r = results[scenario][target]
                        rps = r["wrk"]["rps"] if "wrk" in r else float("nan")
                        log(f"  {target:11} {rps:9,.0f} req/s  "
                            f"{r.get('cpu_us', float('nan')):5.1f} µs CPU/req  "
                            f"p95@{args.rate:g} {r['probe']['p95']:.2f} ms  "
                            f"errors {r['errors']}")
            passes.append(results)
        notes = list(env.notes)
        nginx = env.nginx
        origin_p95 = {s: median([p[s]["origin"]["probe"]["p95"] for p in passes])
                      for s in args.scenarios}
    rows = summarize(passes, args.scenarios)
    cpus = len(os.sched_getaffinity(0))
    reference = tool_version([nginx, "-v"]) if nginx else "no nginx"
    print(f"\nproxyd {git_rev()} vs {reference}; "
          f"{started:%Y-%m-%d %H:%M} UTC; {platform.node()}, {cpus} CPUs; "
          f"wrk -t{args.wrk_threads} -c{args.connections} -d{args.duration:g}s; "
          f"median (min-max) of {args.passes} pass(es), candidates interleaved; "
          f"proxyd workers {args.workers}, nginx workers {args.nginx_workers}, origin "
          f"workers {args.origin_workers}\n")
    print(table(rows, args.rate))
    print(f"\nwrk p95: closed loop at saturation ({args.connections} connections); "
          f"p50/p95/p99: open loop at {args.rate:g} req/s, {args.probe_conns} connections, "
          f"{args.probe_duration:g}s ({args.seed_probe_duration:g}s in seed); "
          "origin direct p95 (just before the proxies'): "
          + ", ".join(f"{s} ({PATHS[s]}) {v:.2f} ms" for s, v in origin_p95.items()))
    notes.extend(chain_cost(passes, args.scenarios))
    notes.extend(latency_lines(passes, args.scenarios))
    if any(r["retried"] for r in rows):
        notes.append("retried: the proxy closed a reused keep-alive connection after the probe "
                     "had sent on it, before any byte of the answer; the probe retried once "
                     "(as browsers, nginx and aiohttp do for idempotent requests), latency "
                     "counted from the first send; not in the errors")
    for note in notes:
        print(f"- {note}")
    if args.json:
        args.json.write_text(json.dumps({
            "started": started.isoformat(), "machine": platform.node(), "cpus": cpus,
            "kernel": platform.release(), "python": platform.python_version(),
            "proxyd": git_rev(), "nginx": reference,
            "wrk": tool_version(["wrk", "-v"]), "args": {k: str(v) for k, v in
                                                        vars(args).items()},
            "notes": notes, "summary": rows, "passes": passes,
        }, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
