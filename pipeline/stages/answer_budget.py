"""How many new tokens evaluation lets a task generate: enough for its gold answers, computed from its data.

A fixed budget cuts long answers short: at 16 tokens the same adapters on the same rows score lower than at 24
(question_selection's choices are whole questions, unit_conversion's answers carry units). ``auto`` gives each
task at least the 99th percentile (``generation.answer_quantile``) of its gold answers' lengths in tokens, over its
whole training split, with the run's tokenizer, plus one token for the EOS its adapters were trained to end with:

    generation.max_new_tokens: auto                  # per task: answer_budget(task)
    generation.composite_max_new_tokens_per_task: auto   # composite-n: the sum of its sub-tasks' budgets
    generation.max_new_tokens_cap: 256               # optional bound for tasks with very long tails (alpaca)

An int keeps the old behaviour (the same budget for every task). The percentile is taken with numpy's
``method="higher"`` (an observed length, never an interpolation below it), and evaluate records each task's
budget in metrics.json (``<task>/max_new_tokens``).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from data.tasks import load_split

AUTO = "auto"
NUMBERING_TOKENS = 4  # a composite answer line's "10. " and its newline


@lru_cache(maxsize=256)
def _lengths(task: str, tokenizer_name: str, tokenizer, split_seed: int) -> tuple[int, ...]:
    answers = [str(a) for a in load_split(task, "train", seed=split_seed)["answer"]]
    ids = tokenizer(answers, add_special_tokens=False)["input_ids"]
    return tuple(len(x) for x in ids)


def answer_budget(task: str, tokenizer, *, quantile: float = 0.99, split_seed: int = 0, cap: int | None = None) \
        -> int:
    """New tokens for ``task``: the ``quantile`` of its training answers' token lengths (+1 for EOS), at most
    ``cap``."""
    if not 0 < quantile <= 1:
        raise ValueError(f"generation.answer_quantile={quantile} must be in (0, 1]")
    lengths = _lengths(task, str(getattr(tokenizer, "name_or_path", "")), tokenizer, int(split_seed))
    budget = int(np.quantile(np.asarray(lengths), quantile, method="higher")) + 1
    return min(budget, int(cap)) if cap else budget


def _setting(cfg, key: str):
    value = cfg.generation.get(key)
    if isinstance(value, str) and value != AUTO:
        raise ValueError(f"generation.{key}={value!r}: give a number of tokens or {AUTO!r} (from the gold answers)")
    return value


def task_budget(cfg, task: str, tokenizer) -> int:
    """``generation.max_new_tokens`` for one task: the number given, or ``auto``'s ``answer_budget``."""
    value = _setting(cfg, "max_new_tokens")
    if value != AUTO:
        return int(value)
    return answer_budget(task, tokenizer, quantile=float(cfg.generation.get("answer_quantile", 0.99)),
                         split_seed=int(cfg.data.get("split_seed", 0)), cap=cfg.generation.get("max_new_tokens_cap"))


def composite_budget(cfg, subtasks: list[str], tokenizer) -> int:
    """New tokens for a composite-n output: n x the per-task number given, or with ``auto`` the sum of the
    sub-tasks' own budgets plus each answer line's numbering."""
    value = _setting(cfg, "composite_max_new_tokens_per_task")
    if value != AUTO:
        return len(subtasks) * int(value)
    q, seed = float(cfg.generation.get("answer_quantile", 0.99)), int(cfg.data.get("split_seed", 0))
    cap = cfg.generation.get("max_new_tokens_cap")
    return sum(answer_budget(t, tokenizer, quantile=q, split_seed=seed, cap=cap) + NUMBERING_TOKENS
               for t in subtasks)


__all__ = ["AUTO", "answer_budget", "composite_budget", "task_budget"]
