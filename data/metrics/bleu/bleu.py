"""Corpus BLEU (0-100) with sacrebleu defaults; hypotheses lower-cased, references as given, empty predictions
dropped (MeteoRA eval.py).

A local `evaluate` module: load it by path, `evaluate.load("data/metrics/bleu")`, so nothing is fetched from a
hub.

Case. MeteoRA's eval.py lower-cases the model output (its ``clean_default``) and hands the gold answer to
sacrebleu unchanged, and sacrebleu is case-sensitive: a prediction that is the gold answer word for word scores
below 100 whenever the gold has capitals ("Yes. The ..."). That rule is the default here, so the paper tables
compare with MeteoRA's numbers. ``lowercase="both"`` lower-cases the references too (the symmetric rule, where a
gold answer scores 100):

    bleu.compute(predictions=p, references=r)                      # MeteoRA's rule
    bleu.compute(predictions=p, references=r, lowercase="both")    # symmetric
    bleu.compute(predictions=p, references=r, rows=True)           # + "bleu_rows": per-row sacrebleu statistics
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
            "lowercase: 'predictions' (MeteoRA, default) or 'both'; rows: also per-row statistics",
            features=_FEATURES,
        )

    def _compute(self, predictions, references, lowercase: str = LOWERCASE[0], rows=False):
        if lowercase not in LOWERCASE:
            raise ValueError(f"bleu: lowercase={lowercase!r} is not a rule; use 'predictions' (MeteoRA's, the "
                             "default) or 'both' (references lower-cased too)")
        both = lowercase == "both"
        pairs = [(p.lower(), r.lower() if both else r) for p, r in zip(predictions, references) if p.strip()]
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
