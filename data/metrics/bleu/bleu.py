"""Corpus BLEU (0-100) with sacrebleu defaults; hypotheses lower-cased, references as given, empty predictions
dropped (MeteoRA eval.py).

A local `evaluate` module: load it by path, `evaluate.load("data/metrics/bleu")`, so nothing is fetched from a
hub. Predictions are lower-cased first, as MeteoRA's eval.py does.
"""

import datasets
import evaluate
import sacrebleu

_FEATURES = datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")})


class Bleu(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=__doc__,
            citation="",
            inputs_description="predictions: list[str] model outputs; references: list[str] gold answers",
            features=_FEATURES,
        )

    def _compute(self, predictions, references):
        pairs = [(p.lower(), r) for p, r in zip(predictions, references) if p.strip()]
        if not pairs:
            return {"bleu": 0.0}
        hyps, refs = zip(*pairs)
        return {"bleu": float(sacrebleu.BLEU().corpus_score(list(hyps), [list(refs)]).score)}
