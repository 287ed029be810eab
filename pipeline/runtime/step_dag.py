"""Which reproduce steps wait for which: a step starts once the steps that write what it reads have finished.

    deps = dependencies(steps, overrides)      # step tag -> tags of the steps it reads from
    run_parallel(steps, overrides, width=4)    # up to 4 processes, each step as soon as its inputs exist

A step writes its ``artefact`` (a finetune step: its adapters' ``adapter_config.json``; a route step: its router's
``router.json``). What a step reads comes from its own composed config, as the stage itself reads it: the adapter
dirs of ``router.adapters`` (null: the experiment's ``tasks``; ``pipeline.runtime.multilora.adapter_paths``) and,
for evaluate, the trained router at ``router.checkpoint`` (dlp_segments reads dlp's). A bench step waits for every
other step. So in meteora_tasks the gates' route and the oracle and merge evaluations start when the joint
fine-tune of the 28 task adapters ends, beside LoRA-B's own fine-tune, and only LoRA-B's evaluation waits for it;
with stage barriers the route waited for LoRA-B too (an H200 session: 2.7 of its 30 minutes).

A step whose inputs come from another experiment (meteora_composite reads meteora_tasks' adapters and gates) waits
for nothing here: no step of this plan writes them. A failed step stops only the steps that read what it writes:
they are reported as not run, naming it; the others go on.

Steps side by side share their GPU's memory. A step that runs out of it (its log ends in a CUDA out-of-memory
error) while other steps ran on the same GPU is run again, first before the steps that became ready meanwhile:
once every step it ran beside has ended (others may start beside it then), and if it runs out again beside
another, a last time alone on its GPU (nothing else starts there until it ends). What fits an H200 side by side
may not fit an H100: on an H100 (80 GB) meteora_tasks' joint fine-tune of 28 adapters held 72 GB and LoRA-B's
fine-tune beside it failed for 48 MB; run again once the joint one has ended, it runs beside the gates' route. Each
earlier attempt's log is kept beside the new one (``stage.oom-1.log``, ``stage.oom-2.log``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from pipeline.runtime.compose import compose
from pipeline.runtime.cotrained_adapters import EXPERIMENT
from pipeline.runtime.multilora import adapter_paths
from pipeline.runtime.settings import passed_to


def artefacts(step: dict) -> list[Path]:
    """The files ``step`` writes that other steps read (none for evaluate and bench)."""
    art = step.get("artefact")
    return [] if art is None else [Path(art)] if isinstance(art, (str, Path)) else [Path(a) for a in art]


def inputs(step: dict, overrides: list[str]) -> list[Path] | None:
    """The files ``step`` reads that a step may write, from its composed config; None: every other step's (bench)."""
    stage = step["stage"]
    if stage == "bench":
        return None
    if stage not in ("route", "evaluate"):
        return []
    cfg = compose(stage, [*passed_to(stage, overrides), *step["overrides"]], run_dir=step["run_dir"])
    files = [Path(d) / "adapter_config.json" for d in adapter_paths(cfg).values()]
    checkpoint = cfg.router.get("checkpoint") if stage == "evaluate" else None
    for router_dir in (checkpoint, cfg.router.get("adapters_from")):  # its router, and whose co-trained adapters
        if router_dir and str(router_dir) != EXPERIMENT:
            files.append(Path(str(router_dir)) / "router.json")
    return files


def dependencies(steps: list[dict], overrides: list[str]) -> dict[str, list[str]]:
    """``{tag: [tags of the steps whose artefacts it reads]}`` over ``steps`` (each with a unique ``tag``)."""
    writer = {str(f.resolve()): s["tag"] for s in steps for f in artefacts(s)}
    deps = {}
    for s in steps:
        read = inputs(s, overrides)
        if read is None:
            deps[s["tag"]] = [o["tag"] for o in steps if o is not s and o["stage"] != "bench"]
        else:
            deps[s["tag"]] = list(dict.fromkeys(writer[k] for k in (str(f.resolve()) for f in read)
                                                if k in writer and writer[k] != s["tag"]))
    return deps


def least_busy_gpu(gpus: list[str], busy: list[str]) -> str | None:
    """The GPU of ``gpus`` running the fewest of ``busy`` (the GPUs of the running steps); the first on a tie."""
    return min(gpus, key=busy.count) if gpus else None


def step_command(step: dict, overrides: list[str]) -> list[str]:
    """The command line that runs ``step`` as its own process, into the same run dir as in-process.

    A single run (not a sweep job) never skips itself, so ``force`` needs no passing on."""
    return [sys.executable, "-m", f"pipeline.{step['stage']}", *passed_to(step["stage"], overrides), *step["overrides"],
            f"hydra.run.dir={step['run_dir']}", "print_config=false"]


#: what a CUDA out-of-memory failure writes to a step's log (torch's error and its message)
OOM_MARKS = ("torch.OutOfMemoryError", "CUDA out of memory")


def ran_out_of_memory(log_path: Path, tail_bytes: int = 65536) -> bool:
    """Whether the end of a step's log holds a CUDA out-of-memory error."""
    try:
        with open(log_path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - tail_bytes))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return False
    return any(m in text for m in OOM_MARKS)


