"""``reproduce parallel=N``: independent steps of a stage run as N processes into the same run dirs as in-process.

A cut-down `smoke` chain (tiny random LLaMA) runs with parallel=2 in a subprocess. First with a broken dlp router
(hidden=0): that one route step fails and the run fails with one line naming its log, while every step that does
not read the dlp router (two finetunes, the meteora router, the oracle evaluation, which starts once the adapters
exist) finishes and lands where the one-after-another run puts it. Then, fixed, a rerun skips everything that
finished, runs the dlp router alone, and writes the report.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from needs_assets import needs_task_files, needs_tiny_model

ROOT = Path(__file__).resolve().parent.parent
pytestmark = needs_tiny_model
# Dicts given on the command line merge into the experiment's: delete (~) and add (+) to replace them.
PLAN = ["plan.finetune=[object_counting,winowhy]", "~plan.evaluate", '+plan.evaluate={oracle:["router=oracle"]}',
        "plan.composite=[]", "plan.bench=false", "~plan.route"]


def _reproduce(root: Path, dlp_hidden: int, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline"}
    cmd = [sys.executable, "-m", "pipeline.reproduce", "experiment=smoke", f"paths.output_root={root}",
           "logger=none", "parallel=2", "allow_dirty=true",
           *PLAN, f'+plan.route={{meteora:[],dlp:["router.hidden={dlp_hidden}"]}}', *extra]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)


@pytest.mark.slow  # real training subprocesses: tens of seconds
@needs_task_files
def test_parallel_steps_fail_alone_then_resume(tmp_path):
    exp = tmp_path / "smoke"
    broken = _reproduce(tmp_path, 0, "gpus=[7,9]")  # ids a CPU build ignores: pinning is only printed
    assert broken.returncode != 0
    started = [line for line in broken.stdout.splitlines() if "started (pid" in line]
    assert len(started) == 5 and all(("GPU 7" in line) != ("GPU 9" in line) for line in started), broken.stdout
    assert "GPU 7" in started[0] and "GPU 9" in started[1]  # 2 finetunes at once: one on each GPU
    err = broken.stderr.strip().splitlines()
    assert len(err) == 1 and "route:dlp" in err[0] and "stage.log" in err[0], broken.stderr[-2000:]
    for stage, step in [("finetune", "object_counting"), ("finetune", "winowhy"), ("route", "meteora"),
                        ("evaluate", "oracle")]:
        assert json.loads((exp / stage / step / "metrics.json").read_text())["stage"] == stage
        assert (exp / stage / step / "stage.log").is_file()
    assert not (exp / "route" / "dlp" / "metrics.json").exists()

    fixed = _reproduce(tmp_path, dlp_hidden=64)
    assert fixed.returncode == 0, fixed.stdout[-3000:] + fixed.stderr[-3000:]
    assert fixed.stdout.count("skipped") == 4 and fixed.stdout.count("started (pid") == 1
    assert json.loads((exp / "evaluate" / "oracle" / "metrics.json").read_text())["strategy"] == "oracle"
    assert (exp / "report.md").is_file()


def test_gpu_choice():
    from pipeline.runtime.step_dag import least_busy_gpu
    from pipeline.stages.reproduce import visible_gpus

    assert least_busy_gpu(["0", "1"], []) == "0"
    assert least_busy_gpu(["0", "1"], ["0"]) == "1"
    assert least_busy_gpu(["0", "1"], ["0", "1", "1"]) == "0"
    assert least_busy_gpu([], ["0"]) is None
    assert visible_gpus([2, 3]) == ["2", "3"] and visible_gpus([]) == [] and visible_gpus(None) == []
    with pytest.raises(ValueError, match=r"gpus=3.*\[0,1\]"):
        visible_gpus(3)
