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
"""

from __future__ import annotations

NAME = "sdpa_unpadded"


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
