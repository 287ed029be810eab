"""Bad inputs (issue 7): each gets ONE line that names the thing and the fix; nothing written before is lost.

The table below is the test: every row builds a real bad input (a damaged PEFT adapter, a config typo, a
non-positive value, a truncated file ...) and asserts the exception type and its message, which must be a single
line. Rows of kind ``stage`` run the stage function in this process on the `smoke` experiment (tiny LLaMA);
``entry`` rows go through the command-line entry point (Hydra + ``pipeline.runtime.entry.cli``) and assert the exact
``error:`` line on stderr and exit status 2. The rows that are not an exception (a prompt longer than the context,
an empty generation, a composite answer list with missing or extra numbers, NaN loss, a full disk) have their own
tests after the table.
"""

from __future__ import annotations

import errno
import json
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
from hydra.core.global_hydra import GlobalHydra
from needs_assets import needs_task_files, needs_tiny_model

from data.assets import cache_dir
from pipeline.runtime.compose import compose

pytestmark = needs_tiny_model
ROOT = Path(__file__).resolve().parent.parent
TINY = cache_dir() / "models" / "tiny-random-llama"
TASKS = ("object_counting", "winowhy")


@pytest.fixture(autouse=True)
def _clean_hydra():
    GlobalHydra.instance().clear()
    yield
    GlobalHydra.instance().clear()


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    """An outputs root whose `smoke` experiment has its two adapters (random PEFT LoRAs on q, v of the tiny model)."""
    from models.tiny import save_random_peft_adapter

    out = tmp_path_factory.mktemp("outputs")
    for i, task in enumerate(TASKS):
        save_random_peft_adapter(TINY, out / "smoke" / "adapters" / task, seed=i + 1)
    return out


def smoke_config(stage: str, overrides: list[str], outputs: Path, run_dir: Path):
    GlobalHydra.instance().clear()
    return compose(stage, ["experiment=smoke", "logger=none", "print_config=false", f"paths.output_root={outputs}",
                           *overrides], run_dir=run_dir)


def run_stage(stage: str, overrides: list[str], outputs: Path, run_dir: Path):
    import importlib

    return getattr(importlib.import_module(f"pipeline.stages.{stage}"), stage)(smoke_config(stage, overrides, outputs,
                                                                                             run_dir))


# ------------------------------------------------------------------------------------------------ adapters
def _damage(kind: str, d: Path) -> None:
    """Turn the good PEFT dir ``d`` into one bad in the way ``kind`` names."""
    from safetensors.torch import load_file, save_file

    conf, weights = d / "adapter_config.json", d / "adapter_model.safetensors"
    if kind == "wrong_rank":
        conf.write_text(json.dumps({**json.loads(conf.read_text()), "r": 4}))
    elif kind == "wrong_shape":  # trained on a model with another hidden size
        t = load_file(weights)
        t = {k: (v[:, :32].contiguous() if "q_proj.lora_A" in k else v) for k, v in t.items()}
        save_file(t, weights)
    elif kind == "other_base_model":
        conf.write_text(json.dumps({**json.loads(conf.read_text()), "base_model_name_or_path": "meta-llama/Llama-3-8B"}))
    elif kind == "missing_weights":
        weights.unlink()
    elif kind == "truncated_weights":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif kind == "empty_dir":
        shutil.rmtree(d)
        d.mkdir()
    elif kind == "not_lora":
        conf.write_text(json.dumps({**json.loads(conf.read_text()), "peft_type": "IA3"}))


ADAPTERS = {  # kind -> the one line, as a regex
    "wrong_rank": r"adapter .*/bad: r: is 4 in adapter_config.json but .*lora_A has rank 8; the config and the "
                  r"weights disagree; re-save the adapter",
    "wrong_shape": r"adapter .*/bad: shape: model.layers.0.self_attn.q_proj: lora_A \[8, 32\] / lora_B \[64, 8\] do not "
                   r"fit the base layer \[64 x 64\].*; the adapter was trained on a base model with other hidden sizes",
    "other_base_model": r"adapter .*/bad: base_model_name_or_path: is 'meta-llama/Llama-3-8B' but the base model is "
                        r".*tiny-random-llama'; use adapters trained on this base model.*",
    "missing_weights": r"adapter .*/bad: adapter_model.safetensors: missing; save the adapter with peft's save_pretrained",
    "truncated_weights": r"adapter .*/bad: adapter_model.safetensors: cannot be read \(.*\); re-save the adapter",
    "empty_dir": r"adapter .*/bad: adapter_config.json: missing; save the adapter with peft's save_pretrained",
    "not_lora": r"adapter .*/bad: peft_type: is 'IA3', not 'LORA'; only LoRA adapters can join the bank",
}


