"""HTTP/2 benchmark: proxyd against nginx (and HAProxy for HTTP/2 upstreams) in the same pass.

    python tests/load/h2_bench.py [--passes 3] [--duration 6] [--workers 2]

Every candidate proxies the same nginx origin (a 1 KiB body), started with the same worker
count, and h2load (nghttp2) drives it; passes interleave the candidates and the table gives
medians. Scenarios:

- ``h2c-m10``, ``h2c-m1``: cleartext HTTP/2 by prior knowledge, ``-c 64 -m 10`` and ``-m 1``,
  HTTP/1.1 to the origin;
- ``tls-m10``: HTTP/2 over TLS (ALPN), ``-c 64 -m 10``;
- ``up-h2c``: HTTP/2 to the origin too (proxyd ``protocol: h2c``; HAProxy ``proto h2``);
- ``rate``: 2000 req/s fixed (``h2load --rps``), latency p50/p95/p99 from h2load's per-request
  log, and the same against the origin directly: what the proxy adds;
- ``streams``: 10,000 concurrent streams over 100 connections to a slow endpoint; the peak
  RSS of proxyd's workers together.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trustme

sys.path.insert(0, str(Path(__file__).parent))
from bench import Proc, children, free_port, rss_kib, start_nginx

BODY = b"x" * 1024


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def wait_port(port: int, proc: Proc, timeout: float = 30.0) -> None:
    import socket
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited:\n{proc.log_tail()}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.05)
    raise RuntimeError(f"{proc.name} did not listen on {port}")


def h2load(url: str, *extra: str, timeout: float = 120.0) -> dict[str, Any]:
    out = subprocess.run(["h2load", *extra, url], capture_output=True, text=True,
                         timeout=timeout, check=False).stdout
    result: dict[str, Any] = {"raw": out}
    for line in out.splitlines():
        if line.startswith("finished in"):
            result["rps"] = float(line.split(",")[1].split()[0])
        elif line.startswith("requests:"):
            parts = line.replace(",", "").split()
            result["succeeded"] = int(parts[parts.index("succeeded") - 1])
            result["failed"] = int(parts[parts.index("failed") - 1])
    return result


def percentiles(log_file: Path) -> dict[str, float]:
    """h2load --log-file: start time (µs), status, duration (µs) per request."""
    times = sorted(int(line.split("\t")[2]) / 1000.0 for line in
                   log_file.read_text().splitlines() if line.count("\t") >= 2)
    if not times:
        return {}

    def at(q: float) -> float:
        return times[min(len(times) - 1, int(q * len(times)))]
    return {"p50": at(0.50), "p95": at(0.95), "p99": at(0.99), "n": len(times)}


def proxyd_config(tmp: Path, port: int, tls_port: int, origin: int, origin_h2: int,
                  slow: int, workers: int, cert: Path, key: Path) -> Path:
    config = {
        "server": {
            "listen": [f"127.0.0.1:{port}",
                       {"address": f"127.0.0.1:{tls_port}",
                        "tls": {"cert": str(cert), "key": str(key)}}],
            "workers": workers, "backlog": 4096,
            "max_requests": 0,  # no recycling mid-run (its GOAWAY ends h2load's connections)
            "limits": {"max_keepalive_requests": 0},
        },
        "access_log": {"enabled": False},
        "upstreams": {
            "origin": {"targets": [f"http://127.0.0.1:{origin}"]},
            "origin_h2": {"targets": [f"http://127.0.0.1:{origin_h2}"], "protocol": "h2c"},
            "slow": {"targets": [f"http://127.0.0.1:{slow}"], "protocol": "h2c",
                     "pool": {"read_timeout": "60s"}},
        },
        "routes": [
            {"name": "h2", "match": {"path_prefix": "/h2/"}, "upstream": "origin_h2",
             "strip_prefix": "/h2"},
            {"name": "slow", "match": {"path_prefix": "/slow"}, "upstream": "slow"},
            {"name": "all", "match": {"path_prefix": "/"}, "upstream": "origin"},
        ],
    }
    path = tmp / "proxyd.json"
    path.write_text(json.dumps(config))
    return path


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--duration", type=float, default=6.0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--skip", nargs="*", default=[])
    args = parser.parse_args()
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    haproxy = shutil.which("haproxy") or "/usr/sbin/haproxy"
    procs: list[Proc] = []
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        tmp.chmod(0o755)  # nginx's workers run as another user: they read the files
        www = tmp / "www"
        www.mkdir()
        (www / "index.txt").write_bytes(BODY)
        (www / "index.txt").chmod(0o644)
        ca = trustme.CA()
        leaf = ca.issue_cert("127.0.0.1", "localhost")
        cert, key = tmp / "cert.pem", tmp / "key.pem"
        cert.write_bytes(b"".join(b.bytes() for b in leaf.cert_chain_pems))
        key.write_bytes(leaf.private_key_pem.bytes())
        ports = {n: free_port() for n in ("origin", "origin_h2", "slow", "proxyd", "proxyd_tls",
                                          "nginx", "nginx_tls", "haproxy")}
        try:
            origin = start_nginx(nginx, tmp, "origin", args.workers, f"""
  server {{ listen 127.0.0.1:{ports['origin']} reuseport backlog=4096; root {www};
           location = / {{ try_files /index.txt =404; }} }}
  server {{ listen 127.0.0.1:{ports['origin_h2']} http2 reuseport backlog=4096; root {www};
           http2_max_concurrent_streams 1000; keepalive_requests 1000000;
           location / {{ try_files /index.txt =404; }} }}""")
            procs.append(origin)
            slow = Proc("slow", [sys.executable, str(Path(__file__).parent / "h2_slow_origin.py"),
                                 str(ports["slow"])], tmp / "slow.log", 15)
            procs.append(slow)
            nginx_proxy = start_nginx(nginx, tmp, "nginx", args.workers, f"""
  upstream origin {{ server 127.0.0.1:{ports['origin']}; keepalive 64;
                    keepalive_requests 1000000; }}
  server {{
    listen 127.0.0.1:{ports['nginx']} http2 reuseport backlog=4096;
    listen 127.0.0.1:{ports['nginx_tls']} ssl http2 reuseport backlog=4096;
    ssl_certificate {cert}; ssl_certificate_key {key};
    http2_max_concurrent_streams 128; keepalive_requests 1000000;
    location / {{ proxy_pass http://origin; proxy_http_version 1.1;
                 proxy_set_header Connection ""; }}
  }}""")
            procs.append(nginx_proxy)
            hacfg = tmp / "haproxy.cfg"
            hacfg.write_text(f"""
