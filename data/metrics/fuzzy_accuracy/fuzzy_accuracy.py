"""Fuzzy accuracy: a prediction counts when the (stripped, lower-cased) gold answer occurs inside it.

A local `evaluate` module: load it by path, `evaluate.load("data/metrics/fuzzy_accuracy")`, so nothing is fetched from a
hub. Predictions are lower-cased first, as MeteoRA's eval.py does.
"""

import datasets
import evaluate

_FEATURES = datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")})


class FuzzyAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=__doc__,
            citation="",
            inputs_description="predictions: list[str] model outputs; references: list[str] gold answers",
            features=_FEATURES,
        )

    def _compute(self, predictions, references, rows=False):
        hits = [r.strip().lower() in p.lower() for p, r in zip(predictions, references)]
        out = {"accuracy": sum(hits) / len(hits) if hits else 0.0}
        if rows:  # per-row additive statistics (data.scoring.row_stats): [hit, 1]
            out["accuracy_rows"] = [[float(h), 1.0] for h in hits]
        return out
