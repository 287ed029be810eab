"""Stage ``evaluate``: score one routing strategy on the experiment's tasks, or on composite-n prompts.

    python -m pipeline.evaluate experiment=demo router=oracle                      # each task on its own
    python -m pipeline.evaluate experiment=demo router=meteora router.top_k=1
    python -m pipeline.evaluate experiment=demo router=dlp composite_n=3           # composite-3 prompts
    python -m pipeline.evaluate -m experiment=demo router=base,oracle,dlp           # a sweep over strategies

Single tasks: the first ``data.test_limit`` rows of each task's test split, greedy decoding of at most
``generation.max_new_tokens`` tokens, each task's own metrics (``data.scoring.score``). Composite-n:
``data.composite.build_composite`` over MeteoRA's sub-task list for n (``composite3/5/10``), or the first n of
``composite_tasks`` when set (MeteoRA's prompt: its two fixed examples, ``composite_shots``), ``composite_rows``
rows, answers parsed and scored per sub-task with attempts / correct (``data.composite.score_composite``);
meteora uses ``router.composite_temperature[n]`` there, and EOS is held back until n answers
(``generation.composite_suppress_eos``, pipeline/eos_gate.py). Writes ``predictions.jsonl`` (one line per example:
prompt, gold, prediction, route) and metrics.json (``<task>/<metric>``, ``<task>/score``, ``main`` = mean score).

Multi-GPU: generation runs through ``Trainer.predict`` with ``cfg.trainer``'s devices (``trainer=ddp``): the
generate calls are sharded across the processes and gathered once on rank 0, which alone scores and writes;
predictions equal a one-process run's (``pipeline/generation.py``).
"""

from __future__ import annotations

import json
import logging

import hydra
from omegaconf import DictConfig, OmegaConf

from pipeline.atomic import atomic_write_text
from pipeline.entry import CONF_DIR, cli, user_errors
from pipeline.stage import StageRun

log = logging.getLogger(__name__)


def task_score(metrics: dict) -> float | None:
    """One number per task for tables and the radar plot: accuracy, else ROUGE-L, else BLEU/100 (all in [0,1])."""
    for key, scale in (("accuracy", 1.0), ("rougeL", 1.0), ("bleu", 0.01)):
        if metrics.get(key) is not None:
            return float(metrics[key]) * scale
    return None


def _label(cfg: DictConfig) -> str:
    return str(cfg.router.label)


def predict_trainer(cfg: DictConfig, progress: bool):
    """The Trainer that runs generation: ``cfg.trainer``'s devices and processes, no logger, no grad.

    Generation needs every rank to hold the whole model, so ``trainer=fsdp`` evaluates with DDP replicas."""
    from hydra.utils import instantiate

    kw = {"logger": False, "callbacks": [], "enable_progress_bar": progress, "inference_mode": False}
    if "FSDP" in str(OmegaConf.select(cfg, "trainer.strategy._target_", default="")):
        from lightning.pytorch.strategies import DDPStrategy

        kw["strategy"] = DDPStrategy()
    return instantiate(cfg.trainer, **kw)


def _single_task_groups(cfg, tokenizer):
    """One prompt group per task: its first ``data.test_limit`` test rows (the oracle gets the task's adapter), at
    most its own answer budget of new tokens (pipeline.answer_budget)."""
    from pipeline.answer_budget import task_budget
    from pipeline.generation import PromptGroup
    from pipeline.task_rows import task_rows

    oracle = str(cfg.router.strategy) == "oracle"
    rows, groups = {}, []
    for task in [str(t) for t in cfg.tasks]:
        rows[task] = task_rows(task, str(cfg.data.test_split), cfg.data.test_limit, int(cfg.data.get("split_seed", 0)))
        groups.append(PromptGroup([r["prompt"] for r in rows[task]], [task] * len(rows[task]) if oracle else None,
                                  task_budget(cfg, task, tokenizer)))
    return rows, groups


def _score_single_tasks(cfg, rows, gens):
    from data.scoring import score

    metrics, lines, skipped, new_tokens = {}, [], 0, 0
    for (task, task_rows_), g in zip(rows.items(), gens):
        scored = [(r, p) for r, p in zip(task_rows_, g.texts) if p is not None]
        m = score(task, [p for _, p in scored], [r["answer"] for r, _ in scored]) if scored else {"n": 0}
        metrics.update({f"{task}/{k}": v for k, v in m.items()})
        metrics[f"{task}/score"] = task_score(m)
        metrics[f"{task}/skipped_long"] = g.skipped
        metrics[f"{task}/max_new_tokens"] = g.max_new_tokens
        skipped, new_tokens = skipped + g.skipped, new_tokens + g.new_tokens
        for i, (r, p, route) in enumerate(zip(task_rows_, g.texts, g.routes)):
            lines.append({"task": task, "index": i, "prompt": r["prompt"], "answer": r["answer"], "prediction": p,
                          "route": route})
    scores = [metrics[f"{t}/score"] for t in cfg.tasks if metrics.get(f"{t}/score") is not None]
    metrics["main"] = sum(scores) / len(scores) if scores else None
    return metrics, lines, list(cfg.tasks), skipped, new_tokens


