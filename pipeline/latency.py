"""Latency of generation: prefill tokens/s and decode ms/token for one model call, measured end to end.

Decode cost is separated from prefill by timing two greedy generations of the same batch, one of 1 new token
and one of N (``min_new_tokens`` forces the length): decode ms/token = (t_N - t_1) / (N - 1), prefill tokens/s
= batch x prompt tokens / t_1. Each is the median of ``repeats`` runs after ``warmup`` runs; CUDA is
synchronised around every timed call.

Engines: ``eager`` is ``model.generate`` with the dynamic KV cache (what users run today); ``static`` asks
transformers for a static KV cache (``cache_implementation="static"``, compiled with ``torch.compile``), which
is only meaningful on CUDA, where it exposes the weight-bandwidth floor.
"""

from __future__ import annotations

import statistics
import time

import torch


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def random_batch(vocab_size: int, batch: int, prompt_len: int, device, seed: int = 0):
    """Random prompt ids (no padding) and their all-ones attention mask."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, max(11, vocab_size - 10), (batch, prompt_len), generator=g)
    return ids.to(device), torch.ones_like(ids, device=device)


def time_generate(generate, ids, mask, new_tokens: int, *, warmup: int = 1, repeats: int = 3,
                  engine: str = "eager") -> dict:
    """``{"prefill_tok_s", "decode_ms_per_token", "t1_s", "tN_s"}`` for ``generate(ids, mask, **kw)``."""
    kw = {"do_sample": False}
    if engine == "static":
        kw["cache_implementation"] = "static"
    elif engine != "eager":
        raise ValueError(f"engine={engine!r} is not known; use eager or static")
    new_tokens = max(2, int(new_tokens))

    def once(n):
        _sync(ids.device)
        t0 = time.perf_counter()
        with torch.no_grad():
            generate(ids, mask, max_new_tokens=n, min_new_tokens=n, **kw)
        _sync(ids.device)
        return time.perf_counter() - t0

    for _ in range(max(0, warmup)):
        once(new_tokens)
    t1 = statistics.median(once(1) for _ in range(max(1, repeats)))
    tn = statistics.median(once(new_tokens) for _ in range(max(1, repeats)))
    b, s = ids.shape
    return {"prefill_tok_s": round(b * s / t1, 2), "decode_ms_per_token": round(1000 * max(tn - t1, 0) /
                                                                               (new_tokens - 1), 4),
            "t1_s": round(t1, 5), "tN_s": round(tn, 5)}
