"""Stage ``evaluate``: score one routing strategy on the experiment's tasks, or on composite-n prompts.

    python -m pipeline.evaluate experiment=demo router=oracle                      # each task on its own
    python -m pipeline.evaluate experiment=demo router=meteora router.top_k=1
    python -m pipeline.evaluate experiment=demo router=dlp composite_n=3           # composite-3 prompts
    python -m pipeline.evaluate -m experiment=demo router=base,oracle,dlp           # a sweep over strategies

Single tasks: the first ``data.test_limit`` rows of each task's test split, greedy decoding of at most
``generation.max_new_tokens`` tokens (``auto``: each task's answer budget, pipeline/stages/answer_budget.py), each
task's own metrics (``data.scoring.score``). Composite-n: ``data.composite.build_composite`` over MeteoRA's sub-task
list for n (``composite3/5/10``), or the first n of ``composite_tasks`` when set (MeteoRA's prompt: its two fixed
examples, ``composite_shots``), ``composite_rows`` rows, answers parsed and scored per sub-task with attempts /
correct (``data.composite.score_composite``); meteora uses ``router.composite[n]``'s temperature there, and EOS is
held back until n answers (``generation.composite_suppress_eos``, pipeline/stages/eos_gate.py). Writes
``predictions.jsonl`` (one line per example: prompt, gold, prediction, route) and metrics.json (``<task>/<metric>``,
``<task>/score``, ``main`` = mean score).

Multi-GPU: generation runs through ``Trainer.predict`` with ``cfg.trainer``'s devices (``trainer=ddp``): the
generate calls are sharded across the processes and gathered once on rank 0, which alone scores and writes;
predictions equal a one-process run's. The generate calls (*jobs*, ``data.batches.plan_jobs``: prompts sorted by
length, left-padded) run through ``Trainer.predict``: with one device that is a plain loop; under DDP Lightning's
``UnrepeatedDistributedSamplerWrapper`` hands rank r the jobs r, r+N, ... (none twice, none lost), each rank
generates its share, and the outputs are gathered once, on rank 0, back into input order. The jobs are the same
whatever the number of processes, so predictions equal a one-process run's exactly.
"""

from __future__ import annotations

import json
import logging
import time

import hydra
import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.strategies import DDPStrategy
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader
from transformers import LogitsProcessorList

from common.atomic import atomic_write_text
from data.batches import Generations, PromptGroup, assemble, left_pad, plan_jobs
from data.composite import build_composite, score_composite
from data.scoring import score
from data.task_rows import task_rows
from data.task_table import SELECTIONS
from pipeline.runtime.distributed import gather_to_zero
from pipeline.runtime.entry import CONF_DIR, cli, user_errors
from pipeline.runtime.multilora import build_multilora, groups_wanted, plan_multilora
from pipeline.runtime.settings import check_settings
from pipeline.runtime.stage import StageRun
from pipeline.stages.answer_budget import composite_budget, task_budget
from pipeline.stages.decode_engine import DecodeEngine
from pipeline.stages.eos_gate import EOSUntilAnswers
from pipeline.stages.no_repeat import NoRepeatNGram

log = logging.getLogger(__name__)


@torch.no_grad()
def run_job(mm, tokenizer, job: dict, engine: DecodeEngine | None = None) -> dict:
    """One batched greedy generate call (``engine``: how it runs, transformers' generate by default):
    ``{"group", "indices", "texts", "routes", "new_tokens"}``."""
    t0 = time.perf_counter()
    device = next(mm.parameters()).device
    ids, mask = left_pad(job["input_ids"], tokenizer.pad_token_id)
    processors = []
    if job.get("no_repeat_ngram_size"):  # MeteoRA's no_repeat_ngram_size: no n-gram twice (the prompt's included)
        processors.append(NoRepeatNGram(job["no_repeat_ngram_size"]))
    if job.get("min_answers"):  # composite-n: EOS held back until the output holds n answers
        processors.append(EOSUntilAnswers(tokenizer, ids.shape[1], job["min_answers"]))
    processors = LogitsProcessorList(processors) if processors else None
    engine = engine or DecodeEngine("generate", mm)
    gen = engine(mm, ids.to(device), mask.to(device), max_new_tokens=job["max_new_tokens"],
                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, task_ids=job["task_ids"],
                 logits_processor=processors)
    new = gen[:, ids.shape[1]:].cpu()
    route = mm.last_route()
    routes = [None] * len(job["indices"])
    if route is not None:
        rid, rw = route
        routes = [{"ids": rid[row].tolist(), "weights": [round(float(w), 4) for w in rw[row]]}
                  for row in range(len(job["indices"]))]
    return {"group": job["group"], "indices": list(job["indices"]), "routes": routes,
            "texts": [tokenizer.decode(t, skip_special_tokens=True).strip() for t in new],
            "ends": [row_end(t.tolist(), tokenizer.eos_token_id, tokenizer.pad_token_id) for t in new],
            "new_tokens": int((new != tokenizer.pad_token_id).sum()), "seconds": time.perf_counter() - t0}


