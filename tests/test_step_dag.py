"""reproduce's step graph (``pipeline/runtime/step_dag.py``): what each planned step waits for, read from the
experiments' own composed configs, and a scheduler that starts each step once its inputs exist."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from pipeline.runtime.step_dag import dependencies, run_parallel
from pipeline.stages.reproduce import plan_steps


def _steps(compose, experiment: str, tmp_path, *extra: str) -> tuple[dict, list]:
    cfg = compose("reproduce", [f"experiment={experiment}", f"paths.output_root={tmp_path}", *extra])
    steps = plan_steps(cfg)
    for s in steps:
        s["tag"] = f"{s['stage']} {s['step']}"
    overrides = [f"experiment={experiment}", f"paths.output_root={tmp_path}"]
    return dependencies(steps, overrides), steps


def test_meteora_tasks_route_and_evaluations_wait_only_for_what_they_read(compose, tmp_path):
    deps, _ = _steps(compose, "meteora_tasks", tmp_path, "joint_finetune=true")
    assert deps["finetune all"] == [] and deps["finetune lora_b"] == []
    assert deps["route meteora"] == ["finetune all"]  # not LoRA-B's fine-tune
    assert deps["evaluate oracle"] == ["finetune all"] and deps["evaluate merge"] == ["finetune all"]
    assert deps["evaluate meteora-top2"] == ["finetune all", "route meteora"]
    assert deps["evaluate meteora-top1"] == ["finetune all", "route meteora"]
    assert deps["evaluate lora_b"] == ["finetune lora_b"]


def test_the_oracle_over_cotrained_adapters_waits_for_the_route_that_writes_them(compose, tmp_path):
    deps, _ = _steps(compose, "meteora_tasks_cotrained_aux5", tmp_path, "joint_finetune=true")
    assert deps["evaluate oracle-cotrained"] == ["finetune all", "route meteora"]  # router.adapters_from
    assert deps["evaluate oracle"] == ["finetune all"]
    # the gates over the adapters as fine-tuned (router.adapters_from=experiment): its router and those adapters
    assert deps["evaluate meteora-top2-frozen"] == ["finetune all", "route meteora"]


def test_separate_finetunes_and_a_router_read_under_another_name(compose, tmp_path):
    deps, steps = _steps(compose, "dlp_tasks", tmp_path, "joint_finetune=false")
    tasks = [s["tag"] for s in steps if s["stage"] == "finetune"]
    assert len(tasks) == 26 and deps["route dlp"] == tasks and deps["evaluate dlp"] == [*tasks, "route dlp"]
    deps, _ = _steps(compose, "head_to_head", tmp_path)  # its adapters are meteora_tasks': its own routers only
    assert deps["route dlp"] == [] and deps["evaluate oracle"] == []
    assert deps["evaluate dlp-segments"] == ["route dlp"]  # dlp_segments reads the dlp router
    assert deps["evaluate composite3-meteora-top2"] == ["route meteora"]


def test_inputs_of_another_experiment_wait_for_nothing(compose, tmp_path):
    deps, steps = _steps(compose, "meteora_composite", tmp_path)
    assert steps and all(deps[s["tag"]] == [] for s in steps)  # meteora_tasks' adapters and gates


def _fake(tmp_path: Path, fail: set[str], seconds: dict[str, float]):
    """A real subprocess per step: it sleeps, then writes its artefact and the start / end times (or exits 1)."""
    log = tmp_path / "times"
    log.mkdir()

    def command(step, _overrides):
        tag = step["tag"]
        code = (f"import time,sys,pathlib; t0=time.time(); time.sleep({seconds.get(tag, 0.3)}); "
                f"pathlib.Path({str(log / tag)!r}).write_text(f'{{t0}} {{time.time()}}'); "
                f"[pathlib.Path(a).write_text('x') for a in {[str(a) for a in step['artefact'] or []]!r}]; "
                f"sys.exit({1 if tag in fail else 0})")
        return [sys.executable, "-c", code]

    def times(tag):
        start, end = (log / tag).read_text().split()
        return float(start), float(end)

    return command, times


def _plan(tmp_path):
    """meteora_tasks' shape: the task adapters, LoRA-B, the gates; an evaluation of each."""
    def mk(stage, tag, writes):
        return {"stage": stage, "step": tag, "tag": tag, "run_dir": tmp_path / tag, "overrides": [],
                "artefact": [tmp_path / f"{tag}.done"] if writes else None}

    steps = [mk("finetune", "tasks", True), mk("finetune", "lora_b", True), mk("route", "gates", True),
             mk("evaluate", "oracle", False), mk("evaluate", "gates_eval", False), mk("evaluate", "lora_b_eval", False)]
    deps = {"tasks": [], "lora_b": [], "gates": ["tasks"], "oracle": ["tasks"], "gates_eval": ["tasks", "gates"],
            "lora_b_eval": ["lora_b"]}
    return steps, deps


