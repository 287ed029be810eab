"""Stage ``bench``: end-to-end generation latency per routing strategy and number of adapters.

    python -m pipeline.bench experiment=dlp_latency
    python -m pipeline.bench bench.shapes=[default] bench.num_adapters=[1,4,16] bench.engines=[eager]

Latency needs shapes, not trained weights, so the adapters are random PEFT LoRAs written on the fly with the
configured ``adapter`` (r, alpha, targets) and the routers are fresh (untrained) ones: meteora gates route every
token to its top-k, the dlp router picks a nucleus once per sequence. For each shape (``default`` = the
configured model; ``llama3_8b`` = a random-weight LLaMA-3-8B-shaped model, bf16, CUDA only), engine
(``eager`` / ``static``, the latter CUDA only), batch size, prompt length and number of adapters it measures:

  base            the plain model                      peft       one unmerged LoRA through peft
  oracle          loramux, each sequence's own adapter  lora_b     loramux, one adapter for all
  meteora-top1/2  loramux token gates, top-k            dlp        loramux sentence router, top-p 0.6
  merge           loramux, all adapters weighted 1/L

Each row: prefill tokens/s, decode ms/token (see ``pipeline.latency``) and ``ratio_to_base`` = decode time over
the base model's with the same shape, engine, batch and prompt length. On CUDA the kernels/ micro-benchmark
(``python -m kernels.bench``) runs too, its table saved beside. Combinations a device cannot run are logged and
left out (never silently faked).
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from pipeline.entry import CONF_DIR, user_errors
from pipeline.stage import StageRun

log = logging.getLogger(__name__)
LOADED = {"oracle": ("oracle", {}), "lora_b": ("lora_b", None), "merge": ("merge", {}),
          "meteora-top1": ("meteora", {"top_k": 1}), "meteora-top2": ("meteora", {"top_k": 2}),
          "dlp": ("dlp", {"top_p": 0.6}), "dlp_segments": ("dlp_segments", {"top_p": 0.6})}
LLAMA3_8B = {"vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
             "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 8192,
             "rope_theta": 500000.0, "tie_word_embeddings": False}


def build_shape(cfg: DictConfig, shape: str):
    """``(model, vocab_size, device)`` for a shape; None where this machine cannot hold it."""
    from hydra.utils import instantiate

    if shape == "default":
        model, tok = instantiate(cfg.model)
        return model, len(tok), next(model.parameters()).device
    if shape == "llama3_8b":
        if not torch.cuda.is_available():
            log.warning("bench: shape llama3_8b needs a CUDA GPU (16 GB of bf16 weights); skipped on this machine")
            return None
        from transformers import LlamaConfig, LlamaForCausalLM

        with torch.device("cuda"):
            model = LlamaForCausalLM(LlamaConfig(**LLAMA3_8B)).to(torch.bfloat16).eval()
        model.requires_grad_(False)
        model.config.name_or_path = "random-llama3-8b-shape"
        return model, LLAMA3_8B["vocab_size"], torch.device("cuda")
    raise ValueError(f"bench.shapes entry {shape!r} is not known; use default or llama3_8b")


def random_adapter(model, out_dir, adapter_cfg: DictConfig, seed: int = 0) -> Path:
    """Write a random (non-zero B) PEFT LoRA for ``model`` with the configured r/alpha/targets; model unchanged."""
    from hydra.utils import instantiate
    from peft import get_peft_model

    torch.manual_seed(seed)
    pm = get_peft_model(model, instantiate(adapter_cfg))
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.02)
    pm.save_pretrained(out_dir)
    pm.unload()
    return Path(out_dir)


def _measure(generate, vocab, device, b, s, cfg, engine):
    from pipeline.latency import random_batch, time_generate

    ids, mask = random_batch(vocab, b, s, device, seed=int(cfg.seed))
    return time_generate(generate, ids, mask, int(cfg.bench.new_tokens), warmup=int(cfg.bench.warmup),
                         repeats=int(cfg.bench.repeats), engine=engine)


def bench_shape(cfg: DictConfig, shape: str, rows: list) -> None:
    """All rows of one shape (appended to ``rows``)."""
    from peft import PeftModel

    from models import MultiLoRAModel

    built = build_shape(cfg, shape)
    if built is None:
        return
    model, vocab, device = built
    b_cfg, strategies = cfg.bench, list(cfg.bench.strategies)
    engines = [e for e in b_cfg.engines if e == "eager" or device.type == "cuda"]
    if len(engines) < len(b_cfg.engines):
        log.warning("bench: engine static needs CUDA; measuring %s only", engines)
    with tempfile.TemporaryDirectory(prefix="loramux-bench-") as tmp:
        adapter = random_adapter(model, Path(tmp) / "random", cfg.adapter, int(cfg.seed))

        def record(strategy, n, engine, b, s, m):
            rows.append({"shape": shape, "engine": engine, "strategy": strategy, "num_adapters": n, "batch_size": b,
                         "prompt_len": s, "new_tokens": int(b_cfg.new_tokens), **m})

        grid = [(e, b, s) for e in engines for b in b_cfg.batch_sizes for s in b_cfg.prompt_lengths]
        if "base" in strategies:
            for e, b, s in grid:
                gen = model.generate
                record("base", 0, e, b, s, _measure(lambda i, m, g=gen, **k: g(input_ids=i, attention_mask=m, **k),
                                                    vocab, device, b, s, cfg, e))
        if "peft" in strategies:
            pm = PeftModel.from_pretrained(model, str(adapter))
            pm.eval()
            for e, b, s in grid:
                record("peft", 1, e, b, s, _measure(lambda i, m, g=pm.generate, **k: g(input_ids=i, attention_mask=m,
                                                                                         **k), vocab, device, b, s, cfg, e))
            model = pm.unload()
        multi = [st for st in strategies if st in LOADED]
        for n in b_cfg.num_adapters:
            if not multi:
                break
            mm = MultiLoRAModel.from_adapters(model, {f"a{i}": adapter for i in range(int(n))}, router="base",
                                              check_base_name=False)
            for st in multi:
                name, kw = LOADED[st]
                if name == "meteora" and kw["top_k"] > int(n):
                    continue
                mm.set_router(name, **({"adapter": "a0"} if kw is None else kw))
                for e, b, s in grid:
                    mm.set_routing(task_ids=[0] * b if name == "oracle" else None)
                    try:
                        m = _measure(lambda i, a, mm=mm, **k: mm.generate(i, attention_mask=a, **k), vocab, device, b, s,
                                     cfg, e)
                    except Exception as err:  # noqa: BLE001 a combination this device cannot run is reported
                        log.warning("bench: %s n=%s %s b=%s s=%s failed: %s", st, n, e, b, s, err)
                        continue
                    record(st, int(n), e, b, s, m)
            model = mm.unwrap()


def add_ratios(rows: list) -> None:
    """``ratio_to_base`` = decode ms/token over base's, same shape / engine / batch / prompt length."""
    base = {(r["shape"], r["engine"], r["batch_size"], r["prompt_len"]): r["decode_ms_per_token"]
            for r in rows if r["strategy"] == "base"}
    for r in rows:
        ref = base.get((r["shape"], r["engine"], r["batch_size"], r["prompt_len"]))
        r["ratio_to_base"] = round(r["decode_ms_per_token"] / ref, 3) if ref else None


