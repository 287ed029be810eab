"""A Lightning callback that prints one line every few steps: step, loss, tokens/s, elapsed time.

Progress bars vanish in log files and CI output; these lines stay readable there, and their tokens/s (prompt
and answer tokens, i.e. what the model processed) is what sizes a run on a given machine.
"""

from __future__ import annotations

import logging
import time

import lightning as L

log = logging.getLogger("loramux.train")


class StepLog(L.Callback):
    """Log ``step k/N  loss x  tokens/s y  elapsed z s`` every ``every`` optimizer steps (and at the last)."""

    def __init__(self, every: int = 5, name: str = "train"):
        self.every, self.name = max(1, int(every)), name
        self.t0 = None
        self.tokens = 0

    def on_train_start(self, trainer, pl_module):
        self.t0, self.tokens = time.perf_counter(), 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if isinstance(batch, dict) and "attention_mask" in batch:
            self.tokens += int(batch["attention_mask"].sum())
        step = trainer.global_step
        if step % self.every == 0 or step >= (trainer.max_steps or 0):
            elapsed = time.perf_counter() - self.t0
            loss = trainer.callback_metrics.get("train/loss")
            log.info("%s step %d/%s  loss %s  %.0f tokens/s  %.0fs", self.name, step, trainer.max_steps,
                     f"{float(loss):.4f}" if loss is not None else "-", self.tokens / max(elapsed, 1e-9), elapsed)
