"""LightningModule that trains a router (MeteoRA gates or the DLP-LoRA sentence MLP) over frozen adapters.

Two objectives, one module:

* ``meteora``: the full model runs with every gate routing every token; loss = LM cross-entropy (on all tokens,
  prompt included, as MeteoRA's script does, or answers only) + ``aux_loss_coef`` x gate cross-entropy against
  the row's task id. Only the gates train (``train_loras`` also unfreezes the adapters, as the paper's script).
* ``dlp``: the sentence MLP classifies the prompt's task; cross-entropy on the task id, no LM forward.

Validation logs the loss and the router's accuracy: for dlp the task classification of the prompt (the paper
reports 98.45%), for meteora the fraction of (token, projection) gates whose top-1 is the row's task. Validation
runs with grad enabled (the Trainer gets ``inference_mode=False``) because the gates record logits only then.
"""

from __future__ import annotations

import lightning as L
import torch


class RouterTrainModule(L.LightningModule):
    """Train ``mm``'s router; ``objective`` is ``"meteora"`` or ``"dlp"``."""

    def __init__(self, mm, objective: str, lr: float, weight_decay: float = 0.0, train_loras: bool = False):
        super().__init__()
        if objective not in ("meteora", "dlp"):
            raise ValueError(f"router objective {objective!r} is not trainable; use router=meteora or router=dlp")
        if not lr > 0:
            raise ValueError(f"router.train.lr={lr} must be > 0")
        self.mm, self.objective = mm, objective
        self.lr, self.weight_decay = float(lr), float(weight_decay)
        which = ("gates+adapters" if train_loras else "gates") if objective == "meteora" else "router"
        self.trainable = mm.set_trainable(which)

    def _step(self, batch):
        if self.objective == "dlp":
            loss = self.mm.router_loss(batch["input_ids"], batch["attention_mask"], batch["task_ids"])
            return loss, {}
        with torch.enable_grad():  # the gates record their logits (for the aux loss) only with grad on
            out = self.mm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          labels=batch["labels"], task_ids=batch["task_ids"])
        parts = {k: out[k].detach() for k in ("lm_loss", "aux_loss") if out.get(k) is not None}
        accuracy = self.mm.router.gate_accuracy()
        if accuracy is not None:
            parts["router_accuracy"] = torch.tensor(accuracy, device=out.loss.device)  # NCCL reduces CUDA tensors only
        return out.loss, parts

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        from pipeline.runtime.distributed import clip_gradients

        clip_gradients(self, optimizer, gradient_clip_val, gradient_clip_algorithm)  # FSDP: the norm over all shards

    def training_step(self, batch, batch_idx):
        loss, parts = self._step(batch)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"router loss is {loss.item()} at step {self.global_step}; "
                                     f"lower router.train.lr")
        bs = batch["input_ids"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=bs, sync_dist=True)  # DDP: the global loss curve
        for k, v in parts.items():
            self.log(f"train/{k}", v, batch_size=bs, sync_dist=True)
        return loss

    def validation_step(self, batch, batch_idx):
        loss, parts = self._step(batch)
        loss = loss.detach()
        bs = batch["input_ids"].shape[0]
        self.log("val/loss", loss, prog_bar=True, batch_size=bs, sync_dist=True)  # DDP: mean over all ranks
        for k, v in parts.items():
            self.log(f"val/{k}", v, batch_size=bs, sync_dist=True)
        if self.objective == "dlp":
            pred = self.mm.router.logits(batch["input_ids"], batch["attention_mask"]).argmax(-1)
            self.log("val/router_accuracy", (pred == batch["task_ids"]).float().mean(), prog_bar=True,
                     batch_size=bs, sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.trainable, lr=self.lr, weight_decay=self.weight_decay)
