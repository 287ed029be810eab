"""metrics.json: the one result file every stage writes and the only thing ``report`` reads.

Schema (wandb is a mirror of it, never the source of truth)::

    {"stage": "evaluate", "experiment": "demo", "tasks": ["arithmetic", ...], "strategy": "meteora-top2",
     "metrics": {"arithmetic/accuracy": 0.41, ..., "main": 0.37},      # flat name -> number
     "main_metric": "main",                                             # what sweepers optimise
     "rows": [{...}, ...],                                              # optional table rows (bench, per-task)
     "provenance": {"git_sha", "device", "versions", "date", "seed",
                    "data": {"bigbench": {"source", "files"}}}}     # "data": runs over tasks (BIG-bench's origin)
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from common.atomic import atomic_write_text

REQUIRED = ("stage", "experiment", "tasks", "strategy", "metrics", "provenance")
FILENAME = "metrics.json"


def _clean(value):
    """JSON has no NaN/inf: they become null so every reader can parse the file."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        return _clean(value.item())
    return value


def write_metrics(run_dir, *, stage: str, experiment: str, tasks, strategy, metrics: dict, provenance: dict,
                  main_metric: str | None = None, rows: list | None = None, extra: dict | None = None) -> Path:
    """Atomically write ``<run_dir>/metrics.json`` and return its path."""
    record = {"stage": stage, "experiment": experiment, "tasks": list(tasks), "strategy": strategy,
              "metrics": dict(metrics), "main_metric": main_metric, "provenance": provenance}
    if rows is not None:
        record["rows"] = list(rows)
    if extra:
        record.update(extra)
    text = json.dumps(_clean(record), indent=2, sort_keys=False, allow_nan=False)
    return atomic_write_text(Path(run_dir) / FILENAME, text + "\n")


def read_metrics(path) -> dict:
    """Load and validate one metrics.json; a broken or foreign file raises one clear ValueError."""
    path = Path(path)
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a readable metrics.json ({e.__class__.__name__}: {e}); "
                         f"delete it and rerun the stage that wrote it") from None
    missing = [k for k in REQUIRED if k not in record] if isinstance(record, dict) else list(REQUIRED)
    if missing:
        raise ValueError(f"{path}: metrics.json lacks {missing}; rerun the stage that wrote it")
    return record


def find_metrics(root) -> list[Path]:
    """Every metrics.json under ``root`` (sorted, so reports are stable)."""
    return sorted(Path(root).rglob(FILENAME))
