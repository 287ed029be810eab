"""Crash recovery and determinism of the training stages (issue 7), on the `smoke` experiment (tiny LLaMA, CPU).

A run is SIGKILLed mid-training (no handler runs: the process kills itself with ``os.kill(getpid(), SIGKILL)``
when training reaches a chosen step, so the test does not race the tiny model's millisecond steps); the same
command started again in the same run dir resumes from the last periodic checkpoint and must end exactly like an
uninterrupted run: same adapter / router weights (fp32, CPU: bit for bit, we allow fp32 rounding) and the same
metrics.json apart from the fields that are not results:

  * ``provenance.date``                         when the run happened,
  * timing, different on every run: any key ending in ``_seconds``, ``_per_s`` or ``_time_s``, at the top level
    or in ``metrics`` (today ``wall_time_s``, ``metrics.train_seconds``, ``metrics.tokens_per_s``),
  * ``adapter_dir`` / ``router_dir``             where the outputs root of that run is.

The finetune run uses ``adapter=dlp`` (LoRA dropout 0.1), so an equal result also shows the dropout RNG resumes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from needs_assets import needs_task_files, needs_tiny_model

from data.assets import cache_dir

ROOT = Path(__file__).resolve().parent.parent
pytestmark = needs_tiny_model

# Kill this process (SIGKILL: nothing runs after it) when training is about to run the optimizer step KILL_AT.
KILLER = """
import os, runpy, signal, sys
stage, kill_at = sys.argv[1], int(os.environ["KILL_AT_STEP"])
import pipeline.stages.finetune, pipeline.stages.route
for cls in (pipeline.stages.finetune.LoRAFinetuneModule, pipeline.stages.route.RouterTrainModule):
    step = cls.training_step
    def training_step(self, batch, i, _step=step):
        if self.global_step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return _step(self, batch, i)
    cls.training_step = training_step
