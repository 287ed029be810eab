"""Raw run records, committed beside the tables: every run's metrics.json, predictions and composed config.

    write_records(records, "outputs/meteora_tasks", "outputs/records/meteora_tasks")   # the report stage does this
    records = read_records("outputs/records/meteora_tasks")                            # what report records=... reads
    python -m pipeline.report experiment=meteora_tasks records=outputs/records/meteora_tasks   # the table, offline

Layout: ``<records dir>/<run>/metrics.json.xz``, ``predictions.jsonl.xz`` (runs that predict) and ``config.yaml.xz``
(the run's own composed config, the ``config.yaml`` its stage saved), where ``<run>`` is the run dir's path below
the experiment dir (``evaluate/oracle``, ``route/meteora``, ``finetune/winowhy``); ``index.json`` lists the runs
with their stage, strategy and git sha. A predictions line keeps everything (task, index, gold answer(s),
prediction, route) except the prompt, which becomes ``prompt_sha1``: prompts are rebuilt by code from the data
(task, split seed, row index), were most of the bytes, and their hash still proves two runs saw the same prompt.
xz with fixed settings and sorted keys, so the same runs always give the same bytes (a re-run report changes
nothing in git). The directory is replaced as a whole (``atomic_dir``): it never mixes two report calls.

Readers take both forms: ``predictions_of(rec)`` / ``config_of(rec)`` read a run dir's plain files or a records
dir's compressed ones, whichever the record (its ``_path``) came from.
"""

from __future__ import annotations

import hashlib
import json
import lzma
from pathlib import Path

import yaml

from common.atomic import atomic_dir, atomic_write_text
from pipeline.runtime.metrics_file import REQUIRED

INDEX = "index.json"
SUFFIX = ".xz"
FILES = ("metrics.json", "predictions.jsonl", "config.yaml")


def prompt_sha1(prompt: str) -> str:
    return hashlib.sha1(prompt.encode("utf-8")).hexdigest()


def _xz(text: str) -> bytes:
    return lzma.compress(text.encode("utf-8"), format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64, preset=6)


def _read(path: Path) -> str | None:
    """A plain file's text, or its ``.xz`` twin's; None when neither exists."""
    if path.is_file():
        return path.read_text(encoding="utf-8")
    packed = path.with_name(path.name + SUFFIX)
    if packed.is_file():
        return lzma.decompress(packed.read_bytes()).decode("utf-8")
    return None


def _run_dir(rec: dict) -> Path | None:
    path = rec.get("_path")
    if not path:
        return None
    path = Path(path)
    return path.parent if path.name.startswith("metrics.json") else path


def predictions_of(rec: dict) -> list[dict]:
    """The run's predictions lines (plain or committed form); [] when it saved none."""
    run = _run_dir(rec)
    text = _read(run / "predictions.jsonl") if run is not None else None
    return [json.loads(line) for line in (text or "").splitlines() if line.strip()]


def config_of(rec: dict) -> dict | None:
    """The run's own composed config (its saved ``config.yaml``), or None when it is not there."""
    run = _run_dir(rec)
    text = _read(run / "config.yaml") if run is not None else None
    return yaml.safe_load(text) if text else None


def slim_prediction(line: dict) -> dict:
    """A predictions line as committed: the prompt replaced by its sha1."""
    out = {k: v for k, v in line.items() if k != "prompt"}
    if "prompt" in line:
        out["prompt_sha1"] = prompt_sha1(str(line["prompt"]))
    return out


def run_key(rec: dict, source_dir=None) -> str:
    """A record's run name: its run dir below ``source_dir`` (or below the records dir it was read from)."""
    run = _run_dir(rec)
    if rec.get("_run"):
        return str(rec["_run"])
    if run is None:
        return f"{rec['stage']}/{rec.get('strategy')}"
    if source_dir is not None:
        try:
            return run.resolve().relative_to(Path(source_dir).resolve()).as_posix()
        except ValueError:
            pass
    return f"{run.parent.name}/{run.name}"


