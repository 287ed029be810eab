"""Stage ``route``: train a router over the experiment's adapters and save it for ``evaluate`` / ``bench``.

    python -m pipeline.route experiment=demo router=meteora      # MeteoRA gates (token level, top-k)
    python -m pipeline.route experiment=demo router=dlp          # DLP-LoRA sentence MLP (top-p)

Any trainable strategy (``conf/router/<name>.yaml``: a router class with ``trainable`` and ``training_loss``) trains
here; what it learns from is the strategy's own: ``training_loss(mm, batch)`` gives the loss and the parts logged
beside it (``router_accuracy`` is the run's main metric). Training rows: ``router.train.rows_per_task`` rows of
each task's train split, labelled with the task's adapter index (adapters = ``${paths.adapters_dir}/<task>`` in
``tasks`` order), shuffled together: prompt + answer for a strategy that ``reads_answers`` (MeteoRA's LM loss),
else the prompt alone. ``router.train.steps`` optimizer steps; validation on the val split every
``router.train.val_check_interval`` steps (null: ``trainer.val_check_interval``). With
``router.train.target_accuracy`` the fit stops once the validation routing accuracy first reaches it
(``router.train.steps`` is then the bound); metrics.json records the target, the step it was reached at and the
accuracy curve (``pipeline/stages/target_accuracy.py``); a router that counts its top-1 hits per task (MeteoRA's
gates) also gives each task's routing accuracy over the last validation (``router_accuracy_by_task``) and
which tasks it takes for which (``router_confusion``: ``confusion_record``), and one that counts them per
projection gate (MeteoRA's) each gate's and each layer's (``router_accuracy_by_projection``,
``router_accuracy_by_layer``: ``projection_accuracies``), which say where the pooled accuracy is lost, and its
accuracy on the answer tokens apart from the prompt's (``router_accuracy_answers`` / ``_prompts`` /
``_answers_by_task``: ``span_accuracies``; the answers are where it routes while the model writes), beside
two references computed from the rows (``data.routing_ceiling``): the most any causal token router can score
on the validation rows (``router_accuracy_ceiling``) and what a router reading one token scores there
(``router_accuracy_one_token``: a layer-0 q / k / v gate's view). The router
(``router.safetensors`` + ``router.json``) is written atomically to ``<run_dir>/router`` and to
``router.checkpoint`` (``${paths.routers_dir}/<name>``), where evaluate and bench read it.

Crashes: like ``finetune``, a resumable checkpoint (trainable router weights, optimizer, loop and RNG state) is
written every ``checkpoint.every_n_steps`` steps; a restart in the same run dir with the same config resumes from
it and saves the router an uninterrupted run saves (``pipeline/runtime/requeue.py``). A NaN/inf loss stops it as it
stops ``finetune``: one line naming the step, checked at the next log line, checkpoint or the end of training
(``pipeline/runtime/step_checks.py``), before the router is saved.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from data.batches import RoutedRowsCollator, pad_to_shape, routed_rows, routed_rows_settings
from data.routing_ceiling import causal_routing_ceiling, one_token_routing
from models.attention import capture_stable_sdpa
from models.compile import uncompile_layers
from pipeline.runtime.cotrained_adapters import mirror_dirs, write_cotrained
from pipeline.runtime.distributed import clip_gradients, full_weights, is_global_zero
from pipeline.runtime.entry import CONF_DIR, cli, user_errors
from pipeline.runtime.multilora import build_multilora, plan_multilora
from pipeline.runtime.requeue import (
    RequeueCheckpoint,
    ResumableSampler,
    fit_resumable,
    prepare_resume,
    training_config,
)
from pipeline.runtime.settings import check_settings
from pipeline.runtime.stage import StageRun, stage_callbacks
from pipeline.runtime.step_checks import StepChecks, progress_bar_shown
from pipeline.runtime.step_graph import StepGraphs
from pipeline.runtime.step_log import StepLog
from pipeline.runtime.train_speed import apply_train_speed, bf16_trainer, cuda_graph_wanted
from pipeline.stages.lora_training import adamw_with_schedule, lr_factor
from pipeline.stages.target_accuracy import ANSWERS_MONITOR, AccuracyCurve, target_callbacks

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GraphedStep:
    """How the route stage captures its training step (``train_speed.cuda_graph``): every batch padded to ``rows``
    rows and a multiple of ``bucket`` tokens (``data.batches.pad_to_shape``), so a few graphs serve the run."""

    rows: int
    bucket: int
    pad_token_id: int
    bf16: bool
    grad_clip: float | None
    verify: int = 2  # replays per shape checked against the eager step (pipeline.runtime.step_graph: fallback)


class RouterTrainModule(L.LightningModule):
    """Train ``mm``'s router by its strategy's own objective (``mm.router.training_loss``) over frozen adapters
    (``train_loras`` unfreezes the adapters too, as MeteoRA's script does, at ``lora_lr``, default ``lr``; the
    stage then writes the adapters it ends with into the router dir, ``<router>/adapters/<name>``, and
    ``router.json`` names them, so evaluate and bench run the router on them:
    ``pipeline/runtime/cotrained_adapters.py``).

    Validation logs the loss and its parts, among them the router's accuracy. It runs with grad enabled (the
    Trainer gets ``inference_mode=False``) because MeteoRA's gates record their logits only then."""

    def __init__(self, mm, lr: float, weight_decay: float = 0.0, train_loras: bool = False,
                 schedule: str = "constant", warmup_steps: int = 0, total_steps: int = 1,
                 graph: GraphedStep | None = None, lora_lr: float | None = None):
        super().__init__()
        self.mm = mm
        self.lr, self.weight_decay = float(lr), float(weight_decay)
        self.lora_lr = self.lr if lora_lr is None else float(lora_lr)  # the adapters' lr (train_loras)
        self.schedule, self.warmup_steps, self.total_steps = schedule, int(warmup_steps), int(total_steps)
        self.trainable = mm.set_trainable("router+adapters" if train_loras else "router")
        self.val_task_hits = None  # (hits [L], pairs [L]) summed over the last validation (routers that count them)
        self.val_projection_hits = None  # (hits [P], tokens) likewise, per projection gate (MeteoRA's)
        self.val_confusion = None  # [L, L] (task, chosen task) counts summed over the last validation (MeteoRA's)
        self.val_answer_hits = None  # (hits [L], pairs [L]) on the answer tokens alone, likewise (MeteoRA's)
        self.step_checks = StepChecks("router loss is {loss} at step {step}; lower router.train.lr")  # the NaN stop
        self.graph = graph  # the whole training step replayed as a CUDA graph (train_speed.cuda_graph)
        if graph is not None:  # attention whose mask is the same while capturing as in the warm-up (models.attention)
            capture_stable_sdpa(mm.model)
        self._graphs: StepGraphs | None = None

    def _step(self, batch):
        return self.mm.router.training_loss(self.mm, batch)

    # ---- the step as a CUDA graph ------------------------------------------------------------------------------
    def _graph_step(self, batch):
        """What the graph holds: forward (bf16 autocast without its cast cache where the trainer is bf16), loss,
        backward, gradient clipping, AdamW; returns the loss and its parts (the graph's own tensors)."""
        opt = self._graphs.optimizer
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.graph.bf16, cache_enabled=False):
            loss, parts = self._step(batch)
        loss.backward()
        if self.graph.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.trainable, self.graph.grad_clip, foreach=True)
        opt.step()
        return loss.detach(), {k: v.detach() for k, v in parts.items()}

    def _drop_compiled_layers(self, why: str) -> bool:
        """A capture failed (``why``): where the layers are compiled (``train_speed.compile``, auto on one GPU),
        run them eagerly and capture again, the form the stage ran before compiled captures; True where it did."""
        dropped = uncompile_layers(self.mm.model) > 0
        if dropped:
            log.warning("route: %s; capturing the eager layers instead", why)
        return dropped

    def _replay(self, batch):
        """One training step through the captured graph of the batch's padded shape; ``(loss, parts)`` copies."""
        opt = self.optimizers().optimizer
        if self._graphs is None:
            for group in opt.param_groups:  # a tensor the step reads, filled per step (a resumed state may hold
                group["lr"] = torch.tensor(float(group["lr"]), device=self.device)  # a float or a host tensor)
            self._graphs = StepGraphs(self._graph_step, opt, self.device, verify=self.graph.verify,
                                      on_capture_failure=self._drop_compiled_layers)
        if self.schedule == "cosine":
            factor = lr_factor(self.global_step, self.warmup_steps, self.total_steps)
            for group in opt.param_groups:
                group["lr"].fill_(group.get("base_lr", self.lr) * factor)
        padded = pad_to_shape(batch, self.graph.rows, self.graph.bucket, self.graph.pad_token_id)
        fell_back = self._graphs.fallback
        loss, parts = self._graphs(padded)
        if self._graphs.fallback is not None and fell_back is None:
            log.warning("route: step %d: %s", self.global_step, self._graphs.fallback)
        return loss.clone(), {k: v.clone() for k, v in parts.items()}

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
        if self.graph is None:
            return super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        optimizer_closure()  # training_step: the replayed graph ran forward, backward and AdamW; Lightning counts it
        return None

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        clip_gradients(self, optimizer, gradient_clip_val, gradient_clip_algorithm)  # FSDP: the norm over all shards

    def training_step(self, batch, batch_idx):
        loss, parts = self._replay(batch) if self.graph is not None else self._step(batch)
        self.step_checks.watch(loss, self.global_step)  # raised at the next read point (pipeline/runtime/step_checks.py)
        bs = batch["input_ids"].shape[0]
        self.log("train/loss", loss, prog_bar=progress_bar_shown(self), batch_size=bs,
                 sync_dist=True)  # DDP: the global loss curve
        for k, v in parts.items():
            self.log(f"train/{k}", v, batch_size=bs, sync_dist=True)
        return None if self.graph is not None else loss  # graph: nothing left for Lightning to backpropagate

    def on_validation_epoch_start(self) -> None:
        self.val_task_hits = self.val_projection_hits = self.val_confusion = self.val_answer_hits = None

    def on_validation_epoch_end(self) -> None:
        reduce = self.trainer.strategy.reduce  # every rank's counts: the whole validation set's
        if self.val_task_hits is not None:
            self.val_task_hits = tuple(reduce(t, reduce_op="sum") for t in self.val_task_hits)
        if self.val_projection_hits is not None:
            self.val_projection_hits = tuple(reduce(t, reduce_op="sum") for t in self.val_projection_hits)
        if self.val_confusion is not None:
            self.val_confusion = reduce(self.val_confusion, reduce_op="sum")
        if self.val_answer_hits is not None:
            self.val_answer_hits = tuple(reduce(t, reduce_op="sum") for t in self.val_answer_hits)
            hits, pairs = self.val_answer_hits  # every rank's already: the answer tokens' accuracy, in the curve too
            if int(pairs.sum()):
                self.log(ANSWERS_MONITOR, hits.sum().float() / pairs.sum(), sync_dist=False)

    def validation_step(self, batch, batch_idx):
        loss, parts = self._step(batch)
        self.val_task_hits = _add_counts(self.val_task_hits, self.mm.router.gate_hits_by_task())
        self.val_projection_hits = _add_counts(self.val_projection_hits, self.mm.router.gate_hits_by_projection())
        if "answer_mask" in batch:
            self.val_answer_hits = _add_counts(self.val_answer_hits, self.mm.router.gate_hits_in(batch["answer_mask"]))
        confusion = self.mm.router.gate_confusion()
        if confusion is not None:
            self.val_confusion = confusion if self.val_confusion is None else self.val_confusion + confusion
        bs = batch["input_ids"].shape[0]
        self.log("val/loss", loss.detach(), prog_bar=True, batch_size=bs, sync_dist=True)  # DDP: mean over all ranks
        for k, v in parts.items():
            self.log(f"val/{k}", v, prog_bar=k == "router_accuracy", batch_size=bs, sync_dist=True)

    def param_groups(self, on_device: bool = False) -> list[dict]:
        """The trainable parameters as AdamW groups: the router's at ``lr``, the adapters' (``train_loras``) at
        ``lora_lr``; each group keeps its ``base_lr`` (what the schedule scales). ``on_device``: every lr a tensor
        on the module's device (the graphed step reads it there)."""
        adapters = {id(p) for p in self.mm.bank.parameters()}  # every slot's A and B
        split = ([p for p in self.trainable if id(p) not in adapters], self.lr), \
                ([p for p in self.trainable if id(p) in adapters], self.lora_lr)
        return [{"params": ps, "base_lr": lr, "lr": torch.tensor(lr, device=self.device) if on_device else lr}
                for ps, lr in split if ps]

    def configure_optimizers(self):
        if self.graph is not None:  # the step count on the device, the LR a tensor the step reads (_replay fills it)
            return torch.optim.AdamW(self.param_groups(on_device=True), lr=torch.tensor(self.lr, device=self.device),
                                     weight_decay=self.weight_decay, capturable=True, fused=True)
        if self.schedule == "cosine":  # MeteoRA's script: warm-up, then cosine decay
            return adamw_with_schedule(self.param_groups(), self.lr, self.weight_decay, self.warmup_steps,
                                       self.total_steps)
        return torch.optim.AdamW(self.param_groups(), lr=self.lr, weight_decay=self.weight_decay)