@pytest.mark.parametrize("kind", list(ADAPTERS))
def test_bad_adapter_is_one_line_naming_the_adapter_and_the_fix(outputs, tmp_path, kind):
    from models import AdapterBank, AdapterError, load_base_model

    model, _ = load_base_model(TINY)
    bad = tmp_path / "bad"
    shutil.copytree(outputs / "smoke" / "adapters" / "winowhy", bad)
    _damage(kind, bad)
    bank = AdapterBank(model, targets=["q_proj", "v_proj"])
    bank.add("good", outputs / "smoke" / "adapters" / "object_counting")
    with pytest.raises(AdapterError) as e:
        bank.add("bad", bad)
    assert "\n" not in str(e.value)
    assert __import__("re").fullmatch(ADAPTERS[kind], str(e.value)), str(e.value)
    assert bank.names == ["good"] and len(bank) == 1  # the bank is unchanged


# ------------------------------------------------------------------------------------------ stage inputs
STAGE_ROWS = [  # (id, stage, overrides, exception, one-line message regex)
    ("unknown_task", "finetune", ["task=winowhyy"], ValueError, r"unknown task 'winowhyy'; did you mean winowhy.*"),
    ("no_task", "finetune", [], ValueError, r"finetune needs task=<name> \(one of .*\); sweep them with -m task=a,b"),
    ("r_zero", "finetune", ["task=winowhy", "adapter.r=0"], ValueError, r"adapter.r=0 must be > 0; set e.g. adapter.r=8"),
    ("lr_zero", "finetune", ["task=winowhy", "optim.lr=0"], ValueError, r"optim.lr=0(\.0)? must be > 0; set e.g. optim.lr=2e-4"),
    ("lr_negative", "finetune", ["task=winowhy", "optim.lr=-1e-4"], ValueError, r"optim.lr=-0.0001 must be > 0.*"),
    ("steps_zero", "finetune", ["task=winowhy", "trainer.max_steps=0"], ValueError, r"trainer.max_steps=0 must be > 0; set e.g. trainer.max_steps=100"),
    ("route_steps_zero", "route", ["router.train.steps=0"], ValueError, r"router.train.steps=0 must be > 0; set e.g. router.train.steps=100"),
    ("route_lr_zero", "route", ["router.train.lr=0"], ValueError, r"router.train.lr=0(\.0)? must be > 0; set e.g. router.train.lr=5e-4"),
    ("route_untrainable", "route", ["router=oracle"], ValueError,
     r"router=oracle has nothing to train; route trains router=dlp or router=dlp_segments or router=meteora"),
    ("top_p_above_1", "route", ["router=dlp", "router.top_p=1.5"], ValueError,
     r"dlp top_p=1.5 must be in \(0, 1\] \(DLP-LoRA used 0.6\)"),
    ("top_p_zero", "route", ["router=dlp", "router.top_p=0"], ValueError, r"dlp top_p=0(\.0)? must be in \(0, 1\].*"),
    ("top_k_above_adapters", "route", ["router=meteora", "router.top_k=3"], ValueError,
     r"meteora top_k=3 must be an integer in \[1, number of adapters = 2\]"),
    ("missing_adapter", "route", ["tasks=[object_counting,winowhy,cs_algorithms]"], FileNotFoundError,
     "adapter 'cs_algorithms' is missing at .*; train it first: python -m pipeline.finetune experiment=smoke task=cs_algorithms"),
]


