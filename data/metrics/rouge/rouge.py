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

    def _compute(self, predictions, references, rows=False):
        keys = ("rouge1", "rouge2", "rougeL")
        scorer = rouge_scorer.RougeScorer(list(keys))
        per_row = []  # [F of each key, 1] for a scored row, zeros for a dropped empty one
        for p, r in zip(predictions, references):
            if p.strip():
                scores = scorer.score(r, p.lower())
                per_row.append([scores[k].fmeasure for k in keys])
            else:
                per_row.append(None)
        scored = [s for s in per_row if s is not None]
        out = {k: sum(s[i] for s in scored) / len(scored) if scored else 0.0 for i, k in enumerate(keys)}
        if rows:  # per-row additive statistics (data.scoring.row_stats): [F, 1], or [0, 0] where dropped
            for i, k in enumerate(keys):
                out[f"{k}_rows"] = [[s[i], 1.0] if s is not None else [0.0, 0.0] for s in per_row]
        return out
