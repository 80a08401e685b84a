"""WebSocket messages relayed per second, and CPU per message, proxyd vs nginx.

Starts a WebSocket echo origin (tests/integration/_ws_origin.py, aiohttp, its own process),
nginx as a reference WebSocket proxy (2 workers) and proxyd (2 workers, a websocket route),
then, against the origin directly and each proxy in turn, opens ``--conns`` WebSockets and
keeps ``--window`` small text messages in flight on each for ``--duration`` seconds. The client
sends pre-masked frames in batches and counts echoed bytes, so it costs little per message.

The echo origin is the slowest part on a small machine, so messages/s mostly measures it;
the proxy's CPU time per relayed message (user + system, all its processes, from /proc) is
the figure to compare.

    python tests/load/ws_bench.py [--conns 32] [--window 16] [--duration 8] [--size 64]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench

REPO = Path(__file__).resolve().parents[2]
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system time of ``pid`` and its children that are alive (the workers)."""
    total = 0.0
    for p in [pid, *bench.children(pid)]:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / TICKS
    return total


def frame(payload: bytes) -> bytes:
    """A masked client text frame (payload < 126 bytes)."""
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes([0x81, 0x80 | len(payload)]) + mask + masked


async def connect(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                 f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                 f"Sec-WebSocket-Version: 13\r\n\r\n".encode())
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    if not head.startswith(b"HTTP/1.1 101"):
        raise RuntimeError(f"upgrade refused: {head[:200]!r}")
    return reader, writer


async def drive(port: int, conns: int, window: int, duration: float, size: int
                ) -> tuple[int, float]:
    """(messages echoed, seconds) with ``window`` messages in flight per connection."""
    message = frame(b"m" * size)
    echo = 2 + size  # server frames are unmasked
    pairs = [await connect(port) for _ in range(conns)]
    stop = time.monotonic() + duration
    counts = [0] * conns

    async def one(i: int) -> None:
        reader, writer = pairs[i]
        writer.write(message * window)
        partial = 0  # bytes of an echo frame not complete yet
        while time.monotonic() < stop:
            data = await reader.read(65536)
            if not data:
                raise RuntimeError("connection closed mid-run")
            done, partial = divmod(partial + len(data), echo)
            counts[i] += done
            if done:
                writer.write(message * done)  # keep the window full

    start = time.monotonic()
    await asyncio.gather(*(one(i) for i in range(conns)))
    elapsed = time.monotonic() - start
    for _, writer in pairs:
        writer.close()
    return sum(counts), elapsed


def measure(name: str, port: int, pid: int | None, args: argparse.Namespace) -> dict[str, float]:
    asyncio.run(drive(port, 4, 4, 1.0, args.size))  # warm-up
    before = cpu_seconds(pid) if pid else 0.0
    messages, elapsed = asyncio.run(drive(port, args.conns, args.window, args.duration,
                                          args.size))
    cpu = cpu_seconds(pid) - before if pid else 0.0
    row = {"messages": messages, "rate": messages / elapsed,
           "cpu_us": cpu / messages * 1e6 if pid and messages else 0.0}
    bench.log(f"  {name:7} {row['rate']:>9,.0f} msg/s"
              + (f"  proxy CPU {row['cpu_us']:.1f} µs/message" if pid else ""))
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--conns", type=int, default=32)
    parser.add_argument("--window", type=int, default=16, help="messages in flight per conn")
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--size", type=int, default=64, help="payload bytes (< 126)")
    parser.add_argument("--passes", type=int, default=3)
    args = parser.parse_args()
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    origin = subprocess.Popen([sys.executable, "-m", "tests.integration._ws_origin"],
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                              text=True)  # (it logs every connection the client drops)
    procs: list[bench.Proc] = []
    try:
        assert origin.stdout is not None
        origin_port = int(origin.stdout.readline().split()[1])
        with tempfile.TemporaryDirectory(prefix="proxyd-ws-") as name:
            tmp = Path(name)
            tmp.chmod(0o755)
            nginx_port = bench.free_port()
            server = f"""
  map $http_upgrade $connection_upgrade {{ default upgrade; '' close; }}
  server {{
    listen 127.0.0.1:{nginx_port} reuseport backlog=4096;
    location / {{
      proxy_pass http://127.0.0.1:{origin_port};
      proxy_http_version 1.1;
      proxy_set_header Upgrade $http_upgrade;
      proxy_set_header Connection $connection_upgrade;
      proxy_read_timeout 300s;
    }}
  }}"""
            procs.append(bench.start_nginx(nginx, tmp, "nginx-ws", 2, server))
            port, admin = bench.free_port(), bench.free_port()
            cfg = tmp / "proxyd-ws.yaml"
            cfg.write_text(yaml.safe_dump({
                "server": {"listen": [f"127.0.0.1:{port}"], "workers": 2,
                           "drain_timeout": "2s"},
                "admin": {"listen": f"127.0.0.1:{admin}"},
                "upstreams": {"origin": {"targets": [f"http://127.0.0.1:{origin_port}"]}},
                "routes": [{"name": "ws", "match": {"path_prefix": "/"}, "upstream": "origin",
                            "websocket": {"idle_timeout": "300s"}}],
                "access_log": {"enabled": False},
            }, sort_keys=False))
            procs.append(bench.Proc("proxyd-ws", [sys.executable, "-m", "proxyd", "run", "-c",
                                                  str(cfg)], tmp / "proxyd-ws.log",
                                    signal.SIGTERM))
            bench.wait_ready(admin, "/health/ready", procs[-1], "proxyd admin")
            rows: dict[str, list[dict[str, float]]] = {"origin": [], "nginx": [], "proxyd": []}
            for n in range(args.passes):
                bench.log(f"pass {n + 1}/{args.passes}: {args.conns} conns x {args.window} "
                          f"in flight, {args.size} B messages")
                rows["origin"].append(measure("origin", origin_port, None, args))
                order = [("nginx", nginx_port, procs[0].pid), ("proxyd", port, procs[1].pid)]
                for name, tport, pid in (order if n % 2 == 0 else order[::-1]):
                    rows[name].append(measure(name, tport, pid, args))
    finally:
        for proc in reversed(procs):
            proc.stop()
        origin.send_signal(signal.SIGTERM)
        origin.wait(10)
    print(f"\n| target | msg/s (median of {args.passes}) | ratio to nginx | "
          "proxy CPU µs/message |")
    print("|---|---:|---:|---:|")
    nginx_rate = bench.median([r["rate"] for r in rows["nginx"]])
    for name, results in rows.items():
        rate = bench.median([r["rate"] for r in results])
        cpu = bench.median([r["cpu_us"] for r in results])
        print(f"| {name} | {rate:,.0f} | {rate / nginx_rate:.2f}x | "
              f"{f'{cpu:.1f}' if name != 'origin' else '-'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
