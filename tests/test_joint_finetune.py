"""Joint fine-tuning (``finetune task=all``) against separate runs, on the tiny random LLaMA and BIG-bench rows, CPU fp32.

The acceptance test trains three adapters jointly and the same three one run each (same config): every saved
tensor agrees to 1e-5 (the adapters move ~1e-3 from their init, so a wrong gradient, a wrong clip or a wrong batch
shows), configs are identical, and each saved dir loads in peft. Clipping is made active (``gradient_clip_val``
below the gradient norms) and weight decay on, and 6 rows at batch 4 make every loader wrap into a new epoch with
a short last batch. The pieces are checked on their own too: the batch replay, per-adapter clipping, the
bank -> peft export (logits), zero rank padding through optimizer steps, LoRA-input dropout, resume after a kill,
the NaN stop and the reproduce plan.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from needs_assets import needs_task_files, needs_tiny_model
from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model_state_dict
from safetensors.torch import load_file
from torch._dynamo.utils import counters
from torch.utils.data import DataLoader

from data.assets import cache_dir
from data.batches import AnswerOnlyCollator
from models import MultiLoRAModel, load_base_model
from models.compile import compile_layers
from models.lora_input_dropout import LoRAInputDropout, add_lora_input_dropout
from pipeline.report.tables import finetune_table
from pipeline.runtime.requeue import ResumableSampler
from pipeline.runtime.settings import check_settings
from pipeline.stages.finetune import finetune
from pipeline.stages.joint_batches import JointBatches
from pipeline.stages.joint_finetune import (
    JointFinetuneModule,
    clip_per_adapter,
    save_joint_adapters,
)
from pipeline.stages.joint_speed import main as joint_speed
from pipeline.stages.lora_training import init_lora, initial_adapters
from pipeline.stages.reproduce import plan_steps, step_done

ROOT = Path(__file__).resolve().parent.parent
TINY = cache_dir() / "models" / "tiny-random-llama"
TASKS = ["object_counting", "winowhy", "cs_algorithms"]
# clipping active (the tiny model's adapter gradients have norm ~0.7-1.4), weight decay on, loaders wrap (6 rows, bs 4)
RUN = ["experiment=smoke", "logger=none", "print_config=false", f"tasks=[{','.join(TASKS)}]", "trainer.max_steps=5",
       "trainer.val_check_interval=5", "data.train_limit=6", "optim.batch_size=4", "optim.weight_decay=0.1",
       "optim.warmup_steps=1", "trainer.gradient_clip_val=0.5"]


@pytest.fixture
def run_finetune(compose):
    """``run_finetune(overrides, run_dir)``: the finetune stage in this process, as its CLI would run it."""
    return lambda overrides, run_dir: finetune(compose("finetune", overrides, run_dir))


# ------------------------------------------------------------------------------------------------ the acceptance test
@needs_tiny_model
@needs_task_files
def test_joint_run_equals_three_separate_runs(tmp_path, run_finetune):
    joint_out, sep_out = tmp_path / "joint", tmp_path / "sep"
    mean_val = run_finetune([*RUN, "task=all", f"paths.output_root={joint_out}"], tmp_path / "run-all")
    sep_val = {t: run_finetune([*RUN, f"task={t}", f"paths.output_root={sep_out}"], tmp_path / f"run-{t}") for t in TASKS}

    rec = json.loads((tmp_path / "run-all" / "metrics.json").read_text())
    assert rec["stage"] == "finetune" and rec["joint"] and rec["tasks"] == TASKS
    assert [r["adapter"] for r in rec["rows"]] == TASKS and rec["metrics"]["steps"] == 5
    tokens = sum(json.loads((tmp_path / f"run-{t}" / "metrics.json").read_text())["metrics"]["tokens"] for t in TASKS)
    assert rec["metrics"]["tokens"] == tokens  # the same rows, padding not counted
    for row in rec["rows"]:
        sep = json.loads((tmp_path / f"run-{row['adapter']}" / "metrics.json").read_text())["metrics"]
        assert row["train_rows"] == sep["train_rows"] and row["answer_tokens"] == sep["answer_tokens"]
        assert row["trainable_params"] == sep["trainable_params"]
        assert row["val_loss"] == pytest.approx(sep_val[row["adapter"]], rel=1e-5)
        assert row["train_loss"] == pytest.approx(sep["train_loss"], rel=1e-5)
    assert mean_val == pytest.approx(sum(sep_val.values()) / 3, rel=1e-5)

    base, tok = load_base_model(TINY)
    ids = tok(["Q: how many legs has a cat?\nA:", "the trophy did not fit"], return_tensors="pt", padding=True)
    for t in TASKS:
        for d in (joint_out / "smoke" / "adapters" / t, tmp_path / "run-all" / "adapters" / t):
            a, b = load_file(str(d / "adapter_model.safetensors")), load_file(str(sep_out / "smoke" / "adapters" / t / "adapter_model.safetensors"))
            assert a.keys() == b.keys() and len(a) == 2 * 7 * 2  # q,k,v,o,gate,up,down x 2 layers, A and B
            for k in a:
                assert a[k].shape == b[k].shape, k
                assert (a[k] - b[k]).abs().max() <= 1e-5, (t, k, float((a[k] - b[k]).abs().max()))
            assert max(float(v.abs().max()) for k, v in b.items() if "lora_B" in k) > 2e-4  # trained: 20x the tolerance
            assert (json.loads((d / "adapter_config.json").read_text())
                    == json.loads((sep_out / "smoke" / "adapters" / t / "adapter_config.json").read_text()))
            meta = json.loads((d / "loramux.json").read_text())
            assert meta["task"] == t and meta["tasks"] == [t] and meta["joint"] == TASKS and meta["steps"] == 5
        assert PeftConfig.from_pretrained(str(d)).r == 8
        peft_model = PeftModel.from_pretrained(base, str(d))
        with torch.no_grad():
            out = peft_model(**ids).logits
        assert torch.isfinite(out).all()
        base = peft_model.unload()

    table = finetune_table([rec])
    assert [r[0] for r in table.rows] == sorted(TASKS)
    assert table.rows[0][2] == round(next(r for r in rec["rows"] if r["adapter"] == "cs_algorithms")["val_loss"], 4)
    assert {r[1] for r in table.rows} == {"joint"}


# --------------------------------------------------------------------------------------------------- batches
def _loader(n_rows: int, seed: int, bs: int, width_of=lambda i: 3 + i % 4):
    rows = [{"input_ids": [100 + i] * width_of(i), "labels": [-100] + [100 + i] * (width_of(i) - 1)}
            for i in range(n_rows)]
    return DataLoader(rows, batch_size=bs, sampler=ResumableSampler(n_rows, seed), collate_fn=AnswerOnlyCollator(0))


def _as_lightning_iterates(loader, batches: int) -> list[dict]:
    """The batches a separate run trains on: epoch e = set_epoch(e), then the loader, until ``batches``."""
    out, epoch = [], 0
    while len(out) < batches:
        loader.sampler.set_epoch(epoch)
        out += list(loader)
        epoch += 1
    return out[:batches]


def test_joint_batches_replay_every_task_loader_and_pad_on_the_right():
    sizes = (5, 2, 11)  # the 2-row task wraps every step, the 5-row one every 2 steps (short last batch)
    make = lambda: [_loader(n, seed=0, bs=3) for n in sizes]
    joint = list(JointBatches(make(), pad_id=0, batches=9))
    own = [_as_lightning_iterates(dl, 9) for dl in make()]
    assert len(joint) == 9
    for k, batch in enumerate(joint):
        start = 0
        assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
        for t, per_task in enumerate(own):
            mine = per_task[k]
            n, w = mine["input_ids"].shape
            rows = slice(start, start + n)
            assert (batch["task_ids"][rows] == t).all()
            for key, pad in (("input_ids", 0), ("attention_mask", 0), ("labels", -100)):
                assert torch.equal(batch[key][rows, :w], mine[key])  # real tokens where they were
                assert (batch[key][rows, w:] == pad).all()  # padding only on the right
            start += n
        assert start == batch["input_ids"].shape[0]

    resumed = JointBatches(make(), pad_id=0, batches=9)
    resumed.resume_at(5)  # resumed after 5 batches: each task at its own epoch and batch (skips 1, 0, 1)
    tail = list(resumed)
    assert len(tail) == 4
    for a, b in zip(tail, joint[5:], strict=True):
        assert all(torch.equal(a[k], b[k]) for k in b)
    assert len(list(resumed)) == 9  # the resume point is used once


# ------------------------------------------------------------------------------------------- bank-level pieces
@pytest.fixture
def bank_model(tmp_path):
    """A MultiLoRAModel over the tiny LLaMA with three fresh (peft-initialised) adapters, oracle router."""
    model, tok = load_base_model(TINY)
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"],
                        task_type="CAUSAL_LM")
    dirs = initial_adapters(model, config, 0, TASKS, tmp_path / "init")
    mm = MultiLoRAModel.from_adapters(model, dirs, router="oracle", tokenizer=tok)
    mm.set_trainable("adapters")
    return mm, config, tok


@needs_tiny_model
def test_initial_adapters_are_the_separate_runs_init(bank_model):
    mm, config, _ = bank_model
    model, _ = load_base_model(TINY)
    torch.manual_seed(123)  # whatever ran before: init_lora seeds itself
    torch.rand(1000)
    separate = get_peft_model_state_dict(init_lora(model, config, 0))
    for i in range(3):
        mine = mm.bank.peft_state(i)
        assert mine.keys() == separate.keys()
        assert all(torch.equal(mine[k], separate[k]) for k in mine)


@needs_tiny_model
def test_clip_per_adapter_equals_clip_grad_norm_of_each_adapter(bank_model):
    mm, _, _ = bank_model
    params = [p for s in mm.bank.slots.values() for p in (s.A, s.B)]
    torch.manual_seed(0)
    for p in params:
        p.grad = torch.randn_like(p) * 0.01
    for p in params:
        p.grad[1] *= 0.1  # adapter 1's norm below the bound: untouched
    want = []
    for a in range(3):
        own = [torch.nn.Parameter(torch.zeros_like(p[a])) for p in params]  # adapter a's tensors, as peft holds them
        for q, p in zip(own, params, strict=True):
            q.grad = p.grad[a].clone()
        norm = torch.nn.utils.clip_grad_norm_(own, 0.5)
        want.append((float(norm), [q.grad for q in own]))
    norms = clip_per_adapter(mm.bank, 0.5)
    assert norms[1] < 0.5 < min(norms[0], norms[2])
    for a, (norm, scaled) in enumerate(want):
        assert float(norms[a]) == pytest.approx(norm, rel=1e-6)
        for p, g in zip(params, scaled, strict=True):
            torch.testing.assert_close(p.grad[a], g, rtol=1e-6, atol=1e-9)


@needs_tiny_model
def test_saved_adapters_load_in_peft_with_the_banks_logits(bank_model, tmp_path):
    mm, config, tok = bank_model
    torch.manual_seed(1)
    with torch.no_grad():  # "trained" adapters: every real entry nonzero, padding zero as training keeps it
        for s in mm.bank.slots.values():
            s.A[:, :, :8].normal_(0, 0.3)
            s.B[:, :8].normal_(0, 0.3)
    enc = tok(["one two three", "four five six seven"], return_tensors="pt", padding=True)
    mm.eval()
    with torch.no_grad():
        bank_logits = {t: mm(**enc, task_ids=[t, t]).logits for t in TASKS}
    dests = {t: [tmp_path / "a" / t, tmp_path / "b" / t] for t in TASKS}
    save_joint_adapters(mm, config, dests, {t: {"task": t} for t in TASKS})
    base, _ = load_base_model(TINY)
    for t in TASKS:
        for d in dests[t]:
            peft_model = PeftModel.from_pretrained(base, str(d))
            with torch.no_grad():
                got = peft_model(**enc).logits
            torch.testing.assert_close(got, bank_logits[t], rtol=1e-5, atol=1e-5)
            assert not torch.allclose(got, bank_logits[TASKS[(TASKS.index(t) + 1) % 3]], atol=1e-3)
            base = peft_model.unload()


@needs_tiny_model
def test_lora_input_dropout_drops_only_the_lora_branch(bank_model):
    mm, _, tok = bank_model
    with torch.no_grad():
        for s in mm.bank.slots.values():
            s.B[:, :8].normal_(0, 0.3)
    name = mm.bank.modules_wrapped[0]
    layer = mm.model.get_submodule(name)
    enc = tok(["one two three"], return_tensors="pt")
    mm.set_routing(task_ids=[1])
    mm.router.begin_forward(enc["input_ids"], enc["attention_mask"], None, True)  # route the bare layer call
    x = torch.randn(1, enc["input_ids"].shape[1], layer.in_features)
    assert add_lora_input_dropout(mm, 0.5) == mm.bank.modules_wrapped
    wrapped = mm.model.get_submodule(name)
    assert isinstance(wrapped, LoRAInputDropout) and wrapped.inner is layer
    mm.model.train()
    with torch.no_grad():
        torch.manual_seed(5)
        d = F.dropout(x, 0.5, training=True)
        want = layer.base_layer(x) + (layer(d) - layer.base_layer(d))  # base(x) + delta(dropout(x))
        torch.manual_seed(5)
        got = wrapped(x)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(got, layer(d), atol=1e-4)  # not dropout on the base projection too
        mm.model.eval()
        assert torch.equal(wrapped(x), layer(x))  # eval: no dropout
    model = mm.unwrap()
    assert isinstance(model.get_submodule(name), torch.nn.Linear)  # unwrap restores the plain projections
    assert add_lora_input_dropout(mm, 0.0) == []
    with pytest.raises(ValueError, match=r"lora_dropout=1.0 must be in \[0, 1\)"):
        add_lora_input_dropout(mm, 1.0)


# ---------------------------------------------------------------------------------------- reliability, plumbing
KILLER = """
import os, runpy, signal, sys
kill_at = int(os.environ["KILL_AT_STEP"])
import pipeline.stages.joint_finetune as jm
step = jm.JointFinetuneModule.training_step
def training_step(self, batch, i):
    if self.global_step == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    return step(self, batch, i)
