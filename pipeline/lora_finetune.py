"""LightningModule that trains one PEFT LoRA adapter with answer-only cross-entropy.

The wrapped model is a ``peft.PeftModel`` whose base weights are frozen, so the optimizer sees only the
LoRA A/B matrices. Labels come from ``AnswerOnlyCollator`` (-100 on prompt and padding), so the HF model's own
shifted cross-entropy is exactly the loss on answer tokens. LR: linear warm-up, then cosine decay to 10%.
"""

from __future__ import annotations

import math

import lightning as L
import torch


class LoRAFinetuneModule(L.LightningModule):
    """Train the trainable (LoRA) parameters of ``model`` on answer tokens; log train/val loss."""

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
        from pipeline.distributed import clip_gradients

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
        return adamw_with_schedule([p for p in self.model.parameters() if p.requires_grad], self.lr,
                                   self.weight_decay, self.warmup_steps, self.total_steps)


def adamw_with_schedule(params, lr: float, weight_decay: float, warmup_steps: int, total_steps: int) -> dict:
    """AdamW over ``params`` and the LR schedule of every LoRA fine-tune (separate or joint): linear warm-up over
    ``warmup_steps``, then cosine decay to 10% of ``lr`` at ``total_steps``; Lightning's optimizer config."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    warmup_steps, total_steps = int(warmup_steps), max(1, int(total_steps))

    def schedule(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
