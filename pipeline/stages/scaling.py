"""Multi-GPU scaling of the route stage: the same router training on 1 device and under DDP / FSDP, compared.

    python -m pipeline.scaling --experiment demo --router meteora --runs gpu:1 ddp:2 fsdp:2 \\
        --steps 40 --global-batch 8 --out outputs/tables/multigpu          # on a 2-GPU machine
    python -m pipeline.scaling --experiment smoke --runs cpu:1 ddp_cpu:2 --steps 4 --global-batch 4   # CPU check

Each run is ``python -m pipeline.route ... trainer=<name> trainer.devices=<n>`` in its own process (Lightning
starts the other ranks), with the same *global* batch (``router.train.batch_size`` = global / n per device), the
same seed and data order, and its own router dir (the experiment's router is left alone). The ``StepTimes``
callback (given through ``callbacks``, which route instantiates) records on rank 0, for every optimizer step, the
wall time (CUDA-synchronised), the global batch's tokens and rows (summed over ranks) and the global train loss.
Missing task adapters are trained first (``--adapter-steps`` steps each, one finetune sweep process).

A run that fails after the first (FSDP on an untested stack, say) is recorded with its error and the others are
still written. Written (atomically): ``<out>.json`` (runs with loss curves, tokens/s and rows/s after ``--warmup`` steps, speedup
and efficiency against the first run, loss-curve difference to it, router accuracy; provenance) and ``<out>.md``.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import torch

from common.atomic import atomic_write_text
from common.cli_args import ArgumentParser
from common.provenance import provenance
from pipeline.runtime.compose import compose
from pipeline.runtime.distributed import sum_over_ranks
from pipeline.runtime.settings import output_root, passed_to

log = logging.getLogger("loramux.scaling")


# ---- recording, inside the route run ------------------------------------------------------------------------------
class StepTimes(L.Callback):
    """Per optimizer step: seconds (rank 0's clock, CUDA synchronised), global tokens and rows, global train loss;
    written by rank 0 to ``path`` (JSON list) when training ends."""

    def __init__(self, path):
        self.path = Path(path)
        self.rows: list[dict] = []
        self.t0 = 0.0

    @staticmethod
    def _sync(pl_module) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._sync(pl_module)
        self.t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._sync(pl_module)
        seconds = time.perf_counter() - self.t0
        loss = trainer.callback_metrics.get("train/loss")
        self.rows.append({"step": int(trainer.global_step), "seconds": seconds,
                          "tokens": int(sum_over_ranks(float(batch["attention_mask"].sum()))),
                          "rows": int(sum_over_ranks(float(batch["attention_mask"].shape[0]))),
                          "loss": float(loss) if loss is not None else None})

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            atomic_write_text(self.path, json.dumps(self.rows) + "\n")


# ---- the driver ---------------------------------------------------------------------------------------------------
def parse_run(spec: str) -> tuple[str, int]:
    """``"ddp:2"`` -> ("ddp", 2); ``"gpu"`` -> ("gpu", 1)."""
    name, _, n = spec.partition(":")
    if not name or (n and not n.isdigit()) or (n and int(n) < 1):
        raise ValueError(f"run {spec!r} is not <trainer config>[:<devices>], e.g. gpu:1, ddp:2, fsdp:2")
    return name, int(n or 1)


def summarize(name: str, devices: int, steps: list[dict], warmup: int) -> dict:
    """Throughput after ``warmup`` steps (tokens/s, rows/s) and the loss curve of one run."""
    timed = steps[warmup:] or steps
    seconds = sum(s["seconds"] for s in timed)
    return {"run": f"{name}:{devices}", "trainer": name, "devices": devices, "steps": len(steps),
            "timed_steps": len(timed), "tokens_per_s": sum(s["tokens"] for s in timed) / max(seconds, 1e-12),
            "rows_per_s": sum(s["rows"] for s in timed) / max(seconds, 1e-12),
            "step_ms": 1000 * seconds / max(len(timed), 1), "loss_curve": [s["loss"] for s in steps],
            "tokens_per_step": [s["tokens"] for s in steps]}


def compare(runs: list[dict]) -> None:
    """Against the first run: speedup, efficiency (speedup / devices), loss-curve difference."""
    base = runs[0]
    for r in runs:
        r["speedup"] = r["tokens_per_s"] / base["tokens_per_s"]
        r["efficiency"] = r["speedup"] * base["devices"] / r["devices"]
        pairs = [(a, b) for a, b in zip(r["loss_curve"], base["loss_curve"]) if a is not None and b is not None]
        r["loss_max_abs_diff"] = max((abs(a - b) for a, b in pairs), default=None)
        r["loss_max_rel_diff"] = max((abs(a - b) / max(abs(b), 1e-12) for a, b in pairs), default=None)
        r["same_global_batches"] = r["tokens_per_step"] == base["tokens_per_step"]


def render_md(result: dict) -> str:
    c, p = result["config"], result["provenance"]
    lines = [f"# Multi-GPU scaling: route stage ({c['router']} router, experiment {c['experiment']})", "",
             (f"Global batch {c['global_batch']} rows, {c['steps']} steps, throughput over steps after the first "
             f"{c['warmup']}; loss = global train loss per step, compared with `{result['runs'][0]['run']}`."), "",
             ("| run | devices | per-device batch | tokens/s | rows/s | ms/step | speedup | efficiency | final loss | "
             "max abs loss diff | same global batches | router acc. |"),
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["runs"]:
        final = r["loss_curve"][-1] if r["loss_curve"] else None
        diff = "-" if r["loss_max_abs_diff"] is None else f"{r['loss_max_abs_diff']:.2e}"
        acc = r.get("router_accuracy")
        lines.append(f"| {r['run']} | {r['devices']} | {r['per_device_batch']} | {r['tokens_per_s']:.0f} | "
                     f"{r['rows_per_s']:.2f} | {r['step_ms']:.1f} | {r['speedup']:.2f} | {r['efficiency']:.2f} | "
                     f"{final:.4f} | {diff} | {'yes' if r['same_global_batches'] else 'no'} | "
                     f"{'-' if acc is None else f'{acc:.3f}'} |")
    lines += [f"| {f['run']} | {f['devices']} | failed: {f['error'][:150]} | | | | | | | | | |"
              for f in result.get("failed", [])]
    lines += ["", (f"Device: {p.get('device')}; git {p.get('git_sha')}; {p.get('date')}; versions "
              f"{json.dumps(p.get('versions'))}."), "", f"Command: `{result['command']}`", ""]
    return "\n".join(lines)


def _run(cmd: list[str], log_path: Path, env: dict, fail: bool = True) -> str | None:
    """Run ``cmd`` with its output in ``log_path``; on failure exit (``fail``) or return the log's last lines."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    print(f"scaling: {' '.join(cmd)}  (log {log_path})", flush=True)
    with open(log_path, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, check=False)
    if proc.returncode == 0:
        return None
    tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-15:])
    if fail:
        raise SystemExit(f"scaling: failed (exit {proc.returncode}): {' '.join(cmd)}\n{tail}")
    print(f"scaling: run failed (exit {proc.returncode}), recorded in the table; log {log_path}\n{tail}", flush=True)
    return tail


