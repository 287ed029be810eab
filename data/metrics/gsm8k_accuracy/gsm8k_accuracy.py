"""GSM8K answer rule: the number after "The answer is" in the prediction (else its last number) must equal the
number after "####" in the gold solution (else its last number); thousands separators are ignored.

A local `evaluate` module: load it by path, `evaluate.load("data/metrics/gsm8k_accuracy")`, so nothing is fetched from a
hub. Predictions are lower-cased first, as MeteoRA's eval.py does.
"""

import re

import datasets
import evaluate

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def _value(token):
    try:
        return float(token.replace(",", ""))
    except ValueError:
        return None


def _number(text, marker):
    text = text.lower()
    if marker in text:
        found = _NUMBER.findall(text.split(marker, 1)[1])
        if found:
            return _value(found[0])
    found = _NUMBER.findall(text)
    return _value(found[-1]) if found else None

_FEATURES = datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")})


class GSM8KAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=__doc__,
            citation="",
            inputs_description="predictions: list[str] model outputs; references: list[str] gold answers",
            features=_FEATURES,
        )

    def _compute(self, predictions, references, rows=False):
        hits = []
        for p, r in zip(predictions, references):
            gold = _number(r, "####")
            hits.append(gold is not None and _number(p, "the answer is") == gold)
        out = {"accuracy": sum(hits) / len(hits) if hits else 0.0}
        if rows:  # per-row additive statistics (data.scoring.row_stats): [hit, 1]
            out["accuracy_rows"] = [[float(h), 1.0] for h in hits]
        return out
