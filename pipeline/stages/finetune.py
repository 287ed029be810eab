"""Stage ``finetune``: train one PEFT LoRA adapter per task (or the mixed LoRA-B adapter).

    python -m pipeline.finetune experiment=demo task=arithmetic
    python -m pipeline.finetune -m experiment=demo task=arithmetic,object_counting,lora_b   # a sweep

The adapter (r, alpha, dropout, target modules: ``adapter=meteora|dlp``) is trained with answer-only loss for
``trainer.max_steps`` steps at ``optim.lr``; validation loss is logged every ``trainer.val_check_interval``
steps and once at the end (the run's main metric, for sweepers). The result is a standard PEFT directory
(``adapter_config.json`` + ``adapter_model.safetensors``) written atomically twice: ``<run_dir>/adapter`` and
``${paths.adapters_dir}/<task>``, the shared dir that ``route`` and ``evaluate`` read; ``loramux.json`` beside
the weights records their size and sha256.

Crashes: a resumable checkpoint is written every ``checkpoint.every_n_steps`` steps (and on SLURM's preemption
signal); started again in the same run dir with the same config, the run resumes from it and ends with the
adapter an uninterrupted run gives (``pipeline/runtime/requeue.py``). A NaN/inf loss stops the run with one line naming
the step and the last checkpoint, which is kept.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import hydra
import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from pipeline.runtime.adapter_dirs import save_adapter
from pipeline.runtime.entry import CONF_DIR, cli, user_errors
from pipeline.runtime.settings import check_settings
from pipeline.runtime.stage import StageRun
from pipeline.runtime.train_speed import apply_train_speed

log = logging.getLogger(__name__)


class LoRAFinetuneModule(L.LightningModule):
    """Train the trainable (LoRA) parameters of ``model`` on answer tokens; log train/val loss.

    The wrapped model is a ``peft.PeftModel`` whose base weights are frozen, so the optimizer sees only the LoRA A/B
    matrices. Labels come from ``AnswerOnlyCollator`` (-100 on prompt and padding), so the HF model's own shifted
    cross-entropy is exactly the loss on answer tokens. LR: linear warm-up, then cosine decay to 10%.
    """

    def __init__(self, model, lr: float, weight_decay: float = 0.0, warmup_steps: int = 0,
                 total_steps: int = 100):
        super().__init__()
        if not lr > 0:
            raise ValueError(f"optim.lr={lr} must be > 0; set e.g. optim.lr=2e-4")
        self.model = model
        self.lr, self.weight_decay = float(lr), float(weight_decay)
        self.warmup_steps, self.total_steps = int(warmup_steps), max(1, int(total_steps))
        self.answer_tokens = 0  # tokens that carry loss
        self.tokens = 0  # tokens the model processed (prompt + answer)

    def forward(self, **batch):
        return self.model(**batch)

    def _loss(self, batch) -> torch.Tensor:
        return self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          labels=batch["labels"], use_cache=False).loss  # training needs no KV cache

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        from pipeline.runtime.distributed import clip_gradients

        clip_gradients(self, optimizer, gradient_clip_val, gradient_clip_algorithm)  # FSDP: the norm over all shards

    def training_step(self, batch, batch_idx):
        loss = self._loss(batch)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"training loss is {loss.item()} at step {self.global_step}; "
                                     f"lower optim.lr or check the task's data")
        self.answer_tokens += int((batch["labels"] != -100).sum())
        self.tokens += int(batch["attention_mask"].sum())
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0], sync_dist=True)
        return loss

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["token_counts"] = {"answer_tokens": self.answer_tokens, "tokens": self.tokens}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """A resumed run counts on from the checkpoint, so its metrics equal an uninterrupted run's."""
        counts = checkpoint.get("token_counts", {})
        self.answer_tokens, self.tokens = int(counts.get("answer_tokens", 0)), int(counts.get("tokens", 0))

    def validation_step(self, batch, batch_idx):
        loss = self._loss(batch)
        self.log("val/loss", loss, prog_bar=True, on_epoch=True, batch_size=batch["input_ids"].shape[0],
                 sync_dist=True)  # DDP: the mean over every rank's share of the val set
        return loss

    def configure_optimizers(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)

        def schedule(step: int) -> float:
            if step < self.warmup_steps:
                return (step + 1) / (self.warmup_steps + 1)
            progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def _loaders(cfg: DictConfig, tokenizer):
    from torch.utils.data import DataLoader

    from data.batches import AnswerOnlyCollator, encode_pair
    from data.task_rows import rows_for
    from pipeline.runtime.requeue import ResumableSampler

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


def finetune(cfg: DictConfig) -> float | None:
    """Train the adapter of ``cfg.task``; write it, metrics.json; return the final validation loss."""
    from hydra.utils import instantiate
    from peft import get_peft_model

    from pipeline.runtime.distributed import sum_over_ranks
    from pipeline.runtime.requeue import RequeueCheckpoint, fit_resumable, prepare_resume, training_config
    from pipeline.runtime.rerun import previous_result

    if (done := previous_result(cfg)) is not None:  # a relaunched sweep's finished job
        return done.value
    if cfg.task in (None, ""):
        raise ValueError(f"finetune needs task=<name> (one of {list(cfg.tasks)} or lora_b); "
                         f"sweep them with -m task=a,b")
    check_settings(cfg)  # every value in range, the task known, the model there: before any model loads
    steps = int(cfg.trainer.max_steps)
    task = str(cfg.task)
    resume = prepare_resume(cfg)  # a requeued SLURM job: its checkpoint and wandb run id (pipeline/runtime/requeue.py)
    with StageRun(cfg) as run:
        model, tokenizer = instantiate(cfg.model)
        train_dl, val_dl, n_train, n_val = _loaders(cfg, tokenizer)
        peft_model = get_peft_model(model, instantiate(cfg.adapter))
        trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
        speed = apply_train_speed(cfg, model)  # GPU: compiled decoder layers, frozen weights in bf16
        module = LoRAFinetuneModule(peft_model, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay,
                                    warmup_steps=cfg.optim.warmup_steps, total_steps=steps)
        from pipeline.runtime.step_log import StepLog

        requeue = RequeueCheckpoint(run.run_dir, every_n_steps=int(cfg.checkpoint.every_n_steps),
                                    config=training_config(cfg))
        trainer_kw = {"logger": run.tracker.lightning,
                      "callbacks": [StepLog(int(cfg.trainer.log_every_n_steps), f"finetune {task}"), requeue]}
        if val_dl is None:
            trainer_kw.update(limit_val_batches=0)
        elif int(cfg.trainer.val_check_interval) > steps:
            trainer_kw.update(val_check_interval=steps)
        trainer = instantiate(cfg.trainer, **trainer_kw)
        peft_model.train()
        t0 = time.perf_counter()
        fit_resumable(trainer, module, train_dl, val_dl, resume, requeue)
        seconds = time.perf_counter() - t0
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
                   "tokens_per_s": round(sum_over_ranks(module.tokens) / max(seconds, 1e-9), 2),  # DDP: all ranks
                   "answer_tokens": int(sum_over_ranks(module.answer_tokens))}
        return run.finish(tasks=[task], strategy="peft", metrics=metrics, main_metric="val_loss",
                          extra={"adapter_dir": str(shared), "train_speed": speed})


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="finetune")
def main(cfg: DictConfig) -> float | None:
    with user_errors(cfg):
        return finetune(cfg)


if __name__ == "__main__":
    cli(main)
