"""Training throughput of the fused core beside peft's single LoRA: tokens/s of whole training steps.

    python -m pipeline.bench experiment=train_throughput          # writes outputs/tables/train_throughput.{json,md}

What users run is a training step (forward, loss, backward, AdamW), so that is what is timed, on a random-weight
model of a configured shape (``bench.shapes``, e.g. SmolLM2-135M's: hidden 576, 30 layers, vocab 49152), LoRA of
the configured ``adapter`` (r, alpha, targets), batch B x ``bench.train.seq_len`` random tokens with no padding
(every counted token is real), loss on every token. Variants:

  peft_single      peft's own ``PeftModel``, one LoRA trained
  loramux_single   a bank of one adapter, its A/B trained through ``MultiLoRAModel`` (oracle route)
  loramux_joint    a bank of ``num_adapters``, each batch row routed to its own adapter (row i -> adapter i mod L),
                   every adapter's A/B trained: joint fine-tuning
  loramux_gates    MeteoRA: per-projection token gates over ``num_adapters`` frozen adapters (top-k), gates trained
                   with LM loss + the gate CE against each row's task, in the router's default form (its
                   ``pack_gates`` / ``pack_base``)
  loramux_gates_packed  the same, each projection's base output, shrink and gate logits as one GEMM
                   (``kernels.packed_gate``: ``pack_gates`` and ``pack_base``)
  loramux_gates_packed_lora  the same with the shrink and gate logits as one GEMM, the base GEMM apart
                   (``pack_gates``, ``pack_base`` false)
  loramux_gates_unpacked  the same with the base, shrink and gate GEMMs apart (``pack_gates`` false)
  loramux_gates_unfused  the router's default GEMMs with the route as a coefficient matrix (``fused_route`` off:
                   torch.compile's kernels for the top-k, the multiply and the CE, not ``kernels.gate_mix``'s)

each in ``precision`` fp32 or bf16 (autocast; trained parameters and their AdamW state fp32, frozen weights stored
in bf16, as the pipeline's GPU trainer runs), ``compiled`` false / true (every decoder layer compiled with
``torch.compile``: regional compilation, so routing decisions stay in eager Python at the model's top while each
layer's routed projections are traced (``models.compile``); dynamo's graph-break count is recorded per row),
``compile_modes`` (torch.compile's mode for the compiled layers: default, ``reduce-overhead``: each layer's
forward and backward replayed as CUDA graphs by torch's graph trees, or ``max-autotune-no-cudagraphs``: inductor
autotunes Triton GEMM templates against cuBLAS and fuses the pointwise ops around a product into its epilogue) and ``graph`` false / true (CUDA only: the
whole step, forward, loss, backward and AdamW, captured once in one CUDA graph and replayed; a step then costs the
host one launch, so the row measures the device's work alone. The routing of a step is part of the graph: task ids
live on the device, set once before the capture). Every setting is built and warmed up first (compiles included),
then timed in interleaved rounds (each setting ``steps`` steps per round, ``repeats`` rounds, each round starting
at the next setting: ``bench_timing.round_order``): tokens/s is the median over rounds, so a slow phase of the
machine hits every variant alike. ``peak_gb``: the step's peak CUDA memory above what was held before it, plus this
variant's own parameters and optimizer state (other variants' models stay resident).
"""

from __future__ import annotations

import gc
import logging
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from peft import PeftModel
from torch._dynamo.utils import counters
from torch.profiler import ProfilerActivity, profile

from models import MultiLoRAModel
from models.attention import capture_stable_sdpa
from models.compile import compile_layers
from models.precision import store_frozen
from pipeline.report.statistics import interval_text, median_interval, median_verdict, rounded
from pipeline.runtime.entry import first_line
from pipeline.runtime.step_graph import GraphPool, StepGraphs
from pipeline.stages.bench_timing import random_adapter, rebuild_cli, rebuild_page, round_order, written_by

log = logging.getLogger(__name__)

TABLE = "train_throughput"  # the table's default name under bench.table_dir (bench.train.table_name)
# the gate-training forms the bench names apart from the router's default: the MeteoraRouter attributes they set
GATE_FORMS = {"loramux_gates_packed": {"pack_gates": True, "pack_base": True},
              "loramux_gates_packed_lora": {"pack_gates": True, "pack_base": False},
              "loramux_gates_unpacked": {"pack_gates": False, "pack_base": False},
              "loramux_gates_unfused": {"fused_route": "off"}}
