"""Experiment tracking behind one small interface: wandb (default), CSV, or nothing.

A tracker mirrors what a stage produces (config, scalar metrics, tables, images) to an external system;
metrics.json stays the source of truth. ``tracker.lightning`` is the Lightning logger to hand to a Trainer
(``False`` when there is none).

wandb runs offline when no ``WANDB_API_KEY`` is set (``WANDB_MODE`` wins when given), groups runs by
experiment and labels them with the stage as ``job_type``. Tracking must never cost a result: if wandb cannot
start (no network, bad key, broken install) the tracker warns once and falls back to CSV, and every later call
that fails is logged and swallowed.

One run per job, not one per process: under DDP (or a multi-task SLURM job) only global rank 0 opens the wandb
run / writes the CSV; the other ranks get a tracker that records nothing but still hands the Trainer the same kind
of Lightning logger (Lightning's loggers are rank-zero-only inside, and every rank must see the same loggers).
"""

from __future__ import annotations

import csv
import logging
import os
import shutil
from pathlib import Path

from lightning.pytorch.loggers import CSVLogger, WandbLogger

from pipeline.runtime.distributed import is_global_zero

log = logging.getLogger(__name__)


class NullTracker:
    """Tracks nothing; every call is a no-op. ``logger=none``."""

    name = "none"
    lightning = False

    def log_config(self, config: dict) -> None:
        pass

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        pass

    def log_table(self, key: str, columns: list[str], rows: list[list]) -> None:
        pass

    def log_image(self, key: str, path) -> None:
        pass

    def finish(self) -> None:
        pass


class CsvTracker(NullTracker):
    """Lightning's CSVLogger for metrics; tables and images as files under ``<save_dir>/csv/``. ``logger=csv``."""

    name = "csv"

    def __init__(self, save_dir):
        self.writer = is_global_zero()  # other DDP ranks: CSVLogger writes nothing there; nor do the tables
        self.dir = Path(save_dir) / "csv"
        self.lightning = CSVLogger(save_dir=str(save_dir), name="csv", version="")

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        numbers = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and v is not None}
        if numbers and self.writer:
            self.lightning.log_metrics(numbers, step=step)
            self.lightning.save()

    def log_table(self, key: str, columns: list[str], rows: list[list]) -> None:
        if not self.writer:
            return
        path = self.dir / "tables" / f"{key.replace('/', '_')}.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(columns)
            w.writerows(rows)

    def log_image(self, key: str, path) -> None:
        if not self.writer:
            return
        dest = self.dir / "images" / f"{key.replace('/', '_')}{Path(path).suffix}"
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, dest)


def wandb_mode(mode: str | None) -> str:
    """Explicit mode, else $WANDB_MODE, else online with an API key and offline without one."""
    if mode:
        return str(mode)
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


class WandbTracker(NullTracker):
    """A wandb run (offline without an API key) that never blocks or crashes a run. ``logger=wandb``."""

    name = "wandb"

    def __init__(self, project="loramux", entity=None, group=None, job_type=None, tags=(), save_dir=".",
                 mode=None, name=None, run_id=None):
        self.run = None
        self.run_dir: Path | None = None  # the wandb run's own dir (offline: <save_dir>/wandb/offline-run-*)
        self.fallback: NullTracker | None = None
        self.lightning = False
        Path(save_dir).mkdir(parents=True, exist_ok=True)
        if not is_global_zero():  # DDP rank > 0: no wandb run; a WandbLogger that never starts one (rank-zero-only)
            self._silent_rank(project, save_dir)
            return
        try:
            import wandb  # lazy: optional and slow to import; a failure here falls back to CSV

            self.run = wandb.init(project=project, entity=entity, group=group, job_type=job_type,
                                  tags=list(tags or []), dir=str(save_dir), mode=wandb_mode(mode), name=name,
                                  id=run_id, resume="allow" if run_id else None, reinit="finish_previous",
                                  settings=wandb.Settings(init_timeout=60, silent=True, console="off"))
            self.lightning = WandbLogger(experiment=self.run, log_model=False)
            self.run_dir = Path(self.run.dir).parent
        except Exception as e:  # noqa: BLE001 tracking must never cost a result
            log.warning("wandb could not start (%s: %s); logging to CSV in %s instead",
                        type(e).__name__, str(e).splitlines()[0] if str(e) else "", save_dir)
            self.fallback = CsvTracker(save_dir)
            self.lightning = self.fallback.lightning

    def _silent_rank(self, project, save_dir) -> None:
        try:
            self.lightning = WandbLogger(project=project, save_dir=str(save_dir), log_model=False)
        except Exception:  # noqa: BLE001 wandb missing: rank 0 fell back to CSV, so do the same
            self.lightning = CsvTracker(save_dir).lightning
        self.fallback = NullTracker()

    def _safely(self, what, fn, *args):
        if self.fallback is not None:
            return getattr(self.fallback, what)(*args)
        try:
            return fn(*args)
        except Exception as e:  # noqa: BLE001
            log.warning("wandb %s failed (%s: %s); continuing", what, type(e).__name__, e)

    def log_config(self, config: dict) -> None:
        self._safely("log_config", lambda c: self.run.config.update(c, allow_val_change=True), config)

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and v is not None}
        self._safely("log_metrics", lambda m, s: self.run.log(m, step=s), numbers, step)
        if self.fallback is None and self.run is not None:
            self._safely("log_metrics", lambda m: self.run.summary.update(m), numbers)

    def log_table(self, key: str, columns: list[str], rows: list[list]) -> None:
        import wandb  # lazy (see __init__)

        self._safely("log_table", lambda k, c, r: self.run.log({k: wandb.Table(columns=c, data=r)}),
                     key, list(columns), [list(r) for r in rows])

    def log_image(self, key: str, path) -> None:
        import wandb  # lazy (see __init__)

        self._safely("log_image", lambda k, p: self.run.log({k: wandb.Image(str(p))}), key, path)

    def finish(self) -> None:
        if self.run is not None:
            try:
                self.run.finish()
            except Exception as e:  # noqa: BLE001
                log.warning("wandb finish failed (%s); the offline run dir may be incomplete", e)
            self.run = None
