"""One broken adapter in a model's bank never reaches a sequence routed elsewhere (the model-level side of
tests/test_kernels_poison.py).

A tiny random LLaMA with three real PEFT adapters (mixed ranks, so there is rank padding). The bank refuses a
non-finite adapter at load, so the damage is done the way training or a direct tensor edit would do it: in place,
in the stacked tensors. One NaN in adapter ``c``'s lora_B and an Inf in the rank padding of adapter ``b``; every
sequence routed to ``a`` or ``b``: logits, greedy tokens and the adapters' gradients equal the clean model's, on
the CPU torch path (dense at prefill, gathered at decode), the reference, and the Triton kernels (interpreted,
short prompts taken as a prefill: the bank path with no chunk skipped, the one that turned every logit NaN).
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before kernels.triton_ops is first imported

from models import MultiLoRAModel, load_base_model
from models.tiny import save_test_assets

PROMPTS = ["[INST] count the apples [/INST]\n", "hello there, a longer prompt than the others", "[INST] x [/INST]\n\nq"]
TASKS = ["a", "b", "a"]
LAYER = "model.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return save_test_assets(tmp_path_factory.mktemp("poison"))


def _mm(assets):
    base, dirs = assets
    model, tok = load_base_model(base)
    return MultiLoRAModel.from_adapters(model, {n: str(dirs[n]) for n in "abc"}, router="oracle", tokenizer=tok)


@torch.no_grad()
def _poison(mm):
    A, B, _, ranks = mm.bank.tensors(LAYER)
    assert ranks.tolist() == [8, 4, 8] and A.shape[2] == 16  # b has rank padding (columns 4..15)
    B[2, 3, 7] = float("nan")  # adapter c, below its rank: nobody routes to c
    A[1, 5, 9] = float("inf")  # adapter b, past its rank: b is routed, its padding must stay unread


@pytest.mark.parametrize("backend,router", [("torch", "oracle"), ("torch", "meteora"), ("reference", "oracle"),
                                            ("triton", "meteora")])
def test_a_nan_in_an_unrouted_adapter_changes_no_logit(assets, monkeypatch, backend, router):
    """Sentence routing (oracle) and token routing (MeteoRA gates forced to the task, top-1: every token of a
    sequence on its task's adapter; on the Triton path no chunk of the bank expand can be skipped then)."""
    monkeypatch.setenv("LORAMUX_KERNEL_BACKEND", backend)
    mm = _mm(assets)
    if router == "meteora":
        mm.set_router("meteora", top_k=1)
        mm.set_routing(force_gates=True)
    prompts, quick = PROMPTS, backend != "torch"
    if backend == "triton":  # the interpreter is slow: short prompts, taken as a prefill (T > SMALL_T_MAX) would be
        from kernels import triton_ops

        prompts = ["[INST] hi", "a b c", "xyz"]
        monkeypatch.setattr(triton_ops, "SMALL_T_MAX", 0)  # the bank path with no chunk skipped, as at prefill
    batch = mm.tokenizer(prompts, return_tensors="pt", padding=True)
    gen = {"max_new_tokens": 3, "do_sample": False}
    with torch.no_grad():
        clean = mm(**batch, task_ids=TASKS).logits
        clean_tokens = None if quick else mm.generate(**batch, task_ids=TASKS, **gen)
        _poison(mm)
        got = mm(**batch, task_ids=TASKS).logits
        assert torch.isfinite(got).all(), f"{int((~torch.isfinite(got)).sum())} of {got.numel()} logits not finite"
        torch.testing.assert_close(got, clean, atol=1e-6, rtol=0)
        if clean_tokens is not None:  # prefill, then decode steps of 3 tokens (the gathered form on the CPU path)
            assert torch.equal(mm.generate(**batch, task_ids=TASKS, **gen), clean_tokens)
        if not quick:
            assert not torch.isfinite(mm(**batch, task_ids=["c", "a", "a"]).logits[0]).all()  # c itself is broken


def test_training_gradients_of_the_routed_adapters_are_the_clean_ones(assets, monkeypatch):
    """Adapters trained jointly on the CPU path (dense form, fwd + bwd): the poisoned bank gives the clean loss and
    the clean gradients for every slot; the unrouted adapter's gradient is zero, not NaN."""
    monkeypatch.setenv("LORAMUX_KERNEL_BACKEND", "torch")
    runs = []
    for poison in (False, True):
        mm = _mm(assets)
        if poison:
            _poison(mm)
        params = mm.set_trainable("adapters")
        batch = mm.tokenizer(PROMPTS, return_tensors="pt", padding=True)
        out = mm(**batch, labels=batch["input_ids"], task_ids=TASKS)
        out.loss.backward()
        grads = {m: [t.grad.clone() for t in mm.bank.tensors(m)[:2]] for m in mm.bank.modules_wrapped}
        runs.append((out.loss.detach(), grads))
        assert len(params) == 2 * len(mm.bank.modules_wrapped)
    (loss_c, clean), (loss_p, poisoned) = runs
    assert torch.isfinite(loss_p) and torch.equal(loss_p, loss_c)
    for m in clean:
        for name, g_c, g_p in zip("AB", clean[m], poisoned[m]):
            assert torch.isfinite(g_p).all(), f"{m} d{name} has non-finite values"
            torch.testing.assert_close(g_p, g_c, atol=1e-7, rtol=0)
            assert torch.count_nonzero(g_p[2]) == 0, f"{m}: adapter c is routed by nobody"
