"""A process's own figures, as prometheus_client's process collector reads them from /proc:
resident and virtual memory, CPU seconds, open descriptors and their limit, start time.

Each worker samples itself with every stats push and the master samples itself at each
scrape; the master exports them all per process (metrics.py: gateway_process_*), its own
labelled process="master", each worker's process="worker" with its slot.
"""

from __future__ import annotations

import contextlib
import os
import resource
from typing import Final

# Read once: they do not change while the process runs.
_TICKS: Final = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_PAGE: Final = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _boot_time() -> float:
    try:
        with open("/proc/stat", "rb") as f:
            for line in f:
                if line.startswith(b"btime "):
                    return float(line.split()[1])
    except OSError:
        pass
    return 0.0


_BOOT: Final = _boot_time()

FIELDS: Final = ("resident_memory_bytes", "virtual_memory_bytes", "cpu_seconds_total",
                 "open_fds", "max_fds", "start_time_seconds")


def sample() -> dict[str, float]:
    """This process's figures (FIELDS); those /proc cannot give are left out."""
    out: dict[str, float] = {}
    try:
        with open("/proc/self/stat", "rb") as f:
            # proc(5): the command name may hold spaces and parentheses; fields follow the
            # last ")". utime, stime are fields 14, 15; starttime 22; vsize 23; rss 24.
            fields = f.read().rpartition(b")")[2].split()
        out["cpu_seconds_total"] = (float(fields[11]) + float(fields[12])) / _TICKS
        out["start_time_seconds"] = float(fields[19]) / _TICKS + _BOOT
        out["virtual_memory_bytes"] = float(fields[20])
        out["resident_memory_bytes"] = float(fields[21]) * _PAGE
    except (OSError, IndexError, ValueError):
        pass
    with contextlib.suppress(OSError):
        out["open_fds"] = float(len(os.listdir("/proc/self/fd")))
    out["max_fds"] = float(resource.getrlimit(resource.RLIMIT_NOFILE)[0])
    return out
