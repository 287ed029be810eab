"""Metric modules (local evaluate modules) and score(): MeteoRA's rules, against the libraries they wrap."""

from __future__ import annotations

import pytest
import sacrebleu
from rouge_score import rouge_scorer

from data.errors import LoramuxDataError
from data.scoring import load_metric, score


def test_exact_accuracy_lowercases_and_strips():
    m = load_metric("exact_accuracy")
    assert m.compute(predictions=["Valid ", "invalid", "valid."], references=["valid", "valid", "valid"]) == {
        "accuracy": pytest.approx(1 / 3)
    }


def test_fuzzy_accuracy_is_gold_inside_output():
    m = load_metric("fuzzy_accuracy")
    out = m.compute(predictions=["The answer: Three apples", "3", ""], references=["three", "three", "three"])
    assert out["accuracy"] == pytest.approx(1 / 3)


def test_strategyqa_rule_reads_the_first_five_characters():
    m = load_metric("strategyqa_accuracy")
    preds = ["Yes. because", "no, never", "I think yes", "", "NO."]
    refs = ["Yes. Reason.", "No. Reason.", "Yes. Reason.", "No. Reason.", "Yes. Reason."]
    assert m.compute(predictions=preds, references=refs)["accuracy"] == pytest.approx(2 / 5)


def test_gsm8k_rule_uses_answer_marker_then_last_number():
    m = load_metric("gsm8k_accuracy")
    preds = ["3 + 4 = 7. The answer is 1,234.", "first 5 then 12", "The answer is 7 apples, not 8", "none"]
    refs = ["so #### 1234", "#### 12", "#### 7", "#### 0"]
    assert m.compute(predictions=preds, references=refs)["accuracy"] == pytest.approx(3 / 4)


def test_bleu_matches_sacrebleu_on_lowercased_hypotheses_and_drops_empties():
    preds = ["The cat sat on the mat", "", "a dog barked loudly today"]
    refs = ["The cat sat on the mat", "anything", "A dog barked loudly"]
    want = sacrebleu.BLEU().corpus_score(["the cat sat on the mat", "a dog barked loudly today"],
                                         [["The cat sat on the mat", "A dog barked loudly"]]).score
    got = load_metric("bleu").compute(predictions=preds, references=refs)["bleu"]
    assert got == pytest.approx(want) and 0 < got < 100
    assert load_metric("bleu").compute(predictions=["", " "], references=["a", "b"]) == {"bleu": 0.0}


def test_bleu_case_rule_meteora_by_default_symmetric_on_request():
    """MeteoRA lower-cases the prediction only: the gold answer itself scores below 100 when it has capitals. The
    symmetric rule lower-cases the references too (100 for the gold answer); anything else is refused."""
    bleu = load_metric("bleu")
    gold = ["Yes. The Eiffel Tower is in Paris", "No. Whales are mammals and breathe air"]
    meteora = bleu.compute(predictions=gold, references=gold)["bleu"]
    want = sacrebleu.BLEU().corpus_score([g.lower() for g in gold], [gold]).score
    assert meteora == pytest.approx(want) and meteora < 100
    assert bleu.compute(predictions=gold, references=gold, lowercase="predictions")["bleu"] == meteora
    assert bleu.compute(predictions=gold, references=gold, lowercase="both")["bleu"] == pytest.approx(100)
    upper = [g.upper() for g in gold]
    assert bleu.compute(predictions=upper, references=gold, lowercase="both")["bleu"] == pytest.approx(100)
    with pytest.raises(ValueError, match="lowercase='refs' is not a rule"):
        bleu.compute(predictions=gold, references=gold, lowercase="refs")
    assert score("strategyqa", gold, gold)["bleu"] == pytest.approx(meteora)
    assert score("strategyqa", gold, gold, bleu_lowercase="both")["bleu"] == pytest.approx(100)


def test_rouge_matches_rouge_score_and_drops_empties():
    preds = ["the quick brown fox", "", "jumps over the dog"]
    refs = ["the quick fox", "x", "jumps over the lazy dog"]
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"])
    pairs = [(preds[0], refs[0]), (preds[2], refs[2])]
    want = {k: sum(scorer.score(r, p)[k].fmeasure for p, r in pairs) / 2 for k in ("rouge1", "rouge2", "rougeL")}
    got = load_metric("rouge").compute(predictions=preds, references=refs)
    assert got == pytest.approx(want)
    assert all(0 <= v <= 1 for v in got.values())


def test_score_uses_the_tasks_metrics_and_counts_empties():
    out = score("strategyqa", ["yes. it is so", "", "No"], ["Yes. it is so", "No. x", "No. y"])
    assert set(out) == {"accuracy", "bleu", "rouge1", "rouge2", "rougeL", "n", "empty"}
    assert out["accuracy"] == pytest.approx(2 / 3) and out["n"] == 3 and out["empty"] == 1
    assert score("winowhy", ["correct", "incorrect"], ["correct", "correct"]) == {"accuracy": 0.5, "n": 2, "empty": 0}
    assert set(score("news_commentary_de", ["a b"], ["a b"])) == {"bleu", "rouge1", "rouge2", "rougeL", "n", "empty"}


def test_score_bad_input():
    with pytest.raises(LoramuxDataError, match=r"2 predictions vs 1 references"):
        score("winowhy", ["a", "b"], ["a"])
    with pytest.raises(LoramuxDataError, match=r"unknown metric 'meteor'.*known: bleu"):
        load_metric("meteor")
    with pytest.raises(LoramuxDataError, match=r"unknown task 'winowy'; did you mean winowhy"):
        score("winowy", [], [])