VARIANTS = ("peft_single", "loramux_single", "loramux_joint", "loramux_gates", *GATE_FORMS)
PRECISIONS = ("fp32", "bf16")


@dataclass(frozen=True)
class Setting:
    variant: str
    precision: str
    compiled: bool
    batch_size: int
    graph: bool = False
    compile_mode: str | None = None  # torch.compile's mode for the layers: None (default) or another mode's name

    @property
    def label(self) -> str:
        graph = "/graph" if self.graph else ""
        how = ("compiled" + (f"[{self.compile_mode}]" if self.compile_mode else "")) if self.compiled else "eager"
        return f"{self.variant}/{self.precision}/{how}{graph}/b{self.batch_size}"


class Trainee:
    """One variant ready to step: the model to call, its trainable parameters and optimizer, its routing.

    With ``graph`` (CUDA) the whole step (forward, loss, backward, AdamW) is captured per batch shape and replayed
    (``pipeline.runtime.step_graph``): AdamW is then ``capturable`` (its step count lives on the device), autocast
    keeps no cast cache (a cache would hold tensors from outside the graph's memory pool), and the task ids are
    device tensors set before each capture, so the routing is read inside the graph.
    """

    def __init__(self, setting: Setting, model, params: list, device, num_routed: int = 0, multi=None,
                 graph: bool = False, pool=None):
        self.setting, self.model, self.params, self.device = setting, model, params, device
        self.num_routed, self.multi = num_routed, multi
        cuda = device.type == "cuda"
        self.optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0, fused=cuda, capturable=graph)
        self.graphs = (StepGraphs(self._step, self.optimizer, device, prepare=self._route_on_device, pool=pool)
                       if graph else None)

    def task_ids(self, batch: int) -> torch.Tensor:
        """Row i of a batch -> adapter i mod L (a host tensor: setting it reads nothing back from the device)."""
        return torch.arange(batch) % self.num_routed

    def _route_on_device(self, ids: torch.Tensor):
        if self.multi is None:
            return None
        task_ids = self.task_ids(ids.shape[0]).to(self.device)  # read inside the graph: kept alive with it
        self.multi.set_routing(task_ids=task_ids)
        return task_ids

    def _step(self, ids: torch.Tensor) -> None:
        bf16 = self.setting.precision == "bf16"
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16, cache_enabled=self.graphs is None):
            out = self.model(input_ids=ids, labels=ids, use_cache=False)
        out.loss.backward()
        self.optimizer.step()

    def step(self, ids: torch.Tensor) -> None:
        if self.graphs is not None:
            self.graphs(ids)
            return
        if self.multi is not None:
            self.multi.set_routing(task_ids=self.task_ids(ids.shape[0]))
        if _own_graphs(self.setting.compile_mode):  # the layers' CUDA graph trees: a new iteration begins
            torch.compiler.cudagraph_mark_step_begin()
        self._step(ids)
        self.optimizer.zero_grad(set_to_none=True)

    def release(self, batch: int) -> None:
        """Drop the captured graphs of ``batch`` and the gradients, which live in their memory pool."""
        self.optimizer.zero_grad(set_to_none=True)
        if self.graphs is not None:
            for shape in self.graphs.shapes:
                if shape[0] == batch:
                    self.graphs.release(shape)

    def resident_bytes(self) -> int:
        state = [t for s in self.optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
        return sum(t.numel() * t.element_size() for t in (*self.model.parameters(), *state))


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_trainee(setting: Setting, make_model, adapter_dir, num_adapters: int, top_k: int, device,
                  compile_backend: str, pool=None) -> Trainee:
    """A fresh random model (same seed for every variant) made into ``setting.variant``. Every variant attends through
    ``models.attention.capture_stable_sdpa``: its rows are unpadded, so a captured step runs the causal kernel, as
    the warm-up did, and compiled layers see the same inputs in both. ``pool``: the graph memory pool its captured
    steps share with the other settings (``StepGraphs``)."""
    model = capture_stable_sdpa(make_model())
    if setting.variant == "peft_single":
        pm = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=True)
        pm.train()
        trainee = Trainee(setting, pm, [p for p in pm.parameters() if p.requires_grad], device, graph=setting.graph,
                          pool=pool)
    else:
        n = 1 if setting.variant == "loramux_single" else num_adapters
        mm = MultiLoRAModel.from_adapters(model, {f"a{i}": adapter_dir for i in range(n)}, check_base_name=False)
        if setting.variant.startswith("loramux_gates"):
            mm.set_router("meteora", top_k=top_k)
            for attr, value in GATE_FORMS.get(setting.variant, {}).items():  # none: the router's defaults
                setattr(mm.router, attr, value)  # kernels.packed_gate, kernels.gate_mix
            params = mm.set_trainable("gates")
        else:
            params = mm.set_trainable("adapters")
        mm.train()
        trainee = Trainee(setting, mm, params, device, num_routed=n, multi=mm, graph=setting.graph, pool=pool)
    if setting.precision == "bf16":
        store_frozen(trainee.model, torch.bfloat16)
    if setting.compiled:
        compile_layers(model, backend=compile_backend, mode=setting.compile_mode)
    return trainee


