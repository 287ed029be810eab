"""Training through the bank: every torch form the layers pick for training gives the reference op's loss and
gradients, and routes say when one adapter serves every row (``Route.uniform``) without reading the device.

Three ways a training step routes (the train_throughput benchmark's variants): one adapter for every row (a plain
LoRA on the bank's slices), one adapter per row (sentence routing folded per sequence: two bmms), MeteoRA's gates
(token routing over the whole bank: two GEMMs). Each is compared with ``LORAMUX_KERNEL_BACKEND=reference`` (the
loop that defines the semantics) on the same model, adapters and batch: loss, and the gradient of every trained
parameter, in fp32.
"""

import pytest
import torch

from models import MultiLoRAModel, load_base_model
from models.tiny import save_random_peft_adapter, save_tiny_llama

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def three(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    base = save_tiny_llama(root / "base")
    ranks = (8, 4, 6)  # mixed ranks: the torch forms drop the bank's padding and mask within the largest rank
    adapters = {f"t{i}": save_random_peft_adapter(base, root / f"t{i}", r=r, targets=TARGETS, seed=i)
                for i, r in enumerate(ranks)}
    return base, adapters


def _step(three, variant, backend, monkeypatch):
    monkeypatch.setenv("LORAMUX_KERNEL_BACKEND", backend)
    base, adapters = three
    model, _ = load_base_model(base)
    mm = MultiLoRAModel.from_adapters(model, adapters)
    torch.manual_seed(0)
    if variant == "gates":
        mm.set_router("meteora", top_k=2)
        params = mm.set_trainable("gates")
    else:
        params = mm.set_trainable("adapters")
    mm.train()
    ids = torch.randint(0, 250, (3, 10), generator=torch.Generator().manual_seed(1))
    task_ids = [1, 1, 1] if variant == "uniform" else [2, 0, 1]
    out = mm(input_ids=ids, labels=ids, task_ids=task_ids)
    out.loss.backward()
    names = {id(p): n for n, p in mm.named_parameters()}
    return out.loss.detach(), {names[id(p)]: p.grad.clone() for p in params}


@pytest.mark.parametrize("variant", ["uniform", "per_row", "gates"])
def test_training_forms_equal_the_reference(three, variant, monkeypatch):
    loss, grads = _step(three, variant, "auto", monkeypatch)
    ref_loss, ref_grads = _step(three, variant, "reference", monkeypatch)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == ref_grads.keys()
    moved = 0
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)
        moved += int(g.abs().sum() > 0)
    assert moved, "no trained parameter got a gradient: the test would mean nothing"


def test_routes_know_when_one_adapter_serves_every_row(three):
    base, adapters = three
    model, _ = load_base_model(base)
    mm = MultiLoRAModel.from_adapters(model, adapters)
    ids = torch.randint(0, 250, (2, 5), generator=torch.Generator().manual_seed(2))
    seen = {}
    layer = next(m for m in mm.model.modules() if type(m).__name__ == "MultiLoRALinear")
    hook = layer.register_forward_pre_hook(lambda m, a: seen.update(route=mm.router.route(m.module_name, a[0])))
    for router, kw, task_ids, want in (("oracle", {}, ["t2", "t2"], 2), ("oracle", {}, ["t2", "t0"], None),
                                       ("oracle", {}, torch.tensor([1, 1]), 1), ("lora_b", {"adapter": "t1"}, None, 1),
                                       ("dlp", {}, None, None)):
        mm.set_router(router, **kw)
        with torch.no_grad():
            mm(input_ids=ids, task_ids=task_ids)
        assert seen["route"].uniform == want, (router, task_ids)
    hook.remove()


def test_a_uniform_route_is_two_gemms_on_the_triton_backend_too(three, monkeypatch):
    """Inference with one host-known adapter for every row takes the plain-LoRA form on every backend (the routed
    kernels are never launched), with the reference's logits."""
    from kernels import op

    base, adapters = three
    ids = torch.randint(0, 250, (2, 6), generator=torch.Generator().manual_seed(3))
    launches = []
    monkeypatch.setattr(op, "_triton_forward", lambda *a, **k: launches.append(1) / 0)  # fails if ever called
    logits = {}
    for backend in ("triton", "reference"):
        monkeypatch.setenv("LORAMUX_KERNEL_BACKEND", backend)
        model, _ = load_base_model(base)
        mm = MultiLoRAModel.from_adapters(model, adapters)
        with torch.no_grad():
            logits[backend] = mm(input_ids=ids, task_ids=["t1", "t1"]).logits
    assert launches == []
    torch.testing.assert_close(logits["triton"], logits["reference"], rtol=1e-5, atol=1e-5)
