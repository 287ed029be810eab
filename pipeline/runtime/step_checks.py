"""What a training step checks and counts, kept on the device and read back only at a few read points.

On a GPU a step of a small model is host-bound: the host spends the step launching hundreds of kernels, and it
stays ahead only while nothing makes it wait. Reading a CUDA tensor on the host (``.item()``, ``int(t)``,
``float(t)``, ``.tolist()``, ``if t:``, ``not torch.isfinite(loss)``) is such a wait: the host stops until the GPU
has drained everything queued, so it can no longer queue step k+1 while step k runs. A step therefore only
*records* what it used to read, as device tensors:

    checks = StepChecks("training loss is {loss} at step {step}; lower optim.lr or check the task's data")
    checks.watch(loss, self.global_step)                       # in training_step: no host read
    checks.count("tokens", batch["attention_mask"].sum())      # a running device sum: no host read

and the host reads them where it has to wait anyway (one read each, however many steps passed):

    read point                                               who calls it
    a StepLog line (every ``trainer.log_every_n_steps``)     ``pipeline.runtime.step_log.StepLog``
    before a checkpoint is written                           ``pipeline.runtime.requeue.RequeueCheckpoint.save``
    the end of training (before the checkpoint is deleted    ``RequeueCheckpoint.on_train_end``
    and before the stage saves its adapter / router)

    check_module(pl_module)       # raises FloatingPointError if a watched loss was ever not finite
    checks.total("tokens")        # the exact int the old per-step ``int(mask.sum())`` summed to

``watch`` keeps, per watched value, the first step at which it was not finite and the value it had there, so the
deferred error names the same step and value as an immediate check would have: a NaN at step 3 found at step 10
still reads "... at step 3". Every checkpoint is written after a check, so no checkpoint holds weights past a
non-finite loss, and ``pipeline.runtime.requeue.fit_resumable`` still names the last good one.

One more read hides in Lightning: after every batch it turns each value logged with ``prog_bar=True`` into a
Python number (``.item()``), whether or not a progress bar is shown. A step therefore puts its loss on the bar
only when there is one (``self.log(..., prog_bar=progress_bar_shown(self))``); a run without a bar
(``trainer.enable_progress_bar=false``, as the GPU experiments set it) reads nothing back per step. Two reads per
step remained outside this repo: AdamW's step counters (``.item()`` on CPU tensors: no wait for the GPU) and
transformers' check whether the attention mask has padding before building the causal mask (a GPU wait). The
training stages avoid the second: their rows are right-padded, so they run the model without the mask
(``MultiLoRAModel.forward(right_padded=True)``; finetune's peft model gets no mask), which changes no real token's
output.

A module opts in by holding its ``StepChecks`` as ``step_checks`` (``check_module`` looks for that attribute).
The message is a ``str.format`` template with ``{step}``, ``{loss}`` (the first non-finite value) and ``{names}``
(the watched entries that went non-finite at that step, comma-separated: a joint run's tasks).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class StepChecks:
    """Device-side finiteness watch and running counts of a training run; see the module docstring.

    ``names`` labels the entries of a watched vector (``watch(losses [T], step)``: one name per task); a scalar
    loss needs none."""

    def __init__(self, message: str, names: Sequence[str] | None = None):
        self.message = message
        self.names = list(names) if names is not None else None
        self._first_step: torch.Tensor | None = None  # per entry: first step with a non-finite value, -1 none yet
        self._first_value: torch.Tensor | None = None  # per entry: the value it had at that step
        self._sums: dict[str, torch.Tensor | int | list] = {}

    # -- in the step: device ops only ------------------------------------------------------------------------------
    def watch(self, loss: torch.Tensor, step: int) -> None:
        """Record whether ``loss`` (a scalar, or one value per name) is finite at ``step``; no host read."""
        loss = loss.detach()
        if self._first_step is None:
            self._first_step = torch.full_like(loss, -1, dtype=torch.long)
            self._first_value = torch.zeros_like(loss, dtype=torch.float32)
        new = ~torch.isfinite(loss) & (self._first_step < 0)
        self._first_step.masked_fill_(new, int(step))  # a Python int: a kernel argument, nothing read back
        self._first_value = torch.where(new, loss.float(), self._first_value)

    def count(self, key: str, value: torch.Tensor) -> None:
        """Add ``value`` (an integer tensor, a scalar or one entry per name) to the running sum ``key``; no host
        read. A float tensor of whole numbers (token counts) is added as int64, so the sum stays exact."""
        value = value.detach()
        if value.is_floating_point():
            value = value.long()
        prev = self._sums.get(key)
        if prev is None:
            self._sums[key] = value
        elif isinstance(prev, torch.Tensor):
            self._sums[key] = prev.to(value.device) + value  # .to: a resumed total starts on the CPU, once
        else:
            self._sums[key] = torch.as_tensor(prev, dtype=torch.long).to(value.device) + value

    # -- at a read point: host reads -------------------------------------------------------------------------------
    def total(self, key: str, default=0):
        """The running sum ``key`` as Python int(s) (one host read); ``default`` before anything was counted."""
        value = self._sums.get(key, default)
        return value.tolist() if isinstance(value, torch.Tensor) else value

    def set_total(self, key: str, value) -> None:
        """Start the sum ``key`` at ``value`` (int or list of ints): a run resumed from a checkpoint counts on."""
        self._sums[key] = value

    def first_non_finite(self) -> tuple[int, float, list[str]] | None:
        """``(step, value, names)`` of the first step whose watched loss was not finite, or None (one host read)."""
        if self._first_step is None:
            return None
        steps = self._first_step.reshape(-1).tolist()
        bad = [i for i, s in enumerate(steps) if s >= 0]
        if not bad:
            return None
        step = min(steps[i] for i in bad)
        at = [i for i in bad if steps[i] == step]
        values = self._first_value.reshape(-1).tolist()
        names = [self.names[i] for i in at] if self.names is not None else []
        return step, values[at[0]], names

    def raise_if_not_finite(self) -> None:
        """Raise ``FloatingPointError(message)`` naming the first step whose loss was not finite, if there was one."""
        found = self.first_non_finite()
        if found is not None:
            step, value, names = found
            raise FloatingPointError(self.message.format(step=step, loss=value, names=", ".join(names)))


def check_module(pl_module) -> None:
    """The read point of a LightningModule that holds a ``StepChecks`` as ``step_checks``: raise its deferred
    ``FloatingPointError``, if any; a module without one passes."""
    checks = getattr(pl_module, "step_checks", None)
    if checks is not None:
        checks.raise_if_not_finite()


def progress_bar_shown(pl_module) -> bool:
    """True when ``pl_module``'s trainer shows a progress bar: the only case in which a training step's value is
    worth logging with ``prog_bar=True`` (Lightning reads every such value back to the host after every batch)."""
    try:
        return pl_module.trainer.progress_bar_callback is not None
    except RuntimeError:  # not attached to a Trainer (a step called on its own): nothing to show it on
        return False
