"""Joint fine-tuning: one ``finetune`` run trains every task adapter of an experiment over one base model.

    python -m pipeline.finetune experiment=meteora_tasks task=all      # 28 adapters, one process, one model

``task=all`` trains one adapter per entry of ``tasks`` (LoRA-B, the mixed adapter, stays its own run:
``task=lora_b``). The base model is loaded once and wrapped as a ``models.MultiLoRAModel`` whose AdapterBank holds
every task's adapter; the ``oracle`` router sends each batch row through its own task's adapter in the fused op,
and ``set_trainable("adapters")`` makes the bank's stacked A/B the trained parameters
(``pipeline/joint_module.py``). Each step trains every adapter on the batch its separate run would draw at that
step (``pipeline/joint_batches.py``), so with ``lora_dropout=0`` a joint run ends with the adapters of the separate
runs (up to float rounding: tests/test_joint_finetune.py checks 1e-5 on every saved tensor). With dropout > 0 the
dropout masks differ from peft's (``pipeline/lora_input_dropout.py``): the same training in distribution.

How each adapter matches its separate run: the same seeded peft init (``pipeline.lora_init``), the same batches,
the sum of the tasks' mean answer-token losses (each adapter gets exactly its own gradient), gradient clipping per
adapter, element-wise AdamW and LR schedule. Its outputs are the separate runs' outputs, per task:

    ${paths.adapters_dir}/<task>       standard PEFT dir (adapter_config.json, adapter_model.safetensors, loramux.json)
    <run_dir>/adapters/<task>          the same, beside the run
    <run_dir>/metrics.json             one record: per-task val/train loss (``<task>/val_loss``...), their means,
                                       one row per adapter (the report's adapter table), joint tokens/s

written by peft's own ``save_pretrained`` (each adapter loaded into a peft model of the unwrapped base) through
``pipeline.finetune.save_adapter``. Checkpoints, requeue and the NaN stop are the separate stage's
(``pipeline/requeue.py``): a restart resumes every task's loader at its own epoch and batch.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from pipeline.stage import StageRun
from pipeline.task_rows import LORA_B

log = logging.getLogger(__name__)
JOINT_TASK = "all"  # task=all: every task of `tasks` in one run


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


def adapter_state(bank, index: int) -> dict:
    """Adapter ``index`` of ``bank`` as peft's state dict (``get_peft_model_state_dict``'s keys and layouts): only
    its first r columns of A / rows of B, transposed back to ``lora_A.weight`` [r, d_in], ``lora_B.weight`` [d_out, r]."""
    from models.adapter_bank import PEFT_PREFIX

    state = {}
    for module in bank.modules_wrapped:
        A, B, _, ranks = bank.tensors(module)
        r = int(ranks[index])
        if r:
            state[f"{PEFT_PREFIX}{module}.lora_A.weight"] = A[index, :, :r].detach().t().contiguous()
            state[f"{PEFT_PREFIX}{module}.lora_B.weight"] = B[index, :r].detach().t().contiguous()
    return state


def save_joint_adapters(mm, lora_config, dests: dict, metas: dict):
    """Write each adapter of ``mm``'s bank (``dests``: name -> dirs) as peft saves it, with ``metas[name]``.

    The model is unwrapped (``mm`` is unusable afterwards); each adapter is loaded into a peft model of the base
    built with the run's ``lora_config`` and saved by ``pipeline.finetune.save_adapter``. Returns the base model."""
    from peft import get_peft_model, set_peft_model_state_dict

    from pipeline.finetune import save_adapter

    states = {name: adapter_state(mm.bank, mm.bank.index(name)) for name in dests}
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


def joint_finetune(cfg: DictConfig) -> float | None:
    """Train every task adapter of ``cfg.tasks`` at once; write them, metrics.json; return the mean val loss."""
    import torch
    from hydra.utils import instantiate

    from models import MultiLoRAModel
    from pipeline.distributed import sum_over_ranks
    from pipeline.finetune import _loaders, check_training_config
    from pipeline.joint_batches import JointBatches
    from pipeline.joint_module import JointFinetuneModule
    from pipeline.lora_init import initial_adapters
    from pipeline.lora_input_dropout import add_lora_input_dropout
    from pipeline.requeue import RequeueCheckpoint, fit_resumable, prepare_resume, training_config
    from pipeline.step_log import StepLog
    from pipeline.train_speed import apply_train_speed

    tasks = joint_tasks(cfg)
    steps = check_training_config(cfg)
    if "FSDP" in str(OmegaConf.select(cfg, "trainer.strategy._target_", default="") or ""):
        raise ValueError("task=all (joint fine-tuning) does not run under trainer=fsdp (per-adapter clipping needs "
                         "whole gradients); use trainer=gpu or trainer=ddp")
    resume = prepare_resume(cfg)
    with StageRun(cfg) as run:
        model, tokenizer = instantiate(cfg.model)
        data = {t: _loaders(task_config(cfg, t), tokenizer) for t in tasks}  # (train, val, n_train, n_val)
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
        every = int(cfg.get("checkpoint", {}).get("every_n_steps", 0) or 0)
        requeue = RequeueCheckpoint(run.run_dir, every_n_steps=every, config=training_config(cfg))
        trainer_kw = {"logger": run.tracker.lightning,
                      "callbacks": [StepLog(int(cfg.trainer.log_every_n_steps), f"finetune all ({len(tasks)} adapters)"),
                                    requeue]}
        if not val_dls:
            trainer_kw.update(limit_val_batches=0)
        elif int(cfg.trainer.val_check_interval) > steps:
            trainer_kw.update(val_check_interval=steps)
        trainer = instantiate(cfg.trainer, **trainer_kw)
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
        for i, t in enumerate(tasks):
            val_loss, train_loss = module.val_losses.get(t), module.train_losses.get(t)
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