def _peak_gb(trainee: Trainee, ids, steps: int) -> float | None:
    if trainee.device.type != "cuda":
        for _ in range(steps):
            trainee.step(ids)
        return None
    _sync(trainee.device)
    before = torch.cuda.memory_allocated(trainee.device)
    torch.cuda.reset_peak_memory_stats(trainee.device)
    for _ in range(steps):
        trainee.step(ids)
    _sync(trainee.device)
    peak = torch.cuda.max_memory_allocated(trainee.device) - before + trainee.resident_bytes()
    return round(peak / 2**30, 3)


def profile_step(trainee: Trainee, ids, out_path: Path, rows: int = 40) -> None:
    """``torch.profiler`` over one step (after warm-up): the top ops by self device time, then by self CPU time."""
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if trainee.device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        trainee.step(ids)
        _sync(trainee.device)
    ka = prof.key_averages()
    sort_dev = "self_cuda_time_total" if trainee.device.type == "cuda" else "self_cpu_time_total"
    text = (f"# {trainee.setting.label}: one step, torch.profiler\n\n## by self device time\n"
            + ka.table(sort_by=sort_dev, row_limit=rows)
            + "\n\n## by self CPU time\n" + ka.table(sort_by="self_cpu_time_total", row_limit=rows))
    out_path.write_text(text)


def _key(s: Setting) -> tuple:
    return (s.variant, s.precision, s.compiled, s.graph, s.compile_mode)


def _warm_up(s: Setting, built: dict, ids, make_model, adapter_dir, num_adapters: int, top_k: int, device,
             compile_backend: str, warmup: int, start: float, warmup_budget_s: float | None, pool=None) -> dict:
    """Build (once per variant / precision / compile / graph) and warm up one setting; its row's metadata, or
    ``{"error": ...}``: skipped for time, a graph on a CPU, out of memory, a step that cannot be captured."""
    if warmup_budget_s is not None and time.perf_counter() - start > warmup_budget_s:
        return {"error": f"skipped: warm-up budget of {warmup_budget_s:.0f} s spent"}
    if s.graph and device.type != "cuda":
        return {"error": "skipped: a CUDA graph needs a CUDA device"}
    key = _key(s)
    breaks0 = sum(counters["graph_break"].values())
    t0 = time.perf_counter()
    try:
        if key not in built:
            built[key] = build_trainee(s, make_model, adapter_dir, num_adapters, top_k, device, compile_backend, pool)
        trainee = built[key]
        trainee.setting = s
        peak = _peak_gb(trainee, ids, max(1, warmup))
        if trainee.graphs is not None and trainee.graphs.fallback:  # its steps would run eagerly: not this form
            raise RuntimeError(trainee.graphs.fallback)
    except torch.OutOfMemoryError:  # reported as a row without a time, never silently dropped
        log.warning("train bench: %s ran out of device memory; left out of the timing", s.label)
        if key in built:
            built[key].release(s.batch_size)
        gc.collect()
        torch.cuda.empty_cache()
        return {"error": "out of memory"}
    except RuntimeError as e:  # a step that cannot be captured (a host read inside it): a row saying so
        if not (s.graph or s.compile_mode):
            raise
        log.warning("train bench: %s could not be captured: %s", s.label, first_line(e))
        built.pop(key, None)
        gc.collect()
        return {"error": f"capture failed: {first_line(e)[:160]}"}
    warm_s = time.perf_counter() - t0
    log.info("train bench: %s warm (%.1f s)", s.label, warm_s)
    return {"peak_gb": peak, "warmup_s": round(warm_s, 2),
            "graph_breaks": sum(counters["graph_break"].values()) - breaks0 if s.compiled else None}