def _add_counts(total, counts):
    """A validation step's device counts added to the sum so far (None: the router counts none)."""
    if counts is None:
        return total
    return counts if total is None else tuple(a + b for a, b in zip(total, counts, strict=True))


def route(cfg: DictConfig) -> float | None:
    """Train ``cfg.router`` over the adapters; return its validation routing accuracy."""
    check_settings(cfg)
    plan = plan_multilora(cfg, fresh=True)  # adapters, strategy and its knobs checked before any model loads
    if not plan.strategy.trainable:
        raise ValueError(f"router={plan.strategy.name} has nothing to train; route trains router="
                         f"{' or router='.join(plan.trainable_names())}")
    name = plan.checkpoint.name  # the router's name in results: the dir evaluate reads it from (dlp for dlp_segments)
    train_cfg, steps = cfg.router.train, int(cfg.router.train.steps)
    reads_answers = bool(getattr(plan.strategy.router_class, "reads_answers", False))  # a LM step: MeteoRA's gates
    if not train_cfg.gate_ce_on_prompt and not reads_answers:
        raise ValueError(f"router.train.gate_ce_on_prompt=false: router={plan.strategy.name} routes from the prompt "
                         f"alone, with no gate CE over answer tokens; drop the override")
    # the step as one CUDA graph where it is a LM step, decided before anything loads or is written
    graphed = cuda_graph_wanted(cfg, graphable=reads_answers)
    resume = prepare_resume(cfg)  # a restarted run: its checkpoint (and wandb run id)
    with StageRun(cfg) as run:
        mm, tokenizer = build_multilora(cfg, plan=plan)
        rows = routed_rows_settings(cfg, tokenizer, prompt_only=not mm.router.reads_answers)
        train = routed_rows(split=str(cfg.data.train_split), per_task=int(train_cfg.rows_per_task), **rows)
        val = routed_rows(split=str(cfg.data.val_split), per_task=int(train_cfg.val_rows_per_task), **rows)
        collate = RoutedRowsCollator(tokenizer.pad_token_id, gate_ce_mask=not train_cfg.gate_ce_on_prompt)
        bs = int(train_cfg.batch_size)
        sampler = ResumableSampler(len(train), int(cfg.seed))  # shuffled by (seed, epoch): replayable on resume
        train_dl = DataLoader(train, batch_size=bs, sampler=sampler, collate_fn=collate)
        val_dl = DataLoader(val, batch_size=bs, shuffle=False,  # validation marks the answer tokens (span_accuracies)
                            collate_fn=RoutedRowsCollator(tokenizer.pad_token_id, answer_mask=mm.router.reads_answers))
        # GPU: the step as one CUDA graph (MeteoRA's gates: a LM step) or compiled decoder layers, frozen weights
        # in bf16 (a strategy whose training runs no LM: nothing to compile or capture)
        graph = GraphedStep(rows=bs, bucket=int(cfg.train_speed.graph_bucket), pad_token_id=int(tokenizer.pad_token_id),
                            bf16=bf16_trainer(cfg),
                            grad_clip=None if train_cfg.grad_clip is None else float(train_cfg.grad_clip)) \
            if graphed else None
        module = RouterTrainModule(mm, train_cfg.lr, train_cfg.weight_decay, bool(train_cfg.train_loras),
                                   str(train_cfg.schedule), round(float(train_cfg.warmup_ratio) * steps), steps,
                                   graph=graph, lora_lr=train_cfg.lora_lr)
        speed = apply_train_speed(cfg, mm.model, cuda_graph=graphed) if mm.router.reads_answers else {"compile": False}
        curve = AccuracyCurve(target=train_cfg.target_accuracy)
        val_every = int(train_cfg.val_check_interval or cfg.trainer.val_check_interval)
        requeue = RequeueCheckpoint(run.run_dir, every_n_steps=int(cfg.checkpoint.every_n_steps),
                                    config=training_config(cfg))
        clip = {} if train_cfg.grad_clip is None or graphed else {"gradient_clip_val": float(train_cfg.grad_clip)}
        trainer = instantiate(cfg.trainer, logger=run.tracker.lightning, max_steps=steps, inference_mode=False, **clip,
                              callbacks=[StepLog(int(cfg.trainer.log_every_n_steps), f"route {name}"), requeue,
                                         *target_callbacks(curve),
                                         *stage_callbacks(cfg)],  # +callbacks.<name>=... (pipeline.stages.scaling)
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
        if graphed:  # whether the replayed step held (verified against the eager one) or the run fell back to it
            speed["cuda_graph_fallback"] = module._graphs.fallback if module._graphs is not None else None
            if module._graphs is not None and module._graphs.capture_retried:  # compiled layers that would not capture
                speed["compile_dropped"] = module._graphs.capture_retried
        shared = Path(plan.checkpoint)
        with full_weights(trainer):  # FSDP: gather the sharded router first; DDP / one device: nothing to do
            sub = None
            if train_cfg.train_loras:  # MeteoRA's script: the adapters trained with the gates go with them
                sub = "adapters"
                written = write_cotrained(mm, plan.adapters, shared / sub, meta={
                    "router": name, "experiment": str(cfg.name), "steps": trainer.global_step})
                mirror_dirs(written, run.run_dir / "router" / sub)  # the run's own copy, hard-linked
            if is_global_zero():  # one writer per job (every DDP rank holds the same router)
                mm.save_router(run.run_dir / "router", adapters=sub)  # router.json after the adapters it names
                mm.save_router(shared, adapters=sub)
        log.info("route: %s router saved to %s", name, shared)
        metrics = {"val_loss": float(final["val/loss"]), "steps": int(trainer.global_step),
                   "train_rows": len(train), "val_rows": len(val), "train_seconds": round(seconds, 3),
                   "trainable_params": sum(p.numel() for p in module.trainable)}
        for k in ("val/router_accuracy", "val/lm_loss", "val/aux_loss"):
            if k in final:
                metrics[k.split("/")[1]] = float(final[k])
        main = "router_accuracy" if "router_accuracy" in metrics else "val_loss"
        return run.finish(tasks=list(cfg.tasks), strategy=name, metrics=metrics, main_metric=main,
                          extra={"router_dir": str(shared), "adapters": list(mm.adapter_names), "train_speed": speed,
                                 **curve.summary(), "router_accuracy_by_task":
                                     task_accuracies(module.val_task_hits, list(mm.adapter_names)),
                                 "router_confusion": confusion_record(module.val_confusion, list(mm.adapter_names)),
                                 **projection_accuracies(module.val_projection_hits,
                                                         list(getattr(mm.router, "gates", {}))),
                                 **span_accuracies(module.val_task_hits, module.val_answer_hits,
                                                   list(mm.adapter_names)),
                                 **routing_ceiling(mm.router, train, val, list(mm.adapter_names))})


def routing_ceiling(router, train: list, val: list, adapters: list[str]) -> dict:
    """For a token router (its rows are prompt + answer, every token labelled with its task: MeteoRA's gates), the
    most any causal router can score on these validation rows, and what a router reading one token scores there
    (``data.routing_ceiling``: a layer-0 q / k / v gate's view), overall and per task, recorded beside its
    accuracy, so a table can say whether the gates or the rows limit it."""
    if not router.reads_answers:
        return {}
    c, one = causal_routing_ceiling(val), one_token_routing(train, val)
    return {"router_accuracy_ceiling": c["accuracy"],
            "router_accuracy_ceiling_by_task": {adapters[k]: v for k, v in c["by_task"].items()},
            "router_accuracy_one_token": one["accuracy"],
            "router_accuracy_one_token_by_task": {adapters[k]: v for k, v in one["by_task"].items()}}


def task_accuracies(counts, adapters: list[str]) -> dict | None:
    """Per adapter (task) name: its routing accuracy over the last validation, hits / pairs (None without pairs),
    from ``RouterTrainModule.val_task_hits``; None for a router that does not count them."""
    if counts is None:
        return None
    hits, pairs = (t.tolist() for t in counts)
    return {name: (round(h / p, 6) if p else None) for name, h, p in zip(adapters, hits, pairs, strict=True)}


def span_accuracies(all_counts, answer_counts, adapters: list[str]) -> dict:
    """The last validation's routing accuracy split by where the token stands in its row, from
    ``RouterTrainModule.val_task_hits`` (every labelled token) and ``val_answer_hits`` (the answer tokens alone):

    ``router_accuracy_answers``          on the answer tokens: where the gates route while the model writes
    ``router_accuracy_prompts``          on the prompt tokens (the rest)
    ``router_accuracy_answers_by_task``  {adapter name: its answer tokens' accuracy}

    A route run's target is its pooled accuracy (MeteoRA's: every token), in which a prompt's first tokens, read
    alike by several tasks, weigh as much as the answer; the split says whether the routing the answers get is
    better than the pooled figure. Empty for a router that does not count them (None where a span has no token)."""
    if all_counts is None or answer_counts is None:
        return {}
    hits, pairs = (t.tolist() for t in all_counts)
    a_hits, a_pairs = (t.tolist() for t in answer_counts)

    def ratio(h, p):
        return round(h / p, 6) if p else None

    return {"router_accuracy_answers": ratio(sum(a_hits), sum(a_pairs)),
            "router_accuracy_prompts": ratio(sum(hits) - sum(a_hits), sum(pairs) - sum(a_pairs)),
            "router_accuracy_answers_by_task": task_accuracies(answer_counts, adapters)}


def confusion_record(counts, adapters: list[str]) -> dict | None:
    """The last validation's ``[L, L]`` (task, chosen task) counts (``RouterTrainModule.val_confusion``) as a record:
    ``{"tasks": adapters, "counts": rows of ints, "confused_with": {task: [[other task, share of its pairs], ...]}}``,
    the three largest off-diagonal shares of each task (those >= 0.01). Where the pooled accuracy is lost between
    tasks: e.g. text in neighbouring languages, or the same reading-comprehension format, routed to each other.
    None for a router that does not count them."""
    if counts is None:
        return None
    rows = counts.tolist()
    if len(rows) != len(adapters):
        raise ValueError(f"a {len(rows)}-row confusion matrix for {len(adapters)} adapters")
    confused = {}
    for i, (name, row) in enumerate(zip(adapters, rows, strict=True)):
        total = sum(row)
        off = sorted(((row[j] / total, adapters[j]) for j in range(len(row)) if j != i and total), reverse=True)
        confused[name] = [[other, round(share, 4)] for share, other in off[:3] if share >= 0.01]
    return {"tasks": list(adapters), "counts": rows, "confused_with": confused}


def projection_accuracies(counts, keys: list[str]) -> dict:
    """Where the routing accuracy is lost, from ``RouterTrainModule.val_projection_hits`` (hits [P], tokens) over
    the last validation, ``keys`` the router's gate keys in the order of the hits (MeteoRA's ``gates``: slot keys
    such as ``model__layers__12__self_attn__q_proj``, the names of ``gates.<key>.weight`` in router.safetensors):

    ``router_accuracy_by_projection``  {gate key: its top-1 accuracy over the labelled tokens}
    ``router_accuracy_by_layer``       {layer index: the mean of that layer's gates' accuracies}; a gate whose name
                                       holds no layer index falls under ``"other"``

    Every gate routes every labelled token, so a layer's mean is also its pooled accuracy and the mean over all
    gates is ``router_accuracy``'s pooled value. Per layer matters because the gates see different things: a
    layer-0 q / k / v gate reads the token's embedding alone (no context: it can tell the task only by the token
    itself), while a later layer's gates read what attention has gathered from the prompt. Both are None for a
    router that does not count per projection (and an accuracy is None without labelled tokens)."""
    if counts is None:
        return {"router_accuracy_by_projection": None, "router_accuracy_by_layer": None}
    hits, tokens = counts[0].tolist(), int(counts[1])
    if len(hits) != len(keys):
        raise ValueError(f"{len(hits)} per-projection counts for {len(keys)} gate keys")
    by_projection = {k: (round(h / tokens, 6) if tokens else None) for k, h in zip(keys, hits, strict=True)}
    layers: dict = {}
    for key, h in zip(keys, hits, strict=True):
        layers.setdefault(layer_of(key), []).append(h)
    order = sorted((k for k in layers if k != "other"), key=int) + (["other"] if "other" in layers else [])
    by_layer = {k: (round(sum(layers[k]) / (len(layers[k]) * tokens), 6) if tokens else None) for k in order}
    return {"router_accuracy_by_projection": by_projection, "router_accuracy_by_layer": by_layer}


def layer_of(name: str) -> str:
    """The decoder layer index in a module name or gate key, as a string (a JSON key): the first dot- (or
    ``__``-) separated part that is a number, ``model.layers.12.self_attn.q_proj`` -> ``"12"``; ``"other"`` for a
    name without one."""
    m = re.search(r"(?:^|\.)(\d+)(?:\.|$)", name.replace("__", "."))
    return str(int(m.group(1))) if m else "other"


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="route")
def main(cfg: DictConfig) -> float | None:
    with user_errors(cfg):
        return route(cfg)


if __name__ == "__main__":
    cli(main)