def row_end(new: list[int], eos: int | None, pad: int | None) -> dict:
    """How one row's generation ended: ``{"new_tokens": tokens before its EOS (or before the padding of a row that
    stopped, or all of them), "eos": whether it stopped by EOS}``. A row with no text that ran its whole budget
    without EOS wrote only special tokens or whitespace (``no_text_at_budget``): a model denied its EOS may loop on
    another special token, a random one on line breaks."""
    if eos is not None and eos in new:
        return {"new_tokens": new.index(eos), "eos": True}
    if pad is not None and pad in new:
        return {"new_tokens": new.index(pad), "eos": False}
    return {"new_tokens": len(new), "eos": False}


class GenerationModule(L.LightningModule):
    """``Trainer.predict`` adapter: each predict batch is one job (``plan_jobs``), its output ``run_job``'s."""

    def __init__(self, mm, tokenizer, engine: DecodeEngine | None = None):
        super().__init__()
        self.mm = mm
        self.tokenizer = tokenizer
        self.engine = engine

    def predict_step(self, job, batch_idx):
        return run_job(self.mm, self.tokenizer, job, self.engine)


def _one_job(items):
    return items[0]


def generate_groups(trainer, mm, tokenizer, groups: list[PromptGroup], *, batch_size: int = 8,
                    max_prompt_tokens: int, max_batch_tokens: int | None = None,
                    engine: DecodeEngine | None = None) -> list[Generations] | None:
    """Generate every group through ``trainer.predict`` (sharded across its processes); rank 0 gets the
    ``Generations`` (``seconds``: the busiest rank's time inside generate, so process start-up is not counted),
    the other ranks None. A prompt that, with its answer budget, would pass the model's positions is skipped
    (``plan_jobs``' ``context``) as one over ``max_prompt_tokens`` is."""
    context = getattr(mm.model.config, "max_position_embeddings", None)
    jobs, skipped = plan_jobs(tokenizer, groups, batch_size, max_prompt_tokens, max_batch_tokens, context=context)
    outputs = trainer.predict(GenerationModule(mm, tokenizer, engine),
                              dataloaders=DataLoader(jobs, batch_size=1, collate_fn=_one_job)) if jobs else []
    outputs = list(outputs or [])
    parts = gather_to_zero((outputs, sum(o["seconds"] for o in outputs)))
    if parts is None:
        return None
    gens = assemble(groups, skipped, [o for outs, _ in parts for o in outs], max(s for _, s in parts))
    lost = [(i, k) for i, g in enumerate(gens) for k, t in enumerate(g.texts) if t is None]
    if len(lost) != sum(skipped):
        raise RuntimeError(f"{len(lost) - sum(skipped)} prompts came back from no rank")
    return gens


def task_score(metrics: dict) -> float | None:
    """One number per task for tables and the radar plot: accuracy, else ROUGE-L, else BLEU/100 (all in [0,1])."""
    for key, scale in (("accuracy", 1.0), ("rougeL", 1.0), ("bleu", 0.01)):
        if metrics.get(key) is not None:
            return float(metrics[key]) * scale
    return None


def predict_trainer(cfg: DictConfig, progress: bool):
    """The Trainer that runs generation: ``cfg.trainer``'s devices and processes, no logger, no grad.

    Generation needs every rank to hold the whole model, so ``trainer=fsdp`` evaluates with DDP replicas."""
    kw = {"logger": False, "callbacks": [], "enable_progress_bar": progress, "inference_mode": False}
    if "FSDP" in str(OmegaConf.select(cfg, "trainer.strategy._target_", default="")):
        kw["strategy"] = DDPStrategy()
    return instantiate(cfg.trainer, **kw)


def _single_task_groups(cfg, needs_task_ids: bool, tokenizer):
    """One prompt group per task: its first ``data.test_limit`` test rows (the oracle gets the task's adapter), at
    most its own answer budget of new tokens (pipeline.stages.answer_budget)."""
    rows, groups = {}, []
    for task in [str(t) for t in cfg.tasks]:
        rows[task] = task_rows(task, str(cfg.data.test_split), cfg.data.test_limit, int(cfg.data.split_seed))
        groups.append(PromptGroup([r["prompt"] for r in rows[task]],
                                  [task] * len(rows[task]) if needs_task_ids else None,
                                  task_budget(cfg, task, tokenizer),
                                  no_repeat_ngram_size=cfg.generation.no_repeat_ngram_size))
    return rows, groups