sys.argv = [f"pipeline.{stage}", *sys.argv[2:]]
runpy.run_module(f"pipeline.{stage}", run_name="__main__")
"""
TIMING = ("_seconds", "_per_s", "_time_s")  # suffixes of wall-clock timing fields
CONF = ROOT / "conf"


def _args(overrides: list[str], outputs: Path) -> list[str]:
    return ["experiment=smoke", "logger=none", "print_config=false", f"paths.output_root={outputs}", *overrides]


def run_in_process(stage: str, overrides: list[str], outputs: Path, run_dir: Path):
    """Run a stage here, as ``python -m pipeline.<stage> <overrides> hydra.run.dir=<run_dir>`` would."""
    import importlib

    from hydra.core.global_hydra import GlobalHydra

    from pipeline.runtime.compose import compose

    GlobalHydra.instance().clear()
    cfg = compose(stage, _args(overrides, outputs), run_dir=run_dir)
    return getattr(importlib.import_module(f"pipeline.stages.{stage}"), stage)(cfg)


def run_killed(stage: str, overrides: list[str], outputs: Path, run_dir: Path, kill_at: int):
    """``python -m pipeline.<stage>`` in a subprocess that SIGKILLs itself in the middle of step ``kill_at``."""
    cmd = [sys.executable, "-c", KILLER, stage, *_args(overrides, outputs), f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "KILL_AT_STEP": str(kill_at), "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run(cmd, check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)


def comparable(metrics_json: Path) -> dict:
    """metrics.json without the fields that are not results (see the module docstring)."""
    rec = json.loads(metrics_json.read_text())
    rec["provenance"].pop("date")
    for record in (rec, rec["metrics"]):
        for k in [k for k in record if k.endswith(TIMING)]:
            record.pop(k)
    rec.pop("adapter_dir", None)
    rec.pop("router_dir", None)
    return rec


def _assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and a
    for k, value in a.items():
        torch.testing.assert_close(value, b[k], rtol=1e-6, atol=1e-7, msg=k)


def _kill_then_resume(stage, overrides, tmp_path, kill_at, outputs=None, caplog=None):
    """Uninterrupted reference run + a run killed at step ``kill_at`` and restarted; returns both run dirs."""
    ref_out, out = (outputs or tmp_path / "ref"), (outputs or tmp_path / "killed")
    killed = run_killed(stage, overrides, out, tmp_path / "run", kill_at=kill_at)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert not (tmp_path / "run" / "metrics.json").exists()
    state = json.loads((tmp_path / "run" / "checkpoints" / "resume.json").read_text())
    assert 0 < state["step"] < kill_at  # a periodic checkpoint older than the kill
    run_in_process(stage, overrides, ref_out, tmp_path / "ref-run")
    run_in_process(stage, overrides, out, tmp_path / "run")  # the restart: same config, same run dir
    ckpt = tmp_path / "run" / "checkpoints" / "requeue.ckpt"
    assert f"resuming from {ckpt} (step {state['step']}" in caplog.text
    assert not ckpt.exists()  # removed once training finished
    return tmp_path / "ref-run", tmp_path / "run"


@needs_task_files
def test_finetune_killed_mid_training_resumes_to_the_uninterrupted_adapter(tmp_path, caplog):
    from safetensors.torch import load_file

    overrides = ["task=winowhy", "adapter=dlp", "trainer.max_steps=8", "checkpoint.every_n_steps=3"]
    ref, run = _kill_then_resume("finetune", overrides, tmp_path, kill_at=5, caplog=caplog)
    _assert_same_tensors(load_file(ref / "adapter" / "adapter_model.safetensors"),
                         load_file(run / "adapter" / "adapter_model.safetensors"))
    assert comparable(ref / "metrics.json") == comparable(run / "metrics.json")
    assert comparable(run / "metrics.json")["metrics"]["steps"] == 8


@needs_task_files
def test_a_run_stopped_by_sigterm_exits_nonzero_checkpointed_and_resumes(tmp_path, caplog):
    """SIGTERM (``timeout``, ``kill``, scancel): Lightning stops after the step and raises a SystemExit of no code,
    which a shell reads as success; the run exits 1 with one line naming its checkpoint instead, writes no
    metrics.json, and the same command resumes it to the end."""
    overrides = ["task=winowhy", "adapter=dlp", "trainer.max_steps=8", "checkpoint.every_n_steps=100"]
    cmd = [sys.executable, "-c", KILLER.replace("signal.SIGKILL", "signal.SIGTERM"), "finetune",
           *_args(overrides, tmp_path / "out"), f"hydra.run.dir={tmp_path / 'run'}"]
    env = {**os.environ, "KILL_AT_STEP": "3", "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    stopped = subprocess.run(cmd, check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert stopped.returncode == 1, stopped.stderr[-3000:]
    assert stopped.stderr.strip().splitlines()[-1].startswith("stopped by SIGTERM after step 4, checkpointed in ")
    assert not (tmp_path / "run" / "metrics.json").exists()
    assert json.loads((tmp_path / "run" / "checkpoints" / "resume.json").read_text())["step"] == 4
    run_in_process("finetune", overrides, tmp_path / "out", tmp_path / "run")
    assert "resuming from" in caplog.text and "(step 4" in caplog.text
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["metrics"]["steps"] == 8


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """The smoke experiment's two adapters (random PEFT LoRAs on the tiny model) under a fresh outputs root."""
    from models.tiny import save_random_peft_adapter

    out = tmp_path_factory.mktemp("outputs")
    base = cache_dir() / "models" / "tiny-random-llama"
    for i, task in enumerate(("object_counting", "winowhy")):
        save_random_peft_adapter(base, out / "smoke" / "adapters" / task, seed=i + 1,
                                 targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
    return out


@pytest.mark.parametrize("router", ["meteora"])
@needs_task_files
def test_route_killed_mid_training_resumes_to_the_uninterrupted_router(adapters, tmp_path, router, caplog):
    from safetensors.torch import load_file

    overrides = [f"router={router}", "router.train.steps=5", "checkpoint.every_n_steps=2", "trainer.val_check_interval=2",
                 "router.train.val_rows_per_task=2"]
    if router == "dlp":
        overrides.append("router.hidden=32")
    ref, run = _kill_then_resume("route", overrides, tmp_path, kill_at=3, outputs=adapters, caplog=caplog)
    _assert_same_tensors(load_file(ref / "router" / "router.safetensors"), load_file(run / "router" / "router.safetensors"))
    assert comparable(ref / "metrics.json") == comparable(run / "metrics.json")


@needs_task_files
def test_finetune_twice_with_one_seed_gives_identical_metrics_json(tmp_path):
    """Determinism: two uninterrupted runs, same seed -> the same metrics.json (minus the fields above)."""
    overrides = ["task=object_counting", "trainer.max_steps=3"]
    for i in range(2):
        run_in_process("finetune", overrides, tmp_path / f"out{i}", tmp_path / f"run{i}")
    first, second = comparable(tmp_path / "run0" / "metrics.json"), comparable(tmp_path / "run1" / "metrics.json")
    assert first == second
    assert first["metrics"]["val_loss"] > 0 and first["metrics"]["answer_tokens"] > 0
