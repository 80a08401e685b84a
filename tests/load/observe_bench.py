"""What observability costs: proxyd throughput with metrics and the JSON access log on vs off.

    python tests/load/observe_bench.py [--duration 5] [--passes 3] [--workers 1] [--json out]

Same origin (nginx, 1 KiB GET /, or the Python origin of bench.py without nginx), same wrk
(``-t1 -c64``, after a 1 s warm-up), three proxyd variants measured back to back in each pass,
their order rotating from pass to pass:

=========  =====================================================================================
off        no per-request observation at all: ``metrics.enabled: false`` and the access log
           disabled, so ``Pipeline.observe`` returns at once (the compiled build's classes
           cannot be patched, which is how this variant used to switch it off)
metrics    the default: in-worker counters and histograms pushed to the master, no access log
on         metrics and the JSON access log to a file (batched writes)
=========  =====================================================================================

The ratio that matters is ``on / off`` in the same pass (goal: at least 0.90, i.e. together at
most 10% of throughput). On a shared machine req/s swings more than that between runs, so the
proxyd processes' CPU time per request (utime + stime of the master and its workers during
the wrk run, from /proc) is reported too: far less sensitive to neighbours, and with one
worker as the bottleneck its inverse ratio is the throughput ratio. ``--pin`` puts proxyd on
CPU 0 and wrk and the origin on the others. With ``--workers 1`` (the default) one proxyd
worker is the bottleneck, so the ratio is its per-request cost; on a 2-CPU machine wrk and the
origin share the other CPU. Medians over ``--passes``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.load.bench import (  # noqa: E402
    Proc,
    children,
    environment,
    free_port,
    log,
    run_wrk,
    wait_ready,
)

VARIANTS = ("off", "metrics", "on")


def config(variant: str, port: int, admin: int, origin: int, workers: int,
           tmp: Path) -> dict[str, Any]:
    access_log: dict[str, Any] = {"enabled": False}
    if variant == "on":
        access_log = {"enabled": True, "format": "json", "path": str(tmp / "access.log")}
    return {
        "server": {"listen": [f"127.0.0.1:{port}"], "workers": workers, "backlog": 4096,
                   "keepalive_timeout": "60s", "drain_timeout": "3s", "max_requests": 0},
        "admin": {"listen": f"127.0.0.1:{admin}"},
        "upstreams": {"origin": {"targets": [f"http://127.0.0.1:{origin}"]}},
        "routes": [{"name": "all", "match": {"path_prefix": "/"}, "upstream": "origin"}],
        "access_log": access_log,
        "metrics": {"enabled": variant != "off"},
    }


def start(tmp: Path, variant: str, workers: int, origin: int) -> tuple[Proc, int, int]:
    port, admin = free_port(), free_port()
    path = tmp / f"observe-{variant}.yaml"
    path.write_text(yaml.safe_dump(config(variant, port, admin, origin, workers, tmp),
                                   sort_keys=False))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}
    proc = Proc(f"proxyd-{variant}", [sys.executable, "-m", "proxyd", "run", "-c", str(path)],
                tmp / f"observe-{variant}.log", signal.SIGTERM, env=env)
    try:
        wait_ready(admin, "/health/ready", proc, f"proxyd ({variant}) admin")
        wait_ready(port, "/", proc, f"proxyd ({variant})")
    except BaseException:
        proc.stop()
        raise
    return proc, port, admin


def cpu_seconds(pid: int) -> float:
    """CPU time of a process and all its descendants (the master and its workers)."""
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        todo.extend(children(p))
        try:
            stat = Path(f"/proc/{p}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()
        # utime, stime, and those of reaped children (a worker recycled meanwhile)
        total += sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")
    return total


def pin(pid: int, cpus: set[int]) -> None:
    todo = [pid]
    while todo:
        p = todo.pop()
        todo.extend(children(p))
        with contextlib.suppress(OSError):
            os.sched_setaffinity(p, cpus)


def observe_cost(variant: str, tmp: Path, n: int = 200_000) -> float:
    """µs per ``Pipeline.observe`` call in this process, for a proxied 200 (no sockets)."""
    import asyncio

    from proxyd.config.models import GatewayConfig
    from proxyd.proxy.connection import ClientConnection
    from proxyd.proxy.exchange import Exchange
    from proxyd.proxy.pipeline import Pipeline
    from proxyd.proxy.request import Request

    if variant == "off":
        return 0.0
    loop = asyncio.new_event_loop()
    cfg = GatewayConfig.model_validate(config(variant, free_port(), free_port(), 9, 1, tmp))
    pipeline = Pipeline(cfg, loop)
    requests = []
    for i in range(n):
        req = Request()
        req.method, req.url, req.host, req.path = b"GET", b"/?page=%d" % i, b"127.0.0.1", b"/"
        req.route_name, req.status, req.bytes_out, req.started = "all", 200, 1200, 0.0
        requests.append(req)
    # A real exchange (the compiled build checks types): only its pool and start time are read.
    exchange = Exchange(ClientConnection(pipeline), requests[0])
    exchange.pool = pipeline.pools["origin"]
    exchange.started_at = 1e-9
    started = time.perf_counter()
    for req in requests:
        pipeline.observe(req, b"127.0.0.1", exchange)
    elapsed = time.perf_counter() - started
    if pipeline.access_log is not None:
        pipeline.access_log.close()
        (tmp / "access.log").unlink()
    loop.close()
    return elapsed / n * 1e6


def scrape_requests(admin: int) -> float:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=5) as r:
        text = r.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("gateway_requests_total{"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=5.0, help="wrk seconds (5)")
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--workers", type=int, default=1, help="proxyd workers (1)")
    parser.add_argument("--origin-workers", type=int, default=1)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--pin", action="store_true",
                        help="proxyd on CPU 0, wrk and the origin on the others")
    args = parser.parse_args()
    args.no_nginx = False
    runs: dict[str, list[float]] = {v: [] for v in VARIANTS}
    cpu: dict[str, list[float]] = {v: [] for v in VARIANTS}  # proxyd CPU µs per request
    others = set(range(1, os.cpu_count() or 1)) or {0}
    notes: list[str] = []
    with environment(args) as env:
        if env.wrk is None:
            raise SystemExit("wrk is needed")
        if args.pin:
            pin(os.getpid(), others)  # wrk inherits it
            for p in env.procs:
                pin(p.pid, others)
        for pass_no in range(args.passes):
            order = VARIANTS[pass_no % 3:] + VARIANTS[:pass_no % 3]
            for variant in order:
                proc, port, admin = start(env.tmp, variant, args.workers, env.origin_port)
                try:
                    if args.pin:
                        pin(proc.pid, {0})
                    run_wrk(env.wrk, env.lua, port, "/", 1.0, args.connections)  # warm-up
                    before = cpu_seconds(proc.pid)
                    result = run_wrk(env.wrk, env.lua, port, "/", args.duration,
                                     args.connections)
                    used = cpu_seconds(proc.pid) - before
                    time.sleep(1.2)  # the next stats push
                    counted = scrape_requests(admin) if variant != "off" else 0.0
                finally:
                    proc.stop()
                runs[variant].append(result["rps"])
                cpu[variant].append(used / result["requests"] * 1e6)
                log(f"pass {pass_no + 1} {variant:<8} {result['rps']:>9,.0f} req/s  "
                    f"{cpu[variant][-1]:6.1f} CPU µs/req  errors {result['errors']}  "
                    f"counted {counted:,.0f}")
                if result["errors"]:
                    notes.append(f"pass {pass_no + 1} {variant}: {result['errors']} wrk errors")
            logged = env.tmp / "access.log"
            if logged.exists():
                lines = logged.read_text().splitlines()
                json.loads(lines[-1])  # the log is real JSON
                logged.unlink()
    med = {v: statistics.median(r) for v, r in runs.items()}
    cpu_med = {v: statistics.median(r) for v, r in cpu.items()}
    print(f"proxyd workers {args.workers}, wrk -t1 -c{args.connections} "
          f"{args.duration:g}s, {args.passes} passes{', pinned' if args.pin else ''}, medians:")
    for v in VARIANTS:
        per_pass = ", ".join(f"{x:,.0f}" for x in runs[v])
        print(f"  {v:<8} {med[v]:>9,.0f} req/s  ({per_pass})  ratio to off "
              f"{med[v] / med['off']:.3f};  {cpu_med[v]:.1f} proxyd CPU µs/req "
              f"(off/this {cpu_med['off'] / cpu_med[v]:.3f})")
    on_ratios = [on / off for on, off in zip(runs["on"], runs["off"], strict=True)]
    print(f"  on/off per pass: {', '.join(f'{r:.3f}' for r in on_ratios)}; "
          f"cost of metrics + JSON access log: {(1 - med['on'] / med['off']) * 100:.1f}%")
    with tempfile.TemporaryDirectory() as name:
        micro = {v: observe_cost(v, Path(name)) for v in VARIANTS}
    print("in-process Pipeline.observe per request: "
          + ", ".join(f"{v} {micro[v]:.2f} µs" for v in VARIANTS[1:])
          + f" = {micro['on'] / cpu_med['off'] * 100:.1f}% of the {cpu_med['off']:.1f} µs "
          "of proxyd CPU a request takes with observation off")
    for note in notes + env.notes:
        print("note:", note)
    if args.json:
        args.json.write_text(json.dumps({"runs": runs, "medians": med, "cpu_us": cpu,
                                         "cpu_medians": cpu_med}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
