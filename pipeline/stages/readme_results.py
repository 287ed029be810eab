"""README Results, written by code: each block between ``<!-- generated:<name> -->`` and ``<!-- /generated:<name> -->``
is rebuilt from the committed tables (``outputs/tables/*.json``, ``outputs/demo/tables/*.csv``), so no number or
verdict inside a block is typed by hand.

    python -m pipeline.readme_results                      # rewrite README.md's blocks from outputs/tables
    python -m pipeline.readme_results --check              # exit 1 naming the stale blocks (tests run the same check)
    python -m pipeline.report experiment=X ... readme=README.md    # the report stage does it after writing a table

Blocks:

* ``claims``: every claim of every paper table (``PAPER_FILES``): what was measured, the 95% paired bootstrap
  interval, the verdict by it (tables whose raw records were not kept have no interval: their verdict is the
  point estimate's, marked so), then per table its code version, device, date and whether its raw records are
  committed under ``outputs/records/<table>/`` (the only way a number can be re-derived).
* ``kernel_targets``: the fused op's time targets (``KERNEL_TARGETS``, ratio to the base linear) against
  ``kernel_bench.json``: the range over the target's ranks per shape, and where the target holds.
* ``train_throughput``: whole training steps beside peft's single LoRA: each target, what was measured (median
  ratio of paired rounds and their spread) and the verdict, as ``train_throughput.json`` holds them.
* ``e2e_decode``: whole-model decode ms/token per strategy and each decode target with its paired-round spread.
* ``head_to_head``, ``multigpu``: those tables' rows.
* ``demo``: ``make demo``'s mean score per strategy and decode time per strategy and adapter count.
"""

from __future__ import annotations

import csv
import json
import re
import sys
from pathlib import Path

from common.atomic import atomic_write_text
from common.cli_args import ArgumentParser, user_error
from data.standin import names_standin
from pipeline.report.paper_claims import table_claims
from pipeline.report.paper_tables import _md_cell, _md_table, interval_cell
from pipeline.stages import e2e_decode as e2e
from pipeline.stages.e2e_decode import targets_table as e2e_targets_table
from pipeline.stages.train_throughput import targets_table

ROOT = Path(__file__).resolve().parents[2]  # the checkout (pipeline/stages/ is two below it)
PAPER_FILES = ("meteora_tasks", "meteora_tasks_cotrained", "meteora_tasks_cotrained_lora_lr",
               "meteora_tasks_cotrained_aux5", "meteora_tasks_cotrained_answers",
               "meteora_tasks_cotrained_answers_lr1e5", "meteora_tasks_gate_ce_answers", "meteora_tasks_gemma",
               "meteora_composite", "meteora_composite_cotrained", "meteora_composite_noeos",
               "meteora_composite_gemma", "dlp_tasks",
               "dlp_tasks_gemma", "head_to_head", "dlp_latency")
# (label, direction, T, ranks, bound): the fused op's time targets, as ratios to the base linear of the same shape
KERNEL_TARGETS = (("prefill T=4096, r ≤ 16: ≤ 1.08", "fwd", 4096, (8, 16), 1.08),
                  ("prefill T=4096, r = 64: ≤ 1.12", "fwd", 4096, (64,), 1.12),
                  ("decode T=1: ≤ 1.06", "fwd", 1, (8, 16, 64), 1.06),
                  ("decode T=64, r = 8: ≤ 1.15", "fwd", 64, (8,), 1.15),
                  ("backward T=4096: ≤ 1.3", "bwd", 4096, (8, 16, 64), 1.3))
KERNEL_SHAPES = ((4096, 4096), (4096, 14336), (14336, 4096))
#: the block that shows one table alone -> that table (``<stem>.json`` under the tables dir)
BLOCK_TABLE = {"kernel_targets": "kernel_bench", "train_throughput": "train_throughput", "e2e_decode": "e2e_decode",
               "head_to_head": "head_to_head", "multigpu": "multigpu"}


