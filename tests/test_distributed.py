"""Multi-GPU code paths on CPU: Lightning DDP with 2 gloo processes equals one process at the same global batch.

One `reproduce` of a reduced `smoke` plan runs twice on the tiny random LLaMA with real BIG-bench rows:
  * one process, in this pytest process (trainer=cpu), global batch 4;
  * `python -m pipeline.reproduce ... trainer=ddp_cpu` (2 processes: Lightning re-runs the command with LOCAL_RANK=1),
    per-device batch 2, with logger=wandb (offline).
Both train the mixed LoRA-B adapter (finetune), the DLP router and the MeteoRA gates (route: the fused op), and
evaluate oracle and dlp; the DDP run starts from the one-process run's two task adapters, so each stage is
compared on the same inputs. Checked: routers and adapter equal (DLP: same math, 1e-6; token-mean losses such
as LM and gate CE are averaged per rank under DDP, so MeteoRA and LoRA agree within a stated tolerance), val
metrics equal, evaluate's predictions.jsonl identical and metrics.json equal (sharded generation gathered on
rank 0), and one wandb run and one metrics.json per job, not one per rank.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from needs_assets import needs_task_files, needs_tiny_model

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [needs_tiny_model, needs_task_files, pytest.mark.slow]  # ~2-4 min on 2 busy cores: 11 stage runs

ROUTE = "'router.train.steps=4','router.train.val_rows_per_task=4','router.train.batch_size={bs}'"


def _overrides(bs: int, finetune: str) -> list[str]:
    route = ROUTE.format(bs=bs)
    return ["experiment=smoke", f"optim.batch_size={bs}", f"plan.finetune={finetune}", "plan.composite=[]",
            "plan.bench=false", "~plan.route", f"+plan.route={{meteora:[{route}],dlp:[{route},'router.hidden=64']}}",
            "~plan.evaluate", "+plan.evaluate={oracle:['router=oracle'],dlp:['router=dlp']}"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, compose):
    """(one-process experiment dir, two-process experiment dir, the DDP command's output)."""
    from omegaconf import open_dict

    from pipeline.stages.reproduce import reproduce

    one, two = tmp_path_factory.mktemp("one"), tmp_path_factory.mktemp("two")
    overrides = [*_overrides(4, "[object_counting,winowhy,lora_b]"), f"paths.output_root={one}", "logger=none",
                 "allow_dirty=true"]
    cfg = compose("reproduce", overrides, run_dir=one / "reproduce")
    with open_dict(cfg):
        cfg.print_config = False
    reproduce(cfg, overrides=overrides)

    for task in ("object_counting", "winowhy"):  # the DDP run routes over the very same task adapters
        shutil.copytree(one / "smoke" / "adapters" / task, two / "smoke" / "adapters" / task)
    env = {**os.environ, "LORAMUX_OUTPUTS": str(two), "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "pipeline.reproduce", *_overrides(2, "[lora_b]"), "trainer=ddp_cpu",
           "allow_dirty=true", "logger=wandb", "print_config=false", f"hydra.run.dir={two / 'reproduce'}"]
    proc = subprocess.run(cmd, check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    return one / "smoke", two / "smoke", proc.stdout + proc.stderr


def _metrics(exp: Path, stage: str, step: str) -> dict:
    return json.loads((exp / stage / step / "metrics.json").read_text())["metrics"]


def _tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def _rel_diff(a: dict, b: dict) -> float:
    """||a - b|| / ||b|| over all tensors (Frobenius)."""
    assert a.keys() == b.keys()
    num = sum(float((a[k] - b[k]).norm() ** 2) for k in a)
    return (num / max(sum(float(b[k].norm() ** 2) for k in b), 1e-30)) ** 0.5


def test_two_processes_really_ran(runs):
    _, two, log = runs
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in log
    assert (two.parent / "reproduce" / "train_ddp_process_1.log").is_file()  # Lightning's second process, same command
    assert _metrics(two, "evaluate", "dlp")["processes"] == 2


def test_dlp_router_equals_one_process(runs):
    one, two, _ = runs
    # same rows per global step, per-sequence CE averaged over equal halves: the same math (measured 9e-8)
    assert _rel_diff(_tensors(two / "routers" / "dlp" / "router.safetensors"),
                     _tensors(one / "routers" / "dlp" / "router.safetensors")) < 1e-6
    a, b = _metrics(one, "route", "dlp"), _metrics(two, "route", "dlp")
    assert a["steps"] == b["steps"] == 4
    assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-5)
    assert b["router_accuracy"] == pytest.approx(a["router_accuracy"], abs=1e-6)


def test_meteora_gates_match_one_process(runs):
    """Through the fused multi-LoRA op. LM loss and gate CE are token means, taken per rank under DDP (per batch in
    validation too), so they weigh tokens a little differently from one process: measured 2e-3 on the gates,
    3e-3 on val loss, 0.007 on routing accuracy."""
    one, two, _ = runs
    gates1 = _tensors(one / "routers" / "meteora" / "router.safetensors")
    gates2 = _tensors(two / "routers" / "meteora" / "router.safetensors")
    assert _rel_diff(gates2, gates1) < 1e-2
    a, b = _metrics(one, "route", "meteora"), _metrics(two, "route", "meteora")
    assert b["steps"] == a["steps"] == 4
    assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-2)
    assert b["router_accuracy"] == pytest.approx(a["router_accuracy"], abs=0.02)


