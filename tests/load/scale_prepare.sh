#!/usr/bin/env bash
# Gather what tests/load/scale_run.sh needs on a machine with no network (the lent 16-core
# device): wheels of every runtime dependency at the versions installed here, built for the
# target's Python (default 3.12), what compiles the data plane there (mypy, setuptools), and
# wrk + nginx with the shared libraries they link beyond glibc. Everything lands in .scale/
# (git-ignored through .git/info/exclude).
#
#   tests/load/scale_prepare.sh [PYTHON_VERSION]     # e.g. 3.12 (the device's), 3.11 (here)
set -euo pipefail
cd "$(dirname "$0")/../.."
pyver=${1:-3.12}
dest=.scale
grep -qx '/.scale/' .git/info/exclude 2>/dev/null || echo '/.scale/' >>.git/info/exclude
rm -rf "$dest" && mkdir -p "$dest/whl" "$dest/lib" "$dest/bin"

# Runtime dependencies of proxyd and of the benchmark, at this venv's versions.
names="aiohttp aiodns pycares cffi pycparser uvloop httptools PyYAML pydantic pydantic_core
annotated-types typing-inspection typing_extensions redis prometheus_client click
brotli xxhash multidict yarl propcache frozenlist aiosignal aiohappyeyeballs attrs idna"
pins=()
for n in $names; do
  v=$(python -c "import importlib.metadata as m; print(m.version('$n'))")
  pins+=("$n==$v")
done
python -m pip download -q --no-deps --only-binary=:all: --python-version "$pyver" \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux1_x86_64 -d "$dest/whl" "${pins[@]}"

# What compiles the data plane there (setup.py: mypyc and the YAML stubs its type check needs, as
# in pyproject.toml's build requirements, and a setuptools new enough for
# pyproject.toml's SPDX license), at this venv's mypy; scale_run.sh builds before it measures.
build=("mypy==$(python -c "import importlib.metadata as m; print(m.version('mypy'))")")
for n in ast-serialize librt mypy_extensions pathspec types-PyYAML; do
  build+=("$n==$(python -c "import importlib.metadata as m; print(m.version('$n'))")")
done
python -m pip download -q --no-deps --only-binary=:all: --python-version "$pyver" \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux1_x86_64 -d "$dest/whl" "${build[@]}" "setuptools>=77"

# wrk and nginx, each behind a wrapper that points only it at the carried libraries (the
# target's Python must keep its own libssl).
for bin in /usr/bin/wrk /usr/sbin/nginx; do
  name=$(basename "$bin")
  cp "$bin" "$dest/lib/$name.bin"
  ldd "$bin" | awk '/=> \// {print $3}' | grep -vE '/(libc|libm|libpthread|libdl|librt)\.so' |
    xargs -r cp -L -t "$dest/lib"
  cat >"$dest/bin/$name" <<WRAP
#!/bin/sh
d=\$(dirname "\$(readlink -f "\$0")")/../lib
LD_LIBRARY_PATH=\$d exec "\$d/$name.bin" "\$@"
WRAP
  chmod +x "$dest/bin/$name"
done
du -sh "$dest"; ls "$dest/whl" | wc -l
