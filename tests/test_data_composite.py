"""Composite-n: build from real test splits with a training-row 2-shot prefix, parse numbered answers, score."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from needs_assets import needs_bigbench

from data.composite import INSTRUCTION, build_composite, parse_composite, parse_report, score_composite
from data.errors import LoramuxDataError
from data.tasks import load_split


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("LORAMUX_USE_HUB", "0")


def _one_line(text):
    return " ".join(text.split())


def _gold_output(answers):
    return "".join(f"{i}. {_one_line(a)}\n" for i, a in enumerate(answers, 1))


def test_parser_reads_numbered_lines_and_counts_oddities():
    text = "1. first answer\n2.second\n11. not one\n 3. third  \n2. again\n0. zero"
    assert parse_composite(text, 3) == ["first answer", "second", "third"]
    answers, counts = parse_report(text, 3)
    assert counts == {"missing": 0, "extra": 2, "duplicate": 1}
    answers, counts = parse_report("blah\n2. only two", 3)
    assert answers == ["", "only two", ""] and counts["missing"] == 2
    assert parse_composite("", 2) == ["", ""]
    assert parse_composite("The 1. is inline, not a list\n1. real", 1) == ["real"]
    assert parse_composite("1. 2.5 meters\n2.5 is a decimal, not answer 2", 2) == ["2.5 meters", ""]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.text(alphabet=st.characters(whitelist_categories=("L", "N", "P", "Zs")), max_size=30), min_size=1,
                max_size=12))
def test_numbered_answers_round_trip(answers):
    answers = [" ".join(a.split()) for a in answers]
    assert parse_composite(_gold_output(answers), len(answers)) == answers


@needs_bigbench
def test_composite3_round_trip_scores_perfect_and_a_dropped_answer_costs_its_row():
    ds = build_composite("composite3", rows=16)
    assert ds.column_names == ["prompt", "answers", "subtasks"] and len(ds) == 16
    assert ds[0]["subtasks"] == ["logical_deduction", "question_selection", "strategyqa"]
    outputs = [_gold_output(a) for a in ds["answers"]]
    report = score_composite(outputs, ds)
    for name in ("logical_deduction", "question_selection", "strategyqa"):
        assert report["per_task"][name]["accuracy"] == 1.0
    assert report["per_task"]["strategyqa"]["rouge1"] == pytest.approx(1.0)
    assert report["attempts"] == 3.0 and report["correct"] == pytest.approx(3.0)
    assert (report["missing"], report["extra"], report["duplicate"]) == (0, 0, 0)

    dropped = list(outputs)
    lines = dropped[0].splitlines(keepends=True)
    dropped[0] = lines[0] + lines[2]  # row 0 loses its answer to sub-task 2
    report = score_composite(dropped, ds)
    assert report["per_task"]["question_selection"]["accuracy"] == pytest.approx(15 / 16)
    assert report["per_task"]["question_selection"]["empty"] == 1
    assert report["per_task"]["logical_deduction"]["accuracy"] == 1.0
    assert report["attempts"] == pytest.approx(3 - 1 / 16) and report["missing"] == 1


@needs_bigbench
def test_rows_join_the_ith_shuffled_test_prompt_and_shots_come_from_training():
    ds = build_composite(["strategyqa", "winowhy"], rows=5)
    tests = {n: set(load_split(n, "test")["prompt"]) for n in ("strategyqa", "winowhy")}
    train = {n: set(load_split(n, "train")["prompt"]) for n in ("strategyqa", "winowhy")}
    for row in ds:
        head, tail = row["prompt"].split(INSTRUCTION + "\n")
        blocks = [b + " [/INST]\n" for b in tail.split(" [/INST]\n") if b]
        assert blocks[0] in tests["strategyqa"] and blocks[1] in tests["winowhy"]
        shot_blocks = [b.split("\n", 2)[-1] if not b.startswith("[INST]") else b
                       for b in head.split(" [/INST]\n") if "[INST]" in b]
        assert len(shot_blocks) == 4
        for b in shot_blocks:
            prompt = "[INST]" + b.split("[INST]", 1)[1] + " [/INST]\n"
            assert prompt in train["strategyqa"] | train["winowhy"]
            assert prompt not in tests["strategyqa"] | tests["winowhy"]
        assert "\n1. " in head and "\n2. " in head
    again = build_composite(["strategyqa", "winowhy"], rows=5)
    assert again["prompt"] == ds["prompt"]
    other = build_composite(["strategyqa", "winowhy"], rows=5, seed=1)
    assert other["prompt"] != ds["prompt"]


@needs_bigbench
def test_composite10_has_ten_subtasks_and_is_capped_by_the_smallest_test_split():
    ds = build_composite("composite10", rows=500, shots=1)
    assert len(ds[0]["subtasks"]) == 10 and len(ds[0]["answers"]) == 10
    smallest = len(load_split("news_commentary_de", "test"))
    assert len(ds) == smallest  # the smallest sub-task test split
    cycled = build_composite("composite10", rows=smallest + 5, shots=0, repeat_short=True)
    assert len(cycled) == smallest + 5 and len(set(cycled["prompt"])) == smallest + 5
    assert cycled[smallest]["answers"][7] == cycled[0]["answers"][7]  # news_commentary_de wraps around
    assert cycled[smallest]["answers"][0] != cycled[0]["answers"][0]


def test_bad_composite_input():
    with pytest.raises(LoramuxDataError, match=r"at least 2 sub-tasks"):
        build_composite(["strategyqa"], rows=3)
    with pytest.raises(LoramuxDataError, match=r"unknown task 'no_such_task'"):
        build_composite(["strategyqa", "no_such_task"], rows=3)
