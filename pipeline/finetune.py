"""Stage ``finetune``: train one PEFT LoRA adapter per task (or the mixed LoRA-B adapter).

    python -m pipeline.finetune experiment=demo task=arithmetic
    python -m pipeline.finetune -m experiment=demo task=arithmetic,object_counting,lora_b   # a sweep
    python -m pipeline.finetune experiment=demo task=all     # every task adapter of `tasks` in one run (joint)

``task=all`` is joint fine-tuning (``pipeline/joint_finetune.py``): one process, one base model, every task's
adapter trained through the fused op on its own rows, each ending as its separate run would (dropout 0); it
writes the same per-task PEFT dirs. Everything below describes one adapter's run and holds for each of them.

The adapter (r, alpha, dropout, target modules: ``adapter=meteora|dlp``) is trained with answer-only loss for
``trainer.max_steps`` steps at ``optim.lr``; validation loss is logged every ``trainer.val_check_interval``
steps and once at the end (the run's main metric, for sweepers). The result is a standard PEFT directory
(``adapter_config.json`` + ``adapter_model.safetensors``) written atomically twice: ``<run_dir>/adapter`` and
``${paths.adapters_dir}/<task>``, the shared dir that ``route`` and ``evaluate`` read; ``loramux.json`` beside
the weights records their size and sha256.

Crashes: a resumable checkpoint is written every ``checkpoint.every_n_steps`` steps (and on SLURM's preemption
signal); started again in the same run dir with the same config, the run resumes from it and ends with the
adapter an uninterrupted run gives (``pipeline/requeue.py``). A NaN/inf loss stops the run with one line naming
the step and the last checkpoint, which is kept.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from pipeline.atomic import atomic_dir
from pipeline.entry import CONF_DIR, cli, user_errors
from pipeline.stage import StageRun
from pipeline.train_speed import apply_train_speed

log = logging.getLogger(__name__)


def _loaders(cfg: DictConfig, tokenizer):
    from torch.utils.data import DataLoader

    from pipeline.answer_batches import AnswerOnlyCollator, encode_pair
    from pipeline.requeue import ResumableSampler
    from pipeline.task_rows import rows_for

    d, task, tasks = cfg.data, str(cfg.task), list(cfg.tasks)
    enc = lambda rows: [encode_pair(tokenizer, r["prompt"], r["answer"], int(d.max_length), bool(d.append_eos))
                        for r in rows]
    train = enc(rows_for(task, tasks, d.train_split, d, int(cfg.seed), d.train_limit))
    val = enc(rows_for(task, tasks, d.val_split, d, int(cfg.seed), d.val_limit))
    if not train:
        raise ValueError(f"task {task!r} has no training rows in split {d.train_split!r}; pick another task")
    collate = AnswerOnlyCollator(tokenizer.pad_token_id)
    bs = int(cfg.optim.batch_size)
    sampler = ResumableSampler(len(train), int(cfg.seed))  # shuffled; a requeued job replays it exactly
    train_dl = DataLoader(train, batch_size=bs, sampler=sampler, collate_fn=collate, num_workers=int(d.num_workers))
    val_dl = DataLoader(val, batch_size=bs, shuffle=False, collate_fn=collate) if val else None
    return train_dl, val_dl, len(train), len(val)


def save_adapter(peft_model, dest, meta: dict) -> Path:
    """``save_pretrained`` into ``dest`` atomically, with ``loramux.json`` (task, base model, training facts and
    the size + sha256 of ``adapter_model.safetensors``)."""
    from pipeline.atomic import file_digest
    from pipeline.distributed import is_global_zero

    if not is_global_zero():  # DDP: every rank holds the same adapter; rank 0 writes it
        return Path(dest)
    with atomic_dir(dest) as tmp:
        peft_model.save_pretrained(tmp)
        weights = Path(tmp) / "adapter_model.safetensors"
        files = {weights.name: file_digest(weights)} if weights.is_file() else {}
        (Path(tmp) / "loramux.json").write_text(json.dumps({**meta, "files": files}, indent=2) + "\n")
    return Path(dest)


def verify_adapter(adapter_dir) -> Path:
    """Check the weights of an adapter saved by :func:`save_adapter` against the size and sha256 in its
    ``loramux.json``; a truncated, damaged or swapped file is one ValueError line. Dirs without the record pass."""
    from pipeline.atomic import file_digest

    d = Path(adapter_dir)
    try:
        files = json.loads((d / "loramux.json").read_text()).get("files") or {}
    except (OSError, ValueError, AttributeError):
        return d
    for name, want in files.items():
        if not (d / name).is_file():
            continue  # the bank names a missing file itself
        got = {"bytes": (d / name).stat().st_size}
        if got["bytes"] == want.get("bytes"):
            got = file_digest(d / name)
        if got != {k: want.get(k) for k in got}:
            what = "size" if "sha256" not in got else "sha256"
            raise ValueError(f"adapter {d}: {name}: {what} does not match loramux.json (truncated, damaged or replaced "
                             f"after training); retrain it with the finetune stage, or delete loramux.json if these "
                             f"weights are intended")
    return d


def check_training_config(cfg: DictConfig) -> int:
    """One-line errors for settings no LoRA fine-tune can run with; returns ``trainer.max_steps``."""
    steps = int(cfg.trainer.max_steps)
    if steps <= 0:
        raise ValueError(f"trainer.max_steps={steps} must be > 0")
    if int(cfg.adapter.r) <= 0:
        raise ValueError(f"adapter.r={cfg.adapter.r} must be > 0")
    return steps


def finetune(cfg: DictConfig) -> float | None:
    """Train the adapter of ``cfg.task``; write it, metrics.json; return the final validation loss."""
    from hydra.utils import instantiate

    from pipeline.distributed import sum_over_ranks
    from pipeline.lora_finetune import LoRAFinetuneModule
    from pipeline.lora_init import init_lora
    from pipeline.requeue import RequeueCheckpoint, fit_resumable, prepare_resume, training_config
    from pipeline.rerun import previous_result

    if (done := previous_result(cfg)) is not None:  # a relaunched sweep's finished job
        return done.value
    if cfg.get("task") in (None, ""):
        raise ValueError(f"finetune needs task=<name> (one of {list(cfg.tasks)} or lora_b, or all: every task in "
                         f"one run); sweep them with -m task=a,b")
    if str(cfg.task) == "all":
        from pipeline.joint_finetune import joint_finetune

        return joint_finetune(cfg)
    steps = check_training_config(cfg)
    task = str(cfg.task)
    resume = prepare_resume(cfg)  # a requeued SLURM job: its checkpoint and wandb run id (pipeline/requeue.py)
    with StageRun(cfg) as run:
        model, tokenizer = instantiate(cfg.model)
        train_dl, val_dl, n_train, n_val = _loaders(cfg, tokenizer)
        peft_model = init_lora(model, instantiate(cfg.adapter), int(cfg.seed))  # the joint run's init too
        trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
        speed = apply_train_speed(cfg, model)  # GPU: compiled decoder layers, frozen weights in bf16
        module = LoRAFinetuneModule(peft_model, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay,
                                    warmup_steps=cfg.optim.warmup_steps, total_steps=steps)
        from pipeline.step_log import StepLog

        every = int(cfg.get("checkpoint", {}).get("every_n_steps", 0) or 0)
        requeue = RequeueCheckpoint(run.run_dir, every_n_steps=every, config=training_config(cfg))
        trainer_kw = {"logger": run.tracker.lightning,
                      "callbacks": [StepLog(int(cfg.trainer.log_every_n_steps), f"finetune {task}"), requeue]}
        if val_dl is None:
            trainer_kw.update(limit_val_batches=0)
        elif int(cfg.trainer.val_check_interval) > steps:
            trainer_kw.update(val_check_interval=steps)
        trainer = instantiate(cfg.trainer, **trainer_kw)
        peft_model.train()
        t0, cpu0 = time.perf_counter(), time.process_time()
        fit_resumable(trainer, module, train_dl, val_dl, resume, requeue)
        seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - cpu0
        train_loss = trainer.callback_metrics.get("train/loss")
        val_loss = None
        if val_dl is not None:  # the in-fit validation ran at the last step when the interval divides the steps
            if trainer.global_step % int(trainer.val_check_interval) == 0 and "val/loss" in trainer.callback_metrics:
                val_loss = float(trainer.callback_metrics["val/loss"])
            else:
                val_loss = float(trainer.validate(module, dataloaders=val_dl, verbose=False)[0]["val/loss"])
        meta = {"task": task, "tasks": list(cfg.tasks) if task == "lora_b" else [task],
                "base_model": str(cfg.model.name_or_path), "steps": int(trainer.global_step),
                "val_loss": val_loss, "adapter": OmegaConf.to_container(cfg.adapter, resolve=True)}
        save_adapter(peft_model, run.run_dir / "adapter", meta)
        shared = save_adapter(peft_model, Path(str(cfg.paths.adapters_dir)) / task, meta)
        log.info("finetune: adapter for %s saved to %s", task, shared)
        metrics = {"val_loss": val_loss, "train_loss": float(train_loss) if train_loss is not None else None,
                   "steps": int(trainer.global_step), "train_rows": n_train, "val_rows": n_val,
                   "trainable_params": trainable, "train_seconds": round(seconds, 3),
                   "train_cpu_seconds": round(cpu_seconds, 3),  # every thread of this process: robust to a busy host
                   "tokens": int(sum_over_ranks(module.tokens)),  # prompt + answer, no padding; DDP: all ranks
                   "tokens_per_s": round(sum_over_ranks(module.tokens) / max(seconds, 1e-9), 2),
                   "answer_tokens": int(sum_over_ranks(module.answer_tokens))}
        return run.finish(tasks=[task], strategy="peft", metrics=metrics, main_metric="val_loss",
                          extra={"adapter_dir": str(shared), "train_speed": speed})


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="finetune")
def main(cfg: DictConfig) -> float | None:
    with user_errors():
        return finetune(cfg)


if __name__ == "__main__":
    cli(main)
