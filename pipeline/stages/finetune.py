"""Stage ``finetune``: train one PEFT LoRA adapter per task (or the mixed LoRA-B adapter).

    python -m pipeline.finetune experiment=demo task=arithmetic
    python -m pipeline.finetune -m experiment=demo task=arithmetic,object_counting,lora_b   # a sweep
    python -m pipeline.finetune experiment=demo task=all     # every task adapter of `tasks` in one run (joint)

``task=all`` is joint fine-tuning (``pipeline/stages/joint_finetune.py``): one process, one base model, every task's
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
adapter an uninterrupted run gives (``pipeline/runtime/requeue.py``). A NaN/inf loss stops the run with one line naming
the step and the last checkpoint, which is kept. The step does not read the loss back to check it (a GPU would
wait for it): ``pipeline/runtime/step_checks.py`` notes it on the device, and the run stops at the next log line,
checkpoint or the end of training, whichever comes first, before any adapter is saved.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from data.task_rows import JOINT_TASK, LORA_B
from pipeline.runtime.adapter_dirs import save_adapter
from pipeline.runtime.distributed import clip_gradients, sum_over_ranks
from pipeline.runtime.entry import CONF_DIR, cli, user_errors
from pipeline.runtime.requeue import fit_resumable, prepare_resume
from pipeline.runtime.rerun import previous_result
from pipeline.runtime.settings import check_settings
from pipeline.runtime.stage import StageRun
from pipeline.runtime.step_checks import StepChecks, progress_bar_shown
from pipeline.runtime.train_speed import apply_train_speed
from pipeline.stages.joint_finetune import joint_finetune
from pipeline.stages.lora_training import adamw_with_schedule, init_lora, lora_trainer, task_loaders

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
        # the NaN stop and the token counts, kept on the device: a step reads nothing back (step_checks.py)
        self.step_checks = StepChecks("training loss is {loss} at step {step}; lower optim.lr or check the task's data")

    @property
    def tokens(self) -> int:
        """Tokens the model processed (prompt + answer, no padding); a host read."""
        return self.step_checks.total("tokens")

    @property
    def answer_tokens(self) -> int:
        """Tokens that carry loss; a host read."""
        return self.step_checks.total("answer_tokens")

    def forward(self, **batch):
        return self.model(**batch)

    def _loss(self, batch) -> torch.Tensor:
        # the rows are right-padded (AnswerOnlyCollator) and their labels -100 past each row's end: causal attention
        # never shows a real token a pad, so the model runs without the mask (the same loss) and transformers'
        # mask code reads nothing back to the host (its "any padding?" check is a GPU wait every step)
        return self.model(input_ids=batch["input_ids"], labels=batch["labels"],
                          use_cache=False).loss  # training needs no KV cache

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        clip_gradients(self, optimizer, gradient_clip_val, gradient_clip_algorithm)  # FSDP: the norm over all shards

    def training_step(self, batch, batch_idx):
        loss = self._loss(batch)
        self.step_checks.watch(loss, self.global_step)  # raised at the next read point, naming this step
        self.step_checks.count("answer_tokens", (batch["labels"] != -100).sum())
        self.step_checks.count("tokens", batch["attention_mask"].sum())
        self.log("train/loss", loss, prog_bar=progress_bar_shown(self), batch_size=batch["input_ids"].shape[0],
                 sync_dist=True)
        return loss

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["token_counts"] = {"answer_tokens": self.answer_tokens, "tokens": self.tokens}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """A resumed run counts on from the checkpoint, so its metrics equal an uninterrupted run's."""
        counts = checkpoint.get("token_counts", {})
        for key in ("answer_tokens", "tokens"):
            self.step_checks.set_total(key, int(counts.get(key, 0)))

    def validation_step(self, batch, batch_idx):
        loss = self._loss(batch)
        self.log("val/loss", loss, prog_bar=True, on_epoch=True, batch_size=batch["input_ids"].shape[0],
                 sync_dist=True)  # DDP: the mean over every rank's share of the val set
        return loss

    def configure_optimizers(self):
        return adamw_with_schedule([p for p in self.model.parameters() if p.requires_grad], self.lr,
                                   self.weight_decay, self.warmup_steps, self.total_steps)


def finetune(cfg: DictConfig) -> float | None:
    """Train the adapter of ``cfg.task`` (every task's with ``task=all``); write it, metrics.json; return the final
    validation loss (``task=all``: the mean over tasks)."""
    if (done := previous_result(cfg)) is not None:  # a relaunched sweep's finished job
        return done.value
    if cfg.task in (None, ""):
        raise ValueError(f"finetune needs task=<name> (one of {list(cfg.tasks)} or {LORA_B}, or {JOINT_TASK}: every "
                         f"task in one run); sweep them with -m task=a,b")
    if str(cfg.task) == JOINT_TASK:
        return joint_finetune(cfg)  # its own checks of `tasks` first, then check_settings
    check_settings(cfg)  # every value in range, the task known, the model there: before any model loads
    steps = int(cfg.trainer.max_steps)
    task = str(cfg.task)
    resume = prepare_resume(cfg)  # a requeued SLURM job: its checkpoint and wandb run id (pipeline/runtime/requeue.py)
    with StageRun(cfg) as run:
        model, tokenizer = instantiate(cfg.model)
        train_dl, val_dl, n_train, n_val = task_loaders(cfg, tokenizer)
        peft_model = init_lora(model, instantiate(cfg.adapter), int(cfg.seed))  # the joint run's init too
        trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
        speed = apply_train_speed(cfg, model)  # GPU: compiled decoder layers, frozen weights in bf16
        module = LoRAFinetuneModule(peft_model, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay,
                                    warmup_steps=cfg.optim.warmup_steps, total_steps=steps)
        trainer, requeue = lora_trainer(cfg, run, steps, f"finetune {task}", validate=val_dl is not None)
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
    with user_errors(cfg):
        return finetune(cfg)


if __name__ == "__main__":
    cli(main)
