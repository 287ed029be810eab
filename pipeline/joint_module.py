"""LightningModule that trains every task adapter of a MultiLoRAModel at once, each row through its own adapter.

The model is a ``models.MultiLoRAModel`` with the ``oracle`` router and ``set_trainable("adapters")``: the
AdapterBank's stacked A [L, d_in, R] / B [L, R, d_out] of every wrapped projection are the trained parameters, and
batch row i adds only the delta of adapter ``task_ids[i]``. Adapter t is trained exactly as its separate run
(``pipeline.lora_finetune.LoRAFinetuneModule`` over a peft model) trains it, piece by piece:

    loss       sum over tasks of each task's own mean answer-token cross-entropy. Adapter t's parameters touch
               only task t's rows, so d loss / d adapter_t = d (task t's mean CE) / d adapter_t: its separate
               run's gradient. (The mean over tasks would scale every gradient by 1/T.)
    clipping   per adapter: ``trainer.gradient_clip_val`` bounds the norm of adapter t's gradient (its slices
               A[t], B[t] over every projection), as the separate run's clip_grad_norm_ bounds its LoRA params'
    optimizer  AdamW, LR schedule and weight decay act per element (``adamw_with_schedule``, shared), so a
               stacked tensor steps each adapter's slice as the adapter's own tensors would be stepped
    padding    the bank pads ranks to R (a multiple of 16); the op ignores columns >= r, so they get exactly
               zero gradient, AdamW moves a zero with zero gradient by exactly zero, and they stay zero

Only answer positions are pushed through the LM head: a forward hook on the decoder keeps its last hidden state,
the HF forward computes one position's logits (``logits_to_keep=1``), and the head runs on the rows/positions
that carry a label. The same per-token CE as the HF loss, without the [B, S, vocab] logits (the head is a fifth
of a small model's FLOPs, and the joint batch holds every task's rows).

Validation: each task's own val loader (``dataloader_idx`` = the task's position among those with val rows),
loss = the mean over its batches weighted by rows (what Lightning logs for the separate run's ``val/loss``),
logged as ``val/<task>/loss``; ``val/loss`` = the mean over tasks. A NaN/inf training loss raises
``FloatingPointError`` naming the step and the tasks (``pipeline.requeue.fit_resumable`` makes it one line).
"""

from __future__ import annotations

import math

import lightning as L
import torch
import torch.nn.functional as F

from pipeline.lora_finetune import adamw_with_schedule


def head_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """The HF causal LM's logits for ``hidden`` states (its output embeddings, then Gemma's final soft-capping
    where the config sets one), as its own forward computes them."""
    logits = model.get_output_embeddings()(hidden)
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def per_task_answer_ce(model, hidden, labels, task_ids, num_tasks: int):
    """Each task's mean next-token CE over its answer tokens: ``(losses [num_tasks], answer tokens [num_tasks])``.

    Position j of a row predicts token j+1; positions whose next label is -100 (prompt, padding) are skipped
    before the head. A task without answer tokens in the batch gets NaN (its separate run's loss would be too).
    """
    keep = labels[:, 1:] != -100  # [B, S-1]
    targets = labels[:, 1:][keep]
    logits = head_logits(model, hidden[:, :-1][keep])
    ce = F.cross_entropy(logits.float(), targets, reduction="none")
    row_task = task_ids[:, None].expand_as(keep)[keep]
    sums = torch.zeros(num_tasks, dtype=ce.dtype, device=ce.device).index_add(0, row_task, ce)
    counts = torch.zeros(num_tasks, dtype=ce.dtype, device=ce.device).index_add(0, row_task, torch.ones_like(ce))
    return sums / counts, counts


