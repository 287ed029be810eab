"""The one builder of random-weight LLaMA models: the tiny test model, its cached asset, the 8B-shaped bench model.

    model = random_llama({"hidden_size": 64, "num_hidden_layers": 2, ...}, seed=0)                 # fp32, CPU
    model = random_llama(LLAMA3_8B, dtype=torch.bfloat16, device="cuda")                          # built in place

The weights are ``LlamaForCausalLM``'s own initialisation, drawn directly in ``dtype`` on ``device`` (a 16 GB bf16
model never exists in fp32 first). ``seed`` fixes them: the same seed and config give the same weights, whichever
caller builds them (the tiny HF dir and its GGUF twin in models/tiny.py, the cached tiny asset in data/assets.py).
The model comes back in eval mode.
"""

from __future__ import annotations

import contextlib


@contextlib.contextmanager
def _default_dtype(dtype):
    import torch

    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def random_llama(config, *, seed: int | None = None, dtype=None, device="cpu"):
    """A random-weight ``LlamaForCausalLM`` of ``config`` (a dict of ``LlamaConfig`` kwargs or a ``LlamaConfig``)."""
    # lazy: common/ is imported by tools that never build a model (reports, benchmarks' writers)
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = config if isinstance(config, LlamaConfig) else LlamaConfig(**config)
    if seed is not None:
        torch.manual_seed(seed)
    with torch.device(device), _default_dtype(dtype or torch.float32):
        return LlamaForCausalLM(cfg).eval()
