"""A bank that trains holds its adapters at their own rank (``AdapterBank.fit_rank_to_adapters``, r = 8 where
inference banks pad to 16): what the padding held stays zero through training, and every backend still computes
what the padded bank computes, the Triton kernels (interpreted here) included, for a sentence route (oracle) and a
token route (MeteoRA top-2)."""

import tempfile

import pytest
import torch

from models import MultiLoRAModel, load_base_model
from models.tiny import save_test_assets


@pytest.fixture(scope="module")
def assets():
    return save_test_assets(tempfile.mkdtemp(prefix="bank-trim-"))


def _bank(assets) -> MultiLoRAModel:
    """The test adapters (r = 8, 4 rsLoRA, 8 on other targets) over the tiny LLaMA, oracle router."""
    base, dirs = assets
    model, tok = load_base_model(base)
    return MultiLoRAModel.from_adapters(model, {n: str(d) for n, d in dirs.items()}, router="oracle", tokenizer=tok)


def _logits(assets, trimmed: bool) -> dict:
    mm = _bank(assets)
    if trimmed:
        mm.set_trainable("adapters")  # trims the padding
        mm.set_trainable("none")
    assert {s.A.shape[2] for s in mm.bank.slots.values()} == ({8} if trimmed else {16})
    ids = torch.randint(0, 256, (3, 9), generator=torch.Generator().manual_seed(0))
    out = {}
    mm.set_routing(task_ids=torch.tensor([0, 1, 2]))
    with torch.no_grad():
        out["oracle"] = mm(input_ids=ids).logits
    torch.manual_seed(0)  # the same fresh gates for both banks
    mm.set_router("meteora", top_k=2)
    with torch.no_grad():
        out["meteora"] = mm(input_ids=ids).logits
    return out


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_trimmed_bank_computes_what_the_padded_bank_does(assets, backend, monkeypatch):
    monkeypatch.setenv("LORAMUX_KERNEL_BACKEND", backend)
    padded, trimmed = _logits(assets, False), _logits(assets, True)
    for route in ("oracle", "meteora"):
        torch.testing.assert_close(trimmed[route], padded[route], rtol=0, atol=2e-6, msg=route)


def test_a_trained_bank_holds_its_adapters_rank_and_keeps_their_padding_zero(assets):
    """Training the adapters trims the bank's rank padding (16 for r = 8) to the largest rank at each projection,
    values and logits unchanged. Where ranks differ the smaller adapter's columns past its rank get exactly zero
    gradient and stay exactly zero under AdamW with weight decay, while the real ones train."""
    mixed = _bank(assets)
    enc = mixed.tokenizer(["a b c d e f", "g h i j", "k l m n o p q"], return_tensors="pt", padding=True)
    mixed.set_routing(task_ids=torch.tensor([0, 1, 2]))
    with torch.no_grad():
        before = mixed(**enc).logits
    params = mixed.set_trainable("adapters")
    q = mixed.bank.slots[next(k for k in mixed.bank.slots if k.endswith("q_proj"))]
    assert q.A.shape[2] == 8 and q.host_ranks == [8, 4, 8]  # padded to 16 before: trimmed to the largest rank
    with torch.no_grad():
        torch.testing.assert_close(mixed(**enc).logits, before, rtol=0, atol=0)
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    start = q.B.detach().clone()
    mixed.train()
    for _ in range(3):
        opt.zero_grad()
        mixed.set_routing(task_ids=torch.tensor([0, 1, 2]))
        mixed(**enc, labels=labels).loss.backward()
        assert (q.A.grad[1, :, 4:] == 0).all() and (q.B.grad[1, 4:] == 0).all()
        opt.step()
    assert (q.A[1, :, 4:] == 0).all() and (q.B[1, 4:] == 0).all()
    assert not torch.equal(q.B[:, :4], start[:, :4])  # the real rows trained
