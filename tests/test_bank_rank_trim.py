"""A bank that trained holds its adapters at their own rank (``AdapterBank.fit_rank_to_adapters``, r = 8 where
inference banks pad to 16): every backend still computes what the padded bank computes, the Triton kernels
(interpreted here) included, for a sentence route (oracle) and a token route (MeteoRA top-2)."""

import tempfile

import pytest
import torch

from models import MultiLoRAModel, load_base_model
from models.tiny import save_test_assets


@pytest.fixture(scope="module")
def assets():
    return save_test_assets(tempfile.mkdtemp(prefix="bank-trim-"))


def _logits(assets, trimmed: bool) -> dict:
    base, dirs = assets
    model, tok = load_base_model(base)
    mm = MultiLoRAModel.from_adapters(model, {n: str(d) for n, d in dirs.items()}, router="oracle", tokenizer=tok)
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
