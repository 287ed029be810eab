"""`launcher=slurm` sweeps on a real SLURM cluster: the one-node cluster of scripts/slurm_localhost.sh.

The sweep is submitted as a job array by hydra-submitit-launcher; the jobs run the finetune stage of the `smoke`
experiment (tiny random LLaMA, real BIG-bench rows, 2 steps, 1 CPU each so both run at once on 2 cores). Checked:
both array tasks COMPLETED in SLURM's own records, both adapters written, each job's validation loss returned
to the Hydra process, the sweep aggregated by the `report` stage, and a job that fails inside the cluster fails
the sweep with its own error. Skipped (with the reason) when no cluster answers `sinfo`; `make test` starts one.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from needs_assets import needs_task_files, needs_tiny_model

ROOT = Path(__file__).resolve().parent.parent
SLURM_DIR = Path(os.environ.get("LORAMUX_SLURM_DIR", "/tmp/loramux-slurm"))
SLURM = ["launcher=slurm", "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=2", "hydra.launcher.timeout_min=10"]
SMOKE = ["experiment=smoke", "logger=none", "print_config=false", "trainer.max_steps=2"]
TASKS = ("object_counting", "winowhy")


def slurm_env(out: Path | None = None) -> dict:
    """Environment that reaches the local cluster: SLURM_CONF, and its sacct (see scripts/slurm_localhost.sh)."""
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    if (SLURM_DIR / "slurm.conf").is_file():
        env.setdefault("SLURM_CONF", str(SLURM_DIR / "slurm.conf"))
        env["PATH"] = f"{SLURM_DIR / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    if out is not None:
        env["LORAMUX_OUTPUTS"] = str(out)
    return env


def _cluster_problem() -> str | None:
    if shutil.which("sinfo") is None:
        return "no SLURM client (sinfo) on PATH; start the local cluster: scripts/slurm_localhost.sh"
    try:
        proc = subprocess.run(["sinfo", "-h", "-o", "%T"], check=False, env=slurm_env(), capture_output=True,
                              text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return "sinfo timed out; start the local cluster: scripts/slurm_localhost.sh"
    if proc.returncode != 0 or not proc.stdout.strip():
        return f"no SLURM cluster answers sinfo ({proc.stderr.strip()[:200]}); start one: scripts/slurm_localhost.sh"
    return None


pytestmark = [
    pytest.mark.slurm,
    needs_tiny_model,
]


@pytest.fixture(scope="module")
def cluster():
    problem = _cluster_problem()
    if problem:
        pytest.skip(problem)
    return slurm_env()


# Runs a Hydra multirun exactly like `python -m pipeline.finetune -m ...` and prints what the launcher handed back
# to this (the Hydra) process: one return value per job.
MULTIRUN = """
import json, sys
from hydra._internal.hydra import Hydra
from hydra._internal.utils import create_config_search_path
from pipeline.runtime.entry import CONF_DIR
from pipeline.stages.finetune import main
hydra = Hydra.create_main_hydra2(task_name="finetune", config_search_path=create_config_search_path(CONF_DIR))
batches = hydra.multirun(config_name="finetune", task_function=main, overrides=sys.argv[1:])
print("RETURNS=" + json.dumps([[r.return_value for r in batch] for batch in batches]))
"""


def array_states(job_id: str, env: dict, n: int, timeout: float = 60.0) -> dict[str, str]:
    """``{<array id>_<task>: state}`` from SLURM's job-completion records (`sacct -c`), once all n are there."""
    states: dict[str, str] = {}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = Path(SLURM_DIR / "jobcomp.log").read_text().splitlines()
        for line in lines:
            f = dict(kv.split("=", 1) for kv in line.split() if "=" in kv)
            if f.get("ArrayJobId") == job_id:
                states[f"{job_id}_{f['ArrayTaskId']}"] = f["JobState"]
        if len(states) >= n:
            break
        time.sleep(0.5)
    raw = subprocess.run(["sacct", "-c", "-n", "-P", "-o", "JobID,State", "-j", job_id], check=False, env=env,
                         capture_output=True, text=True).stdout
    assert "COMPLETED" in raw or not states, raw  # sacct -c reads the same records
    return states


def _array_id(sweep: Path) -> str:
    """The sweep's SLURM array id: submitit keeps one folder per array task, <array id>_<task>."""
    (array_id,) = {p.name.split("_")[0] for p in (sweep / ".submitit").glob("[0-9]*_*") if p.is_dir()}
    return array_id