def run_settings(settings: list[Setting], make_model, adapter_cfg, *, vocab: int, seq_len: int,
                 num_adapters: int, top_k: int, warmup: int, steps: int, repeats: int, device,
                 compile_backend: str = "inductor", profile_dir: Path | None = None,
                 profile: tuple = (), warmup_budget_s: float | None = None) -> list[dict]:
    """Build and warm up every setting, then time them in interleaved rounds, one batch size after another (the
    ratios compare settings of one batch size); one row per setting. A setting whose warm-up would start after
    ``warmup_budget_s`` is reported as skipped (a row without a time)."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)  # a graph per variant
    torch._dynamo.config.automatic_dynamic_shapes = False  # one static graph per batch size
    g = torch.Generator().manual_seed(0)
    batches = {b: torch.randint(10, vocab - 10, (b, seq_len), generator=g).to(device)
               for b in sorted({s.batch_size for s in settings})}
    built: dict = {}  # (variant, precision, compiled, graph) -> Trainee (one model serves every batch size)
    # every captured setting replays in its turn, never two at once: one graph memory pool per batch size holds the
    # largest step's temporaries once (each graph keeps only its gradients and outputs), so its settings fit together
    pooled = device.type == "cuda" and any(s.graph for s in settings)
    meta: dict = {}
    times: dict = {}
    with tempfile.TemporaryDirectory(prefix="loramux-train-bench-") as tmp:
        adapter_dir = random_adapter(make_model(), Path(tmp) / "adapter", adapter_cfg, seed=0)
        start = time.perf_counter()
        # one phase per batch size: its settings are warmed up, then timed in interleaved rounds, then its captured
        # graphs (their gradients, and the pool's share of the step's activations) are released before the next
        for batch in dict.fromkeys(s.batch_size for s in settings):
            phase = [s for s in settings if s.batch_size == batch]
            pool = GraphPool(device) if pooled else None  # the last batch size's pool went with its graphs
            for trainee in built.values():
                if trainee.graphs is not None:
                    trainee.graphs.share_pool(pool.handle)
            for s in phase:
                meta[s] = _warm_up(s, built, batches[batch], make_model, adapter_dir, num_adapters, top_k, device,
                                   compile_backend, warmup, start, warmup_budget_s,
                                   pool.handle if pool is not None else None)
                if profile_dir is not None and s.label in profile and "error" not in meta[s]:
                    profile_step(built[_key(s)], batches[batch],
                                 profile_dir / f"profile_{s.label.replace('/', '_')}.txt")
            timed = [s for s in phase if "error" not in meta[s]]
            times.update({s: [] for s in timed})
            for i in range(repeats):
                for s in round_order(timed, i):
                    trainee = built[_key(s)]
                    trainee.setting = s
                    _sync(device)
                    t0 = time.perf_counter()
                    try:
                        for _ in range(steps):
                            trainee.step(batches[batch])
                        _sync(device)
                    except torch.OutOfMemoryError:  # another setting's memory left too little: a row saying so
                        log.warning("train bench: %s ran out of device memory while timed", s.label)
                        meta[s] = {**meta[s], "error": "out of memory while timed"}
                        timed.remove(s)
                        del times[s]
                        trainee.release(batch)
                        torch.cuda.empty_cache()
                        continue
                    times[s].append((time.perf_counter() - t0) / steps)
            for trainee in built.values():
                trainee.release(batch)
            pool = None
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    rows = []
    for s in settings:
        if s not in times:
            rows.append({**asdict(s), "seq_len": seq_len, "tokens_per_s": None, **meta[s]})
            continue
        ms = statistics.median(times[s]) * 1000
        rows.append({**asdict(s), "seq_len": seq_len, "num_adapters": 1 if s.variant.endswith("single") else num_adapters,
                     "tokens_per_s": round(s.batch_size * seq_len / (ms / 1000), 1), "ms_per_step": round(ms, 3),
                     "ms_per_step_rounds": [round(t * 1000, 3) for t in times[s]], **meta[s]})
    built.clear()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def add_ratios(rows: list[dict]) -> None:
    """``ratio_to_peft``: tokens/s over peft_single's at the same precision, compile and graph choice and batch size, and
    ``ratio_to_best_peft`` over peft_single's best (compiled or not) at the same precision and batch size."""
    def form_key(r):
        return r["precision"], r["compiled"], r.get("graph", False), r.get("compile_mode"), r["batch_size"]

    peft = {form_key(r): r["tokens_per_s"] for r in rows if r["variant"] == "peft_single" and r["tokens_per_s"]}
    best = {}
    for (p, _c, _g, _m, b), v in peft.items():
        best[(p, b)] = max(best.get((p, b), 0.0), v)
    for r in rows:
        ref = peft.get(form_key(r))
        r["ratio_to_peft"] = round(r["tokens_per_s"] / ref, 3) if ref and r["tokens_per_s"] else None
        ref = best.get((r["precision"], r["batch_size"]))
        r["ratio_to_best_peft"] = round(r["tokens_per_s"] / ref, 3) if ref and r["tokens_per_s"] else None


