"""The joint run's training batches: step i = step i's batch of every task's own loader, stacked row-wise.

A separate ``finetune`` run of task t draws its batches from its own ``DataLoader`` (``ResumableSampler``
seeded with ``cfg.seed``, reshuffled per epoch by ``set_epoch`` as Lightning does at every epoch start). The joint
run keeps one such loader per task and replays each exactly: ``TaskStream`` walks a loader epoch after epoch
(a task with fewer rows simply starts its next epoch sooner), and ``JointBatches`` concatenates the tasks' batches
of one step into one batch:

    rows      task 0's rows, then task 1's, ...          task_ids [B] names each row's task (its adapter)
    width     the widest task batch; shorter ones are right-padded (pad id, attention_mask 0, label -100)

Right padding never changes a real token's computation: positions stay 0..n-1, the causal mask already hides
later positions, and padded positions carry no loss. So every real token sees what it saw in its separate run.

One Lightning epoch is the whole run (``len`` = the run's batches), so ``resume_at(k)`` (a requeued job resuming
after k batches, called by ``pipeline.runtime.requeue.RequeueCheckpoint``) can place every task's stream at its
own epoch and batch: epoch ``k // len(loader)``, skipping ``k % len(loader)`` batches through the sampler.
"""

from __future__ import annotations

import torch

from pipeline.runtime.requeue import ResumableSampler


class TaskStream:
    """Batches of one task's loader, epoch after epoch, from batch ``start`` of the whole sequence."""

    def __init__(self, loader, start: int = 0):
        self.loader = loader
        self.per_epoch = len(loader)
        if self.per_epoch == 0:
            raise ValueError("a task's training loader is empty; every task of a joint run needs training rows")
        self.epoch, skip = divmod(int(start), self.per_epoch)
        self._it = self._open(skip)

    def _open(self, skip_batches: int):
        sampler = self.loader.sampler
        if isinstance(sampler, ResumableSampler):
            sampler.set_epoch(self.epoch)
            if skip_batches:
                sampler.skip_next(skip_batches * int(self.loader.batch_size))
        elif skip_batches:
            raise ValueError("resuming a joint run needs every task loader to use "
                             "pipeline.runtime.requeue.ResumableSampler")
        return iter(self.loader)

    def __next__(self) -> dict:
        try:
            return next(self._it)
        except StopIteration:
            self.epoch += 1
            self._it = self._open(0)
            return next(self._it)


def pad_concat(batches: list[dict], pad_id: int) -> dict:
    """Stack the ``AnswerOnlyCollator`` batches of several tasks (right-padded to the widest) and add
    ``task_ids`` [B]: the index in ``batches`` of each row's task."""
    width = max(b["input_ids"].shape[1] for b in batches)
    fill = {"input_ids": int(pad_id), "attention_mask": 0, "labels": -100}
    out = {k: torch.cat([torch.nn.functional.pad(b[k], (0, width - b[k].shape[1]), value=v) for b in batches])
           for k, v in fill.items()}
    out["task_ids"] = torch.cat([torch.full((b["input_ids"].shape[0],), i, dtype=torch.long)
                                 for i, b in enumerate(batches)])
    return out


class JointBatches:
    """``batches`` joint batches: batch k = ``pad_concat`` of batch k of every loader in ``loaders``."""

    def __init__(self, loaders: list, pad_id: int, batches: int):
        self.loaders, self.pad_id, self.batches = list(loaders), int(pad_id), int(batches)
        self.start = 0

    def __len__(self) -> int:
        return self.batches

    def resume_at(self, batches_done: int) -> None:
        """The next iteration starts after ``batches_done`` batches (a resumed run)."""
        self.start = int(batches_done)

    def __iter__(self):
        start, self.start = self.start, 0
        streams = [TaskStream(dl, start) for dl in self.loaders]
        for _ in range(start, self.batches):
            yield pad_concat([next(s) for s in streams], self.pad_id)
