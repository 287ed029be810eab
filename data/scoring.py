"""Score predictions for a task with its metric modules (local `evaluate` modules under data/metrics/).

    from data.scoring import score
    score("strategyqa", ["yes. ...", ""], ["Yes. ...", "No. ..."])
    # {'accuracy': 0.5, 'bleu': ..., 'rouge1': ..., 'rouge2': ..., 'rougeL': ..., 'n': 2, 'empty': 1}

Accuracy and ROUGE are fractions in [0, 1], BLEU is 0-100 (sacrebleu's scale). `empty` counts predictions that
are blank after stripping: they score as wrong for accuracy and are dropped from BLEU/ROUGE, as in MeteoRA.
BLEU lower-cases the predictions but not the references, as MeteoRA does (so a gold answer with capitals scores
below 100); `bleu_lowercase="both"` scores with the symmetric rule instead (data/metrics/bleu).

Per row, for confidence intervals: every metric here is a function of additive per-row statistics (accuracy:
[hit, 1]; ROUGE: [F, 1], [0, 0] for a dropped empty row; BLEU: sacrebleu's lengths, n-gram matches and totals).
`row_stats` returns them (the metric modules compute them with `rows=True`, so the rules live in one place) and
`from_stats` turns their sum over any subset of rows back into that subset's metric:

    stats = row_stats("strategyqa", preds, golds)        # {"accuracy": [N, 2], "bleu": [N, 10], "rouge1": ...}
    from_stats("bleu", stats["bleu"].sum(0)) == score("strategyqa", preds, golds)["bleu"]
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import numpy as np

from data.errors import LoramuxDataError
from data.tasks import Task, get_task

METRICS_DIR = Path(__file__).resolve().parent / "metrics"


@cache
def load_metric(name: str):
    """The local evaluate module `data/metrics/<name>/<name>.py`, loaded by path (never from a hub)."""
    import evaluate  # lazy: slow to import; only scoring needs it

    path = METRICS_DIR / name
    if not (path / f"{name}.py").is_file():
        known = ", ".join(sorted(p.name for p in METRICS_DIR.iterdir() if (p / f"{p.name}.py").is_file()))
        raise LoramuxDataError(f"unknown metric {name!r} (no {path}/{name}.py); known: {known}")
    return evaluate.load(str(path))


def _checked(task: Task, predictions, references) -> list[str]:
    if len(predictions) != len(references):
        raise LoramuxDataError(
            f"score({task.name}): {len(predictions)} predictions vs {len(references)} references; pass one per row"
        )
    return ["" if p is None else str(p) for p in predictions]


def _options(name: str, bleu_lowercase: str) -> dict:
    return {"lowercase": bleu_lowercase} if name == "bleu" else {}


def score(task: str | Task, predictions: list[str], references: list[str], *,
          bleu_lowercase: str = "predictions") -> dict[str, float]:
    """All of the task's metrics on these predictions, plus `n` (rows) and `empty` (blank predictions).
    ``bleu_lowercase``: "predictions" (MeteoRA's rule, the paper tables) or "both" (symmetric)."""
    task = get_task(task)
    predictions = _checked(task, predictions, references)
    out: dict[str, float] = {}
    for name in task.metrics:
        out.update(load_metric(name).compute(predictions=predictions, references=[str(r) for r in references],
                                             **_options(name, bleu_lowercase)))
    out["n"] = len(predictions)
    out["empty"] = sum(1 for p in predictions if not p.strip())
    return out


def row_stats(task: str | Task, predictions: list[str], references: list[str], *,
              bleu_lowercase: str = "predictions") -> dict[str, np.ndarray]:
    """``{metric: array [N, k]}``: each metric's additive statistics of every row (see the module docstring), under
    the same ``bleu_lowercase`` rule as ``score``."""
    task = get_task(task)
    predictions = _checked(task, predictions, references)
    out: dict[str, np.ndarray] = {}
    for name in task.metrics:
        res = load_metric(name).compute(predictions=predictions, references=[str(r) for r in references], rows=True,
                                        **_options(name, bleu_lowercase))
        for key, rows in res.items():
            if key.endswith("_rows"):
                out[key[: -len("_rows")]] = np.asarray(rows, dtype=float).reshape(len(predictions), -1)
    return out


def from_stats(metric: str, summed):
    """The metric of summed per-row statistics: ``summed`` [k] -> float, or [R, k] (R resamples) -> array [R]."""
    s = np.asarray(summed, dtype=float)
    if metric == "bleu":
        import sacrebleu  # lazy, as evaluate above: only BLEU intervals need it

        bleu = sacrebleu.BLEU()
        flat = s.reshape(-1, s.shape[-1])
        vals = np.array([bleu._compute_score_from_stats([round(x) for x in row]).score for row in flat])
        vals = vals.reshape(s.shape[:-1])
    else:  # accuracy, ROUGE: sum of per-row values over the rows that count (0 when none do)
        num, den = s[..., 0], s[..., 1]
        vals = np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)
    return float(vals) if vals.ndim == 0 else vals