@pytest.mark.parametrize("stage,overrides,exc,message", [r[1:] for r in STAGE_ROWS], ids=[r[0] for r in STAGE_ROWS])
def test_bad_stage_input_is_one_line(outputs, tmp_path, stage, overrides, exc, message):
    with pytest.raises(exc) as e:
        run_stage(stage, overrides, outputs, tmp_path / "run")
    assert "\n" not in str(e.value)
    assert __import__("re").fullmatch(message, str(e.value)), str(e.value)
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_empty_adapter_dir_in_an_experiment_names_the_finetune_command(outputs, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(outputs, out)
    shutil.rmtree(out / "smoke" / "adapters" / "winowhy")
    (out / "smoke" / "adapters" / "winowhy").mkdir()  # e.g. a copy that never arrived
    with pytest.raises(FileNotFoundError, match=r"^adapter 'winowhy' is missing at .*; train it first: python -m "
                                                r"pipeline.finetune experiment=smoke task=winowhy$"):
        run_stage("route", [], out, tmp_path / "run")


@pytest.mark.parametrize(("experiment", "router", "missing"), [
    ("meteora_composite", "lora_b", r"adapter 'lora_b' is missing at .*/meteora_tasks/adapters/lora_b"),
    ("meteora_composite", "meteora", r"router 'meteora' is missing at .*/meteora_tasks/routers/meteora"),
    ("meteora_composite_cotrained", "meteora", r"router 'meteora' is missing at .*/meteora_tasks_cotrained/routers/meteora"),
])
def test_what_another_experiment_trains_names_that_experiment(experiment, router, missing, tmp_path, compose):
    """meteora_composite (and its variants) read meteora_tasks' adapters and gates: a missing one names the
    experiment that trains them, not a finetune / route of this one (which trains nothing of it)."""
    from pipeline.runtime.multilora import plan_multilora

    other = missing.split("/")[1]
    cfg = compose("evaluate", [f"experiment={experiment}", f"paths.output_root={tmp_path}", f"router={router}"])
    with pytest.raises(FileNotFoundError, match=rf"^{missing}; run the experiment that trains it first: python -m "
                                                rf"pipeline.reproduce experiment={other}$"):
        plan_multilora(cfg)


# ------------------------------------------------------------------------------- the command line's one line
NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without a CUDA GPU")
SMOKE_ADAPTERS = "paths.adapters_dir={adapters}"  # the module's smoke adapters, for rows refused after they are found
ENTRY_ROWS = [  # (id, stage, argv, the exact stderr line as a regex); every row also leaves no run dir behind
    ("config_typo", "finetune", ["experiment=smoke", "optim.lrr=1e-3"],
     (r"error: config: Could not override 'optim.lrr'; Key 'lrr' not in 'OptimSettings' \(check the spelling: "
      r"`--cfg job` prints every key\)")),
    ("unknown_experiment", "finetune", ["experiment=nosuch"],
     r"error: config: In 'finetune': Could not find 'experiment/nosuch'; pick one of: demo, .*smoke.*"),
    ("sweep_without_m", "finetune", ["experiment=smoke", "task=object_counting,winowhy"],
     r"error: config: Ambiguous value for argument 'task=object_counting,winowhy'.*add --multirun to your command line"),
    ("unknown_task", "finetune", ["experiment=smoke", "task=nosuch_task", "logger=none", "print_config=false"],
     r"error: unknown task 'nosuch_task'.*"),
    # the inputs a new user got wrong (each used to crash late, run on silently, or print a traceback)
    ("tasks_not_a_list", "evaluate", ["experiment=smoke", "tasks=winowhy"],
     r"error: tasks='winowhy' must be a list of task names; write tasks=\[winowhy\]"),
    ("generation_batch_zero", "evaluate", ["experiment=smoke", "generation.batch_size=0"],
     (r"error: generation.batch_size=0 must be a number of prompts per generate call >= 1; set e.g. "
      r"generation.batch_size=8")),
    ("max_batch_tokens_zero", "evaluate", ["experiment=smoke", "generation.max_batch_tokens=0"],
     (r"error: generation.max_batch_tokens=0 must be null \(no bound\) or a number of KV-cache positions per generate "
      r"call >= 1; set e.g. generation.max_batch_tokens=262144")),
    ("router_schedule_unknown", "route", ["experiment=smoke", "router=meteora", "router.train.schedule=step"],
     r"error: router.train.schedule='step' must be constant or cosine; set e.g. router.train.schedule=cosine"),
    ("generation_engine_unknown", "evaluate", ["experiment=smoke", "generation.engine=fast"],
     r"error: generation.engine='fast' must be one of auto, graph, generate; set e.g. generation.engine=auto"),
    ("group_projections_unknown", "evaluate", ["experiment=smoke", "generation.group_projections=sometimes"],
     (r"error: generation.group_projections='sometimes' must be auto \(on CUDA\), true or false; set e.g. "
     r"generation.group_projections=auto")),
    ("max_new_tokens_zero", "evaluate", ["experiment=smoke", "generation.max_new_tokens=0"],
     r"error: generation.max_new_tokens=0 must be a number of tokens >= 1 or auto \(from the gold answers\); set e.g. generation.max_new_tokens=16"),
    ("max_new_tokens_negative", "evaluate", ["experiment=smoke", "generation.max_new_tokens=-1"],
     r"error: generation.max_new_tokens=-1 must be a number of tokens >= 1 or auto \(from the gold answers\); set e.g. generation.max_new_tokens=16"),
    ("composite_shots_negative", "evaluate", ["experiment=smoke", "composite_n=2", "composite_shots=-1"],
     r"error: composite_shots=-1 must be a number of examples >= 0; set e.g. composite_shots=2"),
    ("model_path_missing", "evaluate", ["experiment=smoke", "model.name_or_path=/nonexistent/model"],
     (r"error: base model '/nonexistent/model' does not exist; build the cached models with `python -m data.fetch "
      r"--model` or pass a hub id / an existing HF directory")),
    ("model_path_deleted", "evaluate", ["experiment=smoke", "~model.name_or_path"],
     (r"error: model.name_or_path is missing; pass a hub id, an HF model directory or a .gguf file \(model=smollm2 is "
      r"the cached SmolLM2-135M-Instruct\)")),
    ("model_dtype", "evaluate", ["experiment=smoke", "model.dtype=float17"],
     r"error: model.dtype='float17' is not supported; use one of bf16, bfloat16, float16, float32, float64, fp16, fp32"),
    ("model_dir_without_model", "evaluate", ["experiment=smoke", "model.name_or_path={empty}"],
     r"error: cannot load base model '.*/empty' \(no config.json in it\); pass a HF model directory or a .gguf file"),
    ("seed_not_an_integer", "finetune", ["experiment=smoke", "task=winowhy", "seed=abc"],
     r"error: seed='abc' must be an integer; set e.g. seed=0"),
    ("wrong_type_in_a_typed_section", "evaluate", ["experiment=smoke", "generation.batch_size=abc"],
     (r"error: config: Error merging override generation.batch_size=abc; Value 'abc' of type 'str' could not be "
      r"converted to Integer; give a value of the key's type \(`--cfg job` prints every key and its value\)")),
    ("test_limit_zero", "evaluate", ["experiment=smoke", "data.test_limit=0"],
     r"error: data.test_limit=0 must be null \(all rows\) or a number of rows >= 1; set e.g. data.test_limit=16"),
    ("split_name", "evaluate", ["experiment=smoke", "data.test_split=testing"],
     r"error: data.test_split='testing' must be one of train, val, test; set e.g. data.test_split=test"),
    ("unknown_task_in_tasks", "evaluate", ["experiment=smoke", "tasks=[object_counting,winowhyy]"],
     r"error: unknown task 'winowhyy'; did you mean winowhy\? \(list: python -m data.tasks\)"),
    ("optim_batch_zero", "finetune", ["experiment=smoke", "task=winowhy", "optim.batch_size=0"],
     r"error: optim.batch_size=0 must be a number of rows >= 1; set e.g. optim.batch_size=4"),
    ("val_check_zero", "finetune", ["experiment=smoke", "task=winowhy", "trainer.val_check_interval=0"],
     r"error: trainer.val_check_interval=0 must be a number of steps >= 1; set e.g. trainer.val_check_interval=50"),
    ("checkpoint_every_negative", "route", ["experiment=smoke", "checkpoint.every_n_steps=-1"],
     (r"error: checkpoint.every_n_steps=-1 must be a number of steps >= 0 \(0: never\); set e.g. "
      r"checkpoint.every_n_steps=25")),
    ("router_batch_zero", "route", ["experiment=smoke", "router=dlp", "router.train.batch_size=0"],
     r"error: router.train.batch_size=0 must be a number of rows >= 1; set e.g. router.train.batch_size=8"),
    ("router_knob", "route", ["experiment=smoke", "router=dlp", "router.fusion=max", SMOKE_ADAPTERS],
     r"error: dlp fusion='max' is not known; use 'softmax' \(DLP-LoRA's code\) or 'renorm'"),
    ("top_k_zero", "route", ["experiment=smoke", "router=meteora", "router.top_k=0", SMOKE_ADAPTERS],
     r"error: meteora top_k=0 must be an integer in \[1, number of adapters = 2\]"),
    ("composite_n_above_tasks", "evaluate", ["experiment=smoke", "router=base", "composite_n=5", SMOKE_ADAPTERS],
     r"error: composite_n=5 but composite_tasks has 2 tasks; lower composite_n"),
    ("oracle_on_composite", "evaluate", ["experiment=smoke", "router=oracle", "composite_n=2", SMOKE_ADAPTERS],
     (r"error: router=oracle needs one task per prompt; composite prompts mix tasks: use a router that decides by "
      r"itself \(base, lora_b, merge, meteora, dlp or dlp_segments\)")),
    ("trained_router_missing", "evaluate", ["experiment=smoke", "router=dlp", SMOKE_ADAPTERS],
     (r"error: router 'dlp' is missing at .*/routers/dlp; train it first: python -m pipeline.route experiment=smoke "
      r"router=dlp")),
    ("group_the_stage_ignores", "evaluate", ["experiment=smoke", "adapter=dlp"],
     (r"error: adapter=dlp: the evaluate stage does not read `adapter`, so it would change nothing; drop it \(the "
      r"stages that read it: finetune, bench\)")),
    ("bench_unknown_row", "bench", ["experiment=smoke", "bench.strategies=[base,nosuch]"],
     (r"error: bench.strategies \['nosuch'\] are not known; use base, peft or a label of bench.routers \(oracle, "
      r"lora_b, merge, meteora-top1, meteora-top2, dlp, dlp_segments(, [a-z0-9_-]+)*\)")),
    ("bench_adapter_count", "bench", ["experiment=smoke", "bench.num_adapters=[0]"],
     r"error: bench.num_adapters=\[0\] must be a list of adapter counts >= 1; set e.g. bench.num_adapters=\[1,4\]"),
    ("parallel_zero", "reproduce", ["experiment=smoke", "parallel=0"],
     r"error: parallel=0 must be a number of steps run at once >= 1 \(1: one after another\); set e.g. parallel=1"),
    # an output or input path of the report stage that is mistyped (a file where a dir goes, a damaged index)
    ("report_out_dir_is_a_file", "report", ["experiment=smoke", "logger=none", "out_dir={afile}"],
     (r"error: cannot write .*/afile/report.md: .*/afile is a file, not a directory; point the output at a "
      r"directory \(or move that file away\)")),
    ("report_source_dir_is_a_file", "report", ["experiment=smoke", "logger=none", "source_dir={afile}"],
     r"error: report source_dir '.*/afile' is a file, not a directory; run the experiment's stages first .*"),
    ("records_index_not_json", "report", ["experiment=smoke", "logger=none", "records={not_json}"],
     (r"error: .*/not_json/index.json: not a records index \(JSONDecodeError: .*\); restore it from git, or "
      r"rebuild the records dir with the report stage of its experiment")),
    ("records_index_of_another_shape", "report", ["experiment=smoke", "logger=none", "records={no_runs}"],
     (r"error: .*/no_runs/index.json: not a records index \(no experiment_runs list of \{run: \.\.\.\}\); "
      r"restore it from git, or rebuild the records dir with the report stage of its experiment")),
    pytest.param("model_on_cuda", "evaluate", ["experiment=smoke", "model.device=cuda"],
                 r"error: model.device=cuda but no CUDA GPU is visible; use model.device=null \(the CPU\)", marks=NO_GPU,
                 id="model_on_cuda"),
    pytest.param("trainer_gpu", "finetune", ["experiment=smoke", "task=winowhy", "trainer=gpu"],
                 r"error: trainer.accelerator=gpu \(trainer=gpu / ddp / fsdp\) but no CUDA GPU is visible; use "
                 r"trainer=cpu \(or trainer=ddp_cpu for two CPU processes\)", marks=NO_GPU, id="trainer_gpu"),
]


def _row(r):
    return r if isinstance(r, type(pytest.param())) else pytest.param(*r, id=r[0])


@pytest.mark.parametrize("name,stage,argv,line", [_row(r) for r in ENTRY_ROWS])
def test_command_line_error_is_one_line_and_status_2(outputs, tmp_path, monkeypatch, capsys, name, stage, argv, line):
    """Each refusal: exit status 2, exactly one line on stderr (naming the value and the fix), checked before any model
    loads, and no run dir left behind (Hydra makes one before the stage starts: a refused run removes it)."""
    import importlib
    import re

    from pipeline.runtime.entry import cli

    (tmp_path / "empty").mkdir()
    (tmp_path / "afile").write_text("not a directory")
    for records, index in (("not_json", '{"experiment_runs": [{"run": "evaluate/or'), ("no_runs", '{"runs": []}')):
        (tmp_path / records).mkdir()
        (tmp_path / records / "index.json").write_text(index)  # a truncated index; another tool's index.json
    out = tmp_path / "out"
    inputs = {p.name: p for p in tmp_path.iterdir()}
    argv = [a.format(adapters=outputs / "smoke" / "adapters", **inputs) for a in argv]
    monkeypatch.setenv("LORAMUX_OUTPUTS", str(out))
    monkeypatch.setattr(sys, "argv", [f"pipeline/{stage}.py", *argv])
    with pytest.raises(SystemExit) as e:
        cli(importlib.import_module(f"pipeline.stages.{stage}").main)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and re.fullmatch(line, err.strip()), err
    assert not [p for p in out.rglob("*") if p.is_file()], "a refused run leaves no file behind"


def test_outputs_under_a_regular_file_is_one_line(tmp_path, monkeypatch, capsys):
    from pipeline.runtime.entry import cli
    from pipeline.stages.evaluate import main

    (tmp_path / "afile").write_text("not a directory")
    monkeypatch.setenv("LORAMUX_OUTPUTS", str(tmp_path / "afile" / "outputs"))
    monkeypatch.setattr(sys, "argv", ["pipeline/evaluate.py", "experiment=smoke"])
    with pytest.raises(SystemExit) as e:
        cli(main)
    assert e.value.code == 2
    assert re.fullmatch(rf"error: cannot create the run dir {tmp_path}/afile/outputs/smoke/evaluate/runs/\S+: "
                        rf"{tmp_path}/afile is a file, not a directory; point LORAMUX_OUTPUTS \(or paths.output_root, "
                        r"hydra.run.dir\) at a directory you can write\n", capsys.readouterr().err)


def test_empty_cache_and_outputs_variables_count_as_unset(monkeypatch, compose):
    """LORAMUX_CACHE= / LORAMUX_OUTPUTS= (set but empty) mean the defaults, as `python -m data.fetch` reads them."""
    from omegaconf import OmegaConf

    monkeypatch.setenv("LORAMUX_CACHE", "")
    monkeypatch.setenv("LORAMUX_OUTPUTS", "")
    paths = OmegaConf.to_container(compose("evaluate", ["experiment=smoke"], run_dir="/tmp/r").paths, resolve=True)
    assert paths["cache_dir"] == str(cache_dir()) == str(Path("~/.cache/loramux").expanduser())
    assert paths["output_root"] == "outputs" and paths["exp_dir"] == "outputs/smoke"


def test_a_refusal_inside_a_run_dir_that_holds_work_keeps_it(outputs, tmp_path, monkeypatch, capsys):
    """hydra.run.dir pointing at a dir with a user's files (a resumable checkpoint, say): refused, and nothing is
    removed."""
    from pipeline.runtime.entry import cli
    from pipeline.stages.finetune import main

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "resume.json").write_text("{}")
    monkeypatch.setattr(sys, "argv", ["pipeline/finetune.py", "experiment=smoke", "task=winowhy", "optim.lr=0",
                                      f"hydra.run.dir={run}", f"paths.output_root={tmp_path}"])
    with pytest.raises(SystemExit):
        cli(main)
    assert capsys.readouterr().err.startswith("error: optim.lr=0.0 must be > 0")
    assert (run / "checkpoints" / "resume.json").is_file() and (run / ".hydra").is_dir()