def composite_subtasks(cfg, n: int) -> list[str]:
    """The sub-tasks of composite-n: MeteoRA's list for n (``composite_tasks: null``), else the first n given."""
    from data.task_table import SELECTIONS

    if cfg.get("composite_tasks") is None:
        if f"composite{n}" not in SELECTIONS:
            raise ValueError(f"composite_n={n} has no MeteoRA sub-task list (it has 3, 5 and 10); set "
                             f"composite_tasks=[...] to name its sub-tasks")
        return list(SELECTIONS[f"composite{n}"])
    subtasks = [str(t) for t in list(cfg.composite_tasks)[:n]]
    if len(subtasks) < n:
        raise ValueError(f"composite_n={n} but composite_tasks has {len(subtasks)} tasks; lower composite_n")
    return subtasks


def _composite_group(cfg, n, tokenizer):
    from data.composite import build_composite
    from pipeline.answer_budget import composite_budget
    from pipeline.generation import PromptGroup

    subtasks = composite_subtasks(cfg, n)
    if str(cfg.router.strategy) == "oracle":
        raise ValueError("router=oracle needs one task per prompt; composite prompts mix tasks: use base, lora_b, "
                         "merge, meteora, dlp or dlp_segments")
    ds = build_composite(subtasks, rows=int(cfg.composite_rows), seed=int(cfg.composite_seed),
                         shots=int(cfg.get("composite_shots", 2)),
                         split_seed=int(cfg.data.get("split_seed", 0)),
                         repeat_short=bool(cfg.get("composite_repeat_short", False)))
    suppress = bool(cfg.generation.get("composite_suppress_eos", True))
    return subtasks, ds, PromptGroup(list(ds["prompt"]), None, composite_budget(cfg, subtasks, tokenizer),
                                     min_answers=n if suppress else None)


def _score_composite(n, subtasks, ds, g):
    from data.composite import score_composite

    outputs = ["" if p is None else p for p in g.texts]
    rep = score_composite(outputs, ds)
    metrics = {}
    for name, m in rep["per_task"].items():
        metrics.update({f"{name}/{k}": v for k, v in m.items()})
        metrics[f"{name}/score"] = task_score(m)
    metrics.update({k: rep[k] for k in ("attempts", "correct", "rows", "missing", "extra", "duplicate")})
    metrics["max_new_tokens"] = g.max_new_tokens
    metrics["main"] = rep["correct"] / n
    lines = [{"index": i, "prompt": row["prompt"], "answers": row["answers"], "prediction": p, "route": r}
             for i, (row, p, r) in enumerate(zip(ds, g.texts, g.routes))]
    return metrics, lines, subtasks, g.skipped, g.new_tokens


def evaluate(cfg: DictConfig) -> float | None:
    """Evaluate ``cfg.router`` on the tasks (or composite-n); return the mean task score (None on ranks > 0)."""
    from pipeline.generation import generate_groups
    from pipeline.multilora_setup import build_multilora

    n = int(cfg.composite_n) if cfg.get("composite_n") else None
    with StageRun(cfg) as run:
        mm, tokenizer = build_multilora(cfg, composite_n=n)
        mm.eval()
        if n:
            subtasks, ds, group = _composite_group(cfg, n, tokenizer)
            groups = [group]
        else:
            rows, groups = _single_task_groups(cfg, tokenizer)
        trainer = predict_trainer(cfg, bool(cfg.get("progress", True)))
        gens = generate_groups(trainer, mm, tokenizer, groups, batch_size=int(cfg.generation.batch_size),
                               max_prompt_tokens=int(cfg.data.max_prompt_tokens))
        if gens is None:  # another DDP rank: its share went to rank 0, which scores and writes
            return None
        if n:
            metrics, lines, tasks, skipped, new_tokens = _score_composite(n, subtasks, ds, gens[0])
        else:
            metrics, lines, tasks, skipped, new_tokens = _score_single_tasks(cfg, rows, gens)
        seconds = gens[0].seconds if gens else 0.0
        metrics.update({"skipped_long": skipped, "gen_seconds": round(seconds, 3),
                        "new_tokens_per_s": round(new_tokens / max(seconds, 1e-9), 2),
                        "processes": trainer.world_size})
        atomic_write_text(run.run_dir / "predictions.jsonl", "".join(json.dumps(x) + "\n" for x in lines))
        if run.tracker is not None and lines:
            cols = ["task", "prompt", "answer", "prediction"]
            rows_ = [[x.get("task", f"composite-{n}"), x["prompt"][-300:], str(x.get("answer", x.get("answers"))),
                      x["prediction"]] for x in lines[:200]]
            run.tracker.log_table("evaluate/predictions", cols, rows_)
        return run.finish(tasks=tasks, strategy=_label(cfg), metrics=metrics, main_metric="main",
                          extra={"composite_n": n, "router": str(cfg.router.strategy)})


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="evaluate")
def main(cfg: DictConfig) -> float | None:
    with user_errors():
        return evaluate(cfg)


if __name__ == "__main__":
    cli(main)