jm.JointFinetuneModule.training_step = training_step
sys.argv = ["pipeline.finetune", *sys.argv[1:]]
runpy.run_module("pipeline.finetune", run_name="__main__")
"""


@pytest.mark.slow
@needs_tiny_model
@needs_task_files
def test_joint_run_killed_mid_training_resumes_to_the_uninterrupted_adapters(tmp_path, caplog, run_finetune):
    """adapter=dlp (LoRA dropout 0.1: the RNG resumes too); SIGKILL at step 5, periodic checkpoint at step 3."""
    over = [*RUN[:-1], "task=all", "adapter=dlp", "trainer.max_steps=7", "trainer.val_check_interval=7",
            "checkpoint.every_n_steps=3"]
    run = tmp_path / "run"
    cmd = [sys.executable, "-c", KILLER, *over, f"paths.output_root={tmp_path / 'killed'}", f"hydra.run.dir={run}"]
    killed = subprocess.run(cmd, check=False, cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "KILL_AT_STEP": "5"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert json.loads((run / "checkpoints" / "resume.json").read_text())["step"] == 3
    run_finetune([*over, f"paths.output_root={tmp_path / 'ref'}"], tmp_path / "ref-run")
    run_finetune([*over, f"paths.output_root={tmp_path / 'killed'}"], run)  # the restart: same config, same run dir
    assert f"resuming from {run / 'checkpoints' / 'requeue.ckpt'} (step 3" in caplog.text
    for t in TASKS:
        a = load_file(str(tmp_path / "ref-run" / "adapters" / t / "adapter_model.safetensors"))
        b = load_file(str(run / "adapters" / t / "adapter_model.safetensors"))
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-7, msg=k)
    ref, res = (json.loads((d / "metrics.json").read_text())["metrics"] for d in (tmp_path / "ref-run", run))
    assert res["tokens"] == ref["tokens"] and res["answer_tokens"] == ref["answer_tokens"]
    assert res["val_loss"] == pytest.approx(ref["val_loss"], rel=1e-6)


@needs_tiny_model
@needs_task_files
def test_joint_nan_loss_stops_in_one_line_keeping_the_last_checkpoint(tmp_path, run_finetune):
    run = tmp_path / "run"
    with pytest.raises(FloatingPointError) as e:
        run_finetune([*RUN, "task=all", "optim.lr=1e30", "checkpoint.every_n_steps=1",
                   f"paths.output_root={tmp_path}"], run)
    m = re.fullmatch(r"training loss is not finite at step (\d+) for task\(s\) ([a-z_, ]+); lower optim.lr or check "
                     r"those tasks' data \(last good checkpoint: step (\d+), kept in (.*)\)", str(e.value))
    assert m, str(e.value)
    assert 1 <= int(m.group(3)) == int(m.group(1)) and Path(m.group(4)) == run / "checkpoints"
    assert not (run / "metrics.json").exists() and not (tmp_path / "smoke" / "adapters").exists()


@pytest.mark.parametrize(("overrides", "message"), [
    (["tasks=[]"], r"task=all trains one adapter per entry of `tasks`, which is empty; pick an experiment .*"),
    (["tasks=[winowhy,lora_b]"], r"task=all: tasks=\['winowhy', 'lora_b'\] must name tasks only; .*\(task=lora_b\)"),
    (["tasks=[winowhy,winowhy]"], r"task=all: tasks=.* names a task twice; list each once"),
    (["trainer=fsdp"], r"task=all \(joint fine-tuning\) does not run under trainer=fsdp .*"),
])
def test_bad_joint_config_is_one_line(tmp_path, overrides, message, run_finetune):
    with pytest.raises(ValueError, match=message):
        run_finetune(["experiment=smoke", "logger=none", "task=all", *overrides], tmp_path / "run")


def test_reproduce_plans_one_joint_finetune_step_and_lora_b_its_own(tmp_path, compose):
    over = ["experiment=smoke", f"paths.output_root={tmp_path}"]
    steps = [s for s in plan_steps(compose("reproduce", [*over, "joint_finetune=true"], tmp_path))
             if s["stage"] == "finetune"]
    assert [(s["step"], s["overrides"]) for s in steps] == [("all", ["task=all"]), ("lora_b", ["task=lora_b"])]
    assert [Path(a).parent.name for a in steps[0]["artefact"]] == ["object_counting", "winowhy"]
    sub = compose("reproduce", [*over, "joint_finetune=true", "plan.finetune=[winowhy,cs_algorithms]"], tmp_path)
    assert [s["overrides"] for s in plan_steps(sub) if s["stage"] == "finetune"] == [
        ["task=all", "tasks=[winowhy,cs_algorithms]"]]
    finetune_steps = lambda extra: [s["step"] for s in plan_steps(compose("reproduce", [*over, *extra], tmp_path))
                                    if s["stage"] == "finetune"]
    assert finetune_steps(["joint_finetune=false"]) == ["object_counting", "winowhy", "lora_b"]
    assert finetune_steps([]) == ["all", "lora_b"]  # auto: joint, on CPU too (measured faster there)
    assert finetune_steps(["parallel=2"]) == ["object_counting", "winowhy", "lora_b"]  # CPU runs side by side
    assert finetune_steps(["trainer=gpu", "parallel=2"]) == ["all", "lora_b"]  # auto on a GPU trainer: joint
    assert finetune_steps(["joint_finetune=true", "plan.finetune=[winowhy,lora_b]"]) == ["winowhy", "lora_b"]
    own = ["+plan.finetune_overrides.lora_b=['trainer.max_steps=7']",
           "+plan.finetune_overrides.all=['optim.lr=0.1']"]  # each step's own budget
    assert [s["overrides"] for s in plan_steps(compose("reproduce", [*over, *own], tmp_path))
            if s["stage"] == "finetune"] == [["task=all", "optim.lr=0.1"], ["task=lora_b", "trainer.max_steps=7"]]
    with pytest.raises(ValueError, match=r"plan.finetune_overrides names lora_a, not a step of plan.finetune; use "
                                         r"one of object_counting, winowhy, lora_b, all"):
        plan_steps(compose("reproduce", [*over, "+plan.finetune_overrides.lora_a=['x=1']"], tmp_path))
    with pytest.raises(ValueError, match=r"joint_finetune='sometimes' must be auto, true or false; set e.g. "
                                         r"joint_finetune=auto"):
        check_settings(compose("reproduce", [*over, "joint_finetune=sometimes"], tmp_path))

    joint = steps[0]
    (joint["run_dir"]).mkdir(parents=True)
    (joint["run_dir"] / "metrics.json").write_text("{}")
    assert not step_done(joint)  # every adapter must be there
    for a in joint["artefact"][:1]:
        a.parent.mkdir(parents=True)
        a.write_text("{}")
    assert not step_done(joint)
    joint["artefact"][1].parent.mkdir(parents=True)
    joint["artefact"][1].write_text("{}")
    assert step_done(joint)


@pytest.mark.slow
@needs_tiny_model
@needs_task_files
def test_joint_speed_times_both_modes_and_writes_the_table(tmp_path):
    out = tmp_path / "tables" / "joint"
    result = joint_speed(["--experiment", "smoke", "--repeats", "1", "--out", str(out), "trainer.max_steps=2"])
    assert [(t["mode"], t["runs"]) for t in result["totals"]] == [("joint", 1), ("separate", 2)]
    joint, separate = result["totals"]
    assert joint["tokens"] == separate["tokens"] > 0  # the same rows trained either way
    assert all(t["train_cpu_seconds"] > 0 and t["tokens_per_cpu_s"] > 0 for t in result["totals"])
    assert result["faster"] == ("joint" if result["ratios"]["tokens_per_cpu_s"] > 1 else "separate")
    assert json.loads(out.with_suffix(".json").read_text())["ratios"] == result["ratios"]
    assert "| joint | 0 | 1 |" in out.with_suffix(".md").read_text()


@needs_tiny_model
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_joint_step_compiles_one_graph_for_every_layer(tmp_path, dropout):
    """train_speed.compile on a GPU compiles each decoder layer (models.compile): the joint route and the
    LoRA-input dropout wrapper trace without a graph break into one graph shared by the layers, same loss as eager."""
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, target_modules=["q_proj", "v_proj"],
                        task_type="CAUSAL_LM")

    def losses(compiled: bool, graphs: list):
        model, tok = load_base_model(TINY)
        dirs = initial_adapters(model, config, 0, TASKS, tmp_path / f"init-{compiled}")
        mm = MultiLoRAModel.from_adapters(model, dirs, router="oracle", tokenizer=tok)
        mm.set_trainable("adapters")
        add_lora_input_dropout(mm, dropout)
        module = JointFinetuneModule(mm, TASKS, lr=1e-3)
        if compiled:
            compile_layers(mm.model, backend=lambda gm, inputs: graphs.append(gm) or gm.forward)
        mm.train()
        ids = torch.randint(3, 250, (3, 10), generator=torch.Generator().manual_seed(0))
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids, "task_ids": torch.arange(3)}
        torch.manual_seed(7)
        out, _ = module.task_losses(batch)
        out.sum().backward()
        return out.detach(), [p.grad for p in mm.parameters() if p.requires_grad]

    torch._dynamo.reset()
    graphs: list = []
    eager, eager_grads = losses(False, graphs)
    breaks = sum(counters["graph_break"].values())
    got, grads = losses(True, graphs)
    assert 1 <= len(graphs) <= 2, f"{len(graphs)} graphs for 2 layers"
    assert sum(counters["graph_break"].values()) == breaks
    torch.testing.assert_close(got, eager)
    for g, e in zip(grads, eager_grads, strict=True):
        torch.testing.assert_close(g, e)
