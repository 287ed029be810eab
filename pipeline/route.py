"""Stage ``route``: train a router over the experiment's adapters and save it for ``evaluate`` / ``bench``.

    python -m pipeline.route experiment=demo router=meteora      # MeteoRA gates (token level, top-k)
    python -m pipeline.route experiment=demo router=dlp          # DLP-LoRA sentence MLP (top-p)

Training rows: ``router.train.rows_per_task`` rows of each task's train split, labelled with the task's adapter
index (adapters = ``${paths.adapters_dir}/<task>`` in ``tasks`` order), shuffled together. ``router.train.steps``
optimizer steps; validation on the val split (loss and routing accuracy, the run's main metric) every
``router.train.val_check_interval`` steps (null: ``trainer.val_check_interval``). With
``router.train.target_accuracy`` the fit stops once the validation routing accuracy first reaches it
(``router.train.steps`` is then the bound); metrics.json records the target, the step it was reached at and the
accuracy curve (``pipeline/target_accuracy.py``). The router
(``router.safetensors`` + ``router.json``) is written atomically to ``<run_dir>/router`` and to
``${paths.routers_dir}/<strategy>``.

Crashes: like ``finetune``, a resumable checkpoint (trainable router weights, optimizer, loop and RNG state) is
written every ``checkpoint.every_n_steps`` steps; a restart in the same run dir with the same config resumes from
it and saves the router an uninterrupted run saves (``pipeline/requeue.py``).
"""

from __future__ import annotations

import logging
import random
import time
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from pipeline.entry import CONF_DIR, cli, user_errors
from pipeline.stage import StageRun
from pipeline.train_speed import apply_train_speed

log = logging.getLogger(__name__)


class RoutedRowsCollator:
    """Rows with a task index -> right-padded ``input_ids``, ``attention_mask``, ``labels``, ``task_ids``."""

    def __init__(self, pad_token_id: int):
        from pipeline.answer_batches import AnswerOnlyCollator

        self.pad = AnswerOnlyCollator(pad_token_id)

    def __call__(self, rows):
        batch = self.pad(rows)
        batch["task_ids"] = torch.tensor([r["task_id"] for r in rows], dtype=torch.long)
        return batch


def routed_rows(cfg: DictConfig, tokenizer, split: str, per_task: int, objective: str) -> list[dict]:
    """Encoded rows of every task, each with its adapter index; dlp rows are the prompt alone."""
    from pipeline.answer_batches import encode_pair, encode_prompt
    from pipeline.task_rows import task_rows

    max_len, rows = int(cfg.router.train.max_length), []
    for idx, task in enumerate(cfg.tasks):
        for r in task_rows(str(task), split, per_task, int(cfg.data.get("split_seed", 0))):
            if objective == "dlp":
                ids = encode_prompt(tokenizer, r["prompt"])[:max_len]
                enc = {"input_ids": ids, "labels": [-100] * len(ids)}
            else:
                enc = encode_pair(tokenizer, r["prompt"], r["answer"], max_len, bool(cfg.data.append_eos))
                if cfg.router.train.get("lm_loss_on_prompt", True):
                    enc["labels"] = list(enc["input_ids"])
            rows.append({**enc, "task_id": idx})
    random.Random(int(cfg.seed)).shuffle(rows)
    return rows