def write_records(records: list[dict], source_dir, out_dir) -> Path:
    """Write every record's run files, compressed, under ``out_dir`` (replaced as a whole); return ``out_dir``."""
    index = []
    with atomic_dir(out_dir) as tmp:
        for rec in sorted(records, key=lambda r: run_key(r, source_dir)):
            key = run_key(rec, source_dir)
            dest = Path(tmp) / key
            dest.mkdir(parents=True, exist_ok=True)
            clean = {k: v for k, v in rec.items() if not k.startswith("_")}
            (dest / f"metrics.json{SUFFIX}").write_bytes(_xz(json.dumps(clean, indent=1, sort_keys=True) + "\n"))
            lines = None
            if _read(_run_dir(rec) / "predictions.jsonl") is not None:
                lines = predictions_of(rec)
                text = "".join(json.dumps(slim_prediction(x), sort_keys=True) + "\n" for x in lines)
                (dest / f"predictions.jsonl{SUFFIX}").write_bytes(_xz(text))
            config = _read(_run_dir(rec) / "config.yaml")
            if config is not None:
                (dest / f"config.yaml{SUFFIX}").write_bytes(_xz(config))
            index.append({"run": key, "stage": rec["stage"], "strategy": rec.get("strategy"),
                          "composite_n": rec.get("composite_n"), "git_sha": rec["provenance"].get("git_sha"),
                          "date": rec["provenance"].get("date"), "predictions": None if lines is None else len(lines),
                          "config": config is not None})
        (Path(tmp) / INDEX).write_text(json.dumps({"experiment_runs": index}, indent=1, sort_keys=True) + "\n")
    return Path(out_dir)


def read_run(run_dir) -> dict | None:
    """One run's record (its ``metrics.json``, plain or committed ``.xz``) with ``_path`` set, so ``config_of`` and
    ``predictions_of`` read the files beside it; None when the dir holds none."""
    text = _read(Path(run_dir) / "metrics.json")
    if text is None:
        return None
    return {**json.loads(text), "_path": str(Path(run_dir) / "metrics.json")}


def read_route_record(record_dir) -> tuple[dict, dict]:
    """``(composed config, metrics record)`` of a route run, a committed record dir or a run dir (what the offline
    tools over a route record read); one ValueError line naming the fix when the dir holds no such pair, or holds
    another stage's record."""
    rec = read_run(record_dir)
    cfg = config_of(rec) if rec is not None else None
    if rec is None or cfg is None:
        raise ValueError(f"{record_dir} is not a route record (no metrics.json and config.yaml, plain or .xz): give "
                         f"a committed route record dir, e.g. outputs/records/meteora_tasks/route/meteora")
    if rec.get("stage") != "route":  # an evaluate / finetune record beside it: no router.train in its config
        raise ValueError(f"{record_dir} holds a record of the {rec.get('stage')} stage, not of route: give the "
                         f"route run's dir, e.g. outputs/records/meteora_tasks/route/meteora")
    return cfg, rec


def read_records(records_dir) -> list[dict]:
    """The records of a committed records dir, each with ``_path`` (its metrics.json.xz) and ``_run``."""
    root = Path(records_dir)
    if not (root / INDEX).is_file():
        raise FileNotFoundError(f"records={str(root)!r} holds no {INDEX}: not a records dir; give "
                                f"outputs/records/<experiment> (written by the report stage of a paper experiment)")
    out = []
    for run in _index_runs(root / INDEX):
        path = root / run / f"metrics.json{SUFFIX}"
        try:
            rec = json.loads(_read(root / run / "metrics.json") or "")
        except (ValueError, lzma.LZMAError) as e:
            raise ValueError(f"{path}: not a readable record ({e}); restore it from git") from None
        missing = [k for k in REQUIRED if k not in rec]
        if missing:
            raise ValueError(f"{path}: the record lacks {missing}; restore it from git")
        rec["_path"], rec["_run"] = str(path), run
        out.append(rec)
    return out


def _index_runs(index: Path) -> list[str]:
    """The run names an ``index.json`` lists; a file that is not one (truncated, hand-edited, another tool's
    ``index.json``) is one ValueError naming it and the fix, not a bare JSONDecodeError or a KeyError traceback."""
    try:
        return [str(entry["run"]) for entry in json.loads(index.read_text())["experiment_runs"]]
    except (ValueError, KeyError, TypeError) as e:
        why = (f"{type(e).__name__}: {e}" if isinstance(e, ValueError) else
               "no experiment_runs list of {run: ...}")
        raise ValueError(f"{index}: not a records index ({why}); restore it from git, or rebuild the records dir "
                         f"with the report stage of its experiment") from None


LOST = ("raw records not committed: this table was made before tables kept their runs' metrics.json and "
        "predictions, which are lost, so its numbers cannot be re-derived; re-run the experiment to replace it")


def note_missing_records(table_path, note: str = LOST) -> bool:
    """Say in a committed table's provenance (``raw_records``) that its raw records are not committed; only the
    JSON's provenance changes (same key order and number formatting). True when the note was added."""
    path = Path(table_path)
    table = json.loads(path.read_text())
    if table.get("provenance", {}).get("raw_records"):
        return False
    table["provenance"]["raw_records"] = note
    atomic_write_text(path, json.dumps(table, indent=1, allow_nan=False) + "\n")
    return True


__all__ = ["LOST", "config_of", "note_missing_records", "predictions_of", "prompt_sha1", "read_records", "run_key",
           "write_records"]
