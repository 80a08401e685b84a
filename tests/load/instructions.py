"""Instructions per request of hotpath.py's scenarios, counted by cachegrind: the noise-free figure.

    python tests/load/instructions.py [--scenarios chain ... | --build-up] [--small 1000]
                                      [--large 5000] [--jobs 2] [--keep DIR] [--top 25]
                                      [--json out.json]

Each scenario runs twice under ``valgrind --tool=cachegrind --cache-sim=no`` (``PYTHONHASHSEED=0``,
one round of ``--small`` and one of ``--large`` requests); the difference of the two totals over
the difference of the request counts is what one request costs, start-up and imports cancelled
out. It repeats to about ±0.5 % from run to run, where times on a shared machine move by a tenth.

``--build-up`` runs hotpath.py's build-up scenarios (the full chain made one piece at a time:
the route alone, metrics, the access log, then each element in the chain's order) and prints
what each piece adds. Per scenario it also prints where the extra requests' instructions went
(``cg_diff`` of the two runs, then ``cg_annotate``): grouped by area (interpreted Python,
allocation, the C API's objects, proxyd's compiled code, the HTTP parser, zlib, ...) and the
``--top`` functions by their own (exclusive) count.

``--inclusive`` adds a callgrind run at both request counts per scenario and lists proxyd's
compiled functions by inclusive instructions per request (the function and all it calls), the
same difference taken function by function: which parts of the relay cost what. Functions
re-entered through the event loop or a callback (the ``__top_level__`` entries, anything
recursive) have no meaningful inclusive count and are left out.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import hotpath  # noqa: E402

# Where a function's own instructions belong, by the source file cg_annotate names (first match).
COMPILING = "compiling Python source (one-off: should cancel out)"
AREAS: list[tuple[str, str]] = [
    ("Parser/", COMPILING),
    ("Python/compile.c", COMPILING),
    ("Python/symtable.c", COMPILING),
    ("Python/ast", COMPILING),
    ("Python/pyarena.c", COMPILING),
    ("Python/ceval.c", "interpreted Python (the eval loop)"),
    ("Objects/obmalloc.c", "allocation and freeing (obmalloc, malloc)"),
    ("malloc/", "allocation and freeing (obmalloc, malloc)"),
    ("__native_", "proxyd compiled (mypyc)"),
    ("mypyc/lib-rt", "mypyc runtime (lib-rt)"),
    ("llhttp", "HTTP parsing (httptools, llhttp)"),
    ("httptools", "HTTP parsing (httptools, llhttp)"),
    ("zlib", "zlib"),
    ("deflate", "zlib"),
    ("xxhash", "xxhash"),
    ("xxh", "xxhash"),
    ("Python/pyhash.c", "hashing new str/bytes (siphash)"),
    ("Python/dtoa.c", "float formatting and parsing"),
    ("Python/formatter", "number and string formatting"),
    ("Objects/unicodeobject.c", "str objects"),
    ("Objects/bytesobject.c", "bytes objects"),
    ("Objects/stringlib", "str/bytes join, find, split"),
    ("Objects/dictobject.c", "dicts"),
    ("Objects/setobject.c", "sets"),
    ("Objects/listobject.c", "lists"),
    ("Objects/tupleobject.c", "tuples"),
    ("Objects/object.c", "object protocol (getattr, compare, hash, refcounts)"),
    ("Objects/typeobject.c", "object protocol (getattr, compare, hash, refcounts)"),
    ("Include/", "object protocol (getattr, compare, hash, refcounts)"),
    ("Objects/call.c", "calls into the C API"),
    ("Objects/abstract.c", "calls into the C API"),
    ("Objects/", "other CPython objects"),
    ("Python/", "other CPython runtime"),
    ("Modules/", "CPython C modules (time, _json, ...)"),
    ("sysdeps/", "libc (memcpy, memcmp, ...)"),
    ("string/", "libc (memcpy, memcmp, ...)"),
    ("???", "no debug information (uvloop, ...)"),
]
LINE = re.compile(r"^\s*(-?[\d,]+)\s+(?:\(\s*-?[\d.]+%\)\s+)?(\S.*)$")


def area_of(where: str) -> str:
    func = where.rpartition(":")[2]
    if func.startswith(("CPyDef_", "CPyPy_", "CPyL_")):  # inlined runtime code counts too
        return "proxyd compiled (mypyc)"
    if func.startswith("XXH"):
        return "xxhash"
    for needle, area in AREAS:
        if needle in where:
            return area
    return "other"


def kept_total(out: Path) -> int | None:
    """The total of a finished valgrind output file (its ``summary:`` line), else None."""
    try:
        with open(out) as f:
            f.seek(max(0, out.stat().st_size - 4096))
            tail = f.read()
    except OSError:
        return None
    # cachegrind ends with its "summary:" line, callgrind with "totals:"
    match = re.search(r"^(?:summary|totals):\s+(\d+)", tail, re.MULTILINE)
    return int(match.group(1)) if match else None


def run_cachegrind(scenario: str, requests: int, out: Path, timeout: float,
                   reuse: bool = False) -> int:
    """Total instructions of one hotpath.py run (``I refs``); with ``reuse``, a finished
    output file of an earlier run is read instead."""
    if reuse and (total := kept_total(out)) is not None:
        return total
    argv = ["valgrind", "--tool=cachegrind", "--cache-sim=no", f"--cachegrind-out-file={out}",
            sys.executable, str(HERE / "hotpath.py"), "--scenarios", scenario,
            "--requests", str(requests), "--rounds", "1"]
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env)
    match = re.search(r"I\s+refs:\s+([\d,]+)", proc.stderr)
    if proc.returncode != 0 or match is None:
        raise RuntimeError(f"cachegrind {scenario} {requests}: rc {proc.returncode}\n"
                           f"{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return int(match.group(1).replace(",", ""))


def functions(small: Path, large: Path, timeout: float) -> list[tuple[int, str]]:
    """Exclusive instructions per function of (large - small): cg_diff, then cg_annotate."""
    diff = large.with_suffix(".diff")
    with open(diff, "w") as out:
        subprocess.run(["cg_diff", str(small), str(large)], stdout=out, check=True,
                       timeout=timeout)
    text = subprocess.run(["cg_annotate", "--auto=no", "--threshold=0", "--show-percs=no",
                           str(diff)], capture_output=True, text=True, check=True,
                          timeout=timeout).stdout
    rows = []
    started = False
    for line in text.splitlines():
        if "file:function" in line:
            started = True
            continue
        m = LINE.match(line) if started else None
        if m:
            rows.append((int(m.group(1).replace(",", "")), m.group(2).strip()))
    return rows


def run_callgrind(scenario: str, requests: int, out: Path, timeout: float,
                  reuse: bool = False) -> dict[str, int]:
    """Inclusive instructions of each compiled proxyd function in one hotpath.py run."""
    argv = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable,
            str(HERE / "hotpath.py"), "--scenarios", scenario, "--requests", str(requests),
            "--rounds", "1"]
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    if not (reuse and kept_total(out) is not None):
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"callgrind {scenario} {requests}: rc {proc.returncode}\n"
                               f"{proc.stderr[-2000:]}")
    text = subprocess.run(["callgrind_annotate", "--inclusive=yes", "--auto=no",
                           "--threshold=100", str(out)], capture_output=True, text=True, check=True,
                          timeout=timeout).stdout
    counts: dict[str, int] = {}
    for line in text.splitlines():
        m = LINE.match(line)
        if not m:
            continue
        func = m.group(2).split(" [")[0].rpartition(":")[2]
        if func.startswith("CPyDef_") and "__top_level__" not in func:
            # A function shows up once per file its code was inlined from: keep the largest.
            counts[func] = max(counts.get(func, 0), int(m.group(1).replace(",", "")))
    return counts


def short(where: str) -> str:
    """``/long/path/Objects/obmalloc.c:_PyObject_Free`` → ``obmalloc.c:_PyObject_Free``."""
    path, _, func = where.rpartition(":")
    return f"{Path(path).name}:{func}" if path else where


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scenarios", nargs="+", default=["plain", "chain"],
                        choices=list(hotpath.PATHS))
    parser.add_argument("--build-up", action="store_true",
                        help="hotpath.py's build-up scenarios, in order, instead of --scenarios")
    parser.add_argument("--small", type=int, default=1000)
    parser.add_argument("--large", type=int, default=5000)
    parser.add_argument("--jobs", type=int, default=2, help="valgrind runs at a time (2)")
    parser.add_argument("--keep", type=Path, help="keep the cachegrind files here")
    parser.add_argument("--reuse", action="store_true",
                        help="with --keep: read the finished files of an earlier run there "
                        "instead of running those again (same build, same scenarios)")
    parser.add_argument("--top", type=int, default=25, help="functions listed per scenario")
    parser.add_argument("--inclusive", nargs="*", metavar="SCENARIO",
                        help="also callgrind (for these scenarios; all without a name): "
                        "compiled functions by inclusive count")
    parser.add_argument("--timeout", type=float, default=1200.0, help="per valgrind run (s)")
    parser.add_argument("--json", type=Path, help="write the counts here")
    args = parser.parse_args()
    scenarios = list(hotpath.BUILD_UP) if args.build_up else args.scenarios
    with tempfile.TemporaryDirectory(prefix="proxyd-cg-") as name:
        where = args.keep or Path(name)
        where.mkdir(parents=True, exist_ok=True)

        def one(job: tuple[str, int]) -> int:
            scenario, n = job
            return run_cachegrind(scenario, n, where / f"cg.{scenario}.{n}", args.timeout,
                                  args.reuse)

        jobs = [(s, n) for s in scenarios for n in (args.small, args.large)]
        def inclusive(job: tuple[str, int]) -> dict[str, int]:
            scenario, n = job
            return run_callgrind(scenario, n, where / f"callgrind.{scenario}.{n}", args.timeout,
                                 args.reuse)

        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            totals = dict(zip(jobs, pool.map(one, jobs), strict=True))
            wanted = [(s, n) for s, n in jobs if args.inclusive is not None
                      and (not args.inclusive or s in args.inclusive)]
            calls = dict(zip(wanted, pool.map(inclusive, wanted), strict=True))
        result: dict[str, Any] = {}
        for s in scenarios:
            per = (totals[(s, args.large)] - totals[(s, args.small)]) / (args.large - args.small)
            rows = functions(where / f"cg.{s}.{args.small}", where / f"cg.{s}.{args.large}",
                             args.timeout)
            n = args.large - args.small
            areas: collections.Counter[str] = collections.Counter()
            for count, func in rows:
                areas[area_of(func)] += count
            result[s] = {
                "per_request": per,
                "totals": {str(args.small): totals[(s, args.small)],
                           str(args.large): totals[(s, args.large)]},
                "areas": {a: c / n for a, c in areas.most_common()},
                "functions": [(c / n, short(f)) for c, f in rows[:args.top]],
            }
            if (s, args.large) in calls:
                small, large = calls[(s, args.small)], calls[(s, args.large)]
                incl = sorted(((large[f] - small.get(f, 0)) / n, f) for f in large)
                result[s]["inclusive"] = [(c, f) for c, f in reversed(incl)
                                          if c >= 100][:args.top * 2]
    previous = None
    print(f"instructions per request (cachegrind, ({args.large} - {args.small} requests) "
          f"/ {args.large - args.small}, PYTHONHASHSEED=0)\n")
    print("| scenario | instructions / request | added by this piece |")
    print("|---|---:|---:|")
    for s in scenarios:
        per = result[s]["per_request"]
        added = "" if previous is None or not args.build_up else f"{per - previous:+,.0f}"
        print(f"| {s} | {per:,.0f} | {added} |")
        previous = per
    for s in scenarios:
        if result[s]["areas"].get(COMPILING, 0) > 200:
            print(f"\nWARNING: {s}: {result[s]['areas'][COMPILING]:,.0f} instructions per request "
                  "of compiling Python source: a lazy import (or exec) ran in one of the two "
                  "runs only, so this scenario's count is too high by that and more; run it "
                  "again")
    for s in scenarios:
        print(f"\n{s}: by area (own instructions per request)")
        for area, c in result[s]["areas"].items():
            if abs(c) >= 50:
                print(f"  {c:9,.0f}  {area}")
        print(f"{s}: top functions (own instructions per request)")
        for c, f in result[s]["functions"]:
            print(f"  {c:9,.0f}  {f}")
        if "inclusive" in result[s]:
            print(f"{s}: compiled functions by inclusive instructions per request (callgrind)")
            for c, f in result[s]["inclusive"]:
                print(f"  {c:9,.0f}  {f}")
    if args.json:
        args.json.write_text(json.dumps({"small": args.small, "large": args.large,
                                         "scenarios": result}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
