"""A training step reads nothing back to the host (pipeline/runtime/step_checks.py), yet stops a NaN run as before.

The accumulator first: its token counts equal the old per-step ``int(mask.sum())`` exactly, and a loss that goes
NaN at step 3 of 10 is reported as step 3 (per task, naming the tasks that went bad at that step).

Then the three training modules (separate fine-tuning, joint fine-tuning, router training), each in a real
Lightning fit on the tiny LLaMA (CPU) with the stages' own callbacks (StepLog, RequeueCheckpoint):

  * host reads: every Python-level read of a tensor (``.item()``, ``.tolist()``, ``int(t)``, ``float(t)``,
    ``bool(t)``, ...) is recorded by a ``TorchFunctionMode`` together with the code that issued it and the
    trainer's step. On a CPU such a read costs nothing, but the same line on a CUDA tensor makes the host wait for
    the GPU. Between two log lines no read may come from this repo's code or from Lightning's loop (which, for
    one, reads back every ``prog_bar=True`` value after every batch); reads at the log lines show the recorder
    sees them. Reads inside torch's AdamW (its step counters live on the CPU, on a GPU too) and inside the HF
    model's forward are not this repo's and are not asserted on.
  * a NaN found late: batch 3 carries no answer token (every label -100; for the joint run only task b's rows), so
    the loss at step 3 is NaN (a mean over nothing), as the joint stage documents for a task without answer tokens.
    With the only read points at the last step (8), the fit runs on past it and still raises naming step 3 (and
    task b), the error an immediate check gave.
"""

from __future__ import annotations

import math
import sys
from collections import defaultdict
from pathlib import Path

import lightning as L
import pytest
import torch
from peft import LoraConfig
from torch.overrides import TorchFunctionMode
from torch.utils.data import DataLoader

from models import MultiLoRAModel, load_base_model
from models.tiny import save_test_assets
from pipeline.runtime.requeue import RequeueCheckpoint
from pipeline.runtime.step_checks import StepChecks, check_module, progress_bar_shown
from pipeline.runtime.step_log import StepLog
from pipeline.stages.finetune import LoRAFinetuneModule
from pipeline.stages.joint_finetune import JointFinetuneModule
from pipeline.stages.lora_training import init_lora
from pipeline.stages.route import RouterTrainModule

ROOT = Path(__file__).resolve().parent.parent
FINETUNE = "training loss is {loss} at step {step}; lower optim.lr or check the task's data"
JOINT = "training loss is not finite at step {step} for task(s) {names}; lower optim.lr or check those tasks' data"


# ------------------------------------------------------------------------------------------------ the accumulator
def test_token_counts_are_the_per_step_int_sums_exactly():
    g = torch.Generator().manual_seed(0)
    checks, want = StepChecks(FINETUNE), 0
    for _ in range(10):
        mask = (torch.rand(4, 37, generator=g) < 0.7).long()
        checks.count("tokens", mask.sum())
        want += int(mask.sum())
    assert checks.total("tokens") == want and isinstance(checks.total("tokens"), int)
    assert checks.total("answer_tokens") == 0  # nothing counted yet: the default


def test_float_counts_are_summed_as_int64():
    """Per-task answer counts come out of an index_add in float32; 2**24 + 1 is where float32 stops counting."""
    checks = StepChecks(JOINT, names=["a", "b"])
    checks.count("answer_tokens", torch.tensor([2.0**24, 3.0]))
    checks.count("answer_tokens", torch.tensor([1.0, 0.0]))
    assert checks.total("answer_tokens") == [2**24 + 1, 3]


def test_a_resumed_total_counts_on():
    checks = StepChecks(FINETUNE)
    checks.set_total("tokens", 1000)
    assert checks.total("tokens") == 1000
    checks.count("tokens", torch.tensor(5))
    assert checks.total("tokens") == 1005
    joint = StepChecks(JOINT, names=["a", "b"])
    joint.set_total("answer_tokens", [10, 20])
    joint.count("answer_tokens", torch.tensor([1.0, 2.0]))
    assert joint.total("answer_tokens") == [11, 22]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_a_nan_at_step_3_of_10_is_reported_as_step_3(bad):
    checks = StepChecks(FINETUNE)
    for step in range(10):
        loss = torch.tensor(bad if step == 3 else 1.0 / (step + 1))
        if step > 3:
            loss = torch.tensor(float("nan"))  # what follows a blow-up: later values do not move the first
        checks.watch(loss, step)
        if step == 2:
            checks.raise_if_not_finite()  # a read point before it: passes
    with pytest.raises(FloatingPointError) as e:
        checks.raise_if_not_finite()
    assert str(e.value) == f"training loss is {bad} at step 3; lower optim.lr or check the task's data"


def test_per_task_losses_name_the_tasks_that_went_bad_first():
    checks = StepChecks(JOINT, names=["arith", "winowhy", "cs"])
    for step in range(10):
        loss = torch.ones(3)
        if step >= 3:
            loss[[0, 2]] = float("nan")
        if step >= 5:
            loss[1] = float("inf")
        checks.watch(loss, step)
    assert checks.first_non_finite() == (3, pytest.approx(math.nan, nan_ok=True), ["arith", "cs"])
    with pytest.raises(FloatingPointError, match=r"^training loss is not finite at step 3 for task\(s\) arith, cs; "):
        checks.raise_if_not_finite()


