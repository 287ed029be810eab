"""Corpus BLEU (0-100) with sacrebleu defaults; hypotheses lower-cased, references as given, empty predictions
dropped (MeteoRA eval.py).

A local `evaluate` module: load it by path, `evaluate.load("data/metrics/bleu")`, so nothing is fetched from a
hub.

Case. MeteoRA's eval.py lower-cases the model output (its ``clean_default``) and hands the gold answer to
sacrebleu unchanged, and sacrebleu is case-sensitive: a prediction that is the gold answer word for word scores
below 100 whenever the gold has capitals ("Yes. The ..."). That rule is the default here, so the paper tables compare with MeteoRA's numbers. ``lowercase="both"`` lower-cases the references too (the
symmetric rule, where a gold answer scores 100):

    bleu.compute(predictions=p, references=r)                      # MeteoRA's rule
    bleu.compute(predictions=p, references=r, lowercase="both")    # symmetric
"""

import datasets
import evaluate
import sacrebleu

_FEATURES = datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")})
LOWERCASE = ("predictions", "both")  # the first is MeteoRA's rule and the default


class Bleu(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=__doc__,
            citation="",
            inputs_description="predictions: list[str] model outputs; references: list[str] gold answers; "
            "lowercase: 'predictions' (MeteoRA, default) or 'both'",
            features=_FEATURES,
        )

    def _compute(self, predictions, references, lowercase: str = LOWERCASE[0]):
        if lowercase not in LOWERCASE:
            raise ValueError(f"bleu: lowercase={lowercase!r} is not a rule; use 'predictions' (MeteoRA's, the "
                             "default) or 'both' (references lower-cased too)")
        both = lowercase == "both"
        pairs = [(p.lower(), r.lower() if both else r) for p, r in zip(predictions, references) if p.strip()]
        if not pairs:
            return {"bleu": 0.0}
        hyps, refs = zip(*pairs)
        return {"bleu": float(sacrebleu.BLEU().corpus_score(list(hyps), [list(refs)]).score)}
