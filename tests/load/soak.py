"""Worker memory over a long run: RSS per worker after 1M and 2M requests: it must not grow.

Starts the benchmark's origin (nginx, or the Python one) and proxyd with one of bench.py's
scenario configs (default: the full chain, the most allocation-heavy path), drives it
with wrk in segments until ``--requests`` are served, and prints each worker's RSS at every
segment end, then whether RSS grew between the first and the second half.

    python tests/load/soak.py [--scenario chain] [--requests 2000000] [--workers 2]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench


def worker_rss(pid: int) -> list[int]:
    """RSS in KiB of each worker (children of the master), in pid order."""
    return [bench.rss_kib(child) for child in sorted(bench.children(pid))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenario", default="chain", choices=["plain", "chain", "cache"])
    parser.add_argument("--requests", type=int, default=2_000_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--segment", type=float, default=10.0, help="wrk seconds per segment")
    parser.add_argument("--max-time", type=float, default=600.0)
    args = parser.parse_args()
    bench_args = argparse.Namespace(no_nginx=False, origin_workers=1)
    with bench.environment(bench_args) as env:
        if env.wrk is None:
            print("wrk not found: cannot drive the soak", file=sys.stderr)
            return 2
        rate_limit, _ = bench.rate_limit_entry()
        proc, port, _admin = bench.start_proxyd(env.tmp, args.scenario, args.workers,
                                                env.origin_port, rate_limit)
        try:
            path = bench.PATHS[args.scenario]
            served, errors, started = 0, 0, time.monotonic()
            marks: list[tuple[int, list[int]]] = [(0, worker_rss(proc.pid))]
            print(f"{'requests':>10}  RSS MiB per worker")
            print(f"{0:>10,}  {' '.join(f'{k / 1024:.1f}' for k in marks[0][1])}")
            while served < args.requests and time.monotonic() - started < args.max_time:
                result = bench.run_wrk(env.wrk, env.lua, port, path, args.segment, 64)
                served += int(result["requests"])
                errors += int(result["errors"])
                rss = worker_rss(proc.pid)
                marks.append((served, rss))
                print(f"{served:>10,}  {' '.join(f'{k / 1024:.1f}' for k in rss)}", flush=True)
            if not proc.alive():
                print(f"proxyd died:\n{proc.log_tail()}", file=sys.stderr)
                return 1
        finally:
            proc.stop()
    half = next((m for m in marks if m[0] >= served / 2), marks[-1])
    growth = [(b - a) / 1024 for a, b in zip(half[1], marks[-1][1], strict=False)]
    print(f"\n{served:,} requests, {errors} errors; RSS at {half[0]:,}: "
          f"{' / '.join(f'{k / 1024:.1f}' for k in half[1])} MiB; at {served:,}: "
          f"{' / '.join(f'{k / 1024:.1f}' for k in marks[-1][1])} MiB; growth per worker "
          f"{' / '.join(f'{g:+.1f}' for g in growth)} MiB")
    return 0 if errors == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