def test_user_errors_prints_the_first_line_only(capsys):
    from pipeline.runtime.entry import user_errors

    with pytest.raises(SystemExit) as e, user_errors():
        raise ValueError("adapter x: r: is 0; r must be a positive integer\n  details nobody needs")
    assert e.value.code == 2
    assert capsys.readouterr().err == "error: adapter x: r: is 0; r must be a positive integer\n"


# ---------------------------------------------------------------------------------------- not exceptions
def test_prompt_longer_than_the_context_is_skipped_and_counted():
    from transformers import AutoTokenizer

    from data.batches import PromptGroup, plan_jobs

    tok = AutoTokenizer.from_pretrained(str(TINY))
    prompts = ["[INST] 2+2? [/INST]\n", "[INST] " + "long " * 400 + "[/INST]\n", "[INST] 3+3? [/INST]\n"]
    jobs, skipped = plan_jobs(tok, [PromptGroup(prompts)], batch_size=8, max_prompt_tokens=64)
    assert skipped == [1]
    assert sorted(i for j in jobs for i in j["indices"]) == [0, 2]


def test_a_prompt_whose_answer_would_pass_the_models_positions_is_skipped_and_counted():
    """With ``context`` (the model's max_position_embeddings, which evaluate passes), a prompt that fits
    ``max_prompt_tokens`` but leaves fewer than its group's ``max_new_tokens`` positions is skipped too: the answer
    would be written where the model was never trained. Exactly filling the context is kept."""
    from transformers import AutoTokenizer

    from data.batches import PromptGroup, encode_prompts, plan_jobs

    tok = AutoTokenizer.from_pretrained(str(TINY))
    prompts = [" ".join(["word"] * n) for n in (5, 40, 20)]
    lens = [len(e) for e in encode_prompts(tok, prompts)]
    group = PromptGroup(prompts, max_new_tokens=10)
    jobs, skipped = plan_jobs(tok, [group], batch_size=8, max_prompt_tokens=100, context=lens[2] + 10)
    assert skipped == [1] and sorted(i for j in jobs for i in j["indices"]) == [0, 2]
    jobs, skipped = plan_jobs(tok, [group], batch_size=8, max_prompt_tokens=100)  # no context given: all run
    assert skipped == [0]


