#!/usr/bin/env bash
# pack_bench.sh: the bundle's wheels, without the model, in one folder .gpubench/ (~27 MiB) that travels with every
# once.sh call (beside the ~18 MiB tree, under the 64 MiB a call may carry). The benchmarks build their models from
# shapes with random weights: they need no model file and no asset.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
src=(.gpu-a .gpu-b); [ -f .gpu-a/MANIFEST ] || src=(.gpu-[0-9]*)
[ -f "${src[0]}/MANIFEST" ] || { echo "pack_bench: run ../shared/gpu/bundle.sh first" >&2; exit 2; }
rm -rf .gpubench && mkdir .gpubench
for d in "${src[@]}"; do cp "$d"/*.whl .gpubench/; done
grep ' wheels/' "${src[0]}/MANIFEST" | sed 's#  wheels/#  #' > .gpubench/MANIFEST
(cd .gpubench && sha256sum --quiet -c MANIFEST)
cat > .gpubench/install.sh <<'INSTALL'
#!/usr/bin/env bash
# On the node: install these wheels into /root/gpu-bundle/site (env.sh's PYTHONPATH) unless this node has them.
set -euo pipefail
src=$(dirname "$0") B=${GPU_BUNDLE:-/root/gpu-bundle}
if cmp -s "$src/MANIFEST" "$B/bench.MANIFEST" && [ -d "$B/site" ]; then echo "gpubench: installed"; exit 0; fi
(cd "$src" && sha256sum --quiet -c MANIFEST)
rm -rf "$B/site" && mkdir -p "$B"
PIP_ROOT_USER_ACTION=ignore python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
  --target "$B/site" "$src"/*.whl
cp "$src/MANIFEST" "$B/bench.MANIFEST"
echo "gpubench ready: $(ls "$src"/*.whl | wc -l) packages in $B/site"
INSTALL
echo "pack_bench: $(ls .gpubench/*.whl | wc -l) wheels, $(du -sh .gpubench | cut -f1) in .gpubench/"
