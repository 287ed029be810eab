"""``models.attention.capture_stable_sdpa``: a call without an attention mask runs causal SDPA (no mask built) during a
CUDA graph capture, as outside one, so a captured training step sees what its warm-up saw. No CUDA capture runs on
this CPU: the capture is stood in for by ``torch.cuda.is_current_stream_capturing`` answering True, the one
question transformers' mask code asks of it."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from common.random_llama import random_llama
from models.attention import capture_stable_sdpa

CONFIG = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
          "num_key_value_heads": 2, "vocab_size": 97, "max_position_embeddings": 64}


def _pair():
    plain = random_llama(CONFIG, seed=0)
    plain.config._attn_implementation = "sdpa"
    fixed = random_llama(CONFIG, seed=0)
    fixed.config._attn_implementation = "sdpa"
    return plain, capture_stable_sdpa(fixed)


def _masks_seen(model, ids, attention_mask=None):
    """The attention_mask each decoder layer receives in one forward."""
    seen = []
    hooks = [layer.register_forward_pre_hook(lambda m, a, k: seen.append(k.get("attention_mask")), with_kwargs=True)
             for layer in model.model.layers]
    try:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=attention_mask, use_cache=False)  # a training step's: no KV cache
    finally:
        for h in hooks:
            h.remove()
    return seen


def test_same_logits_as_sdpa_with_and_without_a_padding_mask():
    plain, fixed = _pair()
    assert fixed.config._attn_implementation == "sdpa_unpadded"
    ids = torch.randint(3, 97, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # a left-padded row keeps its mask
    for m in (mask, None):
        with torch.no_grad():
            a, b = plain(input_ids=ids, attention_mask=m).logits, fixed(input_ids=ids, attention_mask=m).logits
        assert torch.equal(a, b)


def test_no_mask_is_built_while_a_graph_is_captured(monkeypatch):
    plain, fixed = _pair()
    ids = torch.randint(3, 97, (2, 9), generator=torch.Generator().manual_seed(2))
    assert all(m is None for m in _masks_seen(plain, ids) + _masks_seen(fixed, ids))  # outside a capture: causal
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert all(m is None for m in _masks_seen(fixed, ids))
    # what the fix is for: plain sdpa builds a [B, 1, S, S] mask while capturing
    assert all(torch.is_tensor(m) for m in _masks_seen(plain, ids))


@pytest.mark.parametrize("fix", [True, False])
def test_compiled_layers_do_not_recompile_on_the_capture_pass(monkeypatch, fix):
    torch._dynamo.reset()
    model = random_llama(CONFIG, seed=0)
    model.config._attn_implementation = "sdpa"
    if fix:
        capture_stable_sdpa(model)
    for layer in model.model.layers:
        layer.compile(backend="eager")
    ids = torch.randint(3, 97, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)  # the warm-up: compiles
        before = counters["stats"]["unique_graphs"]
        monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
        model(input_ids=ids, use_cache=False)  # the capture pass
    new = counters["stats"]["unique_graphs"] - before
    assert (new == 0) if fix else (new > 0), new
    torch._dynamo.reset()


def test_a_given_mask_is_built_alike_inside_and_outside_a_capture(monkeypatch):
    """A batch padded to the graph's shape passes a 2-D mask, and one whose rows happen to be all full must not lose
    it outside the capture only (plain sdpa does: None in the warm-up, a tensor while capturing, so compiled layers
    recompiled inside the route stage's capture)."""
    plain, fixed = _pair()
    ids = torch.randint(3, 97, (2, 9), generator=torch.Generator().manual_seed(4))
    full = torch.ones_like(ids)
    outside = _masks_seen(fixed, ids, full)
    assert all(m is None for m in _masks_seen(plain, ids, full))  # what plain sdpa does outside a capture
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    inside = _masks_seen(fixed, ids, full)
    assert all(torch.is_tensor(m) for m in outside + inside)
    assert all(torch.equal(a, b) for a, b in zip(outside, inside, strict=True))
