"""Joint fine-tuning: one ``finetune`` run trains every task adapter of an experiment over one base model.

    python -m pipeline.finetune experiment=meteora_tasks task=all      # 28 adapters, one process, one model

``task=all`` trains one adapter per entry of ``tasks`` (LoRA-B, the mixed adapter, stays its own run:
``task=lora_b``). The base model is loaded once and wrapped as a ``models.MultiLoRAModel`` whose AdapterBank holds
every task's adapter; the ``oracle`` router sends each batch row through its own task's adapter in the fused op,
and ``set_trainable("adapters")`` makes the bank's stacked A/B the trained parameters (``JointFinetuneModule``
below). Each step trains every adapter on the batch its separate run would draw at that step
(``pipeline/stages/joint_batches.py``), so with ``lora_dropout=0`` a joint run ends with the adapters of the
separate runs (up to float rounding: tests/test_joint_finetune.py checks 1e-5 on every saved tensor). With
dropout > 0 the dropout masks differ from peft's (``models/lora_input_dropout.py``): the same training in
distribution.

How adapter t matches its separate run (``pipeline.stages.finetune.LoRAFinetuneModule`` over a peft model), piece
by piece (the shared pieces are ``pipeline/stages/lora_training.py``'s):

    init       the same seeded peft init (``init_lora`` / ``initial_adapters``)
    batches    the same batches: each task keeps its own seeded loader (``task_loaders``), replayed step for step
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
``FloatingPointError`` naming the step and the tasks (``pipeline.runtime.requeue.fit_resumable`` makes it one line),
at the next log line, checkpoint or the end of training: the step itself reads nothing back to the host
(``pipeline/runtime/step_checks.py``).

Its outputs are the separate runs' outputs, per task:

    ${paths.adapters_dir}/<task>       standard PEFT dir (adapter_config.json, adapter_model.safetensors, loramux.json)
    <run_dir>/adapters/<task>          the same, beside the run
    <run_dir>/metrics.json             one record: per-task val/train loss (``<task>/val_loss``...), their means,
                                       one row per adapter (the report's adapter table), joint tokens/s

written by peft's own ``save_pretrained`` (each adapter loaded into a peft model of the unwrapped base) through
``pipeline.runtime.adapter_dirs.save_adapter``. Checkpoints, requeue and the NaN stop are the separate run's
(``pipeline/runtime/requeue.py``): a restart resumes every task's loader at its own epoch and batch.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from peft import get_peft_model, set_peft_model_state_dict

from data.task_rows import JOINT_TASK, LORA_B
from models import MultiLoRAModel
from models.lora_input_dropout import add_lora_input_dropout
from pipeline.runtime.adapter_dirs import save_adapter
from pipeline.runtime.distributed import sum_over_ranks
from pipeline.runtime.requeue import fit_resumable, prepare_resume
from pipeline.runtime.settings import check_settings
from pipeline.runtime.stage import StageRun
from pipeline.runtime.step_checks import StepChecks, progress_bar_shown
from pipeline.runtime.train_speed import apply_train_speed
from pipeline.stages.joint_batches import JointBatches
from pipeline.stages.lora_training import adamw_with_schedule, initial_adapters, lora_trainer, task_loaders

log = logging.getLogger(__name__)


def joint_tasks(cfg: DictConfig) -> list[str]:
    """The adapters a ``task=all`` run trains: ``cfg.tasks`` (each once; lora_b is not one of them)."""
    tasks = [str(t) for t in cfg.tasks]
    if not tasks:
        raise ValueError("task=all trains one adapter per entry of `tasks`, which is empty; pick an experiment "
                         "(experiment=demo) or set tasks=[a,b]")
    if LORA_B in tasks or JOINT_TASK in tasks:
        raise ValueError(f"task=all: tasks={tasks} must name tasks only; the mixed LoRA-B adapter is its own run "
                         f"(task=lora_b)")
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"task=all: tasks={tasks} names a task twice; list each once")
    return tasks


def task_config(cfg: DictConfig, task: str) -> DictConfig:
    """``cfg`` as the separate run of ``task`` sees it (``task=<task>``)."""
    one = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    with open_dict(one):
        one.task = task
    return one


def save_joint_adapters(mm, lora_config, dests: dict, metas: dict):
    """Write each adapter of ``mm``'s bank (``dests``: name -> dirs) as peft saves it, with ``metas[name]``.

    The model is unwrapped (``mm`` is unusable afterwards); each adapter is loaded into a peft model of the base
    built with the run's ``lora_config`` and saved by ``save_adapter``. Returns the base model."""
    states = {name: mm.bank.peft_state(mm.bank.index(name)) for name in dests}
    model = mm.unwrap()
    for name, dirs in dests.items():
        peft_model = get_peft_model(model, lora_config)  # config and layout of the separate run's adapter
        loaded = set_peft_model_state_dict(peft_model, states[name])
        missing = [k for k in loaded.missing_keys if ".lora_" in k]
        if loaded.unexpected_keys or missing:
            raise RuntimeError(f"adapter {name}: the bank's tensors do not fit peft's model (unexpected "
                               f"{loaded.unexpected_keys[:3]}, missing {missing[:3]})")
        for d in dirs:
            save_adapter(peft_model, d, metas[name])
        model = peft_model.unload()
    return model


