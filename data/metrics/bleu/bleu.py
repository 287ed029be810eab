"""Corpus BLEU (0-100) with sacrebleu defaults; hypotheses lower-cased, references as given, empty predictions
dropped (MeteoRA eval.py).

A local `evaluate` module: load it by path, `evaluate.load("data/metrics/bleu")`, so nothing is fetched from a
hub. Predictions are lower-cased first, as MeteoRA's eval.py does (REFERENCE.md §1.6).
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

    def _compute(self, predictions, references, rows=False):
        pairs = [(p.lower(), r) for p, r in zip(predictions, references) if p.strip()]
        out = {"bleu": 0.0}
        if pairs:
            hyps, refs = zip(*pairs)
            out["bleu"] = float(sacrebleu.BLEU().corpus_score(list(hyps), [list(refs)]).score)
        if rows:  # per-row sacrebleu statistics (lengths, n-gram matches, totals; zeros for a dropped empty row):
            # their sum over any rows gives those rows' corpus BLEU (data.scoring.from_stats)
            bleu = sacrebleu.BLEU()
            stats = iter(bleu._extract_corpus_statistics(list(hyps), [list(refs)]) if pairs else [])
            width = 2 + 2 * bleu.max_ngram_order
            out["bleu_rows"] = [[float(x) for x in next(stats)] if p.strip() else [0.0] * width for p in predictions]
        return out
