"""Joint vs separate fine-tuning of an experiment's task adapters, timed: which one ``reproduce`` should use.

    python -m pipeline.joint_speed --experiment demo --repeats 2 --out outputs/tables/joint_finetune_cpu

For each repeat, alternating the order, it runs ``python -m pipeline.finetune experiment=<e> task=all`` (joint) and
``task=<t>`` for every task of the experiment (separate), each in its own process into a scratch outputs root (the
experiment's own adapters are left alone), and reads their metrics.json: ``train_seconds`` (the fit), ``tokens``
(prompt + answer tokens trained on, padding not counted: the same rows in both modes), ``wall_time_s`` (the whole
stage: model load, data, fit, validation, saving). A mode's tokens/s = its tokens / its summed train seconds;
``stage_seconds`` sums the stages' wall time (what a ``reproduce`` step costs, minus process start).
On a shared host wall time measures the neighbours too (and multi-threaded GEMMs wait for descheduled threads:
``--threads 1`` avoids that), so CPU time is recorded as well: ``train_cpu_seconds``
(the fit, every thread of the stage's process) and ``process_cpu_seconds`` (the whole process, start-up included);
``faster`` is decided by tokens per CPU second of the fit.
Written (atomically): ``<out>.json`` (every run's record, per-mode totals per repeat, the mean ratio joint /
separate, provenance) and ``<out>.md``. Extra arguments are Hydra overrides for every run.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

from common.atomic import atomic_write_text
from common.cli_args import ArgumentParser
from common.provenance import provenance
from data.task_rows import JOINT_TASK
from pipeline.runtime.compose import compose


def _run(overrides: list[str], run_dir: Path, threads: int | None) -> dict:
    cmd = [sys.executable, "-m", "pipeline.finetune", *overrides, f"hydra.run.dir={run_dir}", "print_config=false"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")
    rec = json.loads((run_dir / "metrics.json").read_text())
    m = rec["metrics"]
    process_cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return {"tasks": rec["tasks"], "tokens": m["tokens"], "steps": m["steps"], "val_loss": m["val_loss"],
            "train_seconds": m["train_seconds"], "train_cpu_seconds": m["train_cpu_seconds"],
            "stage_seconds": rec["wall_time_s"], "process_cpu_seconds": round(process_cpu, 3)}


def _total(mode: str, repeat: int, runs: list[dict]) -> dict:
    tokens = sum(r["tokens"] for r in runs)
    total = {k: round(sum(r[k] for r in runs), 2)
             for k in ("train_seconds", "train_cpu_seconds", "stage_seconds", "process_cpu_seconds")}
    return {"mode": mode, "repeat": repeat, "runs": len(runs), "tokens": tokens, **total,
            "tokens_per_s": round(tokens / max(total["train_seconds"], 1e-9), 1),
            "tokens_per_cpu_s": round(tokens / max(total["train_cpu_seconds"], 1e-9), 1)}


def render_md(result: dict) -> str:
    cols = ["mode", "repeat", "runs", "tokens", "train_seconds", "tokens_per_s", "train_cpu_seconds",
            "tokens_per_cpu_s", "stage_seconds", "process_cpu_seconds"]
    lines = [f"# Joint vs separate fine-tuning: {result['experiment']} ({len(result['tasks'])} adapters)", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(t[c]) for c in cols) + " |" for t in result["totals"]]
    p = result["provenance"]
    r = result["ratios"]
    ratios = (f"joint / separate, mean over repeats: tokens/s x{r['tokens_per_s']}, tokens per CPU second "
              f"x{r['tokens_per_cpu_s']}, whole-process CPU time x{r['process_cpu_seconds']}, stage wall time "
              f"x{r['stage_seconds']}; faster (by CPU time, which a busy host does not distort): {result['faster']}")
    where = (f"overrides: {' '.join(result['overrides']) or '-'}; threads {result['threads'] or 'default'}; "
             f"device {p.get('device')}; git {p.get('git_sha')}; "
             f"{p.get('date')}")
    lines += ["", ratios, "", where, ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = ArgumentParser(prog="python -m pipeline.joint_speed", description=__doc__.split("\n\n")[0])
    ap.add_argument("--experiment", default="demo")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default="outputs/tables/joint_finetune_cpu")
    ap.add_argument("--threads", type=int, default=None,
                    help="OMP_NUM_THREADS of every run (1 on a shared host: no thread waits on a descheduled sibling)")
    args, overrides = ap.parse_known_args(argv)
    base = [f"experiment={args.experiment}", "logger=none", *overrides]
    tasks = [str(t) for t in compose("finetune", base).tasks]  # the experiment's (a selection resolves), or overridden
    runs, totals = [], []
    with tempfile.TemporaryDirectory(prefix="joint-speed-") as tmp:
        for rep in range(args.repeats):
            for mode in (("joint", "separate") if rep % 2 == 0 else ("separate", "joint")):
                out = [*base, f"paths.output_root={tmp}/{mode}{rep}"]
                steps = [JOINT_TASK] if mode == "joint" else tasks
                done = [{**_run([*out, f"task={t}"], Path(tmp) / f"{mode}{rep}-{t}", args.threads), "mode": mode,
                         "repeat": rep}
                        for t in steps]
                runs += done
                totals.append(_total(mode, rep, done))
                print(json.dumps(totals[-1]), flush=True)
    mean = lambda mode, key: sum(t[key] for t in totals if t["mode"] == mode) / args.repeats
    ratios = {k: round(mean("joint", k) / mean("separate", k), 3)
              for k in ("tokens_per_s", "tokens_per_cpu_s", "stage_seconds", "process_cpu_seconds")}
    result = {"experiment": args.experiment, "tasks": tasks, "overrides": overrides, "repeats": args.repeats,
              "threads": args.threads,
              "totals": totals, "runs": runs, "ratios": ratios,
              "faster": "joint" if ratios["tokens_per_cpu_s"] > 1 else "separate", "provenance": provenance(0)}
    out = Path(args.out)
    atomic_write_text(out.with_suffix(".json"), json.dumps(result, indent=2) + "\n")
    atomic_write_text(out.with_suffix(".md"), render_md(result))
    print(render_md(result))
    return result


if __name__ == "__main__":
    main()
