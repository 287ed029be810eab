"""Preemption and time-outs on SLURM: checkpoint at a step boundary, requeue, resume exactly where training was.

Why submitit's protocol (not Lightning's own SLURM auto-requeue): sweeps reach SLURM through
hydra-submitit-launcher, whose jobs are submitit jobs. SLURM sends submitit's signal (SIGUSR2, ``--signal``
``signal_delay_s`` before the time limit, or ``scancel --signal=USR2`` to preempt); submitit's handler re-pickles
the job (the launcher's ``checkpoint``: same Hydra job, same overrides, same run dir), counts time-outs against
``max_num_timeout``, requeues it with ``scontrol requeue`` and exits without a result, so the Hydra process just
keeps waiting for the requeued job. Lightning's handler (SIGUSR1) would save in the middle of a step and requeue
behind submitit's back. What neither does is save the *training* state at a safe moment, which is this file:

    resume = prepare_resume(cfg)                        # before the tracker starts: None on a first start
    callback = RequeueCheckpoint(run_dir)               # in the Trainer's callbacks
    loader = DataLoader(rows, batch_size=bs, sampler=ResumableSampler(len(rows), seed))
    trainer.fit(module, loader, ckpt_path=resume.checkpoint if resume else None)

``RequeueCheckpoint`` catches SIGUSR1/SIGUSR2 and only sets a flag; at the start of the next training batch,
when the previous step (optimizer, LR schedule, validation) is complete, it writes ``<run_dir>/checkpoints/requeue.ckpt`` (trainable weights + optimizer + loops; frozen base weights are
left out and come from the model asset again) and ``resume.json`` (checkpoint, step, wandb run id), then hands
over to submitit's handler, which requeues and exits. The requeued job finds them in the same run dir, reopens
the same wandb run (``prepare_resume``), and ``ResumableSampler`` replays the interrupted epoch's order from the first batch not yet
trained, so the resumed run ends with the same adapter as an uninterrupted one. SIGTERM (``scontrol requeue``,
SLURM preemption, scancel) makes Lightning stop after the current step; the checkpoint is saved there too, but
SLURM sends that SIGTERM to every process of the job, wandb's service included: with ``logger=wandb`` the next
metric logged fails before the step ends, so prefer the SIGUSR2 route (csv / none loggers resume either way).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import warnings
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch

from pipeline.atomic import atomic_write_text

log = logging.getLogger(__name__)
CHECKPOINT = Path("checkpoints") / "requeue.ckpt"
STATE = Path("checkpoints") / "resume.json"
SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)


@dataclass(frozen=True)
class ResumePoint:
    """Where a requeued job picks up: the Lightning checkpoint, its global step and the wandb run to reopen."""

    checkpoint: Path
    step: int
    wandb_run_id: str | None


def resume_point(run_dir) -> ResumePoint | None:
    """The checkpoint a previous incarnation of this job left in ``run_dir``, or None on a first start."""
    state, ckpt = Path(run_dir) / STATE, Path(run_dir) / CHECKPOINT
    if not (state.is_file() and ckpt.is_file()):
        return None
    info = json.loads(state.read_text())
    log.info("resuming from %s (step %s, wandb run %s)", ckpt, info["step"], info.get("wandb_run_id"))
    return ResumePoint(ckpt, int(info["step"]), info.get("wandb_run_id"))


def prepare_resume(cfg) -> ResumePoint | None:
    """``resume_point`` of the job's run dir; when there is one, point ``logger`` (wandb) at the same run id."""
    from omegaconf import open_dict

    resume = resume_point(cfg.paths.run_dir)
    if resume and resume.wandb_run_id and str(cfg.get("logger", {}).get("_target_", "")).endswith("WandbTracker"):
        with open_dict(cfg):
            cfg.logger.run_id = resume.wandb_run_id
    return resume


class ResumableSampler(torch.utils.data.Sampler):
    """Shuffled order fixed by (seed, epoch), so a resumed job can replay an epoch from any batch.

    Lightning calls ``set_epoch`` before each epoch; ``skip_next(n)`` makes the next epoch's iterator start at
    sample ``n`` of that epoch's order (the samples the interrupted job had already trained on).
    """

    def __init__(self, num_samples: int, seed: int):
        self.num_samples, self.seed, self.epoch, self.skip = int(num_samples), int(seed), 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def skip_next(self, samples: int) -> None:
        self.skip = int(samples)

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self):
        order = torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        start, self.skip = self.skip, 0
        return iter(order[start:].tolist())