def test_finetuned_adapter_matches_one_process(runs):
    """Answer-token mean per rank (see above): LoRA B, which starts at 0 and so is the whole update, agrees to
    7.5% after 4 steps; validation loss to 1.5e-4."""
    one, two, _ = runs
    w1 = _tensors(one / "adapters" / "lora_b" / "adapter_model.safetensors")
    w2 = _tensors(two / "adapters" / "lora_b" / "adapter_model.safetensors")
    lora_b = {k: v for k, v in w1.items() if "lora_B" in k}
    assert _rel_diff({k: w2[k] for k in lora_b}, lora_b) < 0.2
    a, b = _metrics(one, "finetune", "lora_b"), _metrics(two, "finetune", "lora_b")
    assert a["steps"] == b["steps"] == 4
    assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-3)


def test_sharded_evaluation_equals_one_process(runs):
    one, two, _ = runs
    timing = {"gen_seconds", "new_tokens_per_s", "processes"}
    for label in ("oracle", "dlp"):
        lines1 = (one / "evaluate" / label / "predictions.jsonl").read_text()
        lines2 = (two / "evaluate" / label / "predictions.jsonl").read_text()
        assert lines2 == lines1  # every prompt once, in input order, same text and route
        assert len(lines1.splitlines()) == 8
        a, b = _metrics(one, "evaluate", label), _metrics(two, "evaluate", label)
        timed = lambda k: k.split("/")[-1] in timing  # per task too: <task>/gen_seconds
        assert {k: v for k, v in b.items() if not timed(k)} == {k: v for k, v in a.items() if not timed(k)}


def test_one_wandb_run_and_one_metrics_file_per_job(runs):
    _, two, _ = runs
    jobs = sorted(p.parent for p in two.rglob("metrics.json"))
    assert len(jobs) == 6  # finetune lora_b, route x2, evaluate x2, report
    wandb_runs = sorted(two.rglob("offline-run-*"))
    assert len(wandb_runs) == len(jobs), wandb_runs
    assert sorted(p.parent.parent for p in wandb_runs) == jobs


def test_scaling_entry_writes_multigpu_tables(runs, tmp_path):
    """`python -m pipeline.scaling` on CPU: route (MeteoRA gates) on 1 process vs DDP on 2 gloo processes at the
    same global batch; writes <out>.json/.md with provenance, loss curves and throughput."""
    one, _, _ = runs
    for task in ("object_counting", "winowhy"):  # reuse the task adapters: no finetune sweep here
        shutil.copytree(one / "adapters" / task, tmp_path / "smoke" / "adapters" / task)
    env = {**os.environ, "LORAMUX_OUTPUTS": str(tmp_path), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    out = tmp_path / "tables" / "multigpu"
    cmd = [sys.executable, "-m", "pipeline.scaling", "--experiment", "smoke", "--router", "meteora", "--runs", "cpu:1",
           "ddp_cpu:2", "--steps", "4", "--global-batch", "4", "--warmup", "1", "--out", str(out)]
    proc = subprocess.run(cmd, check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    result = json.loads(out.with_suffix(".json").read_text())
    assert {"git_sha", "device", "versions", "date"} <= result["provenance"].keys()
    base, ddp = result["runs"]
    assert (base["run"], ddp["run"], ddp["per_device_batch"]) == ("cpu:1", "ddp_cpu:2", 2)
    assert base["steps"] == ddp["steps"] == 4 and ddp["same_global_batches"]  # same rows in every global step
    assert ddp["loss_max_rel_diff"] < 1e-2  # token means per rank (see the MeteoRA test above)
    assert all(r["tokens_per_s"] > 0 for r in (base, ddp)) and base["speedup"] == 1.0
    md = out.with_suffix(".md").read_text()
    assert "| ddp_cpu:2 | 2 | 2 |" in md and result["provenance"]["git_sha"] in md
