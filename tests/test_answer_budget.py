"""Answer budgets from the gold answers (pipeline.stages.answer_budget): >= the 99th percentile of a task's training
answers in tokens (+1 for EOS), per task; composite-n sums its sub-tasks' budgets."""

from __future__ import annotations

import numpy as np
import pytest
from needs_assets import needs_task_files, needs_tiny_model
from omegaconf import OmegaConf

from data.assets import cache_dir
from data.tasks import load_split
from pipeline.stages.answer_budget import NUMBERING_TOKENS, answer_budget, composite_budget, task_budget

pytestmark = [needs_task_files, needs_tiny_model]


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(cache_dir() / "models" / "tiny-random-llama")


def _cfg(**generation):
    return OmegaConf.create({"data": {"split_seed": 0}, "generation": {"max_new_tokens": 16,
                                                                       "composite_max_new_tokens_per_task": 24,
                                                                       **generation}})


@pytest.mark.parametrize("task", ["unit_conversion", "question_selection", "strategyqa"])
def test_budget_covers_99_percent_of_the_training_answers(task, tok):
    answers = load_split(task, "train")["answer"]
    lengths = np.array([len(tok(a, add_special_tokens=False)["input_ids"]) for a in answers])
    budget = answer_budget(task, tok)
    assert (lengths <= budget - 1).mean() >= 0.99 and budget - 1 in set(lengths.tolist())  # an observed length
    assert (lengths < budget - 1).mean() < 0.99 or budget - 1 == lengths.min()  # and no larger than needed
    assert answer_budget(task, tok, quantile=1.0) == lengths.max() + 1
    assert answer_budget(task, tok, cap=3) == min(budget, 3)


def test_config_picks_auto_or_a_number(tok):
    assert task_budget(_cfg(), "winowhy", tok) == 16
    auto = _cfg(max_new_tokens="auto", composite_max_new_tokens_per_task="auto")
    assert task_budget(auto, "question_selection", tok) == answer_budget("question_selection", tok)
    subs = ["logical_deduction", "question_selection", "strategyqa"]
    assert composite_budget(_cfg(), subs, tok) == 3 * 24
    assert composite_budget(auto, subs, tok) == sum(answer_budget(t, tok) + NUMBERING_TOKENS for t in subs)
    with pytest.raises(ValueError, match=r"generation.max_new_tokens='long'.*'auto'"):
        task_budget(_cfg(max_new_tokens="long"), "winowhy", tok)
    with pytest.raises(ValueError, match=r"answer_quantile=0"):
        answer_budget("winowhy", tok, quantile=0)
