"""Stage ``bench``: end-to-end generation latency per routing strategy and number of adapters.

    python -m pipeline.bench experiment=dlp_latency
    python -m pipeline.bench bench.shapes=[default] bench.num_adapters=[1,4,16] bench.engines=[eager]

Latency needs shapes, not trained weights, so the adapters are random PEFT LoRAs written on the fly with the
configured ``adapter`` (r, alpha, targets) and the routers are fresh (untrained) ones: meteora gates route every
token to its top-k, the dlp router picks a nucleus once per sequence. For each shape, engine, batch size, prompt
length and number of adapters it measures:

  base            the plain model                      peft       one unmerged LoRA through peft
  oracle          loramux, each sequence's own adapter  lora_b     loramux, one adapter for all
  meteora-top1/2  loramux token gates, top-k            dlp        loramux sentence router, top-p 0.6
  merge           loramux, all adapters weighted 1/L    dlp_segments  dlp re-routed per prompt segment

Each loramux row is a label of ``bench.routers`` (label -> router overrides): its router comes from
``conf/router/<name>.yaml`` like any stage's, untrained; ``bench.strategies`` picks the rows.

Shapes: ``default`` = the configured model; ``llama3_8b`` = a random-weight LLaMA-3-8B-shaped model in bf16
(CUDA only: 16 GB); ``llama3_8b_tiny`` = the same code path (same config keys, vocab, GQA ratio, bf16) with 2
layers and hidden 64, so CPU tests run every line the GPU runs.

Engines (``pipeline.stages.bench_timing``): ``eager``; ``static`` = static KV cache, decode compiled per ``bench.static``
(backend, mode; CUDA only unless ``bench.static.allow_on_cpu``); a compile that fails falls back to the static
cache without compile. Each row's ``engine`` says what ran: ``eager``, ``static+compile`` or ``static``.
``bench.static.{shapes,strategies,num_adapters}`` restrict the static grid (each combination compiles once).
``bench.max_seconds``: no combination starts after it (skipped ones are listed in metrics.json).
``bench.group_projections`` (auto: on CUDA, as evaluate's ``generation.group_projections``): the bank's model runs
q / k / v and gate / up as one projection each (``MultiLoRAModel.group_projections``), so the loramux rows time
the decode evaluate runs; a row's ``grouped`` says whether it was.

Each row: model, prefill tokens/s and ms, decode ms/token, ``peak_mem_gb`` (CUDA max_memory_allocated over the
timed calls; None on CPU) and ``ratio_to_base`` = decode time over the base model's with the same shape, engine,
batch and prompt length. Eager rows are timed per bank size together (base, peft and every router, interleaved
rounds: ``bench_shape``), so a row's ``alongside`` names its round group, its ``rounds`` the raw (t_1, t_N) pairs,
and its ratio is to the base timed beside it. On CUDA the kernels/ micro-benchmark (``python -m kernels.bench``) runs too when
``bench.kernel_micro``. Combinations a device cannot run are logged and left out (never silently faked).
"""

from __future__ import annotations

import gc
import json
import logging
import tempfile
import time
from pathlib import Path

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from peft import PeftModel

from common.atomic import atomic_write_text
from common.provenance import provenance
from common.random_llama import random_llama
from kernels.bench import kernel_bench as kbench
from models import MultiLoRAModel
from pipeline.runtime.compose import compose
from pipeline.runtime.entry import CONF_DIR, cli, user_errors
from pipeline.runtime.multilora import groups_wanted, strategy_of
from pipeline.runtime.settings import check_settings
from pipeline.runtime.stage import StageRun
from pipeline.stages import e2e_decode as e2e
from pipeline.stages import train_throughput as tt
from pipeline.stages.bench_timing import (
    compile_config,
    generate_kwargs,
    random_adapter,
    random_batch,
    time_generate,
    time_interleaved,
)

log = logging.getLogger(__name__)
SUITES = ("latency", "train_throughput", "e2e_decode")
PLAIN = ("base", "peft")  # rows without the adapter bank: the model alone, one unmerged peft LoRA
LLAMA3_8B = {"vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
             "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 8192,
             "rope_theta": 500000.0, "tie_word_embeddings": False, "bos_token_id": 128000,
             "eos_token_id": 128001}
