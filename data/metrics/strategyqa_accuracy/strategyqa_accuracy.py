"""StrategyQA yes/no rule: correct when "yes" (or "no") occurs in the first 5 characters of both the prediction
and the gold answer (gold answers read "Yes. <explanation>" / "No. <explanation>").

A local `evaluate` module: load it by path, `evaluate.load("data/metrics/strategyqa_accuracy")`, so nothing is fetched from a
hub. Predictions are lower-cased first, as MeteoRA's eval.py does.
"""

import datasets
import evaluate

_FEATURES = datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")})


class StrategyQAAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=__doc__,
            citation="",
            inputs_description="predictions: list[str] model outputs; references: list[str] gold answers",
            features=_FEATURES,
        )

    def _compute(self, predictions, references, rows=False):
        def verdict(text):
            head = text.strip().lower()[:5]
            return "yes" if "yes" in head else "no" if "no" in head else None

        hits = [verdict(p) is not None and verdict(p) == verdict(r) for p, r in zip(predictions, references)]
        out = {"accuracy": sum(hits) / len(hits) if hits else 0.0}
        if rows:  # per-row additive statistics (data.scoring.row_stats): [hit, 1]
            out["accuracy_rows"] = [[float(h), 1.0] for h in hits]
        return out
