"""Relaunching a sweep into its own dir reruns only the jobs that did not finish.

    python -m pipeline.finetune -m experiment=demo task=a,b,c                     # prints the sweep dir
    python -m pipeline.finetune -m experiment=demo task=a,b,c hydra.sweep.dir=<that dir>   # a, b done: c only
    python -m pipeline.finetune -m experiment=demo task=a,b,c hydra.sweep.dir=<that dir> force=true  # all again

A sweep job's run dir is ``<sweep dir>/<num>_<overrides>``, the same on every launch of the same sweep, and
``metrics.json`` is the last thing a stage writes. So a multirun job whose run dir already holds a readable
metrics.json of its stage is done: :func:`previous_result` hands back the main metric stored there (the value
the job returned the first time, so Optuna and the sweep's results still see it) and the stage skips its work.
Single runs never skip (their run dirs are new each time; ``reproduce`` has its own skipping), nor does a job
with ``force=true``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from pipeline.runtime.metrics_file import FILENAME, read_metrics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PreviousResult:
    """A finished job's metrics.json and the main metric it returned."""

    path: Path
    value: float | None


def _is_sweep_job(run_dir: Path) -> bool:
    """True inside a Hydra multirun job whose run dir is Hydra's own output dir (not a dir set by a caller)."""
    if not HydraConfig.initialized():
        return False
    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN:
        return False
    return Path(str(hc.runtime.output_dir)).resolve() == run_dir.resolve()


def previous_result(cfg: DictConfig) -> PreviousResult | None:
    """The finished result of this sweep job, or None when it must run (not a sweep job, force=true, no file)."""
    run_dir = Path(str(cfg.paths.run_dir))
    path = run_dir / FILENAME
    if cfg.force or not path.is_file() or not _is_sweep_job(run_dir):
        return None
    try:
        record = read_metrics(path)
    except ValueError as e:
        log.warning("rerunning: %s", e)
        return None
    if record.get("stage") != str(cfg.stage):
        return None
    main = record.get("main_metric")
    value = record["metrics"].get(main) if main else None
    log.info("%s: %s exists, skipping this job (force=true reruns it)", cfg.stage, path)
    return PreviousResult(path, float(value) if value is not None else None)
