"""proxyd against nginx, in the same pass: throughput, latency at a fixed rate, errors, RSS.

    python tests/load/bench.py [--duration 10] [--passes 3] [--workers 2]
                               [--scenarios plain big chain mw cache recycle] [--json out.json]

What it starts (all on free 127.0.0.1 ports, all stopped by process group when it ends):

* an **origin**: nginx (``--origin-workers``, default 2) serving static files, no ETag:
  ``/`` 1 KiB, ``/big`` 64 KiB, ``/cacheable`` 1 KiB with ``Cache-Control: max-age=300``.
  Without nginx, a Python aiohttp origin with the same routes (and then no nginx reference);
* **nginx as the reference reverse proxy**: 2 workers, ``reuseport``, upstream keepalive 64,
  HTTP/1.1 upstream, no access log, no cache;
* **proxyd** (``python -m proxyd run -c <generated yaml>``), ``server.workers: --workers``,
  a fresh one per scenario and pass, access log off unless the scenario says, metrics default.

Scenarios:

=========  ==========================================================================
plain      no middleware, GET /
big        no middleware, GET /big (64 KiB)
chain      the full chain: cors, security_headers, validation, trace_id,
           [rate_limit memory, only if proxyd has it; its rate set so high it never limits],
           etag, compression (min_size 1KiB), JSON access log to a file, metrics; GET /
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

Each pass, for each scenario: ``wrk -t1 -c64`` (closed loop, after a 1 s warm-up) against
nginx and proxyd back to back (the order alternates between passes), then an open-loop probe at
``--rate`` (2000 req/s) on ``--probe-conns`` (64) keep-alive connections against the origin
directly, nginx and proxyd. Request i goes to connection i mod N (so the connections are
staggered) at its scheduled time, up to 1 ms early to absorb timer granularity; a connection
carries one request at a time (no pipelining), and a request due on a busy connection waits
there. Latency is measured from the scheduled time or the real send, whichever is earlier, so a
stall is not hidden by coordinated omission (a proxy that cannot keep up shows huge latencies,
not a lower rate). A request on a reused connection that the server closes before any byte of
the answer is retried once, as real clients do, and shown as "retried", not as an error.
"p95 added" = proxy p95 - origin-direct p95 at the same rate in the same pass (it can come out
negative in noise). Errors = wrk's socket errors and non-2xx/3xx + the probe's failures. RSS is
summed over the master and all its descendants from /proc right after the wrk run, with each
worker's in brackets (during recycling, draining workers show up too). The table shows medians
over ``--passes``; errors are summed over passes. ``--json`` keeps every raw measurement.

On a small machine the load generators, the proxies and the origin share the CPUs: only the
ratios to nginx measured in the same pass mean anything, never absolute numbers from elsewhere.
Close what else runs; take ``--passes 3`` at least; keep the JSON with the table.

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
SCENARIOS = ("plain", "big", "chain", "mw", "cache", "recycle", *ACCESS_SCENARIOS)
PATHS = {"plain": "/", "big": "/big", "chain": "/", "mw": "/", "cache": "/cacheable",
         "recycle": "/", **{s: "/" for s in ACCESS_SCENARIOS}}
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
    if scenario == "chain":
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


class Probe:
    """Open-loop GETs at a fixed rate over ``conns`` staggered keep-alive connections."""

    def __init__(self, port: int, path: str, rate: float, duration: float, conns: int,
                 headers: dict[str, str] | None = None) -> None:
        self.port, self.rate, self.duration, self.nconns = port, rate, duration, conns
        extra = "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
        self.request = (f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                        f"User-Agent: proxyd-bench\r\n{extra}\r\n").encode()
        self.latencies: list[float] = []
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

    async def run(self) -> dict[str, Any]:
        self.slots = [await self.connect(k) for k in range(self.nconns)]
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
        self.closing = True
        for c in self.slots:
            pending = len(c.backlog) + (c.inflight is not None)
            if pending:
                self.errors["no answer in 10s"] += pending
            c.inflight = None
            if c.transport is not None:
                c.transport.close()
        await asyncio.sleep(0)
        return self.summary(elapsed)

    def summary(self, elapsed: float) -> dict[str, Any]:
        lat = sorted(self.latencies)

        def pct(q: float) -> float:
            return lat[min(len(lat) - 1, int(q * len(lat)))] * 1000 if lat else float("nan")

        return {"rate": self.rate, "sent": self.sent, "ok": len(lat),
                "achieved_rps": len(lat) / elapsed if elapsed else 0.0,
                "p50": pct(0.50), "p95": pct(0.95), "p99": pct(0.99), "max": pct(1.0),
                "errors": sum(self.errors.values()), "error_kinds": dict(self.errors),
                "retried": self.retried}


def run_probe(port: int, path: str, rate: float, duration: float, conns: int,
              headers: dict[str, str] | None = None) -> dict[str, Any]:
    return uvloop.run(Probe(port, path, rate, duration, conns, headers).run())


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
        env.notes.append(
            f"chain: GET / (1024 B body, compression min_size 1KiB) with Accept-Encoding: "
            f"{'compressed (' + coding + f', {len(body)} B)' if coding else 'not compressed'};"
            " wrk and the probe send no Accept-Encoding, so the benchmark never compresses")
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


def one_scenario(env: Env, args: argparse.Namespace, scenario: str, pass_no: int,
                 rate_limit: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    path = PATHS[scenario]
    headers = scenario_headers(env.tmp, scenario)
    results: dict[str, dict[str, Any]] = {}
    proc, port, _admin = start_proxyd(env.tmp, scenario, args.workers, env.origin_port,
                                      rate_limit)
    try:
        if pass_no == 0:
            checks(env, scenario, port)
        targets: list[tuple[str, int, int | None]] = [("proxyd", port, proc.pid)]
        if env.proxy_port is not None:
            nginx_pid = next(p.pid for p in env.procs if p.name == "nginx-proxy")
            targets.append(("nginx", env.proxy_port, nginx_pid))
            if pass_no % 2 == 0:
                targets.reverse()  # alternate who goes first
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
                                                args.probe_duration, args.probe_conns, headers)}
        for name, tport, _pid in targets:
            results[name]["probe"] = run_probe(tport, path, args.rate, args.probe_duration,
                                               args.probe_conns, headers)
        if not proc.alive():
            raise RuntimeError(f"proxyd ({scenario}) died:\n{proc.log_tail()}")
    finally:
        proc.stop()
    for name in ("proxyd", "nginx"):
        row = results.get(name)
        if row is None:
            continue
        o, p = results["origin"]["probe"], row["probe"]
        row["p95_added"] = p["p95"] - o["p95"]
        row["errors"] = p["errors"] + (row["wrk"]["errors"] if "wrk" in row else 0)
        row["retried"] = p["retried"]
        if "nginx" in results and "wrk" in row:
            row["ratio"] = row["wrk"]["rps"] / results["nginx"]["wrk"]["rps"]
    return results


def chain_cost(passes: list[dict[str, dict[str, dict[str, Any]]]], scenarios: list[str]
               ) -> list[str]:
    """What a chain (the mw scenario), an access element or worker recycling costs proxyd
    against plain, pass by pass: throughput as a fraction of plain's, and CPU per request over
    plain's (recycle's counts the workers it replaced, through the master's reaped-children
    times)."""
    lines = []
    for scenario in ("mw", "chain", "recycle", *ACCESS_SCENARIOS):
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


def summarize(passes: list[dict[str, dict[str, dict[str, Any]]]], scenarios: list[str]
              ) -> list[dict[str, Any]]:
    rows = []
    for scenario in scenarios:
        for target in ("nginx", "proxyd"):
            runs = [p[scenario][target] for p in passes if target in p.get(scenario, {})]
            if not runs:
                continue
            rss = [r["rss"] for r in runs if r.get("rss")]
            rows.append({
                "scenario": scenario, "target": target,
                "rps": median([r["wrk"]["rps"] for r in runs if "wrk" in r]),
                "ratio": median([r["ratio"] for r in runs if "ratio" in r]),
                "wrk_p95": median([r["wrk"]["p95_us"] / 1000 for r in runs if "wrk" in r]),
                "p50": median([r["probe"]["p50"] for r in runs]),
                "p95": median([r["probe"]["p95"] for r in runs]),
                "p99": median([r["probe"]["p99"] for r in runs]),
                "p95_added": median([r["p95_added"] for r in runs]),
                "errors": sum(r["errors"] for r in runs),
                "retried": sum(r.get("retried", 0) for r in runs),
                "cpu_us": median([r["cpu_us"] for r in runs if "cpu_us" in r]),
                "rss_total": median([x["total"] for x in rss]),
                "rss_workers": [median([x["workers"][i] for x in rss if len(x["workers"]) > i])
                                for i in range(max((len(x["workers"]) for x in rss), default=0))],
            })
    return rows


def table(rows: list[dict[str, Any]], rate: float) -> str:
    def num(v: float, fmt: str) -> str:
        return "—" if v != v else format(v, fmt)

    out = [f"| scenario | target | req/s | ratio to nginx | CPU µs/req | wrk p95 ms | p50 ms "
           f"| p95 ms | p99 ms | p95 added @{rate:g} | errors | RSS MiB total (per worker) |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        workers = "/".join(f"{w:.0f}" for w in r["rss_workers"])
        ratio = num(r["ratio"], ".2f") + ("x" if r["ratio"] == r["ratio"] else "")
        errors = str(r["errors"]) + (f" ({r['retried']} retried)" if r["retried"] else "")
        out.append(
            f"| {r['scenario']} | {r['target']} | {num(r['rps'], ',.0f')} | {ratio} "
            f"| {num(r['cpu_us'], '.1f')} | {num(r['wrk_p95'], '.2f')} "
            f"| {num(r['p50'], '.2f')} | {num(r['p95'], '.2f')} | {num(r['p99'], '.2f')} "
            f"| {num(r['p95_added'], '+.2f')} "
            f"| {errors} "
            f"| {num(r['rss_total'], '.0f')} ({workers}) |")
    return "\n".join(out)


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
            yield env
        finally:
            for proc in reversed(env.procs):
                proc.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=10.0, help="wrk seconds (10)")
    parser.add_argument("--probe-duration", type=float, default=None,
                        help="fixed-rate probe seconds (default: --duration)")
    parser.add_argument("--passes", type=int, default=3)
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

    rate_limit, rl_note = (rate_limit_entry() if "chain" in args.scenarios else (None, ""))
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
                for target in ("nginx", "proxyd"):
                    if target in results[scenario]:
                        r = results[scenario][target]
                        rps = r["wrk"]["rps"] if "wrk" in r else float("nan")
                        log(f"  {target:6} {rps:9,.0f} req/s  p95@{args.rate:g} "
                            f"{r['probe']['p95']:.2f} ms  errors {r['errors']}")
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
          f"median of {args.passes} pass(es); "
          f"proxyd workers {args.workers}, nginx workers {args.nginx_workers}, origin "
          f"workers {args.origin_workers}\n")
    print(table(rows, args.rate))
    print(f"\nwrk p95: closed loop at saturation ({args.connections} connections); "
          f"p50/p95/p99: open loop at {args.rate:g} req/s, {args.probe_conns} connections, "
          f"{args.probe_duration:g}s; origin direct p95 (just before the proxies'): "
          + ", ".join(f"{s} ({PATHS[s]}) {v:.2f} ms" for s, v in origin_p95.items()))
    notes.extend(chain_cost(passes, args.scenarios))
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
