"""Causal SDPA whose mask does not change when a CUDA graph is being captured.

transformers decides per forward whether SDPA gets an explicit mask or runs with ``is_causal``. A call without an
attention mask normally takes ``is_causal`` (no mask built). But transformers' mask code asks
``is_tracing()``, and that includes ``torch.cuda.is_current_stream_capturing()``. So inside a CUDA graph capture,
the same call builds a [B, 1, S, S] boolean mask and hands it to every layer (``masking_utils``: the causal-skip
check and the packed-sequence detection both answer differently while capturing). Two costs follow for a training
step captured whole (``pipeline.runtime.step_graph``):
  - compiled decoder layers see ``attention_mask`` go from None (warm-up) to a tensor (capture). Dynamo's guard
    ``attention_mask is None`` fails, and it recompiles inside the capture, where inductor's constant folding reads
    values back to the host, which a capture refuses;
  - eager layers replay attention with a materialised mask instead of the causal kernel.

``capture_stable_sdpa(model)`` registers ``sdpa_unpadded``: transformers' own SDPA attention with a mask function
that returns None for a call without a 2-D attention mask (the causal kernel, as outside a capture) and
transformers' ``sdpa_mask`` otherwise, never skipped (a batch given a 2-D mask gets the 4-D mask even when none of
its rows is padded: transformers skips it then, but only outside a capture; the route stage's padded batches
recompiled inside the capture that way). A padded batch passes its mask and keeps it. This assumes rows are never
packed (several sequences in one row told apart by position ids), and no stage here packs rows. Outside a capture
the logits are the same as plain ``sdpa``.

``gqa_decode(model)`` (a context manager) makes the model attend through ``sdpa_gqa_decode`` for its duration:
transformers' SDPA attention, except that a single query token per row over grouped key / value heads (a decode
step; SmolLM2: 9 query heads on 3 KV heads, LLaMA-3-8B 32 on 8, Gemma-3-270M 4 on 1) runs as one SDPA of each KV
head's group of query heads, packed as that head's query positions, on the cache as it is. transformers up to 5.17
(the GPU's) instead repeats every key and value head once per query head of its group whenever a mask is given,
as a decode step over a padded batch or a static cache always has: it writes and reads the whole cache twice to
three times more at every step, in every layer (at evaluate's long prompts, the cache is most of a decode step's
traffic). transformers 5.24 packs the same way itself. The same arithmetic: each query head meets its own KV head's
keys, only the kernel's batching differs (float rounding). Models on other attention implementations are left
as they are.
"""

from __future__ import annotations

import contextlib

import torch

NAME = "sdpa_unpadded"
DECODE = "sdpa_gqa_decode"
SDPA = ("sdpa", NAME, DECODE)  # the implementations that attend through SDPA


def _mask_unless_padded(*args, attention_mask=None, **kwargs):
    from transformers.masking_utils import sdpa_mask

    if attention_mask is None:
        return None
    # a padded batch always gets its mask: transformers would skip it for a batch whose rows are all full, but only
    # outside a capture (reading the mask's values is refused inside one), so the two would differ
    kwargs["allow_is_causal_skip"] = False
    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def register() -> str:
    """Register ``sdpa_unpadded`` with transformers' attention and mask interfaces (idempotent); returns its name."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    AttentionInterface.register(NAME, sdpa_attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, _mask_unless_padded)
    return NAME


def capture_stable_sdpa(model):
    """Make ``model`` (a HF model on SDPA) attend through ``sdpa_unpadded``; other attention implementations (eager,
    flash) are left as they are. Returns the model."""
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "_attn_implementation", None) == "sdpa":
        config._attn_implementation = register()
    return model


def _gqa_decode_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """``sdpa_gqa_decode``: one query token per row over grouped KV heads as one SDPA per KV head's group (module
    doc); anything else (prefill, no grouping, no mask, a position bias, dropout) is transformers' SDPA attention.
    Returns ``([B, 1, heads, head_dim], None)`` as that does."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    groups = int(getattr(module, "num_key_value_groups", 1) or 1)
    if (query.shape[2] != 1 or groups <= 1 or attention_mask is None or attention_mask.dim() != 4
            or attention_mask.shape[1] != 1 or attention_mask.shape[2] != 1 or dropout
            or kwargs.get("position_bias") is not None or kwargs.get("softcap") is not None
            or query.shape[1] != key.shape[1] * groups):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    b, heads, _, dim = query.shape
    packed = query.reshape(b, heads // groups, groups, dim)  # query head h sits in KV head h // groups' group
    out = torch.nn.functional.scaled_dot_product_attention(packed, key, value, attn_mask=attention_mask,
                                                           scale=scaling)
    return out.reshape(b, heads, 1, value.shape[-1]).transpose(1, 2).contiguous(), None


def register_gqa_decode() -> str:
    """Register ``sdpa_gqa_decode`` with transformers' attention and mask interfaces (idempotent; the mask of a
    prefill is SDPA's); returns its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(DECODE, _gqa_decode_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(DECODE, sdpa_mask)
    return DECODE


@contextlib.contextmanager
def gqa_decode(model):
    """While open, ``model`` (a transformers model, a peft model around one, or a ``MultiLoRAModel``: its model)
    attends through ``sdpa_gqa_decode`` where it attended through SDPA (its config, its text config and every
    sub-config); on leaving every one of them gets its own implementation back."""
    if hasattr(model, "routing") and hasattr(model, "ctx"):  # a MultiLoRAModel
        model = model.model
    config = getattr(model, "config", None)
    configs = _configs(config) if config is not None else []
    before = [(c, getattr(c, "_attn_implementation", None)) for c in configs]
    if config is None or getattr(config, "_attn_implementation", None) not in SDPA:
        yield
        return
    config._attn_implementation = register_gqa_decode()  # its setter sets the sub-configs too
    for c, impl in before[1:]:  # a sub-config on another implementation keeps it
        if impl not in SDPA:
            c._attn_implementation = impl
    try:
        yield
    finally:
        for c, impl in before:  # the top config first: its setter sets the sub-configs, each then gets its own
            c._attn_implementation = impl


def _configs(config) -> list:
    """``config``, then its text config and every sub-config reachable from it, each once."""
    seen, order, stack = set(), [], [config, getattr(config, "get_text_config", lambda: config)()]
    while stack:
        c = stack.pop(0)
        if c is None or id(c) in seen or not hasattr(c, "_attn_implementation"):
            continue
        seen.add(id(c))
        order.append(c)
        stack += [getattr(c, key, None) for key in getattr(c, "sub_configs", {}) or {}]
    return order
