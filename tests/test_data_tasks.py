"""Task registry: the 28 MeteoRA tasks on the real BIG-bench JSON, selections, seeded splits, bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from needs_assets import needs_bigbench, needs_task_files

from data.errors import LoramuxDataError
from data.task_table import COMPOSITE3, COMPOSITE5, COMPOSITE10, DLP26_MCQ, DLP26_QA
from data.tasks import TASKS, data_source, get_task, load_split, select, split_indices, split_sizes, task_id

METEORA_BIGBENCH = """abstract_narrative_understanding contextual_parametric_knowledge_conflicts cs_algorithms disfl_qa
elementary_math_qa epistemic_reasoning formal_fallacies_syllogisms_negation goal_step_wikihow language_identification
linguistics_puzzles logical_deduction object_counting paragraph_segmentation play_dialog_same_or_different
question_selection reasoning_about_colored_objects strategyqa topical_chat tracking_shuffled_objects unit_conversion
vitaminc_fact_verification winowhy""".split()  # noqa: SIM905
METEORA_HF = ["gsm8k", "cnn_dailymail", "alpaca", "news_commentary_de", "news_commentary_es", "news_commentary_it"]



@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("LORAMUX_USE_HUB", "0")


def test_registry_is_meteora28_with_named_substitutes():
    assert sorted(TASKS) == sorted(METEORA_BIGBENCH + METEORA_HF)
    assert select("meteora28") == tuple(METEORA_BIGBENCH + METEORA_HF)
    for name in METEORA_BIGBENCH:
        assert TASKS[name].source == "bigbench" and TASKS[name].substitute is None
    for name in METEORA_HF:
        task = TASKS[name]
        assert task.source == "hf" and task.hf is not None and task.substitute and task.substitute_for == name
        assert data_source(name) == f"substitute-for {name}: {task.substitute}"
        assert data_source(name, hub=True).startswith("hf:")
    assert data_source("winowhy") == "bigbench"


def test_selections_match_the_papers():
    assert select("composite3") == COMPOSITE3 == ("logical_deduction", "question_selection", "strategyqa")
    assert select("composite5") == ("logical_deduction", "question_selection", "abstract_narrative_understanding",
                                    "goal_step_wikihow", "strategyqa")  # MeteoRA's order: not COMPOSITE3 + 2
    assert select("composite10")[4:] == ("winowhy", "strategyqa", "disfl_qa", "news_commentary_de", "alpaca",
                                         "linguistics_puzzles")
    assert len(COMPOSITE10) == 10 and len(COMPOSITE5) == 5
    dlp = select("dlp26")
    assert len(dlp) == len(set(dlp)) == 26 and len(DLP26_MCQ) == 17 and len(DLP26_QA) == 9
    assert set(dlp) <= set(TASKS)
    assert select("strategyqa,winowhy") == ("strategyqa", "winowhy")
    assert select(["composite3", "winowhy"]) == COMPOSITE3 + ("winowhy",)


def test_task_ids_are_positions_in_the_selection():
    assert [task_id(n) for n in select("meteora28")] == list(range(28))
    assert task_id("strategyqa", "composite3") == 2
    with pytest.raises(LoramuxDataError, match=r"not in selection 'composite3'"):
        task_id("winowhy", "composite3")


def test_unknown_task_names_close_matches_and_the_listing_command():
    with pytest.raises(LoramuxDataError) as err:
        get_task("strategyq")
    assert "unknown task 'strategyq'" in str(err.value) and "strategyqa" in str(err.value)
    assert "python -m data.tasks" in str(err.value)
    with pytest.raises(LoramuxDataError, match=r"unknown task 'nope_nothing'"):
        select("nope_nothing")
    with pytest.raises(LoramuxDataError, match=r"unknown split 'dev'"):
        load_split("winowhy", "dev")


def test_split_indices_are_disjoint_seeded_and_80_10_split():
    idx = split_indices(1000, None, seed=0)
    assert (len(idx["test"]), len(idx["val"]), len(idx["train"])) == (200, 80, 720)
    allidx = set(idx["test"]) | set(idx["val"]) | set(idx["train"])
    assert len(allidx) == 1000
    again = split_indices(1000, None, seed=0)
    assert all((again[s] == idx[s]).all() for s in idx)
    assert not (split_indices(1000, None, seed=1)["test"] == idx["test"]).all()
    with_test = split_indices(100, 30, seed=0)
    assert sorted(with_test["test"]) == list(range(30)) and len(with_test["val"]) == 10


@needs_bigbench
def test_every_task_loads_real_rows_in_meteora_format():
    for name in TASKS:
        task = TASKS[name]
        ds = load_split(name, "test", max_test=8)
        assert ds.column_names == ["task", "prompt", "answer", "choices"] and len(ds) == 8, name
        for row in ds:
            assert row["task"] == name
            assert row["prompt"].startswith("[INST] ") and row["prompt"].endswith(" [/INST]\n"), name
            assert row["answer"].strip(), name
            shown = [line.split("choice:", 1)[1].strip() for line in row["prompt"].split("\n")
                     if line.lstrip().startswith("choice:")]
            if row["choices"]:
                assert task.kind == "mcq" and row["answer"] in row["choices"], name
            if task.choice_lead is not None:  # MeteoRA's own lines, in the data's order
                assert "".join(f"choice: {c}\n" for c in row["choices"]) in row["prompt"], name
            elif shown:  # BIG-bench's: every choice once, a permutation of them
                assert sorted(shown) == sorted(c.strip() for c in row["choices"]), name
        if task.kind == "mcq":
            assert any(ds["choices"]), name
    bare = {n for n, t in TASKS.items() if t.kind == "mcq" and t.choice_lead is None and "choice:" not in
            load_split(n, "test", max_test=1)[0]["prompt"]}
    assert {"winowhy", "formal_fallacies_syllogisms_negation", "cs_algorithms"} <= bare  # BIG-bench appends none
    assert "question_selection" not in bare and "goal_step_wikihow" not in bare


@needs_bigbench
def test_meteora_prompt_details():
    row = load_split("logical_deduction", "test", max_test=1)[0]
    assert " Which choice is correct?\nchoice: " in row["prompt"]
    qa = load_split("strategyqa", "test", max_test=5)
    assert all(r["choices"] == [] for r in qa)
    assert all(r["answer"].split(".")[0] in ("Yes", "No") for r in qa)  # first target, not the Yes/No choice
    assert load_split("object_counting", "train", max_train=1)[0]["prompt"].startswith("[INST] Q: ")


@needs_bigbench
def test_splits_are_deterministic_disjoint_and_caps_are_prefixes():
    sizes = split_sizes("strategyqa")
    assert sizes == {"train": 1648, "val": 183, "test": 458}  # 2289 unique: 20% test, 10% of the rest val
    test = load_split("strategyqa", "test")
    assert len(test) == 458
    assert load_split("strategyqa", "test", max_test=20)["prompt"] == test["prompt"][:20]
    train = set(load_split("strategyqa", "train")["prompt"])
    val = set(load_split("strategyqa", "val")["prompt"])
    assert not (set(test["prompt"]) & train) and not (val & train)
    assert load_split("strategyqa", "test", seed=1, max_test=20)["prompt"] != test["prompt"][:20]
    assert split_sizes("strategyqa", max_train=10, max_test=3) == {"train": 10, "val": 183, "test": 3}


@needs_bigbench
def test_substitutes_serve_hf_tasks_offline():
    german = load_split("news_commentary_de", "train", max_train=5)
    assert all("summary in English" in p for p in german["prompt"])
    gsm = load_split("gsm8k", "test", max_test=5)
    assert all(a.strip().isdigit() for a in gsm["answer"])
    assert len(load_split("cnn_dailymail", "test", max_test=3)) == 3


@needs_task_files
def test_empty_split_is_one_clear_error():
    with pytest.raises(LoramuxDataError, match=r"split 'val' of task strategyqa is empty .*raise max_val"):
        load_split("strategyqa", "val", max_val=0)


def test_malformed_and_missing_task_json(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("LORAMUX_CACHE", str(cache))
    with pytest.raises(LoramuxDataError, match=r"BIG-bench data for 'winowhy' is missing .*python -m data.fetch --bigbench"):
        load_split("winowhy", "test")
    (cache / "bigbench" / "winowhy").mkdir(parents=True)
    (cache / "bigbench" / "winowhy" / "task.json").write_text('{"examples": [ {"input": "x", ')
    with pytest.raises(LoramuxDataError, match=r"malformed BIG-bench file .*winowhy/task.json.*--bigbench --force"):
        load_split("winowhy", "test")
    (cache / "bigbench" / "strategyqa").mkdir(parents=True)
    (cache / "bigbench" / "strategyqa" / "task.json").write_text(json.dumps({"examples": [{"input": "only"}]}))
    with pytest.raises(LoramuxDataError, match=r"example 0 lacks 'input' or a 'target'"):
        load_split("strategyqa", "test")


@needs_bigbench
def test_cli_lists_28_tasks_with_sources_and_counts():
    out = subprocess.run([sys.executable, "-m", "data.tasks"], capture_output=True, text=True, check=True,
                         env={**__import__("os").environ, "LORAMUX_USE_HUB": "0"}).stdout
    lines = [ln for ln in out.splitlines() if "train=" in ln]
    assert len(lines) == 28
    assert sum("bigbench " in ln for ln in lines) == 22
    assert sum("substitute-for" in ln for ln in lines) == 6
    assert any(ln.startswith("gsm8k") and "substitute-for gsm8k: chinese_remainder_theorem" in ln for ln in lines)
    strat = next(ln for ln in lines if ln.startswith("strategyqa"))
    assert "train=1648 val=183 test=458" in strat and "strategyqa_accuracy+bleu+rouge" in strat
    assert out.strip().endswith("28 tasks (meteora28); seed 0")
