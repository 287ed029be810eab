"""The offline-GPU chains (scripts/offline_gpu/chains/*.sh) parse, and ``beside.sh`` staggers its experiments: each
starts only once the previous one's fine-tuning has finished (two joint fine-tunings of 28 adapters side by side ran
out of an H200's memory). The chain runs as written under bash; only its ``reproduce`` step (a GPU run) is replaced
by one that writes the run dirs the way ``pipeline.reproduce`` does, with times."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

CHAINS = Path(__file__).resolve().parents[1] / "scripts" / "offline_gpu" / "chains"


@pytest.mark.parametrize("chain", sorted(p.name for p in CHAINS.glob("*.sh")))
def test_each_chain_parses(chain):
    subprocess.run(["bash", "-n", str(CHAINS / chain)], check=True)


def test_beside_starts_the_next_experiment_once_the_previous_one_has_fine_tuned(tmp_path):
    chains = tmp_path / "scripts" / "offline_gpu" / "chains"
    chains.mkdir(parents=True)
    shutil.copy(CHAINS / "beside.sh", chains / "beside.sh")
    root = tmp_path / "lmx"
    (chains / "common.sh").write_text(f"""
reproduce() {{  # the finetune steps' run dirs appear at once; all/ finishes, then lora_b/, then the rest
  local d={root}/$1/finetune; echo "$1 start $(date +%s.%N)" >> {tmp_path}/times
  mkdir -p $d/all $d/lora_b; sleep 1; touch $d/all/metrics.json; sleep 2; touch $d/lora_b/metrics.json
  echo "$1 finetuned $(date +%s.%N)" >> {tmp_path}/times; sleep 3; echo "$1 end $(date +%s.%N)" >> {tmp_path}/times
}}
""")
    beside = (chains / "beside.sh").read_text().replace("sleep 10", "sleep 0.2")
    (chains / "beside.sh").write_text(beside)
    out = subprocess.run(["bash", "scripts/offline_gpu/chains/beside.sh", "A", "B", "C"], cwd=tmp_path, check=True,
                         capture_output=True, text=True, timeout=120, env={"LMX_ROOT": str(root), "PATH": "/usr/bin:/bin"})
    assert out.stdout.strip().splitlines()[-1] == "DONE"
    t = {tuple(line.split()[:2]): float(line.split()[2]) for line in (tmp_path / "times").read_text().splitlines()}
    assert t[("B", "start")] >= t[("A", "finetuned")] and t[("C", "start")] >= t[("B", "finetuned")]
    assert t[("B", "start")] < t[("A", "end")]  # side by side after the fine-tuning: not one after the other