class RequeueCheckpoint(L.Callback):
    """Save a resumable checkpoint at the next step boundary after SIGUSR1/2 or SIGTERM; then let submitit requeue."""

    def __init__(self, run_dir, wandb_run_id: str | None = None):
        self.run_dir = Path(run_dir)
        self.wandb_run_id = wandb_run_id
        self.requested: int | None = None  # the signal received, handled at the next batch start
        self._previous: dict[int, object] = {}

    # -- signals ---------------------------------------------------------------------------------------------
    def _on_signal(self, signum, frame) -> None:
        log.warning("received %s: checkpointing at the next step boundary", signal.Signals(signum).name)
        self.requested = signum

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit":
            return
        # before Lightning registers its own handlers: it then leaves SIGUSR1 to us (no mid-step auto-requeue)
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._on_signal)
        pl_module.strict_loading = False  # checkpoints hold only the trainable weights
        # ResumableSampler makes the loader resumable mid-epoch, which Lightning cannot see: silence its warning
        warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch")

    def teardown(self, trainer, pl_module, stage: str) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    # -- resume ----------------------------------------------------------------------------------------------
    def on_train_start(self, trainer, pl_module) -> None:
        """On a resumed fit, skip the samples of the current epoch that were trained before the interruption."""
        loader = trainer.train_dataloader
        sampler = getattr(loader, "sampler", None)
        if trainer.global_step == 0 or not isinstance(sampler, ResumableSampler):
            return
        per_epoch = len(loader)
        done_in_epoch = trainer.global_step * trainer.accumulate_grad_batches - trainer.current_epoch * per_epoch
        sampler.skip_next(done_in_epoch * int(loader.batch_size))
        log.info("resumed at step %d: epoch %d from batch %d", trainer.global_step, trainer.current_epoch,
                 done_in_epoch)

    # -- save ------------------------------------------------------------------------------------------------
    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        frozen = {name for name, p in pl_module.named_parameters() if not p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k not in frozen}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if self.requested is None:
            return
        self.save(trainer)
        signum, self.requested = self.requested, None
        previous = self._previous.get(signum)
        if callable(previous):  # submitit's handler: re-pickle the job, requeue it, exit without a result
            previous(signum, None)
        elif os.environ.get("SLURM_JOB_ID"):  # a plain sbatch job: requeue it ourselves
            job = os.environ.get("SLURM_ARRAY_JOB_ID")
            job = f"{job}_{os.environ['SLURM_ARRAY_TASK_ID']}" if job else os.environ["SLURM_JOB_ID"]
            subprocess.run(["scontrol", "requeue", job], check=False)
        raise SystemExit(f"checkpointed at step {trainer.global_step} after {signal.Signals(signum).name}")

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        """SIGTERM (``scontrol requeue``, preemption, scancel): Lightning stops after a complete step; save there."""
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        if isinstance(exception, SIGTERMException):
            self.save(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        """Training finished: the checkpoint has served; a later rerun (force=true) must start afresh."""
        for path in (self.run_dir / STATE, self.run_dir / CHECKPOINT):
            path.unlink(missing_ok=True)

    def save(self, trainer) -> Path:
        """Write requeue.ckpt (atomically: temp file + rename) and resume.json beside it."""
        ckpt = self.run_dir / CHECKPOINT
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        tmp = ckpt.with_name(f".{ckpt.name}.{os.getpid()}.tmp")
        trainer.save_checkpoint(tmp)
        os.replace(tmp, ckpt)
        run_id = self.wandb_run_id or _wandb_run_id(trainer)
        atomic_write_text(self.run_dir / STATE, json.dumps(
            {"checkpoint": str(ckpt), "step": int(trainer.global_step), "wandb_run_id": run_id}) + "\n")
        log.warning("saved %s at step %d", ckpt, trainer.global_step)
        return ckpt


def _wandb_run_id(trainer) -> str | None:
    for logger in trainer.loggers:
        if type(logger).__name__ == "WandbLogger":
            try:
                return str(logger.experiment.id)
            except Exception:  # noqa: BLE001 tracking never costs a checkpoint
                return None
    return None
