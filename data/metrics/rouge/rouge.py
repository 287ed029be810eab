"""ROUGE-1/2/L F-measure (fractions in [0, 1]) from rouge-score, averaged over rows; empty predictions dropped.

A local `evaluate` module: load it by path, `evaluate.load("data/metrics/rouge")`, so nothing is fetched from a
hub. Predictions are lower-cased first, as MeteoRA's eval.py does.
"""

import datasets
import evaluate
from rouge_score import rouge_scorer

_FEATURES = datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")})


class Rouge(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=__doc__,
            citation="",
            inputs_description="predictions: list[str] model outputs; references: list[str] gold answers",
            features=_FEATURES,
        )

    def _compute(self, predictions, references):
        keys = ("rouge1", "rouge2", "rougeL")
        pairs = [(p.lower(), r) for p, r in zip(predictions, references) if p.strip()]
        if not pairs:
            return dict.fromkeys(keys, 0.0)
        scorer = rouge_scorer.RougeScorer(list(keys))
        totals = dict.fromkeys(keys, 0.0)
        for p, r in pairs:
            scores = scorer.score(r, p)
            for k in keys:
                totals[k] += scores[k].fmeasure
        return {k: totals[k] / len(pairs) for k in keys}