def run_parallel(steps: list[dict], overrides: list[str], width: int, gpus: list[str] | None = None,
                 done: Callable[[dict], bool] | None = None, command: Callable = step_command,
                 deps: dict[str, list[str]] | None = None) -> None:
    """Run ``steps`` (in plan order, each with a ``tag``) as subprocesses, at most ``width`` at a time, each once the
    steps it reads from have finished and pinned to the least busy of ``gpus`` (when there are two or more); a step
    that ran out of GPU memory beside others is run again (the module's docstring); raise once, naming every
    failed step and every step left unrun because of one. ``done(step)``: did it finish (default: exit 0);
    ``command(step, overrides)``: its command line; ``deps``: ``dependencies(steps, overrides)`` unless given."""
    deps = dependencies(steps, overrides) if deps is None else deps
    pending, running, finished, failed = list(steps), [], set(), set()
    problems: list[str] = []  # one line per failed or unrun step
    gpus = gpus if gpus and len(gpus) > 1 else []
    companions: dict[str, set[str]] = {}  # a running step -> the steps that have run beside it on its GPU
    after: dict[str, set[str]] = {}  # a step to run again (out of memory) -> the steps that must have ended first
    tries: dict[str, int] = {}  # out-of-memory attempts so far, per step run again (2: its last attempt is alone)

    def alone(tag: str) -> bool:
        return tries.get(tag, 0) >= 2

    while pending or running:
        for step in list(pending):  # steps whose inputs failed never start (and fail their own readers in turn)
            bad = [d for d in deps[step["tag"]] if d in failed]
            if bad:
                pending.remove(step)
                failed.add(step["tag"])
                problems.append(f"{step['stage']}:{step['step']} (not run: it reads what {', '.join(bad)} writes)")
                print(f"{step['tag']}: not run, it needs {', '.join(bad)}", flush=True)
        ready = [s for s in pending if all(d in finished for d in deps[s["tag"]])]
        ready.sort(key=lambda s: s["tag"] not in tries)  # a step run again goes first
        while ready and len(running) < width:
            if after.get(ready[0]["tag"], set()) & {r[0]["tag"] for r in running}:  # one it ran beside still runs
                ready.pop(0)
                continue
            busy = [r[3] for r in running]
            lone = {r[3] for r in running if alone(r[0]["tag"])}  # GPUs a lone step holds
            free = [g for g in gpus if g not in lone] if gpus else ([] if lone else [None])
            if alone(ready[0]["tag"]):  # it needs a GPU with nothing on it; until one frees, nothing starts
                idle = [g for g in free if g not in busy] if gpus else ([None] if not running else [])
                if not idle:
                    break
                gpu = idle[0]
            elif not free:
                break
            else:
                gpu = least_busy_gpu(free, busy) if gpus else None
            step = ready.pop(0)
            pending.remove(step)
            step["run_dir"].mkdir(parents=True, exist_ok=True)
            env = {**os.environ, "PYTHONUNBUFFERED": "1", **({"CUDA_VISIBLE_DEVICES": gpu} if gpu is not None else {})}
            with open(step["run_dir"] / "stage.log", "w") as log_file:
                proc = subprocess.Popen(command(step, overrides), stdout=log_file, stderr=subprocess.STDOUT, env=env)
            where = "" if gpu is None else f", GPU {gpu}"
            print(f"{step['tag']}: started (pid {proc.pid}{where}, log {log_file.name})", flush=True)
            running.append((step, proc, time.perf_counter(), gpu))
        if not running and pending and not ready:  # cannot happen with deps drawn from plan order; never spin
            raise RuntimeError(f"reproduce: steps {[s['tag'] for s in pending]} wait for each other")
        time.sleep(0.2)
        for r in running:  # who has run beside whom (every step shares the one GPU when they are not pinned)
            companions.setdefault(r[0]["tag"], set()).update(o[0]["tag"] for o in running if o is not r and o[3] == r[3])
        for item in list(running):
            step, proc, t0, _ = item
            if proc.poll() is None:
                continue
            running.remove(item)
            tag = step["tag"]
            took, log_path = time.perf_counter() - t0, step["run_dir"] / "stage.log"
            beside = companions.pop(tag, set())
            if proc.returncode == 0 and (done is None or done(step)):
                finished.add(tag)
                print(f"{tag}: finished in {took:.1f}s", flush=True)
            elif beside and not alone(tag) and ran_out_of_memory(log_path):
                n = tries[tag] = tries.get(tag, 0) + 1
                kept = log_path.with_name(f"stage.oom-{n}.log")
                log_path.replace(kept)
                after[tag] = beside
                how = "alone" if alone(tag) else \
                    f"once {', '.join(sorted(beside))} ha{'s' if len(beside) == 1 else 've'} ended"
                pending.insert(0, step)
                print(f"{tag}: ran out of GPU memory beside {', '.join(sorted(beside))} after {took:.1f}s; it runs "
                      f"again {how} (log kept: {kept})", flush=True)
            else:
                failed.add(step["tag"])
                problems.append(f"{step['stage']}:{step['step']} (exit {proc.returncode}, log {log_path})")
                print(f"{step['tag']}: FAILED after {took:.1f}s, see {log_path}", flush=True)
    if problems:
        raise ChildProcessError(f"reproduce: {len(problems)} step(s) failed: {'; '.join(problems)}; fix and rerun "
                                "(finished steps are skipped)")
