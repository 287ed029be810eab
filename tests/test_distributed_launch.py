"""How multi-device runs are configured and started: trainer=ddp|ddp_cpu|fsdp, and launcher=slurm with one task per
device (a real 2-task DDP job on the local SLURM cluster of scripts/slurm_localhost.sh)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from needs_assets import needs_task_files, needs_tiny_model

from pipeline.runtime.compose import compose

ROOT = Path(__file__).resolve().parent.parent


def _compose(stage: str, overrides: list[str], tmp_path, hydra: bool = False):
    GlobalHydra.instance().clear()
    return compose(stage, overrides, run_dir=tmp_path, return_hydra_config=hydra)


def test_ddp_cpu_trainer_is_two_gloo_processes(tmp_path):
    from lightning.pytorch.strategies import DDPStrategy

    trainer = instantiate(_compose("route", ["experiment=smoke", "trainer=ddp_cpu"], tmp_path).trainer)
    assert isinstance(trainer.strategy, DDPStrategy)
    assert trainer.num_devices == 2 and trainer.strategy._process_group_backend == "gloo"
    assert trainer.strategy._ddp_kwargs == {"find_unused_parameters": False}


@pytest.mark.parametrize("name", ["ddp", "fsdp"])
def test_gpu_strategies_compose_and_build(name, tmp_path):
    """trainer=ddp / fsdp: GPU configs (bf16-mixed, 2 devices); their strategy objects build on any machine."""
    cfg = _compose("route", ["experiment=smoke", f"trainer={name}"], tmp_path)
    assert cfg.trainer.accelerator == "gpu" and cfg.trainer.devices == 2 and cfg.trainer.precision == "bf16-mixed"
    strategy = instantiate(cfg.trainer.strategy)
    assert type(strategy).__name__ == {"ddp": "DDPStrategy", "fsdp": "FSDPStrategy"}[name]
    if name == "fsdp":
        assert strategy.kwargs["use_orig_params"] is True  # frozen base weights and trainable gates share units


@needs_tiny_model
def test_fsdp_wraps_each_decoder_layer_of_the_base_model():
    from hydra.utils import instantiate as build

    from data.assets import cache_dir
    from pipeline.runtime.distributed import _IsDecoderLayer

    model, _ = build({"_target_": "models.base.load_base_model",
                      "name_or_path": str(cache_dir() / "models" / "tiny-random-llama"), "dtype": "float32"})
    policy = _IsDecoderLayer()
    wrapped = [name for name, m in model.named_modules() if policy(m)]
    assert wrapped == ["model.layers.0", "model.layers.1"]
    assert [n for n, m in model.named_modules() if _IsDecoderLayer(["LlamaMLP"])(m)] == ["model.layers.0.mlp",
                                                                                         "model.layers.1.mlp"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_fsdp_on_cpu_is_refused_by_lightning_with_its_reason(tmp_path):
    cfg = _compose("route", ["experiment=smoke", "trainer=fsdp", "trainer.accelerator=cpu",
                             "trainer.precision=32-true"], tmp_path)
    with pytest.raises(Exception) as err:
        instantiate(cfg.trainer)
    assert "requires a GPU accelerator" in str(err.value.__cause__ or err.value)


@pytest.mark.parametrize(("trainer", "tasks"), [("cpu", 1), ("gpu", 1), ("ddp", 2), ("ddp_cpu", 2)])
def test_slurm_starts_one_task_per_device(trainer, tasks, tmp_path):
    cfg = _compose("finetune", ["experiment=smoke", "launcher=slurm", f"trainer={trainer}"], tmp_path, hydra=True)
    assert cfg.hydra.launcher.tasks_per_node == tasks
    assert cfg.hydra.launcher.nodes == 1
    more = _compose("finetune", ["experiment=smoke", "launcher=slurm", "trainer=ddp", "trainer.devices=4",
                                 "trainer.num_nodes=2"], tmp_path, hydra=True)
    assert (more.hydra.launcher.tasks_per_node, more.hydra.launcher.nodes) == (4, 2)


@pytest.mark.slurm
@pytest.mark.slow
@needs_tiny_model
@needs_task_files
def test_two_task_ddp_job_on_slurm(tmp_path):
    """`launcher=slurm trainer=ddp_cpu`: one SLURM job with 2 tasks (srun), Lightning's SLURMEnvironment makes them
    ranks 0 and 1 of one DDP run; one metrics.json, one adapter, one wandb run, the loss handed back to Hydra."""
    from test_slurm import MULTIRUN, _cluster_problem, slurm_env

    if problem := _cluster_problem():
        pytest.skip(problem)
    overrides = ["experiment=smoke", "task=winowhy", "logger=wandb", "print_config=false", "trainer.max_steps=2",
                 "launcher=slurm", "trainer=ddp_cpu", "optim.batch_size=2", "hydra.launcher.cpus_per_task=1",
                 "hydra.launcher.mem_gb=2", "hydra.launcher.timeout_min=10"]
    proc = subprocess.run([sys.executable, "-c", MULTIRUN, *overrides], check=False, cwd=ROOT,
                          env=slurm_env(tmp_path), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (sweep,) = (tmp_path / "smoke" / "finetune" / "multiruns").iterdir()
    (job_dir,) = sweep.glob(".submitit/[0-9]*")
    script = (job_dir / f"{job_dir.name}_submission.sh").read_text()
    assert "#SBATCH --ntasks-per-node=2" in script and "srun" in script
    logs = {t: "".join(p.read_text() for p in job_dir.glob(f"*_{t}_log.*")) for t in (0, 1)}
    assert "GLOBAL_RANK: 0, MEMBER: 1/2" in logs[0] and "GLOBAL_RANK: 1, MEMBER: 2/2" in logs[1]
    assert "step 2/2" in logs[0] and "step 2/2" in logs[1]  # both ranks trained, in step
    (metrics,) = sweep.rglob("metrics.json")
    assert len(list(sweep.rglob("offline-run-*"))) == 1
    val_loss = json.loads(metrics.read_text())["metrics"]["val_loss"]
    returns = json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("RETURNS="))[8:])
    assert returns == [[val_loss]]
    assert (tmp_path / "smoke" / "adapters" / "winowhy" / "adapter_model.safetensors").is_file()


def test_scaling_summary_and_comparison():
    from pipeline.stages.scaling import compare, parse_run, summarize

    assert parse_run("ddp:2") == ("ddp", 2) and parse_run("gpu") == ("gpu", 1)
    with pytest.raises(ValueError, match="not <trainer config>"):
        parse_run("ddp:two")
    steps = [{"seconds": 9.0, "tokens": 100, "rows": 4, "loss": 2.0}] + \
            [{"seconds": 0.5, "tokens": 100, "rows": 4, "loss": 1.5}] * 3
    one = summarize("gpu", 1, steps, warmup=1)
    assert one["tokens_per_s"] == pytest.approx(200.0) and one["step_ms"] == pytest.approx(500.0)
    two = summarize("ddp", 2, [{**s, "seconds": s["seconds"] / 1.6, "loss": s["loss"] + 0.01} for s in steps], 1)
    compare([one, two])
    assert two["speedup"] == pytest.approx(1.6) and two["efficiency"] == pytest.approx(0.8)
    assert two["loss_max_abs_diff"] == pytest.approx(0.01) and two["same_global_batches"]


def _random_adapters(model, root: Path) -> dict:
    """Two PEFT LoRA adapters with random (non-zero) B on the tiny LLaMA: inputs for a router, no training needed."""
    import copy

    from peft import LoraConfig, get_peft_model

    dirs = {}
    for i, name in enumerate(("first", "second")):
        torch.manual_seed(10 + i)
        peft = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.data.normal_(0, 0.05)
        peft.save_pretrained(root / name)
        dirs[name] = root / name
    return dirs


CLIP = 1e-3  # max gradient norm in the FSDP test


def _fsdp_rank(rank: int, world: int, adapters: dict, port: int, out: str) -> None:
    """One rank: MeteoRA gates over the adapters, base decoder layers sharded by trainer=fsdp's policy, one SGD step
    on this rank's rows; rank 0 saves the full gates."""
    import os

    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    from data.assets import cache_dir
    from models import MultiLoRAModel, load_base_model
    from pipeline.runtime.distributed import fsdp_auto_wrap

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    model, tok = load_base_model(str(cache_dir() / "models" / "tiny-random-llama"))
    mm = MultiLoRAModel.from_adapters(model, adapters, router="meteora", tokenizer=tok, top_k=2)
    mm.set_trainable("gates")
    fsdp = FSDP(mm, auto_wrap_policy=fsdp_auto_wrap(), use_orig_params=True, device_id=torch.device("cpu"))
    units = sum(isinstance(m, FSDP) for m in fsdp.modules())
    opt = torch.optim.SGD([p for p in fsdp.parameters() if p.requires_grad], lr=1.0)
    ids = torch.randint(0, 1000, (4, 12), generator=torch.Generator().manual_seed(1))[2 * rank:2 * rank + 2]
    fsdp(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids, task_ids=torch.tensor([0, 1])).loss.backward()
    from types import SimpleNamespace

    from pipeline.runtime.distributed import clip_gradients

    # the stages' clipping under FSDP (norm over both ranks' shards), as Lightning calls it: a small max norm so it bites
    clip_gradients(SimpleNamespace(trainer=SimpleNamespace(strategy=SimpleNamespace(model=fsdp))), opt, CLIP, "norm")
    opt.step()
    with FSDP.summon_full_params(fsdp, writeback=False):
        if rank == 0:
            torch.save({"units": units, "gates": {k: v.clone() for k, v in mm.router.state_dict().items()}}, out)
    dist.destroy_process_group()