def ensure_adapters(args, env: dict, work: Path) -> None:
    """Train (briefly) every task adapter of the experiment that is missing, in one finetune sweep process."""
    cfg = compose("route", [f"experiment={args.experiment}", f"router={args.router}", *passed_to("route", args.overrides)])
    root = Path(str(cfg.paths.adapters_dir))  # where route reads them (head_to_head: meteora_tasks' adapters)
    missing = [str(t) for t in cfg.tasks if not (root / str(t) / "adapter_config.json").is_file()]
    if not missing:
        return
    base_trainer = parse_run(args.runs[0])[0]
    _run([sys.executable, "-m", "pipeline.finetune", "-m", f"experiment={args.experiment}", f"task={','.join(missing)}",
          f"trainer={base_trainer}", f"trainer.max_steps={args.adapter_steps}", "logger=none", "print_config=false",
          f"hydra.sweep.dir={work / 'adapters'}", *passed_to("finetune", args.overrides)], work / "adapters.log", env)


def main(argv: list[str] | None = None) -> dict:
    ap = ArgumentParser(prog="python -m pipeline.scaling", description=__doc__.split("\n\n")[0])
    ap.add_argument("--experiment", default="demo")
    ap.add_argument("--router", default="meteora", choices=["meteora", "dlp"])
    ap.add_argument("--runs", nargs="+", default=["gpu:1", "ddp:2", "fsdp:2"],
                    help="<trainer config>:<devices>; the first is the baseline")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--global-batch", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=5, help="first steps left out of the throughput (compile, caches)")
    ap.add_argument("--adapter-steps", type=int, default=8, help="steps of each missing task adapter")
    ap.add_argument("--out", default="outputs/tables/multigpu", help="writes <out>.json and <out>.md")
    ap.add_argument("--work", default=None, help="run dirs (default outputs/<experiment>/scaling/<time>)")
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run, e.g. model=tiny")
    args = ap.parse_args(argv)
    runs = [parse_run(s) for s in args.runs]
    for name, n in runs:
        if args.global_batch % n:
            raise SystemExit(f"error: --global-batch {args.global_batch} is not divisible by {n} devices ({name}:{n})")
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
    exp_root = Path(output_root()) / args.experiment
    work = Path(args.work) if args.work else exp_root / "scaling" / stamp
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    ensure_adapters(args, env, work)

    results, failed = [], []
    for name, n in runs:
        run_dir = work / f"{name}_{n}"
        times = run_dir / "step_times.json"
        error = _run([sys.executable, "-m", "pipeline.route", f"experiment={args.experiment}", f"router={args.router}",
              f"trainer={name}", f"trainer.devices={n}", f"router.train.batch_size={args.global_batch // n}",
              f"router.train.steps={args.steps}", f"trainer.val_check_interval={args.steps}", "logger=csv",
              "print_config=false", "checkpoint.every_n_steps=0", f"hydra.run.dir={run_dir}",
              f"paths.routers_dir={run_dir / 'routers'}", "+callbacks.times._target_=pipeline.stages.scaling.StepTimes",
              f"+callbacks.times.path={times}", *passed_to("route", args.overrides)], run_dir / "run.log", env, fail=not results)
        if error is not None:  # a later run failed (e.g. FSDP): keep the others, say why in the table
            failed.append({"run": f"{name}:{n}", "trainer": name, "devices": n, "error": error.splitlines()[-1],
                           "run_dir": str(run_dir)})
            continue
        r = summarize(name, n, json.loads(times.read_text()), args.warmup)
        metrics = json.loads((run_dir / "metrics.json").read_text())["metrics"]
        r.update(per_device_batch=args.global_batch // n, router_accuracy=metrics.get("router_accuracy"),
                 val_loss=metrics.get("val_loss"), run_dir=str(run_dir))
        results.append(r)
    compare(results)
    result = {"config": {"experiment": args.experiment, "router": args.router, "steps": args.steps,
                         "global_batch": args.global_batch, "warmup": args.warmup, "overrides": args.overrides},
              "runs": results, "failed": failed, "provenance": provenance(0),
              "command": "python -m pipeline.scaling " + " ".join(argv if argv is not None else sys.argv[1:])}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out.with_suffix(".json"), json.dumps(result, indent=2) + "\n")
    atomic_write_text(out.with_suffix(".md"), render_md(result))
    print(render_md(result), flush=True)
    return result


if __name__ == "__main__":
    main()
