#!/usr/bin/env bash
# The scale benchmark: bench.py on a many-core machine with no network, from what
# tests/load/scale_prepare.sh put in .scale/. Runs as one command (device time is scarce):
#
#   tests/load/scale_run.sh [WORKERS] [extra bench.py args...]
#
# It first compiles the data plane for the target's Python (setup.py build_ext --inplace, as
# `pip install -e .` does here) and stops if that fails: a silent fall-back to the pure
# package would measure another build. SCALE_PURE=1 measures the pure package on purpose.
#
# Writes bench.log and bench.json under $OUT (or ./scale-out).
set -uo pipefail
cd "$(dirname "$0")/../.."
workers=${1:-16}; shift || true
out=${OUT:-scale-out}; mkdir -p "$out"
py=${PYTHON:-python3}
site=/tmp/proxyd-site
"$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target "$site" .scale/whl/*.whl || exit 1
export PYTHONPATH=$site PATH=$PWD/.scale/bin:$PATH PYTHONUNBUFFERED=1
echo "== $(nproc) CPUs, $("$py" -V), $(uname -r)"
wrk -v 2>&1 | head -1; nginx -v 2>&1
"$py" -c 'import proxyd, aiohttp, uvloop, httptools, pydantic; print("proxyd", proxyd.__version__,
"aiohttp", aiohttp.__version__, "uvloop", uvloop.__version__)' || exit 1
if [ "${SCALE_PURE:-}" = 1 ]; then
  export PROXYD_PURE=1
else
  inc=$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
  echo "== compiler: $(cc --version 2>&1 | head -1); Python.h: $(ls "$inc/Python.h" 2>&1)"
  start=$(date +%s)
  "$py" setup.py -q build_ext --inplace -j "$(nproc)" >"$out/build.log" 2>&1
  echo "== build: rc $?, $(( $(date +%s) - start )) s"; tail -5 "$out/build.log"
fi
"$py" -c 'import proxyd; print("build:", proxyd.build())' | tee "$out/build.txt"
if [ "${SCALE_PURE:-}" != 1 ] && ! grep -q 'build: compiled' "$out/build.txt"; then
  echo "the compiled data plane did not build; stopping (SCALE_PURE=1 measures the pure one)"
  exit 1
fi
ulimit -n 65536 2>/dev/null || true
"$py" tests/load/bench.py --workers "$workers" --nginx-workers "$workers" \
  --origin-workers 4 --wrk-threads 4 --connections 256 --json "$out/bench.json" "$@" 2>&1 |
  tee "$out/bench.log"
