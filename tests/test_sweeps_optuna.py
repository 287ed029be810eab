"""`hparams_search=adapter_optuna`: Optuna (TPE) searches lr and r, minimising finetune's validation loss.

Two real trials on the `smoke` experiment (tiny random LLaMA, real BIG-bench rows, 2 steps each), basic launcher:
the sweeper's best value must be the smaller of the two validation losses the trials wrote, with that trial's
parameters, and each trial must really have trained with its sampled r and lr.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from needs_assets import needs_task_files, needs_tiny_model

ROOT = Path(__file__).resolve().parent.parent
pytestmark = needs_tiny_model


@pytest.mark.slow  # real training subprocesses: tens of seconds
@needs_task_files
def test_optuna_two_trials_minimise_validation_loss(tmp_path):
    cmd = [sys.executable, "-m", "pipeline.finetune", "experiment=smoke", "task=object_counting",
           "hparams_search=adapter_optuna", "hydra.sweeper.n_trials=2", "logger=none", "print_config=false",
           "trainer.max_steps=2"]
    env = {**os.environ, "LORAMUX_OUTPUTS": str(tmp_path), "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run(cmd, check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (sweep,) = (tmp_path / "smoke" / "finetune" / "multiruns").iterdir()
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())

    trials = []
    for metrics in sorted(sweep.glob("*/metrics.json")):
        cfg = yaml.safe_load((metrics.parent / ".hydra" / "config.yaml").read_text())
        adapter = json.loads((metrics.parent / "adapter" / "adapter_config.json").read_text())
        assert adapter["r"] == cfg["adapter"]["r"] and cfg["adapter"]["r"] in (4, 8, 16)
        assert 1e-5 <= cfg["optim"]["lr"] <= 1e-3
        trials.append((json.loads(metrics.read_text())["metrics"]["val_loss"], cfg["optim"]["lr"], cfg["adapter"]["r"]))
    assert len(trials) == 2 and trials[0][1:] != trials[1][1:]
    loss, lr, r = min(trials)
    assert best["best_value"] == pytest.approx(loss)
    assert best["best_params"] == {"optim.lr": pytest.approx(lr), "adapter.r": r}
    # trials keep their adapters to themselves: the experiment's shared adapters/ dir is untouched
    assert not (tmp_path / "smoke" / "adapters").exists()
