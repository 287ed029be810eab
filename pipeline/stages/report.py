"""Stage ``report``: every metrics.json of an experiment -> Markdown + CSV tables, PNG plots, wandb Tables.

    python -m pipeline.report experiment=demo                 # reads outputs/demo/, writes outputs/demo/report.md
    python -m pipeline.report source_dir=multirun/... out_dir=/tmp/r

Reads only metrics.json files (wandb is a mirror, never the source): see ``pipeline.report.tables`` for which
record feeds which table. Writes ``<out_dir>/report.md``, ``<out_dir>/tables/<name>.{md,csv}`` and
``<out_dir>/plots/<name>.png``, logs each table as a wandb Table and each plot as an image, and its own
metrics.json (number of records and tables) in its run dir. When the experiment is one of the papers' tables
(``paper_table``, default the experiment's name), it also writes ``<paper_tables_dir>/<name>.{json,md,png}``
(``pipeline.report.paper_tables``: the papers' rows, provenance and computed claims; default ``outputs/tables/``) and
commits the raw records it was built from to ``records_out`` (``outputs/records/<name>/``, ``pipeline.report.records``).

    python -m pipeline.report experiment=meteora_tasks records=outputs/records/meteora_tasks   # offline rebuild
    python -m pipeline.report experiment=meteora_tasks records=outputs/records/meteora_tasks readme=README.md

``records=<dir>`` reads a committed records dir instead of the run dirs (nothing else is needed: no adapters, no
model, no data) and rebuilds the paper table from it. ``readme=<path>`` then rewrites the generated block of that
README's Results section from every table in ``paper_tables_dir`` (``pipeline.stages.readme_results``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from common.atomic import atomic_write_text
from data.standin import SOURCE as STANDIN_SOURCE
from data.standin import names_standin
from pipeline.report.paper_tables import PAPER_TABLES, bigbench_sources, claims_summary, write_paper_table
from pipeline.report.records import read_records, write_records
from pipeline.report.render import bar_plot, latency_plot, radar_plot, to_markdown, write_table_files
from pipeline.report.tables import build_tables
from pipeline.runtime.entry import CONF_DIR, cli, user_errors
from pipeline.runtime.metrics_file import find_metrics, read_metrics
from pipeline.runtime.settings import check_settings
from pipeline.runtime.stage import StageRun
from pipeline.stages.readme_results import ROOT, update_readme

log = logging.getLogger(__name__)
SKIP_STAGES = ("report", "reproduce")


def collect_records(source_dir) -> list[dict]:
    """Every valid metrics.json below ``source_dir`` except reports' own; a broken file is skipped loudly."""
    source = Path(source_dir)
    if not source.is_dir():
        what = "is a file, not a directory" if source.exists() else "does not exist"
        raise FileNotFoundError(f"report source_dir {str(source)!r} {what}; run the experiment's stages "
                                f"first (python -m pipeline.reproduce experiment=<name>) or set source_dir=")
    records = []
    for path in find_metrics(source):
        try:
            rec = read_metrics(path)
        except ValueError as e:
            log.warning("report: skipping %s", e)
            continue
        if rec["stage"] not in SKIP_STAGES:
            rec["_path"] = str(path)
            rec["_run"] = path.parent.relative_to(source).as_posix()  # the run's name in tables and records
            records.append(rec)
    return records


#: the folders under outputs/ that git keeps (.gitignore): results people read; never written from stand-in runs
COMMITTED_OUTPUTS = ("tables", "records", "demo")


