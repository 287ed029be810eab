"""Latency of generation: prefill tokens/s, decode ms/token and peak memory for one model call, end to end.

Decode cost is separated from prefill by timing two greedy generations of the same batch, one of 1 new token
and one of N (``min_new_tokens`` forces the length, and the output length is checked: a random-weight model
that emits EOS early would otherwise time fewer steps): decode ms/token = (t_N - t_1) / (N - 1), prefill
tokens/s = batch x prompt tokens / t_1. Each is the median of ``repeats`` runs after one untimed 1-token call and
``warmup`` N-token runs (``time_interleaved``: several contestants' runs in interleaved rounds, each pair kept, so
two contestants' times pair up by round); CUDA is
synchronised around every timed call, and ``peak_mem_gb`` is ``torch.cuda.max_memory_allocated`` over the
timed calls (None on CPU).

Engines: ``eager`` is ``model.generate`` with the dynamic KV cache (what users run today); ``static`` asks
transformers for a static KV cache (``cache_implementation="static"``). With ``compile`` (a
``transformers.CompileConfig``) generate compiles the decode step (``torch.compile``, mode ``reduce-overhead`` =
CUDA graphs: the weight-bandwidth floor is only visible there); transformers does that by itself on CUDA, and on
CPU only when the config says ``_compile_all_devices`` (tests use ``backend="eager"``: dynamo traces every line,
no C++ build). ``compile=None`` passes ``disable_compile=True``: a static cache without compilation.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from peft import get_peft_model
from transformers import CompileConfig

from common.atomic import atomic_write_text


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def random_batch(vocab_size: int, batch: int, prompt_len: int, device, seed: int = 0):
    """Random prompt ids (no padding) and their all-ones attention mask."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, max(11, vocab_size - 10), (batch, prompt_len), generator=g)
    return ids.to(device), torch.ones_like(ids, device=device)


def compile_config(backend: str = "inductor", mode: str | None = "reduce-overhead", fullgraph: bool = False,
                   all_devices: bool = False):
    """A ``transformers.CompileConfig`` for generate's decode step (``all_devices``: compile on CPU too)."""
    kw = {"backend": backend, "fullgraph": fullgraph}
    if mode:
        kw["mode"] = mode
    cc = CompileConfig(**kw)
    if all_devices:
        cc._compile_all_devices = True
    return cc


def generate_kwargs(engine: str, compile=None) -> dict:
    """generate() keyword arguments of an engine: greedy, plus the static cache and its compile choice."""
    kw = {"do_sample": False}
    if engine == "static":
        kw["cache_implementation"] = "static"
        if compile is None:
            kw["disable_compile"] = True
        else:
            kw["compile_config"] = compile
    elif engine != "eager":
        raise ValueError(f"engine={engine!r} is not known; use eager or static")
    return kw


def _timer(generate, ids, mask, kw: dict):
    """``once(n)``: the seconds of one greedy generate call of exactly ``n`` new tokens, the device synchronised
    around it (raises when the output is not ``n`` long: a decode time would be wrong)."""
    def once(n):
        _sync(ids.device)
        t0 = time.perf_counter()
        with torch.no_grad():
            out = generate(ids, mask, max_new_tokens=n, min_new_tokens=n, **kw)
        _sync(ids.device)
        seconds = time.perf_counter() - t0
        seqs = out if torch.is_tensor(out) else out.sequences
        if seqs.shape[-1] != ids.shape[-1] + n:
            raise RuntimeError(f"generate made {seqs.shape[-1] - ids.shape[-1]} new tokens, asked for exactly {n} "
                               f"(min_new_tokens ignored?); decode time would be wrong")
        return seconds
    return once


def _summary(pairs: list, ids, new_tokens: int, peak) -> dict:
    # the decode time is the median of the pairs' differences, not a difference of two medians taken apart
    t1 = statistics.median(a for a, _ in pairs)
    tn = statistics.median(b for _, b in pairs)
    decode = statistics.median(b - a for a, b in pairs)
    b, s = ids.shape
    return {"prefill_tok_s": round(b * s / t1, 2), "prefill_ms": round(1000 * t1, 3),
            "decode_ms_per_token": round(1000 * max(decode, 0) / (new_tokens - 1), 4),
            "t1_s": round(t1, 5), "tN_s": round(tn, 5), "peak_mem_gb": peak}


def _peak(device):
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 3) if device.type == "cuda" else None


