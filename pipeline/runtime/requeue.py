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

A SIGKILL (OOM killer, a node dying, ``kill -9``) runs no handler, so the same checkpoint is also written every
``checkpoint.every_n_steps`` optimizer steps (``RequeueCheckpoint(run_dir, every_n_steps=N)``). A restart with the
same config in the same run dir (a relaunched sweep into its sweep dir, a ``reproduce`` step, or a single run
with ``hydra.run.dir=<its run dir>``) resumes from the last one and ends like an uninterrupted run: the checkpoint
also holds the RNG states (dropout) and the epoch's sample position. ``resume.json`` is written after the
checkpoint and records its size, sha256 and the run's config; a restart with another config is refused (one
line naming the keys that differ) and a truncated checkpoint is refused (one line naming the file).
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import subprocess
import warnings
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import OmegaConf, open_dict

from common.atomic import atomic_write_text, atomic_write_with, file_digest
from pipeline.runtime.distributed import shard, shard_size
from pipeline.runtime.step_checks import check_module

log = logging.getLogger(__name__)
CHECKPOINT = Path("checkpoints") / "requeue.ckpt"
STATE = Path("checkpoints") / "resume.json"
SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)


# keys of the composed config that do not change what training computes: a restart may differ in them
NOT_TRAINING = ("hydra", "paths", "logger", "launcher", "hparams_search", "print_config", "force", "checkpoint",
                "trainer.enable_progress_bar", "trainer.log_every_n_steps", "trainer.default_root_dir",
                "trainer.enable_model_summary", "data.num_workers", "generation", "bench", "plan", "composite_rows")


@dataclass(frozen=True)
class ResumePoint:
    """Where a restarted job picks up: the Lightning checkpoint, its global step and the wandb run to reopen."""

    checkpoint: Path
    step: int
    wandb_run_id: str | None