def render_report(records: list[dict], out_dir, title: str, tracker=None) -> tuple[Path, list]:
    """Write tables, plots and report.md into ``out_dir``; mirror them to ``tracker``; return (report, tables)."""
    out = Path(out_dir)
    tables = build_tables(records)
    parts = [f"# {title}", "", (f"{len(records)} result files, {len(tables)} tables. Each table is also in "
                                "`tables/<name>.csv`; numbers come from the metrics.json files of this run."), ""]
    if names_standin(bigbench_sources(records)):
        parts += [(f"**Task files: {STANDIN_SOURCE}.** These numbers say whether the chain runs, nothing about a "
                   "task or a method."), ""]
    for table in tables:
        write_table_files(table, out)
        plot = None
        if table.name == "tasks":
            plot = radar_plot(table, out / "plots" / "tasks_radar.png")
        elif table.name.startswith("composite_"):
            plot = bar_plot(table, out / "plots" / f"{table.name}.png")
        elif table.name == "latency":
            plot = latency_plot(table, out / "plots" / "latency.png")
        parts.append(to_markdown(table))
        if plot is not None:
            parts.append(f"![{table.name}](plots/{plot.name})\n")
        if tracker is not None:
            tracker.log_table(f"report/{table.name}", table.columns, table.rows)
            if plot is not None:
                tracker.log_image(f"report/{table.name}_plot", plot)
    if not tables:
        parts.append("_No results yet: run finetune / evaluate / bench first._\n")
    sources = sorted({str(r["provenance"].get("git_sha", "?"))[:12] for r in records})
    parts.append(f"\n<sub>git: {', '.join(sources) or '–'}</sub>\n")
    report = atomic_write_text(out / "report.md", "\n".join(parts))
    return report, tables


def write_experiment_table(cfg: DictConfig, records: list[dict]) -> dict:
    """``<paper_tables_dir>/<paper_table_file or paper_table>.{json,md,png}`` when ``cfg.paper_table`` names a paper
    table, else {}."""
    name = cfg.paper_table
    if not name or str(name) not in PAPER_TABLES:
        return {}
    committed = [(ROOT / "outputs" / d).resolve() for d in COMMITTED_OUTPUTS]
    into = [Path(str(d)).resolve() for d in (cfg.paper_tables_dir, cfg.get("records_out") or cfg.paper_tables_dir)]
    if names_standin(bigbench_sources(records)) and any(c == d or c in d.parents for c in committed for d in into):
        raise ValueError(f"the runs of {name} read the generated stand-in task files (data/standin.py), not "
                         f"BIG-bench: their table and records may not go where the committed ones are "
                         f"({', '.join(f'outputs/{d}' for d in COMMITTED_OUTPUTS)}); give another "
                         f"paths.output_root (make demo-standin uses outputs/standin)")
    try:
        config = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    except Exception:  # noqa: BLE001 an interpolation only Hydra's runtime resolves: keep it as written
        config = OmegaConf.to_container(cfg, resolve=False)
    config.pop("hydra", None)
    paths = write_paper_table(str(name), records, str(cfg.paper_tables_dir), config=config,
                              file_name=cfg.paper_table_file or None)
    table = json.loads(Path(paths["json"]).read_text())
    print(f"paper table {name}: {Path(paths['md']).resolve()}\n{claims_summary(table)}")
    return paths


def report(cfg: DictConfig) -> float | None:
    """Build the report of ``cfg.source_dir`` into ``cfg.out_dir``; return the number of tables."""
    check_settings(cfg)
    with StageRun(cfg) as run:
        committed = cfg.records
        records = read_records(committed) if committed else collect_records(cfg.source_dir)
        path, tables = render_report(records, cfg.out_dir, str(cfg.title), tracker=run.tracker)
        print(f"report: {path.resolve()}")
        paper = write_experiment_table(cfg, records)
        if paper and not committed and cfg.records_out:  # the raw records the table was built from
            print(f"records: {write_records(records, cfg.source_dir, cfg.records_out).resolve()}")
        if cfg.readme:
            print(f"readme: {update_readme(cfg.readme, cfg.paper_tables_dir)}")
        tasks = sorted({t for r in records for t in r.get("tasks", [])})
        return run.finish(tasks=tasks, strategy=None, main_metric="tables",
                          metrics={"records": len(records), "tables": len(tables)},
                          extra={"report": str(path), "table_names": [t.name for t in tables],
                                 "paper_table": {k: str(v) for k, v in paper.items()}})


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="report")
def main(cfg: DictConfig) -> float | None:
    with user_errors(cfg):
        return report(cfg)


if __name__ == "__main__":
    cli(main)