def _own_graphs(mode: str | None) -> bool:
    """Whether torch.compile's ``mode`` captures CUDA graphs of its own (cudagraph trees)."""
    return mode in ("reduce-overhead", "max-autotune")


def settings_from(tcfg) -> list[Setting]:
    """Every (variant, precision, compiled, graph, batch) of ``bench.train``, plus ``extra_batch_sizes`` for the
    listed ``extra_variants`` (bf16, every compile and graph choice: the best-batch search)."""
    variants = list(tcfg.variants)
    bad = [v for v in variants if v not in VARIANTS] + [p for p in tcfg.precisions if p not in PRECISIONS]
    if bad:
        raise ValueError(f"bench.train: {bad} not known; variants are {VARIANTS}, precisions {PRECISIONS}")
    graphs = [bool(g) for g in (tcfg.get("graphs") or [False])]
    modes = [None if m in (None, "default") else str(m) for m in (tcfg.get("compile_modes") or [None])]
    # ``compiled_graph`` (conf/bench.yaml): compiled layers inside the captured step too, the fastest form of every
    # variant on an H200 (outputs/tables/train_throughput_compiled_graph_all.md). Without it compiled layers run
    # uncaptured: at 412f547 dynamo recompiled them on the capture pass, because transformers built an attention
    # mask only while capturing (models.attention: every variant now attends through capture_stable_sdpa, and a
    # capture fails on any recompile, naming the guard; a failed capture is a row saying why).
    both = bool(tcfg.get("compiled_graph", False))
    # reduce-overhead (and max-autotune) replay their own CUDA graphs, which cannot nest inside the whole step's
    # capture; default and max-autotune-no-cudagraphs (inductor's Triton GEMM templates, autotuned against cuBLAS,
    # with the pointwise ops around a product fused into its epilogue) can
    forms = list(dict.fromkeys((bool(c), g and (not c or both and not _own_graphs(m)), m if c else None)
                               for c in tcfg.compiled for g in graphs for m in (modes if c else [None])))
    out = [Setting(v, str(p), c, int(b), g, m) for v in variants for p in tcfg.precisions
           for c, g, m in forms for b in tcfg.batch_sizes]
    for v in tcfg.get("extra_variants") or []:
        for b in tcfg.get("extra_batch_sizes") or []:
            for c, g, m in forms:
                s = Setting(str(v), "bf16", c, int(b), g, m)
                if s not in out:
                    out.append(s)
    return out


# Targets: (variant, batch sizes, minimum ratio to peft_single's best, minimum tokens/s at the variant's best batch)
TARGETS = (("loramux_single", (16, 64), 1.0, None), ("loramux_joint", (64,), 0.9, None),
           ("loramux_gates", (64,), 0.8, 150_000.0))