@pytest.mark.slow
@needs_tiny_model
def test_fsdp_step_with_gloo_equals_one_process(tmp_path):
    """Lightning refuses FSDP on CPU, torch does not: trainer=fsdp's wrap policy (one unit per decoder layer,
    use_orig_params: frozen base + trainable gates in one model) run by torch FSDP on 2 gloo processes gives the
    same SGD step on the MeteoRA gates (through the fused op) as one process on both ranks' rows, with gradients
    clipped by ``pipeline.runtime.distributed.clip_gradients`` (over all shards) as the stages clip them."""
    import socket

    import torch.multiprocessing as mp

    from data.assets import cache_dir
    from models import MultiLoRAModel, load_base_model

    model, tok = load_base_model(str(cache_dir() / "models" / "tiny-random-llama"))
    adapters = _random_adapters(model, tmp_path / "adapters")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_fsdp_rank, args=(2, adapters, port, str(tmp_path / "fsdp.pt")), nprocs=2)
    fsdp = torch.load(tmp_path / "fsdp.pt")

    torch.manual_seed(0)  # the reference: one process, both ranks' rows in one batch (equal token counts)
    model, tok = load_base_model(str(cache_dir() / "models" / "tiny-random-llama"))
    mm = MultiLoRAModel.from_adapters(model, adapters, router="meteora", tokenizer=tok, top_k=2)
    opt = torch.optim.SGD(mm.set_trainable("gates"), lr=1.0)
    before = {k: v.clone() for k, v in mm.router.state_dict().items()}
    ids = torch.randint(0, 1000, (4, 12), generator=torch.Generator().manual_seed(1))
    mm(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids, task_ids=torch.tensor([0, 1, 0, 1])).loss.backward()
    assert torch.nn.utils.clip_grad_norm_(mm.router.parameters(), CLIP) > 10 * CLIP  # clipping changes the step
    opt.step()
    assert fsdp["units"] == 3  # root (embeddings, norm, head, adapter bank, gates) + 2 decoder layers
    for k, ref in mm.router.state_dict().items():
        step = (ref - before[k]).norm()
        assert step > 0 and (fsdp["gates"][k] - ref).norm() < 1e-4 * step, k
