"""Stage ``evaluate``: score one routing strategy on the experiment's tasks, or on composite-n prompts.

    python -m pipeline.evaluate experiment=demo router=oracle                      # each task on its own
    python -m pipeline.evaluate experiment=demo router=meteora router.top_k=1
    python -m pipeline.evaluate experiment=demo router=dlp composite_n=3           # composite-3 prompts
    python -m pipeline.evaluate -m experiment=demo router=base,oracle,dlp           # a sweep over strategies

Single tasks: the first ``data.test_limit`` rows of each task's test split, greedy decoding of at most
``generation.max_new_tokens`` tokens, each task's own metrics (``data.scoring.score``). Composite-n:
``data.composite.build_composite`` over the first n of ``composite_tasks`` (MeteoRA's 2-shot numbered-list
prompt), answers parsed and scored per sub-task with attempts / correct (``data.composite.score_composite``);
meteora uses ``router.composite_temperature[n]`` there. Writes ``predictions.jsonl`` (one line per example:
prompt, gold, prediction, route) and metrics.json (``<task>/<metric>``, ``<task>/score``, ``main`` = mean score).
"""

from __future__ import annotations

import json
import logging

import hydra
from omegaconf import DictConfig

from pipeline.atomic import atomic_write_text
from pipeline.entry import CONF_DIR, user_errors
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


def _single_tasks(cfg, mm, tokenizer, gen_cfg, progress):
    from data.scoring import score
    from pipeline.generation import generate_texts
    from pipeline.task_rows import task_rows

    metrics, lines, skipped, seconds, new_tokens = {}, [], 0, 0.0, 0
    oracle = str(cfg.router.strategy) == "oracle"
    for task in [str(t) for t in cfg.tasks]:
        rows = task_rows(task, str(cfg.data.test_split), cfg.data.test_limit, int(cfg.data.get("split_seed", 0)))
        g = generate_texts(mm, tokenizer, [r["prompt"] for r in rows], task_ids=[task] * len(rows) if oracle else None,
                           batch_size=int(gen_cfg.batch_size), max_new_tokens=int(gen_cfg.max_new_tokens),
                           max_prompt_tokens=int(cfg.data.max_prompt_tokens), desc=f"{_label(cfg)}:{task}",
                           progress=progress)
        scored = [(r, p) for r, p in zip(rows, g.texts) if p is not None]
        m = score(task, [p for _, p in scored], [r["answer"] for r, _ in scored]) if scored else {"n": 0}
        metrics.update({f"{task}/{k}": v for k, v in m.items()})
        metrics[f"{task}/score"] = task_score(m)
        metrics[f"{task}/skipped_long"] = g.skipped
        skipped, seconds, new_tokens = skipped + g.skipped, seconds + g.seconds, new_tokens + g.new_tokens
        for i, (r, p, route) in enumerate(zip(rows, g.texts, g.routes)):
            lines.append({"task": task, "index": i, "prompt": r["prompt"], "answer": r["answer"], "prediction": p,
                          "route": route})
    scores = [metrics[f"{t}/score"] for t in cfg.tasks if metrics.get(f"{t}/score") is not None]
    metrics["main"] = sum(scores) / len(scores) if scores else None
    return metrics, lines, list(cfg.tasks), skipped, seconds, new_tokens


def _composite(cfg, mm, tokenizer, gen_cfg, n, progress):
    from data.composite import build_composite, score_composite
    from pipeline.generation import generate_texts

    subtasks = [str(t) for t in list(cfg.composite_tasks)[:n]]
    if len(subtasks) < n:
        raise ValueError(f"composite_n={n} but composite_tasks has {len(subtasks)} tasks; lower composite_n")
    if str(cfg.router.strategy) == "oracle":
        raise ValueError("router=oracle needs one task per prompt; composite prompts mix tasks: use base, lora_b, "
                         "merge, meteora, dlp or dlp_segments")
    ds = build_composite(subtasks, rows=int(cfg.composite_rows), seed=int(cfg.composite_seed),
                         shots=int(cfg.get("composite_shots", 2)),
                         split_seed=int(cfg.data.get("split_seed", 0)))
    g = generate_texts(mm, tokenizer, list(ds["prompt"]), batch_size=int(gen_cfg.batch_size),
                       max_new_tokens=n * int(gen_cfg.composite_max_new_tokens_per_task),
                       max_prompt_tokens=int(cfg.data.max_prompt_tokens), desc=f"{_label(cfg)}:composite-{n}",
                       progress=progress)
    outputs = ["" if p is None else p for p in g.texts]
    rep = score_composite(outputs, ds)
    metrics = {}
    for name, m in rep["per_task"].items():
        metrics.update({f"{name}/{k}": v for k, v in m.items()})
        metrics[f"{name}/score"] = task_score(m)
    metrics.update({k: rep[k] for k in ("attempts", "correct", "rows", "missing", "extra", "duplicate")})
    metrics["main"] = rep["correct"] / n
    lines = [{"index": i, "prompt": row["prompt"], "answers": row["answers"], "prediction": p, "route": r}
             for i, (row, p, r) in enumerate(zip(ds, g.texts, g.routes))]
    return metrics, lines, subtasks, g.skipped, g.seconds, g.new_tokens


def evaluate(cfg: DictConfig) -> float | None:
    """Evaluate ``cfg.router`` on the tasks (or composite-n); return the mean task score."""
    from pipeline.multilora_setup import build_multilora

    n = int(cfg.composite_n) if cfg.get("composite_n") else None
    with StageRun(cfg) as run:
        mm, tokenizer = build_multilora(cfg, composite_n=n)
        mm.eval()
        progress = bool(cfg.get("progress", True))
        if n:
            metrics, lines, tasks, skipped, seconds, new_tokens = _composite(cfg, mm, tokenizer, cfg.generation, n,
                                                                             progress)
        else:
            metrics, lines, tasks, skipped, seconds, new_tokens = _single_tasks(cfg, mm, tokenizer, cfg.generation,
                                                                                progress)
        metrics.update({"skipped_long": skipped, "gen_seconds": round(seconds, 3),
                        "new_tokens_per_s": round(new_tokens / max(seconds, 1e-9), 2)})
        atomic_write_text(run.run_dir / "predictions.jsonl", "".join(json.dumps(x) + "\n" for x in lines))
        if run.tracker is not None and lines:
            cols = ["task", "prompt", "answer", "prediction"]
            rows = [[x.get("task", f"composite-{n}"), x["prompt"][-300:], str(x.get("answer", x.get("answers"))),
                     x["prediction"]] for x in lines[:200]]
            run.tracker.log_table("evaluate/predictions", cols, rows)
        return run.finish(tasks=tasks, strategy=_label(cfg), metrics=metrics, main_metric="main",
                          extra={"composite_n": n, "router": str(cfg.router.strategy)})


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="evaluate")
def main(cfg: DictConfig) -> float | None:
    with user_errors():
        return evaluate(cfg)


if __name__ == "__main__":
    main()