def route(cfg: DictConfig) -> float | None:
    """Train ``cfg.router`` (meteora or dlp) over the adapters; return its validation routing accuracy."""
    from hydra.utils import instantiate
    from torch.utils.data import DataLoader

    from pipeline.multilora_setup import build_multilora
    from pipeline.requeue import (
        RequeueCheckpoint,
        ResumableSampler,
        fit_resumable,
        prepare_resume,
        training_config,
    )
    from pipeline.router_training import RouterTrainModule

    objective = "dlp" if str(cfg.router.strategy) in ("dlp", "dlp_segments") else str(cfg.router.strategy)
    if objective not in ("meteora", "dlp"):
        raise ValueError(f"router={cfg.router.strategy} has nothing to train; route trains router=meteora or "
                         f"router=dlp")
    steps = int(cfg.router.train.steps)
    if steps <= 0:
        raise ValueError(f"router.train.steps={steps} must be > 0")
    resume = prepare_resume(cfg)  # a restarted run: its checkpoint (and wandb run id)
    with StageRun(cfg) as run:
        model, tokenizer = instantiate(cfg.model)
        mm, tokenizer = build_multilora(cfg, model, tokenizer, load_router=False)
        train = routed_rows(cfg, tokenizer, str(cfg.data.train_split), int(cfg.router.train.rows_per_task), objective)
        val = routed_rows(cfg, tokenizer, str(cfg.data.val_split), int(cfg.router.train.val_rows_per_task), objective)
        collate = RoutedRowsCollator(tokenizer.pad_token_id)
        bs = int(cfg.router.train.batch_size)
        sampler = ResumableSampler(len(train), int(cfg.seed))  # shuffled by (seed, epoch): replayable on resume
        train_dl = DataLoader(train, batch_size=bs, sampler=sampler, collate_fn=collate)
        val_dl = DataLoader(val, batch_size=bs, shuffle=False, collate_fn=collate)
        module = RouterTrainModule(mm, objective, cfg.router.train.lr, cfg.router.train.weight_decay,
                                   bool(cfg.router.train.get("train_loras", False)))
        # GPU: compiled decoder layers, frozen weights in bf16 (the dlp objective runs no LM: nothing to compile)
        speed = apply_train_speed(cfg, mm.model) if objective == "meteora" else {"compile": False}
        from pipeline.scaling import stage_callbacks
        from pipeline.step_log import StepLog
        from pipeline.target_accuracy import AccuracyCurve, target_callbacks

        curve = AccuracyCurve(target=cfg.router.train.get("target_accuracy"))
        val_every = int(cfg.router.train.get("val_check_interval") or cfg.trainer.val_check_interval)

        every = int(cfg.get("checkpoint", {}).get("every_n_steps", 0) or 0)
        requeue = RequeueCheckpoint(run.run_dir, every_n_steps=every, config=training_config(cfg))
        trainer = instantiate(cfg.trainer, logger=run.tracker.lightning, max_steps=steps, inference_mode=False,
                              callbacks=[StepLog(int(cfg.trainer.log_every_n_steps), f"route {objective}"), requeue,
                                         *target_callbacks(curve),
                                         *stage_callbacks(cfg)],  # +callbacks.<name>=... (pipeline.scaling)
                              val_check_interval=min(steps, val_every))
        mm.router.train()
        t0 = time.perf_counter()
        fit_resumable(trainer, module, train_dl, val_dl, resume, requeue)
        seconds = time.perf_counter() - t0
        if trainer.global_step % int(trainer.val_check_interval) == 0 and "val/loss" in trainer.callback_metrics:
            final = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        else:  # the last in-fit validation was earlier than the last step
            final = trainer.validate(module, dataloaders=val_dl, verbose=False)[0]
        mm.router.eval()
        from pipeline.distributed import full_weights, is_global_zero

        shared = Path(str(cfg.paths.routers_dir)) / objective
        with full_weights(trainer):  # FSDP: gather the sharded router first; DDP / one device: nothing to do
            if is_global_zero():  # one writer per job (every DDP rank holds the same router)
                mm.save_router(run.run_dir / "router")
                mm.save_router(shared)
        log.info("route: %s router saved to %s", objective, shared)
        metrics = {"val_loss": float(final["val/loss"]), "steps": int(trainer.global_step),
                   "train_rows": len(train), "val_rows": len(val), "train_seconds": round(seconds, 3),
                   "trainable_params": sum(p.numel() for p in module.trainable)}
        for k in ("val/router_accuracy", "val/lm_loss", "val/aux_loss"):
            if k in final:
                metrics[k.split("/")[1]] = float(final[k])
        main = "router_accuracy" if "router_accuracy" in metrics else "val_loss"
        return run.finish(tasks=list(cfg.tasks), strategy=objective, metrics=metrics, main_metric=main,
                          extra={"router_dir": str(shared), "adapters": list(mm.adapter_names),
                                 "train_speed": speed, **curve.summary()})


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="route")
def main(cfg: DictConfig) -> float | None:
    with user_errors():
        return route(cfg)


if __name__ == "__main__":
    cli(main)