def test_long_prompts_come_in_smaller_generate_calls():
    """generation.max_batch_tokens bounds a generate call's KV cache, its rows x (its longest prompt + the new
    tokens): short prompts fill batch_size, longer ones come fewer per call, one over the bound alone. Every prompt
    goes once, shortest first, and no call could have taken the next prompt."""
    from transformers import AutoTokenizer

    from data.batches import PromptGroup, encode_prompts, plan_jobs

    tok = AutoTokenizer.from_pretrained(str(TINY))
    prompts = [" ".join(["word"] * n) for n in (3, 50, 5, 40, 4, 60, 2, 200, 6)]
    lens = [len(e) for e in encode_prompts(tok, prompts)]
    new, size, bound = 10, 4, 150
    jobs, skipped = plan_jobs(tok, [PromptGroup(prompts, max_new_tokens=new)], batch_size=size,
                              max_prompt_tokens=1000, max_batch_tokens=bound)
    assert skipped == [0]
    order = [i for j in jobs for i in j["indices"]]
    assert sorted(order) == list(range(len(prompts))) and [lens[i] for i in order] == sorted(lens)

    def cost(rows):
        return len(rows) * (max(lens[i] for i in rows) + new)

    for job, nxt in zip(jobs, jobs[1:] + [None], strict=True):
        rows = job["indices"]
        assert len(rows) <= size and (len(rows) == 1 or cost(rows) <= bound), (rows, cost(rows))
        if nxt is not None:  # the next prompt did not fit
            assert len(rows) == size or cost(rows + nxt["indices"][:1]) > bound
    assert [len(j["indices"]) for j in jobs][-1] == 1 and jobs[-1]["indices"] == [7]  # 200 words: alone
    unbounded, _ = plan_jobs(tok, [PromptGroup(prompts, max_new_tokens=new)], batch_size=size, max_prompt_tokens=1000)
    assert [len(j["indices"]) for j in unbounded] == [4, 4, 1]


