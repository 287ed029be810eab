#!/usr/bin/env bash
# resplit.sh [N]: re-cut the bundle of ../shared/gpu/bundle.sh (.gpu-a/ + .gpu-b/: wheels, the gzipped model in two
# parts, MANIFEST) into N folders .gpu-1/ .. .gpu-N/ (default 3) of about equal size, for when the working tree
# that travels with every `run` call leaves no room for a 58 MiB folder under the 64 MiB a call may carry. Each
# folder gets the same MANIFEST and an install.sh that stages its part in /root/gpu-bundle and, once all N parts
# are there, joins the model, checks every file against MANIFEST and installs the wheels (as bundle.sh's does).
# On the node, back to back: `bash .gpu-1/install.sh`, ..., `bash .gpu-N/install.sh` (each call carrying its folder).
set -euo pipefail
n=${1:-3}
cd "$(git rev-parse --show-toplevel)"
[ -f .gpu-a/MANIFEST ] && [ -f .gpu-b/model.gz.2 ] || { echo "resplit: run ../shared/gpu/bundle.sh first"; exit 2; }
tmp=$(mktemp -d) && trap 'rm -rf "$tmp"' EXIT
cat .gpu-a/model.gz.1 .gpu-b/model.gz.2 > "$tmp/model.gz"
cp .gpu-a/MANIFEST "$tmp/" && cp .gpu-a/*.whl .gpu-b/*.whl "$tmp/"
for i in $(seq 1 "$n"); do rm -rf ".gpu-$i"; mkdir ".gpu-$i"; cp "$tmp/MANIFEST" ".gpu-$i/"; done
# wheels: largest first, each to the folder holding the fewest bytes so far
mapfile -t wheels < <(ls -S "$tmp"/*.whl)
declare -a size; for i in $(seq 1 "$n"); do size[$i]=0; done
for w in "${wheels[@]}"; do
  best=1; for i in $(seq 2 "$n"); do (( size[i] < size[best] )) && best=$i; done
  cp "$w" ".gpu-$best/"; size[$best]=$(( size[best] + $(stat -c %s "$w") ))
done
# the model: cut so that every folder ends with the same total
total=$(( $(stat -c %s "$tmp/model.gz") )); for i in $(seq 1 "$n"); do total=$(( total + size[i] )); done
each=$(( (total + n - 1) / n )) off=0 model=$(stat -c %s "$tmp/model.gz")
for i in $(seq 1 "$n"); do
  len=$(( each - size[i] )); (( len < 0 )) && len=0; (( i == n || off + len > model )) && len=$(( model - off ))
  dd if="$tmp/model.gz" of=".gpu-$i/model.gz.$i" bs=1M iflag=skip_bytes,count_bytes skip="$off" count="$len" \
    status=none; off=$(( off + len ))
done
for i in $(seq 1 "$n"); do
  cat > ".gpu-$i/install.sh" <<INSTALL
#!/usr/bin/env bash
# On the offline GPU node, from the repo root: stage this folder's part of the bundle in /root/gpu-bundle; once all
# $n parts are there, join the model, check every file against MANIFEST, install the wheels into site/.
set -euo pipefail
src=\$(dirname "\$0") B=/root/gpu-bundle
cmp -s "\$src/MANIFEST" "\$B/MANIFEST" || { rm -rf "\$B"; mkdir -p "\$B/wheels"; cp "\$src/MANIFEST" "\$B/"; }
cp "\$src"/*.whl "\$B/wheels/" 2>/dev/null || true
cp "\$src"/model.gz.* "\$B/"
for i in \$(seq 1 $n); do
  [ -e "\$B/model.gz.\$i" ] || { echo "gpu-bundle: \$src staged; send the next folder within 30 s"; exit 0; }
done
cat \$(for i in \$(seq 1 $n); do echo "\$B/model.gz.\$i"; done) | gunzip > "\$B/SmolLM2-135M-Instruct.Q4_1.gguf"
(cd "\$B" && sha256sum --quiet -c MANIFEST)
rm -rf "\$B/site"
PIP_ROOT_USER_ACTION=ignore python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \\
  --target "\$B/site" "\$B"/wheels/*.whl
echo "gpu-bundle ready: \$B/SmolLM2-135M-Instruct.Q4_1.gguf, \$(ls "\$B/wheels" | wc -l) packages in \$B/site"
INSTALL
done
du -sh .gpu-[0-9]*