@pytest.mark.slow  # a dozen short subprocesses
def test_each_step_starts_once_its_inputs_exist_and_not_before(tmp_path):
    steps, deps = _plan(tmp_path)
    command, times = _fake(tmp_path, set(), {"lora_b": 2.0, "gates": 1.0})
    t0 = time.time()
    run_parallel(steps, [], width=4, command=command, deps=deps)
    for tag, needs in deps.items():
        for need in needs:
            assert times(tag)[0] >= times(need)[1], (tag, need)
    # the route and the oracle ran beside LoRA-B's long fine-tune: no stage barrier
    assert times("gates")[0] < times("lora_b")[1] and times("oracle")[0] < times("lora_b")[1]
    assert time.time() - t0 < 2.0 + 1.0 + 0.3 + 2.5  # far from the sum of a barrier per stage plus start-up


@pytest.mark.slow
def test_a_failed_step_stops_only_what_reads_it(tmp_path, capsys):
    steps, deps = _plan(tmp_path)
    command, times = _fake(tmp_path, {"gates"}, {})
    with pytest.raises(ChildProcessError) as err:
        run_parallel(steps, [], width=2, command=command, deps=deps)
    msg = str(err.value)
    assert "route:gates (exit 1" in msg and "evaluate:gates_eval (not run: it reads what gates writes)" in msg
    assert msg.startswith("reproduce: 2 step(s) failed")
    for tag in ("tasks", "lora_b", "oracle", "lora_b_eval"):  # everything that does not read the gates ran
        times(tag)
    assert not (tmp_path / "times" / "gates_eval").exists()
    assert "gates_eval: not run, it needs gates" in capsys.readouterr().out


def _memory_plan(tmp_path: Path, lora_b_ooms: str):
    """Fake steps that mark the GPU while they run (a file each). LoRA-B's fine-tune writes a CUDA out-of-memory
    error and exits 1 when it finds the joint fine-tune ("tasks") running (``lora_b_ooms="beside_tasks"``), any
    other step running (``"beside_any"``), or always (``"always"``); the gates and their evaluation read the task
    adapters, LoRA-B's evaluation LoRA-B's. Each of LoRA-B's attempts leaves its start time (``lora_b.try<k>``)."""
    steps, deps = _plan(tmp_path)
    log, marks = tmp_path / "times", tmp_path / "running"
    log.mkdir()
    marks.mkdir()
    oom = "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 48.00 MiB."
    cond = {"beside_tasks": "(marks / 'tasks').exists()", "beside_any": "any(marks.iterdir())",
            "always": "True"}[lora_b_ooms]

    def command(step, _overrides):
        tag = step["tag"]
        body = (f"import time,sys,pathlib; t0=time.time(); marks=pathlib.Path({str(marks)!r}); "
                f"log=pathlib.Path({str(log / tag)!r})\n")
        if tag == "lora_b":
            body += ("n=len(list(log.parent.glob('lora_b.try*'))); log.with_name(f'lora_b.try{n}').write_text(str(t0))\n"
                     f"time.sleep(0.5)\nif {cond}: print('Traceback ...'); print({oom!r}); sys.exit(1)\n"
                     "time.sleep(0.3)\n")
        else:
            body += (f"(marks / {tag!r}).write_text('x'); time.sleep({1.5 if tag == 'tasks' else 1.0}); "
                     f"(marks / {tag!r}).unlink()\n")
        body += (f"log.write_text(f'{{t0}} {{time.time()}}'); "
                 f"[pathlib.Path(a).write_text('x') for a in {[str(a) for a in step['artefact'] or []]!r}]")
        return [sys.executable, "-c", body]

    def times(tag):
        start, end = (log / tag).read_text().split()
        return float(start), float(end)

    def tries():
        return [float(p.read_text()) for p in sorted(log.glob("lora_b.try*"))]

    return steps, deps, command, times, tries