def _score_single_tasks(cfg, rows, gens):
    metrics, lines, skipped, new_tokens = {}, [], 0, 0
    for (task, task_rows_), g in zip(rows.items(), gens):
        scored = [(r, p) for r, p in zip(task_rows_, g.texts) if p is not None]
        m = score(task, [p for _, p in scored], [r["answer"] for r, _ in scored]) if scored else {"n": 0}
        metrics.update({f"{task}/{k}": v for k, v in m.items()})
        metrics[f"{task}/score"] = task_score(m)
        metrics[f"{task}/skipped_long"] = g.skipped
        metrics[f"{task}/max_new_tokens"] = g.max_new_tokens
        metrics[f"{task}/gen_seconds"] = round(g.own_seconds, 3)  # where a run's generation time goes, per task
        skipped, new_tokens = skipped + g.skipped, new_tokens + g.new_tokens
        for i, (r, p, route, end) in enumerate(zip(task_rows_, g.texts, g.routes, g.ends)):
            lines.append({"task": task, "index": i, "prompt": r["prompt"], "answer": r["answer"], "prediction": p,
                          "route": route, **(end or {})})
    scores = [metrics[f"{t}/score"] for t in cfg.tasks if metrics.get(f"{t}/score") is not None]
    metrics["main"] = sum(scores) / len(scores) if scores else None
    return metrics, lines, list(cfg.tasks), skipped, new_tokens


def composite_subtasks(cfg, n: int) -> list[str]:
    """The sub-tasks of composite-n: MeteoRA's list for n (``composite_tasks: null``), else the first n given."""
    if cfg.composite_tasks is None:
        if f"composite{n}" not in SELECTIONS:
            raise ValueError(f"composite_n={n} has no MeteoRA sub-task list (it has 3, 5 and 10); set "
                             f"composite_tasks=[...] to name its sub-tasks")
        return list(SELECTIONS[f"composite{n}"])
    subtasks = [str(t) for t in list(cfg.composite_tasks)[:n]]
    if len(subtasks) < n:
        raise ValueError(f"composite_n={n} but composite_tasks has {len(subtasks)} tasks; lower composite_n")
    return subtasks


def _check_composite(cfg, n: int, strategy) -> list[str]:
    """The sub-tasks of composite-n, refused (one line) before any model loads when they cannot be built or routed."""
    subtasks = composite_subtasks(cfg, n)
    if strategy.needs_task_ids:
        raise ValueError(f"router={strategy.name} needs one task per prompt; composite prompts mix tasks: use a "
                         f"router that decides by itself (base, lora_b, merge, meteora, dlp or dlp_segments)")
    return subtasks


def _composite_group(cfg, n, subtasks, tokenizer):
    ds = build_composite(subtasks, rows=int(cfg.composite_rows), seed=int(cfg.composite_seed),
                         shots=int(cfg.composite_shots), split_seed=int(cfg.data.split_seed),
                         repeat_short=bool(cfg.composite_repeat_short))
    suppress = bool(cfg.generation.composite_suppress_eos)
    return subtasks, ds, PromptGroup(list(ds["prompt"]), None, composite_budget(cfg, subtasks, tokenizer),
                                     min_answers=n if suppress else None,
                                     no_repeat_ngram_size=cfg.generation.no_repeat_ngram_size)


def _score_composite(n, subtasks, ds, g):
    """Metrics and prediction lines of a composite-n run. Only the rows that were generated are scored: a prompt
    skipped as too long (text None, ``skipped_long``) is no row of the scores, as in MeteoRA's eval_model.py (it
    never generates for such a prompt, so its N, the attempts' divisor, counts only the prompts it ran), as in
    single-task scoring, and as in the claims' intervals (pipeline/report/claim_rows.py drops it too). Scored as
    an empty output instead, it would cost every sub-task a wrong answer and attempts n / N per skipped row."""
    kept = [i for i, p in enumerate(g.texts) if p is not None]
    metrics = {}
    if kept:
        rep = score_composite([g.texts[i] for i in kept], ds.select(kept))
    else:  # every prompt too long: nothing to score
        rep = {"per_task": {}, "attempts": None, "correct": None, "rows": 0,
               "missing": 0, "extra": 0, "duplicate": 0}
    for name, m in rep["per_task"].items():
        metrics.update({f"{name}/{k}": v for k, v in m.items()})
        metrics[f"{name}/score"] = task_score(m)
    metrics.update({k: rep[k] for k in ("attempts", "correct", "rows", "missing", "extra", "duplicate")})
    metrics["max_new_tokens"] = g.max_new_tokens
    metrics["main"] = rep["correct"] / n if rep["correct"] is not None else None
    lines = [{"index": i, "prompt": row["prompt"], "answers": row["answers"], "sources": row["sources"],
              "prediction": p, "route": r, **(end or {})}
             for i, (row, p, r, end) in enumerate(zip(ds, g.texts, g.routes, g.ends))]
    return metrics, lines, subtasks, g.skipped, g.new_tokens


