"""What both modes of the finetune stage share, so that a joint run's adapter equals its separate run's step for
step: peft's init drawn from a seeded RNG, one task's loaders, AdamW with the LR schedule.

    peft_model = init_lora(model, LoraConfig(...), seed=cfg.seed)        # the separate run (task=<t>)
    dirs = initial_adapters(model, LoraConfig(...), seed, tasks, tmp)     # the joint run (task=all): one PEFT dir each
    train_dl, val_dl, n_train, n_val = task_loaders(cfg, tokenizer)      # cfg.task's rows, as both modes draw them
    adamw_with_schedule(params, lr, weight_decay, warmup_steps, total_steps)    # both LightningModules' optimizer
    trainer, requeue = lora_trainer(cfg, run, steps, label, validate)     # both modes' Lightning trainer

peft initialises ``lora_A`` with kaiming-uniform draws from torch's global RNG (``lora_B`` is zero) while it
injects the layers in model order, so an adapter's start depends on the RNG state at that moment. Loading the
base model, reading data and building samplers may all consume that RNG, and they differ between a separate
run (one task) and a joint run (every task). Seeding right before ``get_peft_model`` makes every adapter of an
experiment start from the same draws whichever mode trains it (``pipeline/stages/joint_finetune.py`` relies on
it). Every adapter of an experiment starts from the same init (seed ``cfg.seed``); they diverge through their data.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from peft import get_peft_model
from torch.utils.data import DataLoader

from data.batches import AnswerOnlyCollator, encode_pairs
from data.task_rows import rows_for
from pipeline.runtime.requeue import RequeueCheckpoint, ResumableSampler, training_config
from pipeline.runtime.step_log import StepLog


def init_lora(model, lora_config, seed: int):
    """``peft.get_peft_model(model, lora_config)`` with torch's RNG (every device's) seeded to ``seed`` just before."""
    torch.manual_seed(int(seed))  # seeds every device's default generator
    return get_peft_model(model, lora_config)


def initial_adapters(model, lora_config, seed: int, names, out_dir) -> dict[str, Path]:
    """Save the initial adapter of every name in ``names`` (each exactly :func:`init_lora`'s) as a PEFT dir
    ``out_dir/<name>`` and return ``{name: dir}``; ``model`` is left as it was (peft's layers unloaded)."""
    dirs = {}
    for name in names:
        peft_model = init_lora(model, lora_config, seed)
        dirs[name] = Path(out_dir) / str(name)
        peft_model.save_pretrained(str(dirs[name]))
        model = peft_model.unload()  # the original nn.Linear modules back, no LoRA left in the model
    return dirs


def task_loaders(cfg: DictConfig, tokenizer):
    """``(train loader, val loader or None, train rows, val rows)`` of ``cfg.task`` (or the LoRA-B mix): the train
    loader shuffles with a ``ResumableSampler`` seeded by ``cfg.seed``, so a requeued job (and a joint run) replays
    exactly the batches of an uninterrupted separate run."""
    d, task, tasks = cfg.data, str(cfg.task), list(cfg.tasks)
    enc = lambda rows: encode_pairs(tokenizer, [r["prompt"] for r in rows], [r["answer"] for r in rows],
                                    int(d.max_length), bool(d.append_eos))
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


def adamw_with_schedule(params, lr: float, weight_decay: float, warmup_steps: int, total_steps: int) -> dict:
    """AdamW over ``params`` and the LR schedule of every LoRA fine-tune (separate or joint): linear warm-up over
    ``warmup_steps``, then cosine decay to 10% of ``lr`` at ``total_steps``; Lightning's optimizer config."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, warmup_steps, total_steps))
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def lr_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """The LR multiplier at optimizer step ``step`` (0-based): linear warm-up over ``warmup_steps``, then cosine
    decay to 0.1 at ``total_steps``."""
    warmup_steps, total_steps = int(warmup_steps), max(1, int(total_steps))
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def lora_trainer(cfg: DictConfig, run, steps: int, label: str, validate: bool):
    """``(trainer, requeue)``: ``cfg.trainer`` with the step log (``label`` names the run in it) and the resumable
    checkpoint every ``checkpoint.every_n_steps``; without validation data no validation loop, and validation
    at least once, at the last step, when ``trainer.val_check_interval`` exceeds ``steps``."""
    requeue = RequeueCheckpoint(run.run_dir, every_n_steps=int(cfg.checkpoint.every_n_steps),
                                config=training_config(cfg))
    kw = {"logger": run.tracker.lightning, "callbacks": [StepLog(int(cfg.trainer.log_every_n_steps), label), requeue]}
    if not validate:
        kw.update(limit_val_batches=0)
    elif int(cfg.trainer.val_check_interval) > steps:
        kw.update(val_check_interval=steps)
    return instantiate(cfg.trainer, **kw), requeue