def test_generation_that_returns_nothing_is_scored_empty_and_counted():
    from data.scoring import score

    out = score("winowhy", ["", "correct", None], ["correct", "correct", "incorrect"])
    assert out["n"] == 3 and out["empty"] == 2
    assert out["accuracy"] == pytest.approx(1 / 3)


def test_composite_answer_list_with_missing_and_extra_numbers_is_counted():
    from data.composite import parse_report

    answers, report = parse_report("1. north\n3. 42\n4. extra\n3. again\n", 3)
    assert answers == ["north", "", "42"]
    assert report == {"missing": 1, "extra": 1, "duplicate": 1}


@needs_task_files
def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(outputs, tmp_path):
    """lr = 1e30 blows the adapter up: the run stops at the first non-finite loss, the step's checkpoint stays;
    resuming it with another lr is refused (another config), and a truncated checkpoint is refused too."""
    from pipeline.runtime.requeue import resume_point

    run = tmp_path / "run"
    overrides = ["task=winowhy", "optim.lr=1e30", "trainer.max_steps=6", "checkpoint.every_n_steps=1"]
    with pytest.raises(FloatingPointError) as e:
        run_stage("finetune", overrides, outputs, run)
    msg = str(e.value)
    m = __import__("re").fullmatch(r"training loss is (nan|inf) at step (\d+); lower optim.lr or check the task's data "
                                   r"\(last good checkpoint: step (\d+), kept in (.*)\)", msg)
    assert m, msg
    bad_step, kept_step = int(m.group(2)), int(m.group(3))
    assert 1 <= kept_step == bad_step and Path(m.group(4)) == run / "checkpoints"
    assert json.loads((run / "checkpoints" / "resume.json").read_text())["step"] == kept_step
    assert not (run / "metrics.json").exists() and not (outputs / "smoke" / "adapters" / "winowhy" / "loramux.json").exists()

    with pytest.raises(ValueError, match=r"requeue.ckpt was written by a run with another config \(optim.lr: 1e\+30 -> "
                                         r"0.0002\); rerun with the same overrides to resume, or delete .*checkpoints"):
        run_stage("finetune", overrides[:1] + overrides[2:], outputs, run)

    ckpt = run / "checkpoints" / "requeue.ckpt"
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 3])
    with pytest.raises(ValueError, match=r"^checkpoint .*requeue.ckpt is truncated or damaged \(.*\); delete "
                                         r".*checkpoints to start afresh$"):
        resume_point(run)