def kernel_micro(run_dir: Path) -> dict | None:
    """On CUDA: ``python -m kernels.bench`` into ``<run_dir>/kernel`` (a subset of T); its JSON, else None."""
    if not torch.cuda.is_available():
        log.info("bench: kernels micro-benchmark needs CUDA; skipped")
        return None
    import json

    from kernels import bench as kbench

    out = run_dir / "kernel"
    kbench.main(["--out", str(out), "--tokens", "1", "64", "1024", "--shapes", "0"])
    return json.loads((out / "kernel_bench.json").read_text())


def bench(cfg: DictConfig) -> float | None:
    """Measure every configured combination; return the largest decode ratio to base of a loramux strategy."""
    with StageRun(cfg) as run:
        rows: list = []
        for shape in cfg.bench.shapes:
            bench_shape(cfg, str(shape), rows)
        add_ratios(rows)
        if not rows:
            raise ValueError("bench measured nothing on this machine; use bench.shapes=[default] "
                             "bench.engines=[eager]")
        kernel = kernel_micro(run.run_dir) if cfg.bench.get("kernel_micro") else None
        ratios = [r["ratio_to_base"] for r in rows if r["ratio_to_base"] and r["strategy"] not in ("base", "peft")]
        metrics = {"rows": len(rows), "max_ratio_to_base": max(ratios) if ratios else None}
        for r in rows:
            key = f"{r['shape']}/{r['engine']}/{r['strategy']}/n{r['num_adapters']}/b{r['batch_size']}/s{r['prompt_len']}"
            metrics[f"{key}/decode_ms_per_token"] = r["decode_ms_per_token"]
        if run.tracker is not None:
            cols = list(rows[0].keys())
            run.tracker.log_table("bench/latency", cols, [[r.get(c) for c in cols] for r in rows])
        return run.finish(tasks=list(cfg.tasks), strategy=None, metrics=metrics, main_metric="max_ratio_to_base",
                          rows=rows, extra={"bench": OmegaConf.to_container(cfg.bench, resolve=True),
                                            "kernel_rows": (kernel or {}).get("rows")})


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="bench")
def main(cfg: DictConfig) -> float | None:
    with user_errors():
        return bench(cfg)


if __name__ == "__main__":
    main()