# name -> (LlamaConfig kwargs, needs CUDA): random weights in bf16; the tiny one is the CPU stand-in of the 8B
SMOLLM2_135M = {"vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                "num_attention_heads": 9, "num_key_value_heads": 3, "max_position_embeddings": 8192,
                "rope_theta": 100000.0, "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2}
SHAPES = {"llama3_8b": (LLAMA3_8B, True),
          "llama3_8b_tiny": ({**LLAMA3_8B, "hidden_size": 64, "intermediate_size": 224, "num_hidden_layers": 2,
                              "num_attention_heads": 8, "num_key_value_heads": 2}, False),
          "smollm2_135m": (SMOLLM2_135M, False),
          "smollm2_135m_tiny": ({**SMOLLM2_135M, "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
                                 "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}, False)}


def shape_model(config: dict, device, dtype=torch.bfloat16, seed: int | None = None):
    """A frozen random-weight LLaMA of ``config`` (``common.random_llama``), in ``dtype`` on ``device``, ready to generate
    (``seed``: the same weights for every copy of the shape)."""
    model = random_llama(config, dtype=dtype, device=device, seed=seed)
    model.requires_grad_(False)
    model.generation_config.pad_token_id = config["eos_token_id"]
    return model


def build_shape(cfg: DictConfig, shape: str):
    """``(model, vocab_size, device, model label, tokenizer)`` for a shape (the tokenizer None for a random-weight
    shape); None where this machine cannot hold it."""
    device = _device(cfg)
    if shape == "default":
        model, tok = instantiate(cfg.model)
        if cfg.model.get("device") is None:  # the model config leaves placement to the stage
            model = model.to(device)
        return model, len(tok), next(model.parameters()).device, Path(str(cfg.model.name_or_path)).name, tok
    if shape not in SHAPES:
        raise ValueError(f"bench.shapes entry {shape!r} is not known; use default, {', '.join(SHAPES)}")
    config, needs_cuda = SHAPES[shape]
    if needs_cuda and device.type != "cuda":
        log.warning("bench: shape %s needs a CUDA GPU (16 GB of bf16 weights); skipped on this machine (its CPU "
                    "stand-in is llama3_8b_tiny)", shape)
        return None
    model = shape_model(config, device, seed=int(cfg.seed))
    model.config.name_or_path = f"random-{shape}"
    return model, config["vocab_size"], device, shape, None


class TimeBudget:
    """``bench.max_seconds``: combinations not started within it are skipped and listed (the rows measured so far
    are still written), so one bench command stays under a hard per-command limit (e.g. 10 min on a lent GPU)."""

    def __init__(self, seconds):
        self.clock = time.perf_counter
        self.t0, self.seconds = self.clock(), (float(seconds) if seconds else None)
        self.skipped: list[str] = []

    def spent(self) -> bool:
        return self.seconds is not None and self.clock() - self.t0 >= self.seconds

    def left(self, what: str) -> bool:
        if not self.spent():
            return True
        if not self.skipped:
            log.warning("bench: bench.max_seconds=%s reached; skipping the remaining combinations", self.seconds)
        self.skipped.append(what)
        return False


class ShapeBench:
    """Times one model (one shape) under every configured engine / batch / prompt length; appends rows."""

    def __init__(self, cfg: DictConfig, shape: str, model, vocab: int, device, label: str, rows: list,
                 budget: TimeBudget | None = None):
        self.budget = budget or TimeBudget(None)
        self.cfg, self.b_cfg, self.shape, self.model = cfg, cfg.bench, shape, model
        self.vocab, self.device, self.label, self.rows = vocab, device, label, rows
        # strategy -> (eager, compiled): it decodes through the bank's projection groups (group_projections)
        self.grouped: dict = {}
        st = self.b_cfg.static
        self.static = st
        engines = list(self.b_cfg.engines)
        if "static" in engines and device.type != "cuda" and not st.allow_on_cpu:
            log.warning("bench: engine static needs CUDA (or bench.static.allow_on_cpu=true); measuring eager only")
            engines = [e for e in engines if e != "static"]
        self.engines = engines

    def _static_allowed(self, strategy: str, n: int) -> bool:
        def ok(key, value):
            sel = self.static[key]
            return sel is None or value in list(sel)
        plain = strategy in ("base", "peft")  # no adapter count to filter on
        return ok("shapes", self.shape) and ok("strategies", strategy) and (plain or ok("num_adapters", n))

    def _compile(self):
        st = self.static
        if not st.compile:
            return None

        return compile_config(str(st.backend), st.mode, bool(st.fullgraph), all_devices=self.device.type != "cuda")

    def _time(self, generate, b, s, engine, compile=None):
        ids, mask = random_batch(self.vocab, b, s, self.device, seed=int(self.cfg.seed))
        return time_generate(generate, ids, mask, int(self.b_cfg.new_tokens), warmup=int(self.b_cfg.warmup),
                             repeats=int(self.b_cfg.repeats), engine=engine, compile=compile)

    def _static(self, generate, b, s) -> tuple[str, dict]:
        """Static cache, compiled when configured; a compile failure falls back to no compile (logged)."""
        cc = self._compile()
        if cc is not None:
            torch._dynamo.reset()  # a fresh compile per combination: no stale guards, no recompile limit
            self.model.__dict__.pop("_compiled_call", None)
            try:
                m = self._time(generate, b, s, "static", cc)
                if "_compiled_call" in self.model.__dict__:
                    return "static+compile", m
                log.warning("bench: generate did not compile (transformers' auto-compile criteria); static only")
                return "static", m
            except Exception as err:  # noqa: BLE001 reported, then measured without compile
                log.warning("bench: static+compile failed (%s: %s); measuring the static cache without compile",
                            type(err).__name__, str(err)[:300])
                torch._dynamo.reset()
                self.model.__dict__.pop("_compiled_call", None)
        return "static", self._time(generate, b, s, "static", None)

    def _grid(self, what: str):
        """The (batch, prompt length) pairs of the bench the time budget still lets start (``what`` names the
        combination in the budget's list of skipped ones)."""
        for b in self.b_cfg.batch_sizes:
            for s in self.b_cfg.prompt_lengths:
                if self.budget.left(f"{self.shape}/{what}/b{b}/s{s}"):
                    yield int(b), int(s)

    def _row(self, engine: str, strategy: str, n: int, b: int, s: int, measured: dict, **extra) -> None:
        grouped = self.grouped.get(strategy, (False, False))[engine == "static+compile"]
        self.rows.append({"model": self.label, "shape": self.shape, "engine": engine, "strategy": strategy,
                          "num_adapters": n, "batch_size": b, "prompt_len": s,
                          "new_tokens": int(self.b_cfg.new_tokens), "grouped": grouped, **extra, **measured})

    def measure(self, strategy: str, n: int, generate, engines=None) -> None:
        """One strategy alone under ``engines`` (default every configured one): one row per batch and prompt."""
        for engine in self.engines if engines is None else engines:
            if engine == "static" and not self._static_allowed(strategy, n):
                continue
            for b, s in self._grid(f"{engine}/{strategy}/n{n}"):
                try:
                    if engine == "static":
                        ran, m = self._static(generate, b, s)
                    else:
                        ran, m = engine, self._time(generate, b, s, engine)
                except Exception as err:  # noqa: BLE001 a combination this device cannot run is reported
                    log.warning("bench: %s %s n=%s %s b=%s s=%s failed: %s", self.shape, strategy, n, engine, b, s,
                                err)
                    continue
                self._row(ran, strategy, n, b, s, m)

    def measure_together(self, gens: dict, alongside: int | None) -> None:
        """Eager decode of several strategies (``{strategy: (num_adapters, generate)}``) in interleaved rounds
        (``time_interleaved``), one row each per batch and prompt, with its ``rounds`` and ``alongside`` (the bank
        size of the round group, so the base and peft rows timed beside each bank size pair with its rows)."""
        if "eager" not in self.engines or not gens:
            return
        for b, s in self._grid(f"eager/{'+'.join(gens)}/n{alongside}"):
            ids, mask = random_batch(self.vocab, b, s, self.device, seed=int(self.cfg.seed))
            runs = {k: v for k, v in gens.items() if self._runs(k, v[0], v[1], ids, mask)}
            if not runs:
                continue
            try:
                out = time_interleaved({k: g for k, (_, g) in runs.items()}, ids, mask, int(self.b_cfg.new_tokens),
                                       warmup=int(self.b_cfg.warmup), repeats=int(self.b_cfg.repeats))
            except Exception as err:  # noqa: BLE001 a combination this device cannot run is reported
                log.warning("bench: %s %s n=%s eager b=%s s=%s failed: %s", self.shape, list(runs), alongside, b, s,
                            err)
                continue
            for strategy, (n, _) in runs.items():
                self._row("eager", strategy, n, b, s, out[strategy], alongside=alongside)

    def _runs(self, strategy: str, n, generate, ids, mask) -> bool:
        """Does ``strategy`` generate on this batch (a prefill and a decode step)? One that cannot (e.g. dlp_segments
        without a tokenizer on a random-weight shape) is reported and left out of its round group, so the others are
        timed."""
        try:
            with torch.no_grad():
                generate(ids, mask, max_new_tokens=2, min_new_tokens=2, **generate_kwargs("eager"))
        except Exception as err:  # noqa: BLE001 reported, the group goes on without it
            log.warning("bench: %s %s n=%s eager b=%s s=%s failed, timed without it: %s", self.shape, strategy, n,
                        ids.shape[0], ids.shape[1], err)
            return False
        return True


def bench_routers(cfg: DictConfig, strategies=None) -> dict:
    """``{label: Strategy}`` of the loramux rows in ``strategies`` (default ``bench.strategies``): each label's router
    overrides in ``bench.routers``, composed from ``conf/router/`` (so its knobs are the configs' own); the routers
    are fresh."""
    strategies = [str(s) for s in (cfg.bench.strategies if strategies is None else strategies)]
    unknown = [s for s in strategies if s not in PLAIN and s not in cfg.bench.routers]
    if unknown:
        raise ValueError(f"bench.strategies {unknown} are not known; use {', '.join(PLAIN)} or a label of "
                         f"bench.routers ({', '.join(cfg.bench.routers)})")
    return {s: strategy_of(compose("bench", list(cfg.bench.routers[s])).router) for s in strategies if s not in PLAIN}


def bench_shape(cfg: DictConfig, shape: str, rows: list, budget: TimeBudget | None = None,
                routers: dict | None = None) -> None:
    """All rows of one shape (appended to ``rows``); ``routers``: ``bench_routers(cfg)``.

    Eager: per bank size n, the base model, peft's single LoRA and every router over a bank of n adapters are timed
    together in interleaved rounds (``ShapeBench.measure_together``), each on its own copy of the model (the bank
    wraps its model's projections in place), so every ratio to base or peft has its baseline timed beside it, round
    by round. Static (compiled: each combination compiles once): one strategy after another."""
    routers = bench_routers(cfg) if routers is None else routers
    built = build_shape(cfg, shape)
    if built is None:
        return
    model, vocab, device, label, tok = built
    strategies = list(cfg.bench.strategies)
    sb = ShapeBench(cfg, shape, model, vocab, device, label, rows, budget)
    static = [e for e in sb.engines if e != "eager"]
    with tempfile.TemporaryDirectory(prefix="loramux-bench-") as tmp:
        adapter = random_adapter(model, Path(tmp) / "random", cfg.adapter, int(cfg.seed))
        plain = {}
        if "base" in strategies:
            plain["base"] = (0, lambda i, m, **k: model.generate(input_ids=i, attention_mask=m, **k))
        if "peft" in strategies:
            pm = PeftModel.from_pretrained(build_shape(cfg, shape)[0], str(adapter))
            pm.eval()
            plain["peft"] = (1, lambda i, m, **k: pm.generate(input_ids=i, attention_mask=m, **k))
        for strategy, (n, gen) in plain.items():
            sb.model = pm.base_model.model if strategy == "peft" else model  # what the static engine compiles
            sb.measure(strategy, n, gen, engines=static)
        sb.model = model
        ns = [int(n) for n in cfg.bench.num_adapters] if routers else []
        if not ns:
            sb.measure_together(plain, None)
        bank_model = build_shape(cfg, shape)[0] if ns else None
        for n in ns:
            if sb.budget.spent():  # no bank is built for combinations that will not run
                sb.budget.skipped.append(f"{shape}/*/n{n}")
                continue
            mm = MultiLoRAModel.from_adapters(bank_model, {f"a{i}": adapter for i in range(n)}, router="base",
                                              check_base_name=False, tokenizer=tok)  # dlp_segments reads the text
            if groups_wanted(cfg.bench.group_projections, mm):
                mm.group_projections()
            banked = {}
            for st, strategy in routers.items():
                try:
                    router = mm.build_router(strategy.build, **strategy.knobs)
                except ValueError as err:  # a router this bank cannot hold (top_k above its size): no row
                    log.info("bench: %s at %s adapters skipped: %s", st, n, err)
                    continue

                def gen(i, a, mm=mm, router=router, needs=strategy.needs_task_ids, **k):
                    mm.set_router(router)
                    mm.set_routing(task_ids=[0] * i.shape[0] if needs else None)  # the oracle: adapter a0
                    return mm.generate(i, attention_mask=a, **k)
                banked[st] = (n, gen)
                sb.grouped[st] = (mm.decodes_grouped(router), mm.decodes_grouped(router, compiled=True))
            sb.measure_together({**plain, **banked}, n)
            sb.model = bank_model
            for st, (_, gen) in banked.items():
                sb.measure(st, n, gen, engines=static)
            sb.model = model
            bank_model = mm.unwrap()


def add_ratios(rows: list) -> None:
    """``ratio_to_base`` = decode ms/token over base's, same shape / engine / batch / prompt length and, where the
    rows were timed together, the same round group (``alongside``)."""
    def key(r):
        return r["shape"], r["engine"], r["batch_size"], r["prompt_len"], r.get("alongside")
    base = {key(r): r["decode_ms_per_token"] for r in rows if r["strategy"] == "base"}
    for r in rows:
        ref = base.get(key(r))
        r["ratio_to_base"] = round(r["decode_ms_per_token"] / ref, 3) if ref else None


def kernel_micro(run_dir: Path) -> dict | None:
    """On CUDA: ``python -m kernels.bench`` into ``<run_dir>/kernel`` (a subset of T); its JSON, else None."""
    if not torch.cuda.is_available():
        log.info("bench: kernels micro-benchmark needs CUDA; skipped")
        return None

    out = run_dir / "kernel"
    kbench.main(["--out", str(out), "--tokens", "1", "64", "1024", "--shapes", "0"])
    return json.loads((out / "kernel_bench.json").read_text())


def _device(cfg: DictConfig) -> torch.device:
    want = str(cfg.bench.device)
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if want == "auto" else want)


def write_table(table_dir, name: str, doc: dict, md: str) -> Path:
    """``<table_dir>/<name>.json`` (rows, config, provenance: what the table is rebuilt from) and ``.md``,
    each written atomically."""
    out = Path(str(table_dir))
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / f"{name}.json", json.dumps(doc, indent=1) + "\n")
    atomic_write_text(out / f"{name}.md", md)
    return out / f"{name}.md"


def train_suite(cfg: DictConfig, run) -> float | None:
    """``bench.suite=train_throughput``: training steps of every variant (``pipeline.stages.train_throughput``)."""
    t = cfg.bench.train
    shape = str(cfg.bench.shapes[0])
    if shape not in SHAPES:
        raise ValueError(f"bench.shapes[0]={shape!r}: the training benchmark needs a random-weight shape, one of "
                         f"{sorted(SHAPES)}")
    config, needs_cuda = SHAPES[shape]
    device = _device(cfg)
    if needs_cuda and device.type != "cuda":
        raise ValueError(f"bench.shapes[0]={shape!r} needs a CUDA GPU; use its CPU stand-in {shape}_tiny")

    def make_model():  # a fresh fp32 model, the same weights every time
        torch.manual_seed(int(cfg.seed))
        return shape_model(config, device, torch.float32)

    rows = tt.run_settings(
        tt.settings_from(t), make_model, cfg.adapter,
        vocab=config["vocab_size"], seq_len=int(t.seq_len), num_adapters=int(t.num_adapters), top_k=int(t.top_k),
        warmup=int(t.warmup), steps=int(t.steps), repeats=int(t.repeats), device=device,
        compile_backend=str(t.compile_backend), profile_dir=run.run_dir, profile=tuple(t.get("profile") or ()),
        warmup_budget_s=cfg.bench.get("max_seconds"))
    tt.add_ratios(rows)
    conf = {"shape": shape, "adapter": OmegaConf.to_container(cfg.adapter, resolve=True),
            **{k: v for k, v in OmegaConf.to_container(t, resolve=True).items()}}
    doc = {"provenance": provenance(int(cfg.seed)), "config": conf, "rows": rows, "targets": tt.verdicts(rows)}
    if cfg.bench.get("table_dir"):
        name = str(t.get("table_name") or tt.TABLE)
        log.info("bench: wrote %s", write_table(cfg.bench.table_dir, name, doc, tt.markdown(doc)))
    metrics = {f"{r['variant']}/{r['precision']}/{'compiled' if r['compiled'] else 'eager'}/b{r['batch_size']}"
               "/tokens_per_s": r["tokens_per_s"] for r in rows}
    ratios = [r["ratio_to_best_peft"] for r in rows if r["variant"] != "peft_single" and r["ratio_to_best_peft"]]
    metrics["min_ratio_to_best_peft"] = min(ratios) if ratios else None
    return run.finish(tasks=[], strategy=None, metrics=metrics, main_metric="min_ratio_to_best_peft", rows=rows,
                      extra={"targets": doc["targets"], "bench": conf})


def e2e_suite(cfg: DictConfig, run) -> float | None:
    """``bench.suite=e2e_decode``: generate's decode time per strategy (``pipeline.stages.e2e_decode``). With
    ``bench.e2e.merge`` the records of an existing table are kept where this run measured nothing (one table can be
    filled by several calls, each under a per-command time limit)."""
    settings = OmegaConf.to_container(cfg.bench.e2e, resolve=True)
    unknown = [s for s in settings["strategies"] if e2e.router_label(s) not in e2e.STRATEGIES]
    unknown += [t for t in settings["targets"] if t not in e2e.TARGETS]
    if unknown:
        raise ValueError(f"bench.e2e: {unknown} not known; strategies {e2e.STRATEGIES} (each may end in "
                         f"one of {e2e.VARIANTS}), targets {sorted(e2e.TARGETS)}")
    routers = bench_routers(cfg, [e2e.router_label(s) for s in settings["strategies"]])
    shape = str(cfg.bench.shapes[0])
    if shape not in SHAPES:
        raise ValueError(f"bench.shapes[0]={shape!r}: e2e_decode needs a random-weight shape, one of {sorted(SHAPES)}")
    config, needs_cuda = SHAPES[shape]
    device = _device(cfg)
    if needs_cuda and device.type != "cuda":
        raise ValueError(f"bench.shapes[0]={shape!r} needs a CUDA GPU; use its CPU stand-in {shape}_tiny")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    def make_model():
        torch.manual_seed(int(cfg.seed))
        return shape_model(config, device, dtype)

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)  # a graph per router
    records: list = []
    adapter = OmegaConf.to_container(cfg.adapter, resolve=True)
    e2e.run(settings, make_model, adapter, config["vocab_size"], device, records, routers,
            cfg.bench.get("max_seconds"), profile_dir=run.run_dir)
    prov = provenance(int(cfg.seed))
    for rec in records:
        rec["provenance"] = prov
    table = Path(str(cfg.bench.table_dir)) / "e2e_decode.json" if cfg.bench.get("table_dir") else None
    if settings.get("merge") and table is not None and table.is_file():
        new = {(r["engine"], r["targets"], r["batch_size"]) for r in records}
        records = [r for r in json.loads(table.read_text())["records"]
                   if (r["engine"], r["targets"], r["batch_size"]) not in new] + records
    conf = {"shape": shape, "dtype": str(dtype).removeprefix("torch."),
            **{k: v for k, v in settings.items() if k != "merge"}}
    doc = {"provenance": prov, "config": conf, "records": records, "rows": e2e.rows_from(records),
           "targets": e2e.verdicts(records)}
    if table is not None:
        log.info("bench: wrote %s", write_table(table.parent, "e2e_decode", doc, e2e.markdown(doc)))
    ratios = [t["ratio"]["median"] for t in doc["targets"] if t.get("ratio")]
    metrics = {"records": len(records), "max_target_ratio": max(ratios) if ratios else None}
    return run.finish(tasks=[], strategy=None, metrics=metrics, main_metric="max_target_ratio", rows=doc["rows"],
                      extra={"targets": doc["targets"], "bench": conf})


def bench(cfg: DictConfig) -> float | None:
    """Measure every configured combination; return the largest decode ratio to base of a loramux strategy
    (``bench.suite=latency``) or the smallest training tokens/s ratio to peft (``train_throughput``)."""
    check_settings(cfg)
    suite = str(cfg.bench.suite)
    if suite not in SUITES:
        raise ValueError(f"bench.suite={suite!r} is not known; use one of {SUITES}")
    routers = bench_routers(cfg) if suite == "latency" else {}  # unknown rows / shapes: refused before a model loads
    unknown = [str(s) for s in cfg.bench.shapes if str(s) != "default" and str(s) not in SHAPES]
    if unknown:
        raise ValueError(f"bench.shapes {unknown} are not known; use default, {', '.join(SHAPES)}")
    with StageRun(cfg) as run:
        if suite == "train_throughput":
            return train_suite(cfg, run)
        if suite == "e2e_decode":
            return e2e_suite(cfg, run)
        rows: list = []
        budget = TimeBudget(cfg.bench.max_seconds)
        for shape in cfg.bench.shapes:
            if budget.spent():
                budget.skipped.append(f"{shape}/*")
                continue
            bench_shape(cfg, str(shape), rows, budget, routers)
            gc.collect()  # the shape's model (16 GB at 8B) goes before the next one is built
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        add_ratios(rows)
        if not rows:
            raise ValueError("bench measured nothing on this machine; use bench.shapes=[default] "
                             "bench.engines=[eager]")
        kernel = kernel_micro(run.run_dir) if cfg.bench.kernel_micro else None
        ratios = [r["ratio_to_base"] for r in rows if r["ratio_to_base"] and r["strategy"] not in ("base", "peft")]
        metrics = {"rows": len(rows), "max_ratio_to_base": max(ratios) if ratios else None,
                   "skipped_for_time": len(budget.skipped)}
        for r in rows:
            key = f"{r['shape']}/{r['engine']}/{r['strategy']}/n{r['num_adapters']}/b{r['batch_size']}/s{r['prompt_len']}"
            metrics[f"{key}/decode_ms_per_token"] = r["decode_ms_per_token"]
        if run.tracker is not None:
            cols = list(rows[0].keys())
            run.tracker.log_table("bench/latency", cols, [[r.get(c) for c in cols] for r in rows])
        return run.finish(tasks=list(cfg.tasks), strategy=None, metrics=metrics, main_metric="max_ratio_to_base",
                          rows=rows, extra={"bench": OmegaConf.to_container(cfg.bench, resolve=True),
                                            "skipped_for_time": budget.skipped,
                                            "kernel_rows": (kernel or {}).get("rows")})


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="bench")
def main(cfg: DictConfig) -> float | None:
    with user_errors(cfg):
        return bench(cfg)


if __name__ == "__main__":
    cli(main)