def test_finite_losses_pass_every_read_point():
    checks = StepChecks(FINETUNE)
    assert checks.first_non_finite() is None  # nothing watched yet
    for step in range(5):
        checks.watch(torch.tensor(2.0 - step), step)
    checks.raise_if_not_finite()
    check_module(object())  # a module without step_checks passes


# --------------------------------------------------------------------------------- real fits on the tiny LLaMA
READS = {"item", "tolist", "numpy", "cpu", "__bool__", "__int__", "__float__", "__index__", "__format__"}
OURS = (str(ROOT / "pipeline"), str(Path(L.__file__).parent))  # this repo's stages and Lightning's loop


class HostReads(TorchFunctionMode):
    """Record every Python-level host read of a tensor: ``(trainer step, file:line, method)`` of its caller."""

    def __init__(self):
        super().__init__()
        self.trainer = None
        self.by_step: dict[int, list[str]] = defaultdict(list)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in READS and self.trainer is not None:
            caller = sys._getframe(1).f_code
            if caller.co_filename.startswith(OURS):
                self.by_step[self.trainer.global_step].append(f"{caller.co_filename}:{caller.co_name} {name}")
        return func(*args, **(kwargs or {}))


class Losses(L.Callback):
    """Each step's training loss as the module returned it (a tensor, read only after the fit)."""

    def __init__(self):
        self.losses: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(outputs["loss"].detach())


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return save_test_assets(tmp_path_factory.mktemp("step_checks"))


def batches(n: int, names, poison_at: int | None = None, poison_rows=slice(None)) -> list[dict]:
    """``n`` batches of 3 rows (every task once), right-padded, the answer the last half of each row; batch
    ``poison_at`` has no answer token in ``poison_rows`` (labels all -100)."""
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        ids = torch.randint(3, 250, (3, 12), generator=g)
        mask = torch.ones_like(ids)
        mask[1, 9:] = 0
        labels = ids.masked_fill(mask == 0, -100)
        labels[:, :6] = -100
        if i == poison_at:
            labels[poison_rows] = -100
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels,
                    "task_ids": torch.arange(3) % len(names)})
    return out


def module_for(kind: str, assets, lr: float):
    base, dirs = assets
    model, tok = load_base_model(base)
    if kind == "finetune":
        config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
        peft_model = init_lora(model, config, 0)
        peft_model.train()
        return LoRAFinetuneModule(peft_model, lr=lr, total_steps=8)
    mm = MultiLoRAModel.from_adapters(model, {n: str(d) for n, d in dirs.items()},
                                      router="oracle" if kind == "joint" else "meteora", tokenizer=tok)
    if kind == "joint":
        mm.set_trainable("adapters")
        mm.train()
        return JointFinetuneModule(mm, list(mm.adapter_names), lr=lr, total_steps=8)
    mm.router.train()
    return RouterTrainModule(mm, lr=lr)


def fit(module, tmp_path, steps: int, log_every: int, callbacks=(), reads: HostReads | None = None,
        **poison) -> None:
    """``steps`` steps of ``module`` with the stages' StepLog (a line every ``log_every`` steps and at the last) and
    RequeueCheckpoint (no periodic checkpoint): the read points are those lines and the end of training."""
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=log_every,
                        limit_val_batches=0, num_sanity_val_steps=0, inference_mode=False, gradient_clip_val=1.0,
                        callbacks=[*callbacks, StepLog(log_every, "test"), RequeueCheckpoint(tmp_path, every_n_steps=0)])
    if reads is not None:
        reads.trainer = trainer
    rows = batches(steps, getattr(module, "tasks", "abc"), **poison)
    trainer.fit(module, train_dataloaders=DataLoader(rows, batch_size=None))


@pytest.mark.parametrize("kind", ["finetune", "joint", "route"])
def test_a_training_step_reads_nothing_back_between_log_lines(kind, assets, tmp_path):
    module = module_for(kind, assets, lr=1e-3)
    rec = HostReads()
    with rec:
        fit(module, tmp_path, steps=8, log_every=4, reads=rec)
    quiet = {s: reads for s, reads in rec.by_step.items() if s not in (0, 4, 8)}
    assert not quiet, f"host reads between log lines: {quiet}"
    assert any("step_checks.py" in r for r in rec.by_step[8]), "the recorder missed the reads at the last line"
    assert not progress_bar_shown(module)  # no bar: the loss is not logged with prog_bar, so Lightning reads none


@pytest.mark.parametrize("kind", ["finetune", "joint", "route"])
def test_a_loss_gone_nan_at_step_3_is_reported_at_step_3_after_the_fact(kind, assets, tmp_path):
    module = module_for(kind, assets, lr=1e-3)
    losses = Losses()
    with pytest.raises(FloatingPointError) as e:
        fit(module, tmp_path, steps=8, log_every=100, callbacks=[losses], poison_at=3,
            poison_rows=[1] if kind == "joint" else slice(None))
    finite = [bool(torch.isfinite(v)) for v in losses.losses]  # joint: the sum over tasks
    assert finite == [True, True, True, False, True, True, True, True]  # past it: a batch with answers again
    assert str(e.value) == {
        "finetune": "training loss is nan at step 3; lower optim.lr or check the task's data",
        "joint": "training loss is not finite at step 3 for task(s) b; lower optim.lr or check those tasks' data",
        "route": "router loss is nan at step 3; lower router.train.lr"}[kind]
