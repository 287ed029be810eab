#!/usr/bin/env bash
# Here: pack the extracted BIG-bench task files of the local asset cache into .gpubb/bb.tgz (for start.sh).
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
cache=${LORAMUX_CACHE:-$HOME/.cache/loramux}
[ -f "$cache/bigbench/MANIFEST.json" ] || { echo "no BIG-bench in $cache: run make assets first (where the index lacks its sdist: python -m data.fetch --bigbench-sdist PATH or --bigbench-dir DIR)" >&2; exit 2; }
if grep -q '"standin"' "$cache/bigbench/MANIFEST.json"; then
  echo "$cache/bigbench holds the generated stand-in (data/standin.py), not BIG-bench: a GPU run on it measures nothing; point LORAMUX_CACHE at the real cache" >&2; exit 2
fi
rm -rf .gpubb && mkdir .gpubb
tar czf .gpubb/bb.tgz -C "$cache" bigbench
ls -la .gpubb
