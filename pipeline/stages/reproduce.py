"""Stage ``reproduce``: one experiment's whole chain, finetune -> route -> evaluate -> bench -> report.

    python -m pipeline.reproduce experiment=demo            # `make demo`
    python -m pipeline.reproduce experiment=head_to_head force=true
    python -m pipeline.reproduce experiment=meteora_tasks trainer=gpu model.device=cuda parallel=8

The experiment's ``plan`` lists the steps: ``plan.finetune`` (adapters; with ``joint_finetune`` (auto: unless CPU
steps run in parallel) the task adapters are trained together by one ``finetune task=all`` run, LoRA-B by its own),
``plan.finetune_overrides`` (step -> its own finetune overrides, e.g. LoRA-B's longer budget: ``lora_b:
[trainer.max_steps=1750]``; the joint run's step is ``all``), ``plan.route`` (router -> route overrides),
``plan.evaluate`` (label -> evaluate overrides), ``plan.composite`` x ``plan.composite_strategies``
(composite-n runs), ``plan.bench``; a label set to null is no step (an experiment built on another drops an
inherited step that way). Each step composes its stage's config with the same experiment and
command-line overrides plus the step's own, and runs in this process with a fixed run dir
``outputs/<name>/<stage>/<step>/``; a step whose metrics.json (and artefact: adapter, router) already exists is
skipped, so an interrupted reproduce continues where it stopped (``force=true`` reruns everything). The report
is rebuilt every time and its path printed last.

``parallel=N`` (N > 1) runs up to N steps at once, each as its own ``python -m pipeline.<stage> ...
hydra.run.dir=<its run dir>`` process (log in ``<run dir>/stage.log``), each as soon as the steps that write what
it reads have finished (``pipeline/runtime/step_dag.py``: a route waits for the task adapters, an evaluation for
its adapters and its router, LoRA-B's evaluation alone for LoRA-B). A small model leaves one GPU mostly idle
while Python drives it, so N processes share it well. A failed step stops only the steps that read what it
writes; the others go on, and the run then fails with one line naming every failed step's log.
On a node with several GPUs the processes are spread over them (``gpus=auto``: every visible GPU; ``gpus=[0,1]``;
``gpus=[]``: no pinning): each starts with ``CUDA_VISIBLE_DEVICES`` set to the GPU running the fewest steps, so
``parallel=14`` on 2 GPUs keeps 7 on each.

Every number must trace to a commit, so reproduce refuses to start from code whose version is unknown (no git
checkout, ``LORAMUX_GIT_SHA`` unset) or a checkout with uncommitted changes to tracked files: one line, exit 2.
``allow_dirty=true`` runs anyway and every step's metrics.json records ``allow_dirty: true`` beside its git sha
(``<sha>+dirty`` / ``unknown``), and so does every table built from them.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import time
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, ListConfig, open_dict

from common.provenance import ALLOW_DIRTY_ENV, code_version_problem, git_sha
from data.task_rows import JOINT_TASK, LORA_B
from pipeline.runtime.compose import compose
from pipeline.runtime.config_tree import show_and_save_config
from pipeline.runtime.entry import CONF_DIR, cli, user_errors
from pipeline.runtime.settings import check_settings, passed_to

log = logging.getLogger(__name__)
#: stage -> the module whose function of the same name runs it in this process, imported when a step of it runs
#: here: a reproduce that refuses to start, or only schedules step processes (parallel=N), does not import lightning
#: and transformers (~8 s of every such start on a small host)
RUNNERS = {stage: f"pipeline.stages.{stage}" for stage in ("finetune", "route", "evaluate", "bench", "report")}


def runner(stage: str):
    """The function that runs ``stage`` in this process (``RUNNERS``)."""
    return getattr(importlib.import_module(RUNNERS[stage]), stage)


# reproduce's own keys: not passed on to the stages
OWN_KEYS = ("allow_dirty", "force", "gpus", "joint_finetune", "parallel", "plan", "print_config", "stage")


def passed_overrides(cfg: DictConfig, overrides: list[str] | None) -> list[str]:
    """Overrides every step inherits: the command line's (or ``overrides``), minus reproduce's own keys."""
    if overrides is None:
        overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    kept = [o for o in overrides if o.lstrip("+~").split("=")[0].split(".")[0] not in OWN_KEYS]
    return kept + list(cfg.plan.get("overrides", []) or [])


def _flat(entries) -> list:
    return [x for e in entries or [] for x in (e if isinstance(e, (list, ListConfig)) else [e])]


def joint_finetune(cfg: DictConfig) -> bool:
    """Train the task adapters in one joint run? ``joint_finetune``: true / false (``check_settings`` refuses any
    other value), or auto = joint, except on CPU with ``parallel`` > 1. The joint run measured faster than the same
    adapters trained one run after another on an H200 (outputs/tables/train_throughput.md: the joint step over 28
    adapters beside one LoRA) and on the demo's 2-core CPU (outputs/tables/joint_finetune_cpu.md, ``python -m
    pipeline.joint_speed``: 1.2x the tokens/s, 0.75x the process CPU time); separate runs side by side on CPU cores
    (``parallel`` > 1) were not compared with it, so there they stay separate."""
    value = cfg.get("joint_finetune", "auto")
    if value != "auto":
        return bool(value)
    accel = str(cfg.trainer.get("accelerator", "cpu"))
    gpu = torch.cuda.is_available() if accel == "auto" else accel in ("gpu", "cuda")
    return gpu or int(cfg.get("parallel", 1) or 1) <= 1


def _steps(section) -> list:
    """A plan section's ``(label, overrides)`` pairs; a label set to null is no step (an experiment that builds on
    another drops an inherited step that way: ``plan.evaluate.merge: null``)."""
    return [(label, ovs) for label, ovs in (section or {}).items() if ovs is not None]


def plan_steps(cfg: DictConfig) -> list[dict]:
    """The ordered steps: ``{"stage", "step", "overrides", "artefact"}`` (artefact: a file, or a list of files, that
    must exist). With ``joint_finetune`` the task adapters of ``plan.finetune`` are one step, ``finetune/all``."""
    exp = Path(str(cfg.paths.exp_dir))
    adapters, routers = Path(str(cfg.paths.adapters_dir)), Path(str(cfg.paths.routers_dir))
    steps = []
    own = {str(k): list(v) for k, v in (cfg.plan.get("finetune_overrides") or {}).items()}
    finetune = [str(t) for t in _flat(cfg.plan.finetune)]  # an entry may be a list itself: [${tasks}, lora_b]
    stray = sorted(set(own) - set(finetune) - {JOINT_TASK})
    if stray:
        raise ValueError(f"plan.finetune_overrides names {', '.join(stray)}, not a step of plan.finetune; use one of "
                         f"{', '.join([*finetune, JOINT_TASK])}")
    joint = [t for t in finetune if t != LORA_B]
    if joint_finetune(cfg) and len(joint) > 1:  # one `finetune task=all` run; lora_b stays its own
        pinned = [] if joint == [str(t) for t in cfg.tasks] else [f"tasks=[{','.join(joint)}]"]
        steps.append({"stage": "finetune", "step": JOINT_TASK,
                      "overrides": [f"task={JOINT_TASK}", *pinned, *own.get(JOINT_TASK, [])],
                      "artefact": [adapters / t / "adapter_config.json" for t in joint]})
        finetune = [t for t in finetune if t == LORA_B]
    for task in finetune:
        steps.append({"stage": "finetune", "step": str(task), "overrides": [f"task={task}", *own.get(str(task), [])],
                      "artefact": adapters / str(task) / "adapter_config.json"})
    for router, ovs in _steps(cfg.plan.route):
        steps.append({"stage": "route", "step": str(router), "overrides": [f"router={router}", *ovs],
                      "artefact": routers / str(router) / "router.json"})
    for label, ovs in _steps(cfg.plan.evaluate):
        steps.append({"stage": "evaluate", "step": str(label), "overrides": list(ovs), "artefact": None})
    for n in cfg.plan.composite or []:
        for label, ovs in _steps(cfg.plan.composite_strategies):
            steps.append({"stage": "evaluate", "step": f"composite{n}-{label}",
                          "overrides": [*ovs, f"composite_n={n}"], "artefact": None})
    if cfg.plan.get("bench"):
        steps.append({"stage": "bench", "step": "bench", "overrides": [], "artefact": None})
    for s in steps:
        s["run_dir"] = exp / s["stage"] / s["step"]
    return steps


def step_done(step: dict) -> bool:
    """A step is done when its metrics.json exists (and its artefacts, where it has some)."""
    art = step["artefact"]
    files = [] if art is None else [art] if isinstance(art, (str, Path)) else list(art)
    return (step["run_dir"] / "metrics.json").is_file() and all(Path(f).is_file() for f in files)


def run_step(step: dict, overrides: list[str]):
    cfg = compose(step["stage"], [*passed_to(step["stage"], overrides), *step["overrides"]], run_dir=step["run_dir"])
    with open_dict(cfg):
        cfg.print_config = False
    return runner(step["stage"])(cfg)


def visible_gpus(setting) -> list[str]:
    """The GPUs parallel steps are spread over: ``"auto"`` = every visible one (``CUDA_VISIBLE_DEVICES`` when set,
    else torch's device count), a list = those ids, ``None`` / ``[]`` = none (children inherit the environment)."""
    if setting is None or setting == "none":
        return []
    if setting != "auto":
        if isinstance(setting, (str, int)):
            raise ValueError(f"gpus={setting!r}: give auto, a list of GPU ids like [0,1], or [] for no pinning")
        return [str(g) for g in setting]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [g.strip() for g in visible.split(",") if g.strip() and g.strip() != "-1"]
    return [str(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []


@contextlib.contextmanager
def code_version_guard(allow_dirty: bool):
    """Refuse (ValueError, one line) to run from unknown or dirty code unless ``allow_dirty``; when allowed, mark
    every step's provenance (``LORAMUX_ALLOW_DIRTY=1`` here and in the step processes) until the run ends."""
    problem = code_version_problem(git_sha())
    if problem and not allow_dirty:
        raise ValueError(f"reproduce: {problem}, or pass allow_dirty=true (recorded in every result's provenance)")
    previous = os.environ.get(ALLOW_DIRTY_ENV)
    if problem:
        os.environ[ALLOW_DIRTY_ENV] = "1"
        log.warning("reproduce: %s; running anyway (allow_dirty=true, recorded in provenance)", problem)
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(ALLOW_DIRTY_ENV, None)
        else:
            os.environ[ALLOW_DIRTY_ENV] = previous


def reproduce(cfg: DictConfig, overrides: list[str] | None = None) -> Path:
    """Run (or skip) every planned step of ``cfg``'s experiment, then the report; return the report's path."""
    check_settings(cfg)
    with code_version_guard(bool(cfg.allow_dirty)):
        return _reproduce(cfg, overrides)


def _reproduce(cfg: DictConfig, overrides: list[str] | None) -> Path:
    inherited = passed_overrides(cfg, overrides)
    exp = Path(str(cfg.paths.exp_dir))
    steps = plan_steps(cfg)
    show_and_save_config(cfg, exp / "reproduce", print_tree=bool(cfg.print_config))
    log.info("reproduce %s: %d steps (%s)", cfg.name, len(steps), ", ".join(f"{s['stage']}:{s['step']}" for s in steps))
    t_all = time.perf_counter()
    width = int(cfg.parallel)
    todo = []
    for i, step in enumerate(steps, 1):
        step["tag"] = f"[{i}/{len(steps)}] {step['stage']} {step['step']}"
        if step_done(step) and not cfg.force:
            print(f"{step['tag']}: done already ({step['run_dir']}), skipped", flush=True)
        else:
            todo.append(step)
    if width > 1:  # each step as soon as the steps it reads from have finished (pipeline/runtime/step_dag.py)
        from pipeline.runtime.step_dag import run_parallel  # (it plans over the stages' configs: lightning)

        run_parallel(todo, inherited, width, visible_gpus(cfg.gpus), done=step_done)
    else:
        for step in todo:
            print(f"{step['tag']}: running -> {step['run_dir']}", flush=True)
            t0 = time.perf_counter()
            value = run_step(step, inherited)
            print(f"{step['tag']}: finished in {time.perf_counter() - t0:.1f}s (main metric {value})", flush=True)
    report_step = {"stage": "report", "step": "report", "overrides": [], "run_dir": exp / "report" / "report"}
    run_step(report_step, inherited)
    report_md = exp / "report.md"
    print(f"reproduce {cfg.name}: {len(steps)} steps in {time.perf_counter() - t_all:.0f}s; "
          f"report: {report_md.resolve()}", flush=True)
    return report_md


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="reproduce")
def main(cfg: DictConfig) -> None:
    with user_errors(cfg):
        reproduce(cfg)


if __name__ == "__main__":
    cli(main)