@needs_task_files
def test_nan_loss_found_at_the_end_names_the_step_it_happened(outputs, tmp_path):
    """The NaN check is deferred (a step reads nothing back: pipeline/runtime/step_checks.py): with no log line and
    no checkpoint before the last step, the run trains on past the blow-up, then stops naming the step the
    every-step check above names, and saves nothing."""
    base = ["task=winowhy", "optim.lr=1e30", "trainer.max_steps=6"]
    every_step = ["trainer.log_every_n_steps=1", "checkpoint.every_n_steps=1"]
    with pytest.raises(FloatingPointError) as now:
        run_stage("finetune", [*base, *every_step], outputs, tmp_path / "now")
    with pytest.raises(FloatingPointError) as late:
        run_stage("finetune", [*base, "trainer.log_every_n_steps=100", "checkpoint.every_n_steps=0"], outputs,
                  tmp_path / "late")
    first = re.match(r"training loss is (nan|inf) at step (\d+); lower optim.lr or check the task's data", str(now.value))
    assert first and int(first.group(2)) < 5, str(now.value)  # the deferred run must outlive it to test anything
    assert str(late.value) == f"{first.group(0)} (no checkpoint was written before it (checkpoint.every_n_steps))"
    assert not (tmp_path / "late" / "metrics.json").exists()
    assert not (outputs / "smoke" / "adapters" / "winowhy" / "loramux.json").exists()


# ----------------------------------------------------------------------------------- disk full while saving
class _DiskFullAfterHalf:
    """A file object that writes half of what it is given, then fails like a full disk (ENOSPC)."""

    def __init__(self, f):
        self.f = f

    def write(self, data):
        self.f.write(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()

    def __getattr__(self, name):
        return getattr(self.f, name)


def test_disk_full_while_writing_metrics_keeps_the_previous_file(tmp_path, monkeypatch, capsys):
    import common.atomic
    from pipeline.runtime.entry import user_errors
    from pipeline.runtime.metrics_file import read_metrics, write_metrics

    kw = {"stage": "finetune", "experiment": "smoke", "tasks": ["winowhy"], "strategy": "peft",
          "provenance": {"seed": 0}, "main_metric": "val_loss"}
    path = write_metrics(tmp_path, metrics={"val_loss": 1.5}, **kw)
    before = path.read_bytes()
    real_open = open
    monkeypatch.setattr(common.atomic, "open", lambda p, mode="r", *a, **k: _DiskFullAfterHalf(real_open(p, mode, *a, **k))
                        if "w" in mode else real_open(p, mode, *a, **k), raising=False)
    with pytest.raises(SystemExit) as e, user_errors():
        write_metrics(tmp_path, metrics={"val_loss": 0.5}, **kw)
    assert e.value.code == 2
    assert capsys.readouterr().err == (f"error: no space left on the device while writing {path} (No space left on "
                                       "device); free space or point LORAMUX_OUTPUTS at another disk, then rerun (the "
                                       "previous version of the file is kept)\n")
    assert path.read_bytes() == before and read_metrics(path)["metrics"] == {"val_loss": 1.5}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]  # no temp file left behind