def clip_per_adapter(bank, max_norm: float) -> torch.Tensor:
    """Scale adapter a's gradient (A[a], B[a] of every projection) by min(1, max_norm / (||g_a|| + 1e-6)), as
    ``torch.nn.utils.clip_grad_norm_`` scales one adapter's own parameters; returns the norms [L] before."""
    grads = [p.grad for s in bank.slots.values() for p in (s.A, s.B) if p.grad is not None]
    if not grads:
        return torch.zeros(0)
    norms = torch.stack([torch.linalg.vector_norm(g.flatten(1), dim=1) for g in grads])  # [tensors, L]
    total = torch.linalg.vector_norm(norms, dim=0)  # [L]
    coef = (float(max_norm) / (total + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(coef.to(g.dtype).view(-1, *([1] * (g.dim() - 1))))
    return total


class JointFinetuneModule(L.LightningModule):
    """Train the adapters of ``mm`` (one per name in ``tasks``, bank order) on their tasks' answer tokens."""

    def __init__(self, mm, tasks, lr: float, weight_decay: float = 0.0, warmup_steps: int = 0,
                 total_steps: int = 100, val_tasks=None):
        super().__init__()
        if not lr > 0:
            raise ValueError(f"optim.lr={lr} must be > 0; set e.g. optim.lr=2e-4")
        if list(mm.adapter_names) != list(tasks):
            raise ValueError(f"the bank's adapters {mm.adapter_names} must be the tasks {list(tasks)}, in order")
        self.mm = mm
        self.tasks = list(tasks)
        self.val_tasks = list(self.tasks if val_tasks is None else val_tasks)  # tasks with a val loader, in order
        self.lr, self.weight_decay = float(lr), float(weight_decay)
        self.warmup_steps, self.total_steps = int(warmup_steps), max(1, int(total_steps))
        self.tokens = 0  # tokens processed (prompt + answer, no padding), all tasks
        self.answer_tokens = [0] * len(self.tasks)  # tokens that carry loss, per task
        self.train_losses: dict[str, float] = {}  # each task's loss at the last training step
        self.val_losses: dict[str, float] = {}  # each task's loss at the last validation
        self.val_step = -1  # global step of that validation
        self._val_sums = None
        self._hidden = None
        self._hook = mm.model.get_decoder().register_forward_hook(self._keep_hidden)

    def _keep_hidden(self, module, args, output):
        self._hidden = output[0] if isinstance(output, tuple) else output.last_hidden_state

    def task_losses(self, batch):
        """``(losses [T], answer tokens [T])`` of a batch whose rows carry ``task_ids`` (bank indices)."""
        self._hidden = None
        self.mm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], task_ids=batch["task_ids"],
                logits_to_keep=1, use_cache=False)  # training needs no KV cache
        hidden, self._hidden = self._hidden, None
        return per_task_answer_ce(self.mm.model, hidden, batch["labels"], batch["task_ids"], len(self.tasks))

    def training_step(self, batch, batch_idx):
        losses, counts = self.task_losses(batch)
        bad = [t for t, v in zip(self.tasks, losses.tolist(), strict=True) if not math.isfinite(v)]
        if bad:
            raise FloatingPointError(f"training loss is not finite at step {self.global_step} for task(s) "
                                     f"{', '.join(bad)}; lower optim.lr or check those tasks' data")
        self.tokens += int(batch["attention_mask"].sum())
        for i, n in enumerate(counts.tolist()):
            self.answer_tokens[i] += int(n)
        self.train_losses = dict(zip(self.tasks, losses.tolist(), strict=True))
        rows = batch["input_ids"].shape[0]
        self.log("train/loss", losses.mean(), prog_bar=True, batch_size=rows, sync_dist=True)
        for t, v in zip(self.tasks, losses, strict=True):
            self.log(f"train/{t}/loss", v, batch_size=rows, sync_dist=True)
        return losses.sum()

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        if not gradient_clip_val:
            return
        if gradient_clip_algorithm in (None, "norm"):
            clip_per_adapter(self.mm.bank, float(gradient_clip_val))
        else:  # "value": element-wise, the same for a stacked tensor as for the adapters' own
            self.clip_gradients(optimizer, gradient_clip_val=gradient_clip_val,
                                gradient_clip_algorithm=gradient_clip_algorithm)

    def on_validation_epoch_start(self) -> None:
        self._val_sums = torch.zeros(len(self.val_tasks), 2, dtype=torch.float64, device=self.device)

    def validation_step(self, batch, batch_idx, dataloader_idx: int = 0):
        t = self.tasks.index(self.val_tasks[dataloader_idx])
        batch = {**batch, "task_ids": torch.full((batch["input_ids"].shape[0],), t, dtype=torch.long,
                                                 device=batch["input_ids"].device)}
        losses, _ = self.task_losses(batch)
        rows = batch["input_ids"].shape[0]
        self._val_sums[dataloader_idx, 0] += losses[t].double() * rows
        self._val_sums[dataloader_idx, 1] += rows
        return losses[t]

    def on_validation_epoch_end(self) -> None:
        sums = self.trainer.strategy.reduce(self._val_sums, reduce_op="sum")  # DDP: every rank's share
        means = (sums[:, 0] / sums[:, 1]).tolist()
        self.val_losses = {t: v for t, v, n in zip(self.val_tasks, means, sums[:, 1].tolist(), strict=True) if n}
        self.val_step = self.global_step
        for t, v in self.val_losses.items():  # the same on every rank already: sync_dist only averages equals
            self.log(f"val/{t}/loss", v, sync_dist=True)
        if self.val_losses:
            self.log("val/loss", sum(self.val_losses.values()) / len(self.val_losses), prog_bar=True, sync_dist=True)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["token_counts"] = {"answer_tokens": list(self.answer_tokens), "tokens": self.tokens}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """A resumed run counts on from the checkpoint, so its metrics equal an uninterrupted run's."""
        counts = checkpoint.get("token_counts", {})
        self.tokens = int(counts.get("tokens", 0))
        self.answer_tokens = [int(n) for n in counts.get("answer_tokens", [0] * len(self.tasks))]

    def configure_optimizers(self):
        params = [p for p in self.mm.parameters() if p.requires_grad]
        return adamw_with_schedule(params, self.lr, self.weight_decay, self.warmup_steps, self.total_steps)