def time_generate(generate, ids, mask, new_tokens: int, *, warmup: int = 1, repeats: int = 3,
                  engine: str = "eager", compile=None) -> dict:
    """``{"prefill_tok_s", "prefill_ms", "decode_ms_per_token", "t1_s", "tN_s", "peak_mem_gb"}`` for
    ``generate(ids, mask, **kw)``; raises when the output is not exactly ``new_tokens`` long."""
    new_tokens = max(2, int(new_tokens))
    once = _timer(generate, ids, mask, generate_kwargs(engine, compile))
    once(1)  # untimed: first-call costs (lazy init, cache allocation) never land in t_1, even with warmup=0
    for _ in range(max(0, warmup)):
        once(new_tokens)
    if ids.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(ids.device)
    # interleaved pairs (1 token, then new_tokens): a slow stretch of the host lands in both halves of a pair
    pairs = [(once(1), once(new_tokens)) for _ in range(max(1, repeats))]
    return _summary(pairs, ids, new_tokens, _peak(ids.device))


def time_interleaved(gens: dict, ids, mask, new_tokens: int, *, warmup: int = 1, repeats: int = 3,
                     engine: str = "eager") -> dict:
    """``time_generate`` for several contestants (``{name: generate}``) at once, in interleaved rounds: each warms
    up alone (its ``peak_mem_gb`` is the peak of its warm-up), then round i times one (t_1, t_N) pair of every
    contestant in ``round_order(names, i)``. ``{name: time_generate's dict + "rounds": [[t_1, t_N], ...]}``: the
    i-th pair of two contestants share a round (a slow phase of the host hits both), so their decode-time ratio
    pairs up by round (``pipeline.report.statistics.paired_time_ratios``)."""
    new_tokens = max(2, int(new_tokens))
    kw = generate_kwargs(engine)
    timers = {name: _timer(g, ids, mask, kw) for name, g in gens.items()}
    peaks = {}
    for name, once in timers.items():
        if ids.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(ids.device)
        once(1)
        for _ in range(max(0, warmup)):
            once(new_tokens)
        peaks[name] = _peak(ids.device)
    pairs: dict = {name: [] for name in timers}
    for i in range(max(1, repeats)):
        for name in round_order(list(timers), i):
            pairs[name].append((timers[name](1), timers[name](new_tokens)))
    return {name: {**_summary(p, ids, new_tokens, peaks[name]), "rounds": [[round(a, 6), round(b, 6)] for a, b in p]}
            for name, p in pairs.items()}


def round_order(items: list, i: int) -> list:
    """The order of interleaved round ``i``: ``items`` rotated to start at the i-th, so no variant always runs first
    (after the host's pause between rounds) or right after the same neighbour's cache and allocator state."""
    k = i % len(items) if items else 0
    return items[k:] + items[:k]


def random_adapter(model, out_dir, adapter_cfg: DictConfig, seed: int = 0) -> Path:
    """Write a random (non-zero B) PEFT LoRA for ``model`` with the configured r/alpha/targets; model unchanged."""
    torch.manual_seed(seed)
    pm = get_peft_model(model, instantiate(adapter_cfg, _convert_="all"))  # plain lists: the config is saved as JSON
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.02)
    pm.save_pretrained(out_dir)
    pm.unload()
    return Path(out_dir)


def written_by(experiment: str, provenance: dict, overrides: str = "") -> str:
    """The provenance line that opens a bench suite's committed page: its command (with ``overrides`` that name
    where it wrote), code version, device, date and package versions."""
    p = provenance
    cmd = f"python -m pipeline.bench experiment={experiment}" + (f" {overrides}" if overrides else "")
    return (f"Written by `{cmd}` at git `{p['git_sha']}` on {p['device']}, "
            f"{p['date']}; versions {', '.join(f'{k} {v}' for k, v in p['versions'].items())}.")


def rebuild_page(json_path, derive: Callable[[dict], None], markdown: Callable[[dict], str]) -> Path:
    """Re-derive what a committed bench table computes from its raw rows or records (``derive(doc)``, in place),
    rewrite its JSON and write its Markdown page (``markdown(doc)``) beside it; returns the page's path."""
    path = Path(json_path)
    doc = json.loads(path.read_text())
    derive(doc)
    atomic_write_text(path, json.dumps(doc, indent=1) + "\n")
    return atomic_write_text(path.with_suffix(".md"), markdown(doc))


def rebuild_cli(name: str, rebuild: Callable[[str], Path]) -> None:
    """``python -m pipeline.<name> outputs/tables/<name>.json``: rebuild that page, print its path."""
    if len(sys.argv) != 2 or not sys.argv[1].endswith(".json"):
        sys.exit(f"usage: python -m pipeline.{name} outputs/tables/{name}.json (rebuilds the .md from it)")
    print(rebuild(sys.argv[1]))