def _best(rows: list[dict], variant: str, batch: int | None = None, precision: str = "bf16") -> dict | None:
    cands = [r for r in rows if r["variant"] == variant and r["precision"] == precision and r["tokens_per_s"]
             and (batch is None or r["batch_size"] == batch)]
    return max(cands, key=lambda r: r["tokens_per_s"]) if cands else None


def paired_ratio(row: dict, ref: dict) -> dict:
    """Tokens/s ratio of ``row`` to ``ref`` per interleaved round (the same rounds, so paired): its median with a
    distribution-free 95% interval of the median (``median_interval``: min..max below 6 rounds), rounded."""
    return rounded(median_interval([b / a for a, b in zip(row["ms_per_step_rounds"], ref["ms_per_step_rounds"])]))


def form(row: dict) -> str:
    """How a row's step ran: eager or compiled, and whether it was one replayed CUDA graph."""
    how = ("compiled" + (f" ({row['compile_mode']})" if row.get("compile_mode") else "")) if row["compiled"] else "eager"
    return how + (" + CUDA graph" if row.get("graph") else "")


def verdicts(rows: list[dict]) -> list[dict]:
    """Each target's measured ratio (best of compiled / eager for both sides, bf16) over paired rounds: its median
    and a distribution-free 95% interval of the median (min..max below 6 rounds); verdict yes when the whole
    interval meets the target, no when none of it does, else inconclusive; None where a row is missing."""
    out = []
    for variant, batches, min_ratio, min_tps in TARGETS:
        for b in batches:
            mine, peft = _best(rows, variant, b), _best(rows, "peft_single", b)
            item = {"variant": variant, "batch_size": b, "target_ratio": min_ratio}
            if mine is None or peft is None:
                out.append({**item, "verdict": None, "reason": "variant or peft_single not measured at this batch"})
                continue
            r = paired_ratio(mine, peft)
            v = median_verdict(r, min_ratio, ">=")
            out.append({**item, "setting": form(mine), "peft_setting": form(peft), "ratio": r, "verdict": v})
        if min_tps is not None:
            best = _best(rows, variant)
            item = {"variant": variant, "batch_size": best and best["batch_size"], "target_tokens_per_s": min_tps}
            if best is None:
                out.append({**item, "verdict": None, "reason": "variant not measured"})
                continue
            sizes = sorted({r["batch_size"] for r in rows if r["variant"] == variant and r["tokens_per_s"]})
            iv = median_interval([best["batch_size"] * best["seq_len"] / (t / 1000) for t in best["ms_per_step_rounds"]])
            v = median_verdict(iv, min_tps, ">=")
            if len(sizes) < 2 and v != "yes":  # one batch size is no search for the best one: it can only show a
                out.append({**item, "verdict": None, "reason": f"one batch size measured ({sizes[0]}): no search "
                            "for the best batch in this run"})  # lower bound of the best batch's rate
                continue
            out.append({**item, "tokens_per_s": rounded(iv, 1), "verdict": v,
                        **({"searched": False} if len(sizes) < 2 else {})})
    return out + precision_verdicts(rows)


def precision_verdicts(rows: list[dict]) -> list[dict]:
    """Where a run timed a loramux variant in both precisions, in the same form and batch: is bf16 (autocast, frozen
    weights stored in bf16) faster than fp32? The paired ratio of bf16's tokens/s to fp32's, verdict by its interval
    against 1.0."""
    out = []
    key = lambda r: (r["variant"], r["batch_size"], r["compiled"], r.get("graph"), r.get("compile_mode"))
    fp32 = {key(r): r for r in rows if r["precision"] == "fp32" and r["tokens_per_s"]}
    for r in rows:
        ref = fp32.get(key(r))
        if r["precision"] != "bf16" or not r["tokens_per_s"] or ref is None or r["variant"] == "peft_single":
            continue
        ratio = paired_ratio(r, ref)
        out.append({"variant": r["variant"], "batch_size": r["batch_size"], "precision_ratio": 1.0,
                    "setting": form(r), "ratio": ratio, "verdict": median_verdict(ratio, 1.0, ">=")})
    return out