@needs_task_files
def test_finetune_sweep_of_two_tasks_on_slurm(cluster, tmp_path):
    overrides = [*SMOKE, *SLURM, f"task={','.join(TASKS)}"]
    proc = subprocess.run([sys.executable, "-c", MULTIRUN, *overrides], check=False, cwd=ROOT,
                          env=slurm_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (sweep,) = (tmp_path / "smoke" / "finetune" / "multiruns").iterdir()

    # SLURM ran both array tasks to COMPLETED.
    array_id = _array_id(sweep)
    assert array_states(array_id, cluster, 2) == {f"{array_id}_0": "COMPLETED", f"{array_id}_1": "COMPLETED"}

    # Each job wrote its metrics.json and adapter; the Hydra process got each job's validation loss back.
    records = {}
    for i, task in enumerate(TASKS):
        (job,) = sweep.glob(f"{i}_*task={task}*")
        records[task] = json.loads((job / "metrics.json").read_text())
        assert (tmp_path / "smoke" / "adapters" / task / "adapter_model.safetensors").is_file()
        assert (job / "adapter" / "adapter_config.json").is_file()
    returns = json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("RETURNS="))[8:])
    assert returns == [[records[t]["metrics"]["val_loss"] for t in TASKS]]
    assert all(isinstance(v, float) and v > 0 for v in returns[0])

    # The report stage aggregates the sweep into the finetune table.
    rep = subprocess.run([sys.executable, "-m", "pipeline.report", "experiment=smoke", "logger=none",
                          f"source_dir={sweep}", f"out_dir={tmp_path / 'report'}"], check=False, cwd=ROOT,
                         env=slurm_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert rep.returncode == 0, rep.stderr[-3000:]
    table = (tmp_path / "report" / "tables" / "finetune.csv").read_text().splitlines()
    assert [row.split(",")[0] for row in table[1:]] == list(TASKS)


def test_a_failing_job_fails_the_sweep_with_its_error(cluster, tmp_path):
    """`task=nosuch_task` composes fine and fails only inside the SLURM job: the sweep ends with that error."""
    cmd = [sys.executable, "-m", "pipeline.finetune", "-m", *SMOKE, *SLURM, "task=nosuch_task"]
    proc = subprocess.run(cmd, check=False, cwd=ROOT, env=slurm_env(tmp_path), capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode != 0
    assert "nosuch_task" in proc.stderr and "unknown task" in proc.stderr, proc.stderr[-3000:]
    # It is the job's own error, raised on the cluster (its SLURM log holds the one-line message) and handed back.
    (sweep,) = (tmp_path / "smoke" / "finetune" / "multiruns").iterdir()
    (job_log,) = (sweep / ".submitit").glob("[0-9]*/*_log.err")
    assert "error: unknown task 'nosuch_task'" in job_log.read_text()


def _wait_for(path_glob, root: Path, text: str, timeout: float) -> Path:
    """The first file under ``root`` matching ``path_glob`` that contains ``text`` (polls; fails on timeout)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for path in root.glob(path_glob):
            if text in path.read_text(errors="replace"):
                return path
        time.sleep(0.1)
    raise AssertionError(f"no {path_glob} under {root} contains {text!r} after {timeout:.0f}s")


def _start_requeued_now(job: str, env: dict, timeout: float = 90.0) -> None:
    """SLURM holds a requeued job back ~2 minutes (its begin time); on this test cluster let it start at once."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T %r"], check=False, env=env,
                               capture_output=True, text=True).stdout.split()
        if state[:2] == ["PENDING", "BeginTime"]:
            subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=False, env=env)
            return
        time.sleep(0.5)


@pytest.mark.slow
@needs_task_files
def test_preempted_job_checkpoints_requeues_and_ends_with_the_same_adapter(cluster, tmp_path):
    """SIGUSR2 (submitit's preemption / time-limit signal) mid-training: the job saves a checkpoint, submitit
    requeues it, it resumes in the same run dir with the same wandb run, and its adapter equals the adapter of the
    same job run without interruption (the sweep's other job, `+replica=reference`)."""
    from safetensors.torch import load_file

    steps = 40
    cmd = [sys.executable, "-m", "pipeline.finetune", "-m", "experiment=smoke", "task=object_counting",
           "logger=wandb", "print_config=false", f"trainer.max_steps={steps}", "trainer.val_check_interval=10",
           *SLURM, "hydra.launcher.max_num_timeout=1", "+replica=interrupted,reference"]
    sweep_proc = subprocess.Popen(cmd, cwd=ROOT, env=slurm_env(tmp_path), stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True)
    try:
        multiruns = tmp_path / "smoke" / "finetune" / "multiruns"
        log = _wait_for("*/.submitit/*_0/*_0_0_log.*", multiruns, "step 4/", timeout=180)
        job = log.parent.name  # <array id>_0: the interrupted replica
        subprocess.run(["scancel", "--signal=USR2", job], check=True, env=cluster)
        _start_requeued_now(job, cluster)
        out, _ = sweep_proc.communicate(timeout=300)
    finally:
        if sweep_proc.poll() is None:
            sweep_proc.kill()
    assert sweep_proc.returncode == 0, out[-4000:]

    (sweep,) = multiruns.iterdir()
    (interrupted,) = sweep.glob("0_*replica=interrupted*")
    (reference,) = sweep.glob("1_*replica=reference*")
    job_log = "".join(p.read_text(errors="replace") for p in log.parent.glob("*_log.*"))
    saved = [int(s.split("at step ")[1].split()[0]) for s in job_log.splitlines() if "requeue.ckpt at step" in s]
    assert len(saved) == 1 and 4 <= saved[0] < steps, job_log[-3000:]
    assert f"(step {saved[0]}, wandb run " in job_log  # the requeued incarnation resumed from it

    for run in (interrupted, reference):
        assert json.loads((run / "metrics.json").read_text())["metrics"]["steps"] == steps
    a = load_file(interrupted / "adapter" / "adapter_model.safetensors")
    b = load_file(reference / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    assert not (interrupted / "checkpoints" / "requeue.ckpt").exists()  # cleaned up once training finished

    # both incarnations logged to one wandb run: two offline run dirs with the same run id
    runs = sorted(p.name for p in (interrupted / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and len({r.rsplit("-", 1)[1] for r in runs}) == 1, runs