def _load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def records_status(name: str, table: dict, records_root: Path) -> str:
    """Where the table's raw records are, or an honest note that they are not committed."""
    if (records_root / name / "index.json").is_file():
        return f"raw records committed: `outputs/records/{name}/`"
    note = (table.get("provenance") or {}).get("raw_records")
    return note or "raw records not committed: its numbers cannot be re-derived"


def verdict_cell(c: dict) -> str:
    """The verdict by the interval; for a table without one (built before intervals), the point estimate's."""
    if "verdict" not in c:
        point = {True: "yes", False: "no", None: "–"}[c.get("holds")]
        return f"{point} (point estimate; no interval)"
    if c["verdict"] is None:
        return f"none: {c.get('reason')}"
    return f"**{c['verdict']}**" + (f" ({c['reason']})" if c.get("reason") else "")


def claims_block(tables_dir: Path) -> str:
    rows, notes = [], []
    for name in PAPER_FILES:
        t = _load(tables_dir / f"{name}.json")
        if t is None:
            continue
        for c in t.get("claims", []):
            rows.append({"table": f"`{name}`", "claim": c["claim"], "measured": _md_cell(c["measured"]),
                         "95% interval": interval_cell(c.get("interval")), "verdict": verdict_cell(c)})
        p = t.get("provenance", {})
        sha = p.get("git_sha")
        sha = ", ".join(str(s)[:7] for s in sha) if isinstance(sha, list) else str(sha)[:7]
        ran = (p.get("runs") or [None, None])[-1] or p.get("date")  # when its runs ended, not when it was rebuilt
        notes.append(f"- `{name}`: git {sha} · {p.get('device')} · {str(ran)[:10]} · {p.get('records')} "
                     f"runs · {records_status(name, t, tables_dir.parent / 'records')}")
    e2e = _load(tables_dir / "e2e_decode.json")  # claim 5 under CUDA graphs, from the decode bench's raw rounds
    if e2e is not None:
        for c in table_claims("e2e_decode", e2e):
            rows.append({"table": "`e2e_decode`", "claim": c["claim"], "measured": _md_cell(c["measured"]),
                         "95% interval": interval_cell(c.get("interval")), "verdict": verdict_cell(c)})
        p = e2e["provenance"]
        notes.append(f"- `e2e_decode`: git {str(p.get('git_sha'))[:7]} · {p.get('device')} · "
                     f"{str(p.get('date'))[:10]} · raw per-round times in the table's JSON")
    return "\n".join(_md_table(rows, ["table", "claim", "measured", "95% interval", "verdict"]) + notes)


