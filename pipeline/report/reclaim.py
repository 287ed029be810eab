"""Recompute the claims of a committed paper table whose raw records are lost, from the table's own rows.

    python -m pipeline.report.reclaim outputs/tables/meteora_composite.json

A table made before tables kept their runs' records cannot be rebuilt (``python -m pipeline.report
records=...``), but its rows are still there. When the rule that turns rows into a claim changes (a claim that is
untestable gets no point verdict, say), this writes the table's claims again by that rule, from those rows: the JSON
(its ``claims``, everything else as it was) and its Markdown page, next to the table's existing figure. Intervals
need per-row records, so such a table's claims stay point estimates; its rows stay as the code of its day built
them (``meteora_composite``'s free-text sub-tasks on ROUGE-L, which claim 2 now reads as BLEU). A table whose
records are committed is refused: rebuild it from them instead, which recomputes rows and claims together.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from common.atomic import atomic_write_text
from common.cli_args import ArgumentParser, user_error
from pipeline.report.paper_claims import table_claims
from pipeline.report.paper_tables import paper_markdown


def reclaim(path, records_root=None) -> dict:
    """The table at ``path`` with its claims recomputed from its rows (written back, JSON and Markdown).
    ``records_root``: where its records would be, by default beside the tables dir (``outputs/records`` for
    ``outputs/tables/<name>.json``, from wherever it is called)."""
    path = Path(path)
    records_root = path.resolve().parent.parent / "records" if records_root is None else records_root
    if not path.is_file():
        raise FileNotFoundError(f"{path} is not a file; give a committed table, e.g. outputs/tables/<name>.json")
    try:
        table = json.loads(path.read_text())
        name = table["table"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{path} is not a paper table ({e}); give outputs/tables/<name>.json") from None
    if (Path(records_root) / path.stem / "index.json").is_file():
        raise ValueError(f"{path.stem}'s records are committed: rebuild it from them, python -m pipeline.report "
                         f"experiment={path.stem} records={Path(records_root) / path.stem}")
    body = {k: v for k, v in table.items() if k not in ("table", "provenance", "claims")}
    table["claims"] = table_claims(name, body)
    plot = path.with_suffix(".png")
    atomic_write_text(path, json.dumps(table, indent=1, allow_nan=False) + "\n")
    atomic_write_text(path.with_suffix(".md"), paper_markdown(name, table, plot if plot.is_file() else None,
                                                              title=path.stem))
    return table


def main(argv=None) -> int:
    ap = ArgumentParser(prog="python -m pipeline.report.reclaim", description=__doc__.splitlines()[0])
    ap.add_argument("table", help="a committed paper table, outputs/tables/<name>.json")
    args = ap.parse_args(argv)
    try:
        table = reclaim(args.table)
    except (ValueError, FileNotFoundError) as e:
        return user_error(e)
    print(f"reclaim: {args.table}: " + "; ".join(f"{c['claim'].split('.')[0]} holds {c['holds']}"
                                                 for c in table["claims"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
