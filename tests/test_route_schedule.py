"""The route stage's learning-rate schedule (router.train.schedule): MeteoRA's script trains its gates with a
linear warm-up and a cosine decay, clipped gradients; a constant lr is the other choice (DLP-LoRA's router)."""

import itertools

import pytest
import torch

from models import MultiLoRAModel, load_base_model
from models.tiny import save_test_assets
from pipeline.stages.route import RouterTrainModule


@pytest.fixture(scope="module")
def mm(tmp_path_factory):
    base, dirs = save_test_assets(tmp_path_factory.mktemp("route_schedule"))
    model, tok = load_base_model(base)
    return MultiLoRAModel.from_adapters(model, {n: str(d) for n, d in dirs.items()}, router="meteora", tokenizer=tok)


def test_cosine_warms_up_then_decays_to_a_tenth(mm):
    module = RouterTrainModule(mm, lr=1e-3, weight_decay=0.01, schedule="cosine", warmup_steps=4, total_steps=100)
    conf = module.configure_optimizers()
    opt, sched = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    lrs.append(opt.param_groups[0]["lr"])
    assert lrs[0] == pytest.approx(1e-3 / 5) and lrs[:5] == sorted(lrs[:5])  # warm-up: rising to lr
    assert max(lrs) == pytest.approx(1e-3) and lrs[-1] == pytest.approx(1e-4)  # cosine down to 10%
    assert all(a >= b for a, b in itertools.pairwise(lrs[4:]))
    assert opt.param_groups[0]["weight_decay"] == 0.01


def test_constant_is_plain_adamw(mm):
    opt = RouterTrainModule(mm, lr=1e-3).configure_optimizers()
    assert isinstance(opt, torch.optim.AdamW) and opt.param_groups[0]["lr"] == 1e-3
