"""Score predictions for a task with its metric modules (local `evaluate` modules under data/metrics/).

    from data.scoring import score
    score("strategyqa", ["yes. ...", ""], ["Yes. ...", "No. ..."])
    # {'accuracy': 0.5, 'bleu': ..., 'rouge1': ..., 'rouge2': ..., 'rougeL': ..., 'n': 2, 'empty': 1}

Accuracy and ROUGE are fractions in [0, 1], BLEU is 0-100 (sacrebleu's scale). `empty` counts predictions that
are blank after stripping: they score as wrong for accuracy and are dropped from BLEU/ROUGE, as in MeteoRA.
BLEU lower-cases the predictions but not the references, as MeteoRA does (so a gold answer with capitals scores
below 100); `bleu_lowercase="both"` scores with the symmetric rule instead (data/metrics/bleu).
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

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


def score(task: str | Task, predictions: list[str], references: list[str], *,
          bleu_lowercase: str = "predictions") -> dict[str, float]:
    """All of the task's metrics on these predictions, plus `n` (rows) and `empty` (blank predictions).
    ``bleu_lowercase``: "predictions" (MeteoRA's rule, the paper tables) or "both" (symmetric)."""
    task = get_task(task)
    if len(predictions) != len(references):
        raise LoramuxDataError(
            f"score({task.name}): {len(predictions)} predictions vs {len(references)} references; pass one per row"
        )
    predictions = ["" if p is None else str(p) for p in predictions]
    out: dict[str, float] = {}
    for name in task.metrics:
        options = {"lowercase": bleu_lowercase} if name == "bleu" else {}
        out.update(load_metric(name).compute(predictions=predictions, references=[str(r) for r in references],
                                             **options))
    out["n"] = len(predictions)
    out["empty"] = sum(1 for p in predictions if not p.strip())
    return out