def test_disk_full_while_saving_an_adapter_or_a_router_keeps_the_previous_one(outputs, tmp_path, monkeypatch):
    import peft.peft_model
    import safetensors.torch
    from peft import PeftModel

    import models.routing.checkpoint
    from models import load_base_model
    from models.routing.checkpoint import read_router_checkpoint, save_router_checkpoint
    from pipeline.runtime.adapter_dirs import save_adapter

    model, _ = load_base_model(TINY)
    peft_model = PeftModel.from_pretrained(model, str(outputs / "smoke" / "adapters" / "winowhy"))
    dest = tmp_path / "adapters" / "winowhy"
    save_adapter(peft_model, dest, {"task": "winowhy"})
    router = tmp_path / "router"
    save_router_checkpoint(router, "dlp", {"top_p": 0.6}, {"w": torch.ones(2, 3)}, ["a", "b"])
    before = {p.name: p.read_bytes() for d in (dest, router) for p in d.iterdir()}

    real_save = safetensors.torch.save_file

    def save_half_then_fail(tensors, filename, metadata=None):
        real_save(tensors, filename, metadata=metadata)
        Path(filename).write_bytes(Path(filename).read_bytes()[:100])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", save_half_then_fail)
    monkeypatch.setattr(models.routing.checkpoint, "save_file", save_half_then_fail)  # the router's writer
    monkeypatch.setattr(peft.peft_model, "safe_save_file", save_half_then_fail)  # peft's own name for it
    with torch.no_grad():
        for p in peft_model.parameters():
            p.add_(1.0) if p.requires_grad else None
    with pytest.raises(OSError) as e:
        save_adapter(peft_model, dest, {"task": "winowhy", "steps": 99})
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(dest)
    with pytest.raises(OSError) as e:
        save_router_checkpoint(router, "dlp", {"top_p": 0.6}, {"w": torch.zeros(2, 3)}, ["a", "b"])
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(router / "router.safetensors")

    after = {p.name: p.read_bytes() for d in (dest, router) for p in d.iterdir()}
    assert after == before  # both previous versions intact, byte for byte
    assert not [p for p in tmp_path.rglob(".*") if p.name.endswith(".tmp")]  # temps removed
    _, tensors = read_router_checkpoint(router)
    assert torch.equal(tensors["w"], torch.ones(2, 3))


def test_truncated_router_checkpoint_is_refused_in_one_line(tmp_path):
    from models import RouterCheckpointError
    from models.routing.checkpoint import read_router_checkpoint, save_router_checkpoint

    d = save_router_checkpoint(tmp_path / "router", "dlp", {"top_p": 0.6}, {"w": torch.randn(64, 3)}, ["a", "b"])
    w = d / "router.safetensors"
    w.write_bytes(w.read_bytes()[:-40])
    with pytest.raises(RouterCheckpointError, match=r"^router checkpoint .*: router.safetensors: \d+ bytes, router.json "
                                                    r"says \d+ \(truncated or interrupted save\); re-save it or rerun route$"):
        read_router_checkpoint(d)
    meta = json.loads((d / "router.json").read_text())
    meta.pop("weights")  # a checkpoint from before sizes were recorded: safetensors' own check still refuses it
    (d / "router.json").write_text(json.dumps(meta))
    with pytest.raises(RouterCheckpointError, match=r"^router checkpoint .*: router.safetensors cannot be read \(.*\); "
                                                    r"re-save it or rerun route$"):
        read_router_checkpoint(d)


def test_truncated_metrics_json_is_refused_in_one_line(tmp_path):
    from pipeline.runtime.metrics_file import read_metrics

    (tmp_path / "metrics.json").write_text('{"stage": "finetune", "metr')
    with pytest.raises(ValueError, match=r"^.*metrics.json: not a readable metrics.json \(JSONDecodeError: .*\); delete "
                                         r"it and rerun the stage that wrote it$"):
        read_metrics(tmp_path / "metrics.json")


@needs_task_files
def test_adapter_damaged_after_training_is_refused_by_its_recorded_checksum(outputs, tmp_path):
    """Same size, one flipped byte: safetensors still loads it, the sha256 in loramux.json does not match."""
    from peft import PeftModel

    from models import load_base_model
    from pipeline.runtime.adapter_dirs import save_adapter

    out = tmp_path / "out"
    shutil.copytree(outputs, out)
    model, _ = load_base_model(TINY)
    peft_model = PeftModel.from_pretrained(model, str(outputs / "smoke" / "adapters" / "winowhy"))
    dest = save_adapter(peft_model, out / "smoke" / "adapters" / "winowhy", {"task": "winowhy"})
    weights = dest / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x40  # a mantissa bit of the last weight
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"^adapter .*/winowhy: adapter_model.safetensors: sha256 does not match "
                                         r"loramux.json \(truncated, damaged or replaced after training\); retrain it "
                                         r"with the finetune stage, or delete loramux.json if these weights are "
                                         r"intended$"):
        run_stage("route", [], out, tmp_path / "run")
    (dest / "loramux.json").unlink()  # the user says the new weights are intended: they load
    run_stage("route", ["router=dlp", "router.hidden=16", "router.train.steps=1", "checkpoint.every_n_steps=0"],
              out, tmp_path / "run2")