def _adapter_params(bank, index: int) -> int:
    """Parameters of adapter ``index`` as peft counts them (r x (d_in + d_out) per projection, no padding)."""
    return sum(int(bank.tensors(m)[3][index]) * sum(bank.module_shapes[m]) for m in bank.modules_wrapped)


# ------------------------------------------------------------------------------------------------------- the LightningModule
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
        # the NaN stop (per task) and the token counts, kept on the device: a step reads nothing back (step_checks.py)
        self.step_checks = StepChecks("training loss is not finite at step {step} for task(s) {names}; lower "
                                      "optim.lr or check those tasks' data", names=self.tasks)
        self._last_losses: torch.Tensor | None = None  # each task's loss at the last training step, on the device
        self.val_losses: dict[str, float] = {}  # each task's loss at the last validation
        self.val_step = -1  # global step of that validation
        self._val_sums = None
        self._hidden = None
        self._hook = mm.model.get_decoder().register_forward_hook(self._keep_hidden)

    @property
    def tokens(self) -> int:
        """Tokens processed (prompt + answer, no padding), all tasks; a host read."""
        return self.step_checks.total("tokens")

    @property
    def answer_tokens(self) -> list[int]:
        """Tokens that carry loss, per task; a host read."""
        return self.step_checks.total("answer_tokens", [0] * len(self.tasks))

    @property
    def train_losses(self) -> dict[str, float]:
        """Each task's loss at the last training step (empty before one); a host read."""
        return {} if self._last_losses is None else dict(zip(self.tasks, self._last_losses.tolist(), strict=True))

    def _keep_hidden(self, module, args, output):
        self._hidden = output[0] if isinstance(output, tuple) else output.last_hidden_state

    def task_losses(self, batch):
        """``(losses [T], answer tokens [T])`` of a batch whose rows carry ``task_ids`` (bank indices)."""
        self._hidden = None
        self.mm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], task_ids=batch["task_ids"],
                logits_to_keep=1, use_cache=False, right_padded=True)  # no KV cache; rows right-padded: no mask
        hidden, self._hidden = self._hidden, None
        return per_task_answer_ce(self.mm.model, hidden, batch["labels"], batch["task_ids"], len(self.tasks))

    def training_step(self, batch, batch_idx):
        losses, counts = self.task_losses(batch)
        self.step_checks.watch(losses, self.global_step)  # raised at the next read point, naming this step's tasks
        self.step_checks.count("tokens", batch["attention_mask"].sum())
        self.step_checks.count("answer_tokens", counts)  # whole numbers in float: added as int64
        self._last_losses = losses.detach()
        rows = batch["input_ids"].shape[0]
        self.log("train/loss", losses.mean(), prog_bar=progress_bar_shown(self), batch_size=rows, sync_dist=True)
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
        self.step_checks.set_total("tokens", int(counts.get("tokens", 0)))
        self.step_checks.set_total("answer_tokens", [int(n) for n in counts.get("answer_tokens", [0] * len(self.tasks))])

    def configure_optimizers(self):
        params = [p for p in self.mm.parameters() if p.requires_grad]
        return adamw_with_schedule(params, self.lr, self.weight_decay, self.warmup_steps, self.total_steps)