def training_config(cfg) -> dict:
    """The config as flat ``{dotted key: value}``, without the keys that do not change what training computes."""
    plain = OmegaConf.to_container(cfg, resolve=False) if not isinstance(cfg, dict) else cfg
    flat: dict = {}

    def walk(node, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        else:
            key = prefix[:-1]
            if not any(key == n or key.startswith(n + ".") for n in NOT_TRAINING):
                flat[key] = node if isinstance(node, (int, float, str, bool, type(None))) else json.dumps(node)

    walk(plain, "")
    return flat


def _differences(saved: dict, now: dict) -> list[str]:
    keys = sorted(set(saved) | set(now))
    return [f"{k}: {saved.get(k, '<unset>')!r} -> {now.get(k, '<unset>')!r}" for k in keys if saved.get(k) != now.get(k)]


def resume_point(run_dir, config: dict | None = None) -> ResumePoint | None:
    """The checkpoint a previous incarnation of this job left in ``run_dir``, or None on a first start.

    ``config`` (from :func:`training_config`) must equal the one the checkpoint was written with; a checkpoint
    that is truncated or unreadable is refused. Both are one ValueError line naming the fix.
    """
    state, ckpt = Path(run_dir) / STATE, Path(run_dir) / CHECKPOINT
    if not ckpt.is_file():
        if state.is_file():
            log.warning("%s names a checkpoint that is gone; starting afresh", state)
        return None
    try:
        info = json.loads(state.read_text()) if state.is_file() else {}
    except json.JSONDecodeError:
        info = {}
    if config is not None and "config" in info and info["config"] != config:
        diff = _differences(info["config"], config)
        raise ValueError(f"{ckpt} was written by a run with another config ({'; '.join(diff[:3])}); rerun with the "
                         f"same overrides to resume, or delete {ckpt.parent} to start afresh")
    digest = file_digest(ckpt)
    if (digest["bytes"], digest["sha256"]) != (info.get("bytes"), info.get("sha256")):
        # resume.json is written after the checkpoint: a kill between the two renames leaves an older record
        # beside a complete newer checkpoint. A complete checkpoint loads; a truncated or damaged one does not.
        try:
            step = int(torch.load(ckpt, map_location="cpu", weights_only=False, mmap=True)["global_step"])
        except Exception as e:  # noqa: BLE001 torch raises many types for a broken zip
            raise ValueError(f"checkpoint {ckpt} is truncated or damaged ({type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''}); delete {ckpt.parent} to start "
                             f"afresh") from None
        info = {**info, "step": step}
    log.warning("resuming from %s (step %s, wandb run %s)", ckpt, info["step"], info.get("wandb_run_id"))
    return ResumePoint(ckpt, int(info["step"]), info.get("wandb_run_id"))


def prepare_resume(cfg) -> ResumePoint | None:
    """``resume_point`` of the job's run dir; when there is one, point ``logger`` (wandb) at the same run id."""
    resume = resume_point(cfg.paths.run_dir, training_config(cfg))
    if resume and resume.wandb_run_id and str(cfg.get("logger", {}).get("_target_", "")).endswith("WandbTracker"):
        with open_dict(cfg):
            cfg.logger.run_id = resume.wandb_run_id
    return resume


def _rng_states() -> dict:
    """torch / python / numpy (and CUDA) RNG states as tensors and plain types (Lightning loads weights_only)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    states = {"torch": torch.get_rng_state(), "python": random.getstate(),
              "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class ResumableSampler(torch.utils.data.distributed.DistributedSampler):
    """Shuffled order fixed by (seed, epoch), so a resumed job can replay an epoch from any batch.

    Lightning calls ``set_epoch`` before each epoch; ``skip_next(n)`` makes the next epoch's iterator start at
    sample ``n`` of that epoch's order (the samples the interrupted job had already trained on).
    Under DDP each rank iterates its shard of the same order (``pipeline.runtime.distributed.shard``: every N-th sample),
    so the global batch of a step is the one-process batch; being a ``DistributedSampler``, Lightning uses it
    as it is (it would otherwise wrap it and shuffle the order a second time). ``skip_next`` counts this rank's
    samples then.
    """

    def __init__(self, num_samples: int, seed: int):
        self.num_samples, self.seed, self.epoch, self.skip = int(num_samples), int(seed), 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def skip_next(self, samples: int) -> None:
        self.skip = int(samples)

    def __len__(self) -> int:
        return shard_size(self.num_samples)

    def __iter__(self):
        order = torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        start, self.skip = self.skip, 0
        return iter(shard(order.tolist())[start:])


class RequeueCheckpoint(L.Callback):
    """Save a resumable checkpoint every ``every_n_steps`` steps (0: never) and at the next step boundary after
    SIGUSR1/2 or SIGTERM (then let submitit requeue). ``config``: :func:`training_config`, recorded for restarts."""

    def __init__(self, run_dir, wandb_run_id: str | None = None, every_n_steps: int = 0, config: dict | None = None):
        self.run_dir = Path(run_dir)
        self.wandb_run_id = wandb_run_id
        self.every_n_steps = max(0, int(every_n_steps))
        self.config = config
        self.requested: int | None = None  # the signal received, handled at the next batch start
        self.saved_step: int | None = None  # global step of the last checkpoint written or resumed from
        self._rng: dict | None = None  # RNG states of a resumed checkpoint, applied at the first batch
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
        if trainer.global_step == 0:
            return
        per_epoch = len(loader)
        done_in_epoch = trainer.global_step * trainer.accumulate_grad_batches - trainer.current_epoch * per_epoch
        if isinstance(sampler, ResumableSampler):
            sampler.skip_next(done_in_epoch * int(loader.batch_size))
        elif hasattr(loader, "resume_at"):  # a loader that places itself (stages/joint_batches.py)
            loader.resume_at(done_in_epoch)
        else:
            return
        self.saved_step = trainer.global_step
        log.info("resumed at step %d: epoch %d from batch %d", trainer.global_step, trainer.current_epoch,
                 done_in_epoch)

    def state_dict(self) -> dict:
        """Saved in the checkpoint: the RNG states at the step boundary (dropout draws the same after a resume)."""
        return {"rng": _rng_states()}

    def load_state_dict(self, state_dict: dict) -> None:
        self._rng = state_dict.get("rng")

    # -- save ------------------------------------------------------------------------------------------------
    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        frozen = {name for name, p in pl_module.named_parameters() if not p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k not in frozen}
        # Saved at a batch start, when Lightning has already counted the new batch as "ready". Record the
        # boundary as Lightning's own end-of-batch checkpoints do (every counter = batches completed): otherwise
        # the resumed loop counts one batch too many and validates one step early.
        progress = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_loop.batch_progress", {})
        for part in ("total", "current"):
            if isinstance(progress.get(part), dict) and "completed" in progress[part]:
                done = progress[part]["completed"]
                progress[part].update(ready=done, started=done, processed=done)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if self._rng is not None:  # a resumed fit: continue the random streams where the checkpoint left them
            _set_rng_states(self._rng)
            self._rng = None
        step = trainer.global_step
        if (self.requested is None and self.every_n_steps and step > 0 and step % self.every_n_steps == 0
                and step != self.saved_step):
            self.save(trainer, periodic=True)
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
        if isinstance(exception, SIGTERMException):
            self.save(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        """Training finished: the checkpoint has served; a later rerun (force=true) must start afresh. Unless a
        loss went non-finite since the last read point (``pipeline/runtime/step_checks.py``): that raises here,
        before the checkpoint is deleted, so the last good one is kept."""
        check_module(pl_module)
        for path in (self.run_dir / STATE, self.run_dir / CHECKPOINT):
            path.unlink(missing_ok=True)

    def save(self, trainer, periodic: bool = False) -> Path:
        """Write requeue.ckpt (atomically: temp file + rename), then resume.json (step, size, sha256, config).
        First the module's deferred NaN check (``pipeline/runtime/step_checks.py``): a checkpoint never holds
        weights trained past a non-finite loss, so the one kept is the last good one."""
        check_module(trainer.lightning_module)
        ckpt = self.run_dir / CHECKPOINT
        if trainer.world_size > 1:  # every rank takes part in save_checkpoint; rank 0 writes
            trainer.save_checkpoint(ckpt.with_name(f".{ckpt.name}.ddp.tmp"))
            if trainer.is_global_zero:
                os.replace(ckpt.with_name(f".{ckpt.name}.ddp.tmp"), ckpt)
        else:
            atomic_write_with(ckpt, trainer.save_checkpoint)
        self.saved_step = int(trainer.global_step)
        if trainer.is_global_zero:
            run_id = self.wandb_run_id or _wandb_run_id(trainer)
            record = {"checkpoint": str(ckpt), "step": self.saved_step, "wandb_run_id": run_id, **file_digest(ckpt)}
            if self.config is not None:
                record["config"] = self.config
            atomic_write_text(self.run_dir / STATE, json.dumps(record) + "\n")
            if periodic:
                log.info("periodic checkpoint (step %d) written: %s", trainer.global_step, ckpt)
            else:
                log.warning("saved %s at step %d", ckpt, trainer.global_step)
        return ckpt


def fit_resumable(trainer, module, train_dl, val_dl, resume: ResumePoint | None, callback: RequeueCheckpoint) -> None:
    """``trainer.fit`` from ``resume`` (or from scratch); a NaN/inf loss (``FloatingPointError``, raised at a read
    point of the module's ``step_checks``: a log line, a checkpoint, the end of training) ends it with one line that
    names the step and the last good checkpoint, kept. SIGTERM (``timeout``, ``kill``, scancel, preemption) ends it
    with exit status 1 and one line naming the checkpoint ``RequeueCheckpoint.on_exception`` wrote, never 0."""
    try:
        trainer.fit(module, train_dataloaders=train_dl, val_dataloaders=val_dl,
                    ckpt_path=str(resume.checkpoint) if resume else None)
    except FloatingPointError as e:
        kept = (f"last good checkpoint: step {callback.saved_step}, kept in {callback.run_dir / CHECKPOINT.parent}"
                if callback.saved_step else "no checkpoint was written before it (checkpoint.every_n_steps)")
        raise FloatingPointError(f"{e} ({kept})") from None
    except SIGTERMException:  # Lightning's is a SystemExit with no code: a stopped run would exit 0, as if done
        raise SystemExit(f"stopped by SIGTERM after step {trainer.global_step}, checkpointed in "
                         f"{callback.run_dir / CHECKPOINT.parent}: the same command resumes it") from None


def _wandb_run_id(trainer) -> str | None:
    for logger in trainer.loggers:
        if type(logger).__name__ == "WandbLogger":
            try:
                return str(logger.experiment.id)
            except Exception:  # noqa: BLE001 tracking never costs a checkpoint
                return None
    return None
