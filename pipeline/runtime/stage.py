"""What every stage does around its own work: seed, show and save the config, track, write metrics.json.

    with StageRun(cfg) as run:                       # seeds, prints the config tree, opens the tracker
        trainer = instantiate(cfg.trainer, logger=run.tracker.lightning)
        ...
        return run.finish(tasks=[...], strategy="oracle", metrics={"main": 0.4}, main_metric="main")

``finish`` writes ``<run_dir>/metrics.json`` atomically, mirrors the metrics to the tracker and returns the
main metric, which the @hydra.main entry returns so sweepers (Optuna) can optimise it.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import lightning
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from common.provenance import provenance
from data.assets import bigbench_source
from pipeline.runtime.config_tree import show_and_save_config
from pipeline.runtime.distributed import is_global_zero, wait_for_all
from pipeline.runtime.metrics_file import write_metrics
from pipeline.runtime.tracking import NullTracker

log = logging.getLogger(__name__)


def run_dir_of(cfg: DictConfig) -> Path:
    """The run's output dir: ``paths.run_dir`` (Hydra's output dir under @hydra.main, set directly by tests)."""
    return Path(str(cfg.paths.run_dir))


def build_tracker(cfg: DictConfig):
    """Instantiate ``cfg.logger`` (wandb / csv / none); a missing logger group means no tracking."""
    if cfg.get("logger") is None:
        return NullTracker()
    return instantiate(cfg.logger)


class StageRun:
    """One stage's run: seed + config tree + tracker on enter, metrics.json + main metric on ``finish``."""

    def __init__(self, cfg: DictConfig, print_config: bool | None = None):
        self.cfg = cfg
        self.stage = str(cfg.stage)
        self.run_dir = run_dir_of(cfg)
        self.print_config = bool(cfg.print_config) if print_config is None else print_config
        self.tracker = None
        self.finished = False
        self.t0 = time.perf_counter()
        self.writer = True

    def __enter__(self) -> StageRun:  # noqa: PYI034
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.t0 = time.perf_counter()  # metrics.json's wall_time_s (paper-table provenance)
        lightning.seed_everything(int(self.cfg.seed), workers=True, verbose=False)
        self.writer = is_global_zero()  # DDP / SLURM tasks: rank 0 alone saves, tracks and writes metrics.json
        if self.writer:
            show_and_save_config(self.cfg, self.run_dir, print_tree=self.print_config)
        self.tracker = build_tracker(self.cfg)
        plain = OmegaConf.to_container(self.cfg, resolve=True, throw_on_missing=False)
        plain.pop("hydra", None)
        self.tracker.log_config(plain)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:  # DDP: no rank leaves the stage before rank 0 has written its outputs
            wait_for_all()
        if self.tracker is not None:
            self.tracker.finish()

    def finish(self, *, tasks, strategy, metrics: dict, main_metric: str | None = None, rows=None,
               extra: dict | None = None) -> float | None:
        """Write metrics.json, mirror it to the tracker, return ``metrics[main_metric]`` (None without one)."""
        value = metrics.get(main_metric) if main_metric else None
        if not self.writer:  # another DDP rank: same result, written once by rank 0
            self.finished = True
            return float(value) if value is not None else None
        path = write_metrics(self.run_dir, stage=self.stage, experiment=str(self.cfg.name), tasks=tasks,
                             strategy=strategy, metrics=metrics, provenance=run_provenance(int(self.cfg.seed), tasks),
                             main_metric=main_metric, rows=rows,
                             extra={**(extra or {}), "wall_time_s": round(time.perf_counter() - self.t0, 3)})
        self.tracker.log_metrics({f"{self.stage}/{k}": v for k, v in metrics.items()})
        log.info("%s: wrote %s", self.stage, path)
        self.finished = True
        return float(value) if value is not None else None


def run_provenance(seed: int, tasks) -> dict:
    """``common.provenance.provenance`` plus, for a run over tasks (each reads BIG-bench task files, an HF task its
    named BIG-bench substitute offline), where the cached files came from (``data.bigbench``: the pinned sdist and
    its sha256, or a BIG-bench tree and its commit; ``data.fetch``)."""
    out = provenance(seed)
    if tasks:
        source = bigbench_source()
        if source is not None:
            out["data"] = {"bigbench": source}
    return out


def stage_callbacks(cfg) -> list:
    """Extra Lightning callbacks a stage run adds from ``cfg.callbacks`` (``{name: {_target_: ...}}``; none by
    default), e.g. ``+callbacks.times._target_=pipeline.stages.scaling.StepTimes +callbacks.times.path=<file>``."""
    return [instantiate(c) for c in (cfg.get("callbacks") or {}).values()]