def kernel_targets_block(tables_dir: Path) -> str:
    t = _load(tables_dir / "kernel_bench.json")
    if t is None:
        return "_kernel_bench.json is not committed_"
    ratio = {(r["d_in"], r["d_out"], r["r"], r["T"], r["direction"]): r["ratio_to_base"]
             for r in t["rows"] if r.get("variant") == "loramux"}
    head = ["target (ratio to base)", *[f"{a}→{b}" for a, b in KERNEL_SHAPES], "held where"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, direction, T, ranks, bound in KERNEL_TARGETS:
        cells, held, n_ok, total = [], [], 0, 0
        for a, b in KERNEL_SHAPES:
            got = {r: ratio[(a, b, r, T, direction)] for r in ranks if (a, b, r, T, direction) in ratio}
            lo, hi = (min(got.values()), max(got.values())) if got else (None, None)
            cells.append("–" if not got else f"{lo:.2f}" if f"{lo:.2f}" == f"{hi:.2f}" else f"{lo:.2f}–{hi:.2f}")
            ok = [r for r, v in got.items() if v <= bound]
            n_ok, total = n_ok + len(ok), total + len(got)
            if ok:
                held.append(f"{a}→{b} r {', '.join(map(str, ok))}")
        where = "nowhere" if not n_ok else "everywhere" if n_ok == total else "; ".join(held)
        lines.append("| " + " | ".join([label, *cells, where]) + " |")
    p = t["provenance"]
    return "\n".join(lines + ["", (f"{p.get('device')}, torch {p.get('torch')}, triton {p.get('triton')}, git "
                                  f"{str(p.get('git_sha'))[:7]}, {str(p.get('date'))[:10]} (`outputs/tables/"
                                  f"kernel_bench.json`, variant `loramux`).")])


def train_throughput_block(tables_dir: Path) -> str:
    """The targets of every committed ``train_throughput*.json`` (the latest run, all of them; earlier or narrower
    runs, e.g. the batch-size search, those they decided), each under its own provenance line."""
    paths = sorted(tables_dir.glob("train_throughput*.json"), key=lambda p: (p.stem != "train_throughput", p.stem))
    if not paths:
        return "_train_throughput.json is not committed_"
    lines: list = []
    for path in paths:
        t = _load(path)
        p = t["provenance"]
        # the latest run lists every target; an earlier or narrower run only those it measured
        shown = [x for x in t["targets"] if path.stem == "train_throughput" or x["verdict"] is not None]
        lines += [*targets_table(shown), "",
                  (f"{p.get('device')}, git {str(p.get('git_sha'))[:7]}, {str(p.get('date'))[:10]} "
                   f"(`outputs/tables/{path.stem}.{{json,md}}`: every row, precision, compile, CUDA graph and batch)."),
                  ""]
    return "\n".join(lines).rstrip()


def e2e_decode_block(tables_dir: Path) -> str:
    """Decode ms/token per strategy and each target of ``e2e_decode.json`` with its paired-round spread."""
    t = _load(tables_dir / "e2e_decode.json")
    if t is None:
        return "_e2e_decode.json is not committed_"
    rows = [{"engine": r["engine"], "targets": r["targets"], "batch": r["batch_size"], "strategy": r["strategy"],
             "decode ms/token": r["decode_ms_per_token"]} for r in t["rows"]]
    lines = [*_md_table(rows), *e2e_targets_table(t["targets"])]
    p = t["provenance"]
    skipped = sorted({s for r in t["records"] for s in r.get("skipped", [])})
    lines += ["", (f"{p.get('device')}, written at git {str(p.get('git_sha'))[:7]}, {str(p.get('date'))[:10]}; "
                   "measured: " + "; ".join(e2e.measured_at(t["records"]))
                   + (f"; not measured (time budget): {', '.join(skipped)}" if skipped else "")
                   + " (`outputs/tables/e2e_decode.{json,md}`, raw per-round times in the JSON).")]
    return "\n".join(lines).rstrip()


def head_to_head_block(tables_dir: Path) -> str:
    t = _load(tables_dir / "head_to_head.json")
    if t is None:
        return "_head_to_head.json is not committed_"
    composite = "; ".join(f"n={c['n']} {c['strategy']}: correct {_md_cell(c['correct'])}, attempts "
                          f"{_md_cell(c.get('attempts'))}" for c in t.get("composite", []))
    return "\n".join([*_md_table(t["rows"], ["strategy", "avg_score", "decode_ms", "peak_mem_gb"]),
                      f"setting: {_md_cell(t.get('setting'))}; composite: {composite}"])


def multigpu_block(tables_dir: Path) -> str:
    t = _load(tables_dir / "multigpu.json")
    if t is None:
        return "_multigpu.json is not committed_"
    rows = [{"run": r["run"], "per-GPU batch": r["per_device_batch"], "tokens/s": round(r["tokens_per_s"]),
             "ms/step": round(r["step_ms"]), "speedup": round(r["speedup"], 2),
             "final loss": round(r["loss_curve"][-1], 3), "max loss diff vs 1 GPU": round(r["loss_max_abs_diff"], 3),
             "router acc.": round(r["router_accuracy"], 3)} for r in t["runs"]]
    return "\n".join(_md_table(rows)).rstrip()


def demo_block(demo_dir: Path) -> str:
    tasks, latency = demo_dir / "tables" / "tasks.csv", demo_dir / "tables" / "latency.csv"
    if not tasks.is_file():
        return "_outputs/demo/tables/tasks.csv is not committed_"
    with open(tasks) as f:
        mean = next(r for r in csv.DictReader(f) if r["task"] == "mean")
    rows = [{"strategy": s, "mean score": float(v)} for s, v in mean.items() if s != "task"]
    lines = _md_table(rows)
    if latency.is_file():
        with open(latency) as f:
            lat = [{"strategy": r["strategy"], "adapters": int(r["num_adapters"]),
                    **({"timed with bank of": r["alongside"] or "–"} if "alongside" in r else {}),
                    "decode ms/token": float(r["decode_ms_per_token"]), "ratio to base": float(r["ratio_to_base"])}
                   for r in csv.DictReader(f)]
        lines += _md_table(lat)
    finetune, report = demo_dir / "tables" / "finetune.csv", demo_dir / "report.md"
    if finetune.is_file():
        with open(finetune) as f:
            rows = list(csv.DictReader(f))
        joint = [r for r in rows if r.get("run") == "joint"]
        own = sorted(float(r["tokens_per_s"]) for r in rows if r.get("run") != "joint")
        parts = ([f"one joint run of the {len(joint)} task adapters {float(joint[0]['tokens_per_s']):g} tokens/s"]
                 if joint else [])
        parts += [f"one run per adapter {own[0]:g}-{own[-1]:g} tokens/s"] if own else []
        lines += [(f"Fine-tuning on the CPU (fp32): {'; '.join(parts)} (prompt + answer tokens over the fit, "
                   "`outputs/demo/tables/finetune.csv`)."), ""]
    sha = re.search(r"<sub>git: ([0-9a-f]+)</sub>", report.read_text()) if report.is_file() else None
    lines.append(f"Made by `make demo` at git {sha.group(1) if sha else '(no report.md)'}; every number above is in that "
                 "run's metrics.json files, gathered by its report (`outputs/demo/report.md`).")
    return "\n".join(lines).rstrip()


BLOCKS = {"claims": claims_block, "kernel_targets": kernel_targets_block, "train_throughput": train_throughput_block,
          "e2e_decode": e2e_decode_block, "head_to_head": head_to_head_block,
          "multigpu": multigpu_block}


def blocks(tables_dir) -> dict[str, str]:
    """Every block's text from the committed tables under ``tables_dir`` (and ``<its parent>/demo``). A dir that
    holds no table at all is refused: it is a mistyped path, and every block would say "not committed", which
    written over the README would drop all its results. So is a table made on the stand-in task files."""
    tables_dir = Path(tables_dir)
    if not tables_dir.is_dir() or not any(tables_dir.glob("*.json")):
        what = ("holds no table (*.json)" if tables_dir.is_dir() else
                "is a file, not a directory" if tables_dir.exists() else "does not exist")
        raise FileNotFoundError(f"tables dir {str(tables_dir)!r} {what}; give the committed tables' dir, "
                                f"outputs/tables (--tables, or the report stage's paper_tables_dir=)")
    standin = [p.stem for p in sorted(tables_dir.glob("*.json"))
               if names_standin(((_load(p) or {}).get("provenance") or {}).get("bigbench"))]
    if standin:
        raise ValueError(f"{', '.join(f'{s}.json' for s in standin)} under {str(tables_dir)!r} were made on the "
                         f"generated stand-in task files (data/standin.py), not BIG-bench: their numbers test the "
                         f"plumbing only; rebuild them from runs on BIG-bench before they enter README")
    out = {name: fn(tables_dir).rstrip() for name, fn in BLOCKS.items()}
    out["demo"] = demo_block(tables_dir.parent / "demo")
    return out


def _markers(name: str) -> tuple[str, str]:
    return (f"<!-- generated:{name} (python -m pipeline.readme_results; do not edit by hand) -->",
            f"<!-- /generated:{name} -->")


def render(text: str, generated: dict[str, str]) -> str:
    """``text`` with every marked block replaced by its generated content; a block whose markers are missing is
    one ValueError naming it."""
    for name, body in generated.items():
        begin, end = _markers(name)
        if text.count(begin) != 1 or text.count(end) != 1 or text.index(begin) > text.index(end):
            raise ValueError(f"README has no (or a broken) generated block {name!r}; put the lines {begin!r} and "
                             f"{end!r} where it goes")
        head, rest = text.split(begin)
        _, tail = rest.split(end)
        text = f"{head}{begin}\n{body}\n{end}{tail}"
    return text


def _readme(readme) -> Path:
    """The README file to render into; a path that is a directory or is not there is one line naming the fix."""
    path = Path(readme)
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise FileNotFoundError(f"readme {str(path)!r} {what}; give the repository's README.md (--readme, or the "
                                f"report stage's readme=)")
    return path


def stale_blocks(readme, tables_dir) -> list[str]:
    """Names of the README's blocks that differ from what the committed tables give."""
    text = _readme(readme).read_text()
    generated = blocks(tables_dir)  # every table read once
    if render(text, generated) == text:
        return []
    return [n for n, b in generated.items() if f"{_markers(n)[0]}\n{b}\n{_markers(n)[1]}" not in text]


def _block(text: str, name: str) -> str:
    """What README's generated block ``name`` holds now ("" where it has none)."""
    begin, end = _markers(name)
    if begin not in text or end not in text:
        return ""
    return text.split(begin, 1)[1].split(end, 1)[0]


def tables_lost(text: str, tables_dir) -> list[str]:
    """The tables README's generated blocks show that ``tables_dir`` lacks: rendered from that dir, their results
    would vanish from the README (a dir of some tables only, such as another ``paths.output_root``'s). The claims
    block names each paper table it shows (`` `stem` ``); every other block shows one table, unless it says that
    table is not committed."""
    tables_dir = Path(tables_dir)
    claims = _block(text, "claims")
    shown = [s for s in PAPER_FILES if f"`{s}`" in claims]
    held = {s: _block(text, b) for b, s in BLOCK_TABLE.items()}
    shown += [s for s, body in held.items() if body.strip() and "is not committed" not in body]
    return [s for s in dict.fromkeys(shown) if not (tables_dir / f"{s}.json").is_file()]


def update_readme(readme, tables_dir, drop_missing: bool = False) -> Path:
    """Rewrite the README's generated blocks from ``tables_dir`` (atomically); return its path. A table the README
    shows that the dir lacks is refused (``tables_lost``), README untouched, unless ``drop_missing``: its results
    then leave the README on purpose."""
    path = _readme(readme)
    text = path.read_text()
    generated = blocks(tables_dir)  # a missing or empty dir is refused first
    lost = [] if drop_missing else tables_lost(text, tables_dir)
    if lost:
        raise ValueError(f"tables dir {str(tables_dir)!r} lacks {', '.join(f'{s}.json' for s in lost)}, which README "
                         f"Results show: give the dir of every committed table (outputs/tables), or drop them from "
                         f"README on purpose (python -m pipeline.readme_results --drop-missing)")
    new = render(text, generated)
    if new != text:
        atomic_write_text(path, new)
    return path.resolve()


def main(argv=None) -> int:
    ap = ArgumentParser(prog="python -m pipeline.readme_results", description=__doc__.splitlines()[0])
    ap.add_argument("--readme", default=str(ROOT / "README.md"))
    ap.add_argument("--tables", default=str(ROOT / "outputs" / "tables"))
    ap.add_argument("--check", action="store_true", help="exit 1 when a block differs from the tables")
    ap.add_argument("--drop-missing", action="store_true",
                    help="let a table README shows but --tables lacks leave README (refused otherwise)")
    args = ap.parse_args(argv)
    try:
        if args.check:
            stale = stale_blocks(args.readme, args.tables)
            if stale:
                print(f"error: README blocks out of date: {', '.join(stale)}; run python -m pipeline.readme_results",
                      file=sys.stderr)
                return 1
            return 0
        print(update_readme(args.readme, args.tables, drop_missing=args.drop_missing))
    except (ValueError, FileNotFoundError) as e:
        return user_error(e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