# --------------------------------------------------------------------------------------------------------------- the run
def joint_finetune(cfg: DictConfig) -> float | None:
    """Train every task adapter of ``cfg.tasks`` at once; write them, metrics.json; return the mean val loss."""
    tasks = joint_tasks(cfg)
    if "FSDP" in str(OmegaConf.select(cfg, "trainer.strategy._target_", default="") or ""):
        raise ValueError("task=all (joint fine-tuning) does not run under trainer=fsdp (per-adapter clipping needs "
                         "whole gradients); use trainer=gpu or trainer=ddp")
    check_settings(cfg)  # every value in range, the tasks known, the model there: before any model loads
    steps = int(cfg.trainer.max_steps)
    resume = prepare_resume(cfg)
    with StageRun(cfg) as run:
        model, tokenizer = instantiate(cfg.model)
        data = {t: task_loaders(task_config(cfg, t), tokenizer) for t in tasks}  # (train, val, n_train, n_val)
        lora_config = instantiate(cfg.adapter)
        with tempfile.TemporaryDirectory(dir=run.run_dir, prefix=".init-") as tmp:
            init = initial_adapters(model, lora_config, int(cfg.seed), tasks, tmp)
            mm = MultiLoRAModel.from_adapters(model, init, router="oracle", tokenizer=tokenizer)
        if mm.bank.slots[next(iter(mm.bank.slots))].A.dtype != torch.float32:
            mm.bank.float()  # what is trained stays fp32 (as peft keeps LoRA weights), whatever the base's dtype
        mm.set_trainable("adapters")
        add_lora_input_dropout(mm, float(lora_config.lora_dropout))
        speed = apply_train_speed(cfg, mm.model)  # GPU: compiled decoder layers, frozen weights in bf16
        val_tasks = [t for t in tasks if data[t][1] is not None]
        module = JointFinetuneModule(mm, tasks, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay,
                                     warmup_steps=cfg.optim.warmup_steps, total_steps=steps, val_tasks=val_tasks)
        accumulate = int(cfg.trainer.get("accumulate_grad_batches", 1) or 1)
        train_batches = JointBatches([data[t][0] for t in tasks], tokenizer.pad_token_id, steps * accumulate)
        val_dls = [data[t][1] for t in val_tasks]
        trainer, requeue = lora_trainer(cfg, run, steps, f"finetune all ({len(tasks)} adapters)",
                                        validate=bool(val_dls))
        mm.train()
        t0, cpu0 = time.perf_counter(), time.process_time()
        fit_resumable(trainer, module, train_batches, val_dls or None, resume, requeue)
        seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - cpu0
        if val_dls and module.val_step != trainer.global_step:  # no validation ran at the last step
            trainer.validate(module, dataloaders=val_dls, verbose=False)
        step = int(trainer.global_step)
        answer = [int(sum_over_ranks(n)) for n in module.answer_tokens]
        tokens = int(sum_over_ranks(module.tokens))
        tokens_per_s = round(tokens / max(seconds, 1e-9), 2)
        adapter_cfg = OmegaConf.to_container(cfg.adapter, resolve=True)
        rows, metas, dests = [], {}, {}
        train_losses = module.train_losses  # one host read
        for i, t in enumerate(tasks):
            val_loss, train_loss = module.val_losses.get(t), train_losses.get(t)
            metas[t] = {"task": t, "tasks": [t], "base_model": str(cfg.model.name_or_path), "steps": step,
                        "val_loss": val_loss, "adapter": adapter_cfg, "joint": tasks}
            dests[t] = [run.run_dir / "adapters" / t, Path(str(cfg.paths.adapters_dir)) / t]
            rows.append({"adapter": t, "val_loss": val_loss, "train_loss": train_loss, "steps": step,
                         "train_rows": data[t][2], "val_rows": data[t][3], "answer_tokens": answer[i],
                         "trainable_params": _adapter_params(mm.bank, i), "train_seconds": round(seconds, 3),
                         "tokens_per_s": tokens_per_s})
        save_joint_adapters(mm, lora_config, dests, metas)
        log.info("finetune: %d adapters (%s) saved to %s", len(tasks), ", ".join(tasks), cfg.paths.adapters_dir)
        mean = lambda key: (sum(r[key] for r in rows) / len(rows)) if all(r[key] is not None for r in rows) else None
        metrics = {"val_loss": mean("val_loss") if val_dls else None, "train_loss": mean("train_loss"),
                   "steps": step, "adapters": len(tasks), "train_rows": sum(r["train_rows"] for r in rows),
                   "val_rows": sum(r["val_rows"] for r in rows),
                   "trainable_params": sum(r["trainable_params"] for r in rows), "train_seconds": round(seconds, 3),
                   "train_cpu_seconds": round(cpu_seconds, 3),
                   "tokens": tokens, "tokens_per_s": tokens_per_s, "answer_tokens": sum(answer)}
        for r in rows:
            metrics.update({f"{r['adapter']}/val_loss": r["val_loss"], f"{r['adapter']}/train_loss": r["train_loss"]})
        return run.finish(tasks=tasks, strategy="peft", metrics=metrics, main_metric="val_loss", rows=rows,
                          extra={"joint": True, "adapter_dirs": {t: str(dests[t][1]) for t in tasks},
                                 "train_speed": speed})
