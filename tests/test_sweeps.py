"""Multirun hygiene and hyper-parameter search, with Hydra's basic launcher (no cluster needed).

Real `python -m pipeline.finetune -m` processes on the `smoke` experiment (tiny random LLaMA, real BIG-bench rows):
a sweep over two tasks gives two jobs and two adapters that the report aggregates, sweep dirs are unique to the
microsecond, and a relaunched sweep skips finished jobs (force=true reruns them). That two-task sweep runs once
(a module fixture); the relaunch test works on its own copy of it. (The Optuna sweeper: test_sweeps_optuna.py.)
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from needs_assets import needs_task_files, needs_tiny_model

ROOT = Path(__file__).resolve().parent.parent
pytestmark = needs_tiny_model
SMOKE = ["experiment=smoke", "logger=none", "print_config=false", "trainer.max_steps=2"]
STAMP = re.compile(r"^\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d_\d{6}$")


def _env(out: Path) -> dict:
    return {**os.environ, "LORAMUX_OUTPUTS": str(out), "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1"}


def _sweep(out: Path, *overrides: str, timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pipeline.finetune", "-m", *SMOKE, *overrides]
    return subprocess.run(cmd, check=False, cwd=ROOT, env=_env(out), capture_output=True, text=True,
                          timeout=timeout)


def _job_files(sweep: Path) -> dict[str, int]:
    """Job dir name -> mtime (ns) of its metrics.json."""
    return {p.parent.name: p.stat().st_mtime_ns for p in sweep.glob("*/metrics.json")}


@pytest.fixture(scope="module")
def two_task_sweep(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """`python -m pipeline.finetune -m task=object_counting,winowhy`, once: (its outputs root, the process). Tests
    read it; one that changes it works on a copy (:func:`_copy_of`)."""
    out = tmp_path_factory.mktemp("two-task-sweep")
    return out, _sweep(out, "task=object_counting,winowhy")


def _copy_of(sweep_outputs: Path, dest: Path) -> None:
    """The finished sweep's outputs root copied to ``dest``, file times kept (copy2), so the copy is that sweep."""
    shutil.copytree(sweep_outputs, dest, dirs_exist_ok=True)


@pytest.mark.slow  # real training subprocesses: tens of seconds
@needs_task_files
def test_finetune_multirun_over_two_tasks(two_task_sweep, tmp_path):
    """`python -m pipeline.finetune -m task=a,b`: two jobs, two adapters, one sweep dir, report aggregates it."""
    out, proc = two_task_sweep
    assert proc.returncode == 0, proc.stderr[-3000:]
    exp = out / "smoke"
    sweeps = list((exp / "finetune" / "multiruns").iterdir())
    assert len(sweeps) == 1
    jobs = sorted(p.parent.name for p in sweeps[0].rglob("metrics.json"))
    assert len(jobs) == 2 and jobs[0].startswith("0_") and "task=object_counting" in jobs[0]
    assert jobs[1].startswith("1_") and "task=winowhy" in jobs[1]
    for task in ("object_counting", "winowhy"):
        assert (exp / "adapters" / task / "adapter_model.safetensors").is_file()
    from pipeline.stages.report import collect_records, render_report

    _, tables = render_report(collect_records(sweeps[0]), tmp_path / "rep", "sweep")
    finetune = next(t for t in tables if t.name == "finetune")
    assert [r[0] for r in finetune.rows] == ["object_counting", "winowhy"]


@pytest.mark.slow  # real training subprocesses: tens of seconds
def test_sweeps_started_in_the_same_second_get_their_own_dirs(tmp_path):
    """Two sweeps launched at once: two dirs, named to the microsecond. (Their one job fails fast on purpose.)"""
    cmd = [sys.executable, "-m", "pipeline.finetune", "-m", *SMOKE, "task=nosuch_task"]
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=_env(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    errs = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [2, 2], errs
    dirs = sorted(p.name for p in (tmp_path / "smoke" / "finetune" / "multiruns").iterdir())
    assert len(dirs) == 2 and all(STAMP.match(d) for d in dirs), dirs


@pytest.mark.slow  # real training subprocesses: tens of seconds
@needs_task_files
def test_relaunched_sweep_skips_finished_jobs_and_force_reruns_them(two_task_sweep, tmp_path):
    first_out, first = two_task_sweep  # the first launch: `_sweep(<outputs>, "task=object_counting,winowhy")`
    assert first.returncode == 0, first.stderr[-3000:]
    _copy_of(first_out, tmp_path)  # relaunched here, outputs root tmp_path: the fixture's sweep stays as it ended
    (sweep,) = (tmp_path / "smoke" / "finetune" / "multiruns").iterdir()
    done = _job_files(sweep)
    assert sorted(done) == ["0_task=object_counting,trainer.max_steps=2", "1_task=winowhy,trainer.max_steps=2"]

    # job 1 "died": its metrics.json is gone. The relaunch trains job 1 only.
    lost = sweep / "1_task=winowhy,trainer.max_steps=2" / "metrics.json"
    lost.unlink()
    again = _sweep(tmp_path, "task=object_counting,winowhy", f"hydra.sweep.dir={sweep}")
    assert again.returncode == 0, again.stderr[-3000:]
    log = again.stdout + again.stderr
    assert log.count("skipping this job") == 1 and "0_task=object_counting" in log.split("skipping this job")[0]
    after = _job_files(sweep)
    assert after["0_task=object_counting,trainer.max_steps=2"] == done["0_task=object_counting,trainer.max_steps=2"]
    assert lost.is_file()
    assert len(list((tmp_path / "smoke" / "finetune" / "multiruns").iterdir())) == 1

    # force=true reruns a finished job, in the same job dir (force is not part of the dir name)
    forced = _sweep(tmp_path, "task=object_counting", f"hydra.sweep.dir={sweep}", "force=true")
    assert forced.returncode == 0, forced.stderr[-3000:]
    assert "skipping this job" not in forced.stdout + forced.stderr
    final = _job_files(sweep)
    assert sorted(final) == sorted(done)
    assert final["0_task=object_counting,trainer.max_steps=2"] > after["0_task=object_counting,trainer.max_steps=2"]
    assert final["1_task=winowhy,trainer.max_steps=2"] == after["1_task=winowhy,trainer.max_steps=2"]
