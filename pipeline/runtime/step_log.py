"""A Lightning callback that prints one line every few steps: step, loss, tokens/s, elapsed time.

Progress bars vanish in log files and CI output; these lines stay readable there, and their tokens/s (prompt
and answer tokens, i.e. what the model processed) is what sizes a run on a given machine.

A line is also a read point of ``pipeline/runtime/step_checks.py``: between lines the token count stays a running
sum on the device (adding a batch's count reads nothing back, so a GPU step never waits for the host), and at a
line the module's deferred NaN check runs first, so a run whose loss went non-finite stops there, naming the step.
"""

from __future__ import annotations

import logging
import time

import lightning as L

from pipeline.runtime.step_checks import check_module

log = logging.getLogger("loramux.train")


class StepLog(L.Callback):
    """Log ``step k/N  loss x  tokens/s y  elapsed z s`` every ``every`` optimizer steps (and at the last)."""

    def __init__(self, every: int = 5, name: str = "train"):
        self.every, self.name = max(1, int(every)), name
        self.t0 = None
        self.tokens = 0  # int, or a device tensor once a batch is counted: read at a line only

    def on_train_start(self, trainer, pl_module):
        self.t0, self.tokens = time.perf_counter(), 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if isinstance(batch, dict) and "attention_mask" in batch:
            self.tokens = self.tokens + batch["attention_mask"].sum()  # on the device: no host read
        step = trainer.global_step
        if step % self.every == 0 or step >= (trainer.max_steps or 0):
            check_module(pl_module)  # a non-finite loss since the last line stops the run here
            elapsed = time.perf_counter() - self.t0
            loss = trainer.callback_metrics.get("train/loss")
            log.info("%s step %d/%s  loss %s  %.0f tokens/s  %.0fs", self.name, step, trainer.max_steps,
                     f"{float(loss):.4f}" if loss is not None else "-", int(self.tokens) / max(elapsed, 1e-9), elapsed)