def targets_table(targets: list[dict]) -> list[str]:
    """Markdown lines of the targets with what was measured and the verdict (this page and README Results)."""
    lines = ["| target | measured | verdict |", "| --- | --- | --- |"]
    for t in targets:
        if "precision_ratio" in t:
            what = f"{t['variant']} bf16 faster than fp32 at batch {t['batch_size']} ({t['setting']})"
            got = f"{interval_text(t['ratio'], '{}x')} ({t['ratio']['n']} rounds)"
        elif "target_ratio" in t:
            what = f"{t['variant']} >= {t['target_ratio']}x peft_single at batch {t['batch_size']}"
            got = (f"{interval_text(t['ratio'], '{}x')} ({t['ratio']['n']} rounds; {t['setting']} vs peft "
                   f"{t['peft_setting']})") if t.get("ratio") else t.get("reason", "")
        else:
            what = f"{t['variant']} >= {t['target_tokens_per_s']:,.0f} tokens/s at its best batch"
            tps = t.get("tokens_per_s")
            got = (f"{interval_text(tps, '{:,.0f}')} at batch {t['batch_size']}" if tps else t.get("reason", ""))
            if tps and t.get("searched") is False:
                got += " (the only batch measured: the best batch is at least this fast)"
        lines.append(f"| {what} | {got} | {t['verdict']} |")
    return lines


def markdown(doc: dict) -> str:
    """The committed table: provenance, every row, then each target with its verdict."""
    p, c = doc["provenance"], doc["config"]
    graphs = any(r.get("graph") for r in doc["rows"])  # the column appears once a run measured CUDA-graph steps
    lines = ["# train_throughput: tokens/s of whole training steps, loramux beside peft's single LoRA", "",
             written_by("train_throughput", p, "" if c.get("table_name", TABLE) == TABLE
                        else f"bench.train.table_name={c['table_name']}"),
             (f"Model: {c['shape']} (random weights), LoRA r={c['adapter']['r']} alpha={c['adapter']['lora_alpha']} on "
             f"{', '.join(c['adapter']['target_modules'])}; {c['seq_len']} tokens per row, no padding; AdamW; "
             f"loss on every token. {c['num_adapters']} adapters for joint / gates (top-{c['top_k']}). Each setting: "
             f"{c['warmup']} warm-up steps, then {c['repeats']} interleaved rounds of {c['steps']} steps; tokens/s "
             "is the median round. bf16 = autocast, with what is trained (and its AdamW state) in fp32 and the frozen "
             "weights stored in bf16; fp32 = no autocast. AdamW fused on CUDA. Raw per-round step times are in the "
             "JSON beside this file; `python -m pipeline.train_throughput <json>` rebuilds this page from it."
             + (" CUDA graph = the whole step (forward, loss, backward, AdamW) captured once and replayed: the host "
                "launches one graph per step." if graphs else "")), "",
             ("| variant | precision | compiled |" + (" CUDA graph |" if graphs else "") + " batch | tokens/s | "
              "ms/step | x peft (same compile) | x best peft | peak GB | graph breaks |"),
             "|" + " --- |" * (11 if graphs else 10)]
    for r in doc["rows"]:
        compiled = (r.get("compile_mode") or "yes") if r["compiled"] else "no"
        head = (f"| {r['variant']} | {r['precision']} | {compiled} | "
                + (f"{'yes' if r.get('graph') else 'no'} | " if graphs else "") + f"{r['batch_size']} ")
        if not r["tokens_per_s"]:
            lines.append(head + f"| {r.get('error', 'not measured')} | | | | | |")
            continue
        lines.append(head + f"| {r['tokens_per_s']:,.0f} | {r['ms_per_step']:.1f} | {r['ratio_to_peft']} "
                     f"| {r['ratio_to_best_peft']} | {r['peak_gb']} | {r['graph_breaks']} |")
    lines += ["", ("## Targets (bf16, best of compiled / eager on each side; median [95% interval of the median over "
                   "paired rounds, order statistics; min..max below 6 rounds])"), "",
              *targets_table(doc["targets"])]
    return "\n".join(lines) + "\n"


def rebuild(json_path) -> Path:
    """Re-derive ratios, verdicts and the Markdown page of a committed ``train_throughput.json`` from its rows."""
    def derive(doc):
        add_ratios(doc["rows"])
        doc["targets"] = verdicts(doc["rows"])

    return rebuild_page(json_path, derive, markdown)


if __name__ == "__main__":
    rebuild_cli("train_throughput", rebuild)