@pytest.mark.slow
def test_a_step_out_of_gpu_memory_runs_again_once_what_it_ran_beside_has_ended(tmp_path, capsys):
    """LoRA-B's fine-tune runs out of memory beside the joint fine-tune: it runs again once the joint one has ended,
    first, and beside the gates and the oracle (ready at the same moment), as on an H100; everything finishes and
    the first attempt's log is kept."""
    steps, deps, command, times, tries = _memory_plan(tmp_path, "beside_tasks")
    run_parallel(steps, [], width=4, command=command, deps=deps)
    first, again = tries()
    assert first < times("tasks")[1] <= again  # the retry began after the joint fine-tune ended
    assert times("gates")[0] < times("lora_b")[1]  # and the gates ran beside it
    for tag in ("oracle", "gates_eval", "lora_b_eval"):
        times(tag)
    kept = (tmp_path / "lora_b" / "stage.oom-1.log").read_text()
    assert "CUDA out of memory" in kept and "CUDA out of memory" not in (tmp_path / "lora_b" / "stage.log").read_text()
    assert "lora_b: ran out of GPU memory beside tasks" in capsys.readouterr().out


@pytest.mark.slow
def test_out_of_memory_again_beside_others_runs_a_last_time_alone(tmp_path):
    """LoRA-B runs out of memory beside anything: beside the joint fine-tune, then again beside the gates that started
    with its retry; its last attempt waits until nothing runs, and nothing starts until it ends."""
    steps, deps, command, times, tries = _memory_plan(tmp_path, "beside_any")
    run_parallel(steps, [], width=4, command=command, deps=deps)
    first, second, last = tries()
    assert first < times("tasks")[1] <= second
    others = [times(t) for t in ("tasks", "gates", "oracle", "gates_eval")]
    for start, end in others:  # the lone attempt: no other step overlapped it
        assert end <= last or start >= times("lora_b")[1]
    assert (tmp_path / "lora_b" / "stage.oom-2.log").exists()
    times("lora_b_eval")


@pytest.mark.slow
def test_a_step_out_of_memory_alone_fails_and_is_not_run_again(tmp_path):
    """Out of memory with nothing beside it (width 1), or in its lone last attempt: the step fails as any other,
    naming its log, and what reads it is not run."""
    for width, attempts in ((1, 1), (4, 3)):
        root = tmp_path / f"w{width}"
        root.mkdir()
        steps, deps, command, times, tries = _memory_plan(root, "always")
        with pytest.raises(ChildProcessError) as err:
            run_parallel(steps, [], width=width, command=command, deps=deps)
        assert "finetune:lora_b (exit 1" in str(err.value)
        assert "evaluate:lora_b_eval (not run: it reads what lora_b writes)" in str(err.value)
        assert len(tries()) == attempts
        times("gates_eval")  # the rest ran