global
  nbthread {args.workers}
  maxconn 8000
defaults
  mode http
  timeout connect 5s
  timeout client 60s
  timeout server 60s
frontend fe
  bind 127.0.0.1:{ports['haproxy']} proto h2
  default_backend be
backend be
  http-reuse always
  server s1 127.0.0.1:{ports['origin_h2']} proto h2
""")
            ha = Proc("haproxy", [haproxy, "-f", str(hacfg), "-db"], tmp / "haproxy.log", 15)
            procs.append(ha)
            config = proxyd_config(tmp, ports["proxyd"], ports["proxyd_tls"], ports["origin"],
                                   ports["origin_h2"], ports["slow"], args.workers, cert, key)
            proxyd = Proc("proxyd", [sys.executable, "-m", "proxyd", "run", "-c", str(config)],
                          tmp / "proxyd.log", 15)
            procs.append(proxyd)
            for name, proc in (("origin", origin), ("slow", slow), ("nginx", nginx_proxy),
                               ("haproxy", ha), ("proxyd", proxyd)):
                wait_port(ports[name], proc)
            wait_port(ports["proxyd_tls"], proxyd)
            time.sleep(1.0)  # workers ready
            results = run_passes(args, ports, tmp, proxyd)
        finally:
            for proc in reversed(procs):
                proc.stop()
    print(json.dumps(results, indent=2))
    return 0


def sized(url: str, extra: list[str], duration: float) -> list[str]:
    """A request count that takes about ``duration`` seconds (h2load's -D mode is unreliable
    in the versions Debian ships: it reports no or capped requests), from a short probe."""
    probe = h2load(url, "-n", "2000", *extra)
    n = int(max(probe.get("rps", 1000.0), 100.0) * duration)
    return ["-n", str(max(n, 1000))]


def run_passes(args: argparse.Namespace, ports: dict[str, int], tmp: Path,
               proxyd: Proc) -> dict[str, Any]:
    candidates = {
        "h2c-m10": [("proxyd", f"http://127.0.0.1:{ports['proxyd']}/", ["-c", "64", "-m", "10"]),
                    ("nginx", f"http://127.0.0.1:{ports['nginx']}/", ["-c", "64", "-m", "10"])],
        "h2c-m1": [("proxyd", f"http://127.0.0.1:{ports['proxyd']}/", ["-c", "64", "-m", "1"]),
                   ("nginx", f"http://127.0.0.1:{ports['nginx']}/", ["-c", "64", "-m", "1"])],
        "tls-m10": [("proxyd", f"https://127.0.0.1:{ports['proxyd_tls']}/",
                     ["-c", "64", "-m", "10"]),
                    ("nginx", f"https://127.0.0.1:{ports['nginx_tls']}/",
                     ["-c", "64", "-m", "10"])],
        "up-h2c": [("proxyd", f"http://127.0.0.1:{ports['proxyd']}/h2/",
                    ["-c", "64", "-m", "10"]),
                   ("haproxy", f"http://127.0.0.1:{ports['haproxy']}/", ["-c", "64", "-m", "10"])],
    }
    # Each candidate answers what the others answer: the 1 KiB body, 200.
    for runs in candidates.values():
        for name, url, _ in runs:
            check = subprocess.run(
                ["curl", "-sk", "--http2-prior-knowledge" if url.startswith("http:")
                 else "--http2", "-o", "/dev/null", "-w", "%{http_code} %{size_download}",
                 url], capture_output=True, text=True, timeout=30, check=False).stdout
            if check != f"200 {len(BODY)}":
                raise RuntimeError(f"{name} {url}: {check!r}, not 200 with {len(BODY)} bytes")
    passes: list[dict[str, Any]] = []
    counts: dict[tuple[str, str], list[str]] = {}
    for n in range(args.passes):
        one: dict[str, Any] = {}
        for scenario, runs in candidates.items():
            if scenario in args.skip:
                continue
            order = runs if n % 2 == 0 else list(reversed(runs))
            for name, url, extra in order:
                key = (scenario, name)
                if key not in counts:
                    counts[key] = sized(url, extra, args.duration)
                r = h2load(url, *counts[key], *extra)
                one.setdefault(scenario, {})[name] = {k: v for k, v in r.items() if k != "raw"}
                log(f"pass {n + 1} {scenario} {name}: {r.get('rps')} req/s, "
                    f"failed {r.get('failed')}")
        if "rate" not in args.skip:
            for name, url in (("origin", f"http://127.0.0.1:{ports['origin_h2']}/"),
                              ("proxyd", f"http://127.0.0.1:{ports['proxyd']}/"),
                              ("nginx", f"http://127.0.0.1:{ports['nginx']}/")):
                logf = tmp / f"rate-{name}-{n}.log"
                h2load(url, "-n", str(int(2000 * args.duration)), "-c", "4", "-m", "1",
                       "--rps", "500", "--log-file", str(logf))
                one.setdefault("rate", {})[name] = percentiles(logf)
                log(f"pass {n + 1} rate {name}: {one['rate'][name]}")
        passes.append(one)
    out: dict[str, Any] = {"passes": passes, "median": {}}
    for scenario in [*candidates, "rate"]:
        names = {name for p in passes for name in p.get(scenario, {})}
        for name in sorted(names):
            if scenario == "rate":
                for q in ("p50", "p95", "p99"):
                    vals = [p["rate"][name][q] for p in passes if q in p["rate"].get(name, {})]
                    if vals:
                        out["median"].setdefault("rate", {}).setdefault(name, {})[q] = \
                            statistics.median(vals)
            else:
                vals = [p[scenario][name]["rps"] for p in passes
                        if p.get(scenario, {}).get(name, {}).get("rps")]
                if vals:
                    out["median"].setdefault(scenario, {})[name] = statistics.median(vals)
    if "streams" not in args.skip:
        out["streams"] = streams(ports, proxyd)
    return out


def streams(ports: dict[str, int], proxyd: Proc) -> dict[str, Any]:
    """10,000 streams at once (100 connections, 100 each) to an endpoint that answers after 2 s:
    the peak RSS of proxyd's workers together, sampled while they are all open."""
    workers = children(proxyd.pid)
    before = sum(rss_kib(w) for w in workers)
    load = subprocess.Popen(["h2load", "-c", "100", "-m", "100", "-n", "10000",
                             f"http://127.0.0.1:{ports['proxyd']}/slow"],
                            stdout=subprocess.PIPE, text=True)
    peak = before
    while load.poll() is None:
        peak = max(peak, sum(rss_kib(w) for w in children(proxyd.pid)))
        time.sleep(0.05)
    out = load.stdout.read() if load.stdout else ""
    ok = next((line for line in out.splitlines() if line.startswith("requests:")), "")
    result = {"workers_rss_mib_before": before / 1024, "workers_rss_mib_peak": peak / 1024,
              "requests": ok}
    log(f"streams: {result}")
    return result


if __name__ == "__main__":
    sys.exit(main())