def no_text_at_budget(gens) -> int:
    """Rows that ran their whole answer budget without EOS and wrote no text (only special tokens or whitespace;
    ``row_end``)."""
    return sum(1 for g in gens for text, end in zip(g.texts, g.ends)
               if text == "" and end and not end["eos"] and end["new_tokens"] >= g.max_new_tokens)


def evaluate(cfg: DictConfig) -> float | None:
    """Evaluate ``cfg.router`` on the tasks (or composite-n); return the mean task score (None on ranks > 0)."""
    check_settings(cfg)
    n = int(cfg.composite_n) if cfg.composite_n else None
    plan = plan_multilora(cfg, composite_n=n)  # strategy, adapters and trained router checked before a model loads
    subtasks = _check_composite(cfg, n, plan.strategy) if n else None
    with StageRun(cfg) as run:
        mm, tokenizer = build_multilora(cfg, plan=plan)
        mm.eval()
        grouped = mm.group_projections() if groups_wanted(cfg.generation.group_projections, mm) else 0
        if n:
            subtasks, ds, group = _composite_group(cfg, n, subtasks, tokenizer)
            groups = [group]
        else:
            rows, groups = _single_task_groups(cfg, mm.router.needs_task_ids, tokenizer)
        trainer = predict_trainer(cfg, bool(cfg.progress))
        engine = DecodeEngine(str(cfg.generation.engine), mm)
        gens = generate_groups(trainer, mm, tokenizer, groups, batch_size=int(cfg.generation.batch_size),
                               max_prompt_tokens=int(cfg.data.max_prompt_tokens),
                               max_batch_tokens=cfg.generation.max_batch_tokens, engine=engine)
        if gens is None:  # another DDP rank: its share went to rank 0, which scores and writes
            return None
        if n:
            metrics, lines, tasks, skipped, new_tokens = _score_composite(n, subtasks, ds, gens[0])
        else:
            metrics, lines, tasks, skipped, new_tokens = _score_single_tasks(cfg, rows, gens)
        seconds = gens[0].seconds if gens else 0.0
        metrics["no_text_at_budget"] = no_text_at_budget(gens)
        metrics.update({"skipped_long": skipped, "gen_seconds": round(seconds, 3),
                        "new_tokens_per_s": round(new_tokens / max(seconds, 1e-9), 2),
                        "processes": trainer.world_size, "projection_groups": grouped,
                        "decodes_grouped": mm.decodes_grouped(), **engine.record()})
        device = next(mm.parameters()).device
        if device.type == "cuda":  # what this process held at its peak (processes of a reproduce share one GPU)
            metrics.update({"peak_allocated_gb": round(torch.cuda.max_memory_allocated(device) / 2**30, 3),
                            "peak_reserved_gb": round(torch.cuda.max_memory_reserved(device) / 2**30, 3)})
        atomic_write_text(run.run_dir / "predictions.jsonl", "".join(json.dumps(x) + "\n" for x in lines))
        if run.tracker is not None and lines:
            cols = ["task", "prompt", "answer", "prediction"]
            rows_ = [[x.get("task", f"composite-{n}"), x["prompt"][-300:], str(x.get("answer", x.get("answers"))),
                      x["prediction"]] for x in lines[:200]]
            run.tracker.log_table("evaluate/predictions", cols, rows_)
        label = str(cfg.router.label) if cfg.router.label is not None else mm.router.label
        return run.finish(tasks=tasks, strategy=label, metrics=metrics, main_metric="main",
                          extra={"composite_n": n, "router": plan.strategy.name,
                                 "router_config": mm.router.config()})  # the knobs it ran with (MeteoRA's T)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="evaluate")
def main(cfg: DictConfig) -> float | None:
    with user_errors(cfg):
        return evaluate(cfg)


if __name__ == "__main__":
    cli(main)
