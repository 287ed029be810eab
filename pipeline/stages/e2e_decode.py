"""End-to-end decode: ms per generated token of a whole model, loramux's strategies beside peft and the base model.

    python -m pipeline.bench experiment=e2e_decode      # writes outputs/tables/e2e_decode.{json,md}

What a user runs is ``generate``; this times it on a random-weight model of a configured shape (LLaMA-3-8B's, bf16,
on CUDA; its 2-layer stand-in on the CPU), with ``num_adapters`` random r=8 adapters on ``all7`` (q,k,v,o,gate,
up,down) or ``qv`` projections. Strategies, each in its own model instance where they would wrap the same layers:

  base           the plain model              peft           peft's PeftModel with one unmerged LoRA
  oracle         loramux, the sequence's own adapter (1 of num_adapters)
  meteora-top2   loramux, fresh token gates, top-2
  dlp-nucleus2   loramux, a fresh DLP router with its nucleus capped at 2 kept adapters (a trained router keeps 1-3)
  dlp-fresh      loramux, a fresh DLP router at top-p 0.6 (a near-uniform distribution: the widest nucleus)
  <s>+grouped    the same loramux strategy with q / k / v and gate / up run as one projection each
                 (``MultiLoRAModel.group_projections``: packed base weights; at decode one GEMM with every
                 adapter's shrink and the gates, then one routed expand; e.g. ``oracle+grouped``), in its own
                 model beside the ungrouped one
  <s>+onelaunch  grouped, and a uniform route's decode step in one launch per group (``group_projections(
                 one_launch=True)``: ``kernels.gemv_lora``, the LoRA in a Triton GEMV's epilogue, in place of
                 cuBLAS's GEMM and an addmm; e.g. ``oracle+onelaunch``)

Engines: ``eager`` (``generate`` with the dynamic cache), ``static+compile`` (static KV cache, the decode step
compiled with ``reduce-overhead``: CUDA graphs; CUDA only unless ``e2e.allow_static_on_cpu``) and ``static+graph``
(``models.graph_generate``, what evaluate runs on CUDA: static KV cache, the eager decode step captured as one CUDA
graph per call, no compile, its decode steps over grouped KV heads unrepeated (``models.attention.gqa_decode``,
since 3d97585; the other engines run transformers' attention, so compare ratios within an engine); on the CPU
the same loop uncaptured). For one (engine,
targets, batch) every strategy is warmed up (compiles happen there), then timed in interleaved rounds: each round
runs, per strategy, one 1-token and one N-token greedy generation of the same prompts (``min_new_tokens`` forces
the length, checked); decode ms/token = (t_N - t_1) / (N - 1), prefill ms = t_1; medians over rounds. Every
record (one per engine x targets x batch) keeps its per-round times, so ``rows`` are rebuilt from raw records.
The graph engine's record also takes ``split_calls`` calls per strategy apart by phase after the rounds (the
eager first step and the capture, paid once a call, against the replays, paid once a token: ``phases_table``), so
a ratio's gap can be told apart into per-call and per-token costs.
"""

from __future__ import annotations

import gc
import logging
import statistics
import tempfile
import time
from pathlib import Path

import torch
from peft import PeftModel

from models import MultiLoRAModel
from models.graph_generate import graph_generate
from pipeline.report.statistics import (
    interval_text,
    median_interval,
    median_verdict,
    paired_time_ratios,
    rounded,
)
from pipeline.runtime.entry import first_line
from pipeline.stages.bench_timing import (
    compile_config,
    generate_kwargs,
    random_adapter,
    random_batch,
    rebuild_cli,
    rebuild_page,
    round_order,
    written_by,
)

log = logging.getLogger(__name__)

STRATEGIES = ("base", "peft", "oracle", "meteora-top2", "dlp-nucleus2", "dlp-fresh")
GROUPED = "+grouped"  # a strategy label's suffix: the same router on the grouped model
ONE_LAUNCH = "+onelaunch"  # the same on the grouped model whose uniform decode is one kernels.gemv_lora launch
VARIANTS = (GROUPED, ONE_LAUNCH)


def variant(strategy: str) -> str:
    """The model variant a label names: its suffix (``+grouped``, ``+onelaunch``), or "" (the ungrouped model)."""
    return next((v for v in VARIANTS if strategy.endswith(v)), "")


def router_label(strategy: str) -> str:
    """The strategy a label names, without its variant suffix (``oracle+grouped`` -> ``oracle``)."""
    return strategy.removesuffix(variant(strategy))
TARGETS = {"all7": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
           "qv": ["q_proj", "v_proj"]}
# the loramux strategies' routers come from conf/router through bench.routers (label -> router overrides), as the
# latency suite's do: oracle, meteora-top2 (top_k 2), dlp-nucleus2 (dlp, max_kept 2), dlp-fresh (dlp)
# Targets (ratio of decode ms/token, static+compile, same run): loramux oracle <= peft and <= 1.10 base; MeteoRA
# top-2 <= 1.3 base; DLP with a 2-adapter nucleus <= 1.15 base; eager: oracle <= peft
ENGINE_LABELS = {"eager": "eager", "static": "static+compile", "graph": "static+graph"}
TARGET_RATIOS = (("static+compile", "oracle", "peft", 1.0), ("static+compile", "oracle", "base", 1.10),
                 ("static+compile", "meteora-top2", "base", 1.3), ("static+compile", "dlp-nucleus2", "base", 1.15),
                 ("static+graph", "oracle", "peft", 1.0), ("static+graph", "oracle", "base", 1.10),
                 ("static+graph", "meteora-top2", "base", 1.3), ("static+graph", "dlp-nucleus2", "base", 1.15),
                 ("eager", "oracle", "peft", 1.0))
TARGET_RATIOS += tuple((e, s + GROUPED, ref, limit) for e, s, ref, limit in TARGET_RATIOS)  # eager too: judged where run
TARGET_RATIOS += tuple((e, s + ONE_LAUNCH, ref, limit) for e, s, ref, limit in TARGET_RATIOS
                       if s == "oracle" and e != "eager")  # fmt: skip


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _generate_kwargs(engine: str, backend: str, graph_kw: dict | None = None):
    if engine == "graph":  # the contestants' callables take it to models.graph_generate (warm_start, keep_graph)
        return {"engine": "graph", **(graph_kw or {})}
    if engine == "eager":
        return generate_kwargs("eager")
    return generate_kwargs("static", compile_config(backend, "reduce-overhead" if backend == "inductor" else None,
                                                    all_devices=True))


def _timed(generate, ids, mask, n: int, kw: dict, device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = generate(ids, mask, max_new_tokens=n, min_new_tokens=n, **kw)
    _sync(device)
    seconds = time.perf_counter() - t0
    seqs = out if torch.is_tensor(out) else out.sequences
    if seqs.shape[-1] != ids.shape[-1] + n:
        raise RuntimeError(f"generate made {seqs.shape[-1] - ids.shape[-1]} new tokens, asked for exactly {n}")
    return seconds


class Contestants:
    """The models of one ``targets``: a plain base model, a peft model and one loramux bank with every router."""

    def __init__(self, make_model, adapter_cfg, targets: str, num_adapters: int, strategies, tmp: Path, routers):
        self.generate: dict = {}
        base = make_model()
        adapter = random_adapter(base, tmp / f"adapter_{targets}", {**adapter_cfg, "target_modules": TARGETS[targets]})
        if "base" in strategies:
            self.generate["base"] = lambda i, m, **k: _decode(base, i, m, **k)
        if "peft" in strategies:
            pm = PeftModel.from_pretrained(make_model(), str(adapter)).eval()
            self.generate["peft"] = lambda i, m, **k: _decode(pm, i, m, **k)
        routed = [s for s in strategies if router_label(s) in routers]
        models = {}
        for s in routed:
            v = variant(s)
            if v not in models:
                models[v] = MultiLoRAModel.from_adapters(
                    make_model(), {f"a{i}": adapter for i in range(num_adapters)}, check_base_name=False)
                if v:
                    models[v].group_projections(one_launch=v == ONE_LAUNCH)
            mm, spec = models[v], routers[router_label(s)]
            torch.manual_seed(0)
            router = mm.build_router(spec.build, **spec.knobs)

            def gen(i, m, mm=mm, router=router, oracle=router.needs_task_ids, **k):
                mm.set_router(router)
                mm.set_routing(task_ids=[0] * i.shape[0] if oracle else None)
                return _decode(mm, i, m, **k)
            self.generate[s] = gen


def _decode(model, ids, mask, engine: str | None = None, **kw):
    """``model.generate`` with ``kw``, or with ``engine="graph"`` ``models.graph_generate`` (no EOS: exactly
    ``max_new_tokens``)."""
    if engine != "graph":
        return model.generate(input_ids=ids, attention_mask=mask, **kw)
    return graph_generate(model, ids, mask, max_new_tokens=kw["max_new_tokens"], eos_token_id=None, pad_token_id=0,
                          capture=ids.is_cuda, phases=kw.get("phases"), warm_start=kw.get("warm_start", False),
                          keep_graph=kw.get("keep_graph", False))


def split_calls(gens: dict, ids, mask, new_tokens: int, calls: int, device, kw: dict | None = None) -> dict:
    """The graph engine's decode time taken apart, per strategy: ``calls`` N-token generations each with the device
    synchronised between phases (``models.graph_generate.PHASES``), after the timed rounds and apart from them (the
    synchronisations cost overlap). Per strategy the median seconds of each phase and the replayed steps: what a
    call pays once (the eager first step, where routers lay out what the capture reads, and the capture) against
    what it pays per token (the replays). ``kw``: the graph engine's generate kwargs (``_generate_kwargs``)."""
    out = {}
    for s, gen in gens.items():
        runs = []
        for _ in range(max(1, calls)):
            phases: dict = {}
            _timed(gen, ids, mask, new_tokens, {**(kw or {"engine": "graph"}), "phases": phases}, device)
            runs.append(phases)
        out[s] = {k: statistics.median(r[k] for r in runs) for k in runs[0] if all(k in r for r in runs)}
    return out


def profile_calls(gens: dict, ids, mask, new_tokens: int, device, out_dir: Path, batch: int, rows: int = 40,
                  kw: dict | None = None) -> list:
    """One graph-engine call of each strategy in ``gens`` under ``torch.profiler`` (after the rounds), written to
    ``out_dir/profile_e2e_<strategy>_b<batch>.txt``: the call's phases (``graph_generate``'s ranges: host and
    device time of the prefill, the eager first step, the capture, the replays), then its ops by self device time
    and by self CPU time. Where a call's once-a-call cost goes (the page's last table says how large it is);
    ``kw``: the graph engine's generate kwargs (``_generate_kwargs``)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    written = []
    for s, gen in gens.items():
        with profile(activities=acts) as prof:
            _timed(gen, ids, mask, new_tokens, kw or {"engine": "graph"}, device)
        ka = prof.key_averages()
        sort_dev = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        phases = [e for e in ka if e.key.startswith("graph_generate.")]
        lines = [f"# {s} at batch {batch}: one graph-engine call of {new_tokens} new tokens, torch.profiler", "",
                 "## phases (host: the range's CPU time; device: the kernels launched inside it)", "",
                 "| phase | host ms | device ms |", "| --- | --- | --- |"]
        lines += [f"| {e.key.removeprefix('graph_generate.')} | {e.cpu_time_total / 1e3:.2f} | "
                  f"{getattr(e, 'device_time_total', 0.0) / 1e3:.2f} |" for e in phases]
        text = ("\n".join(lines) + "\n\n## by self device time\n" + ka.table(sort_by=sort_dev, row_limit=rows)
                + "\n\n## by self CPU time\n" + ka.table(sort_by="self_cpu_time_total", row_limit=rows))
        path = out_dir / f"profile_e2e_{s.replace('+', '_')}_b{batch}.txt"
        path.write_text(text)
        written.append(path)
    return written


def measure(contestants: Contestants, engine: str, batch: int, prompt_len: int, new_tokens: int, vocab: int,
            device, warmup: int, repeats: int, backend: str, deadline: float | None = None,
            split: int = 0, profile: tuple = (), profile_dir: Path | None = None, graph_kw: dict | None = None) -> dict:
    """One record: every strategy's per-round (t_1, t_N) for this engine and batch, warm-ups first. A strategy
    whose warm-up (its compile, for the static engine) would start after ``deadline`` (``time.perf_counter``) is
    left out of the record and named in its ``skipped`` list (a run under a time limit keeps what it measured); one
    whose warm-up raises a RuntimeError is left out and named in ``failed`` with the error's first line. ``split``:
    for the graph engine, that many calls per strategy taken apart by phase after the rounds (``split_calls``,
    the record's ``phases``); ``profile``: strategies of which one graph-engine call is then profiled into
    ``profile_dir`` (``profile_calls``); ``graph_kw``: the graph engine's ``warm_start`` / ``keep_graph``
    (``models.graph_generate``), kept in the record where set."""
    graph_kw = {k: True for k, v in (graph_kw or {}).items() if v}
    ids, mask = random_batch(vocab, batch, prompt_len, device, seed=0)
    kw = _generate_kwargs(engine, backend, graph_kw)
    peak: dict = {}
    skipped: list = []
    failed: dict = {}  # strategy -> the first line of its warm-up's error
    warm: dict = {}
    for s, gen in contestants.generate.items():
        if deadline is not None and time.perf_counter() > deadline:
            skipped.append(s)
            log.warning("e2e_decode: %s %s b=%s skipped: bench.max_seconds spent", engine, s, batch)
            continue
        t0 = time.perf_counter()
        try:
            for _ in range(max(1, warmup)):
                _timed(gen, ids, mask, 1, kw, device)
                _timed(gen, ids, mask, new_tokens, kw, device)
        except RuntimeError as e:  # e.g. a capture this strategy cannot do: the others are still measured
            failed[s] = first_line(e)[:200]
            log.warning("e2e_decode: %s %s b=%s failed: %s", engine, s, batch, failed[s])
            continue
        warm[s] = round(time.perf_counter() - t0, 2)  # the static engine's compile is in here: plan calls by it
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            _timed(gen, ids, mask, new_tokens, kw, device)
            peak[s] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
    gens = {s: g for s, g in contestants.generate.items() if s not in skipped and s not in failed}
    rounds: dict = {s: [] for s in gens}
    for i in range(repeats):
        for s in round_order(list(gens), i):
            gen = gens[s]
            rounds[s].append((_timed(gen, ids, mask, 1, kw, device), _timed(gen, ids, mask, new_tokens, kw, device)))
    rec = {"engine": ENGINE_LABELS[engine], "batch_size": batch, **(graph_kw if engine == "graph" else {}),
           "prompt_len": prompt_len, "new_tokens": new_tokens, "rounds": rounds, "peak_gb": peak, "warmup_s": warm}
    if engine == "graph" and split > 0:
        rec["phases"] = split_calls(gens, ids, mask, new_tokens, split, device, kw)
    if engine == "graph" and profile and profile_dir is not None:
        profile_calls({s: g for s, g in gens.items() if s in profile}, ids, mask, new_tokens, device, profile_dir,
                      batch, kw=kw)
    return {**rec, **({"skipped": skipped} if skipped else {}), **({"failed": failed} if failed else {})}


def rows_from(records: list[dict]) -> list[dict]:
    """The table's rows (medians over rounds) from raw records."""
    rows = []
    for rec in records:
        n = rec["new_tokens"]
        for s, rounds in rec["rounds"].items():
            t1 = statistics.median(r[0] for r in rounds)
            decode = statistics.median(max(tn - t1_, 0.0) / (n - 1) for t1_, tn in rounds)
            rows.append({"engine": rec["engine"], "strategy": s, "targets": rec["targets"],
                         "num_adapters": 1 if s == "peft" else 0 if s == "base" else rec["num_adapters"],
                         "batch_size": rec["batch_size"], "prompt_len": rec["prompt_len"], "new_tokens": n,
                         "decode_ms_per_token": round(1000 * decode, 4), "prefill_ms": round(1000 * t1, 3),
                         "peak_gb": rec["peak_gb"].get(s)})
    return rows


def verdicts(records: list[dict]) -> list[dict]:
    """Each target per (targets, batch): the decode-time ratio per round (paired: same round), its median and a
    distribution-free 95% interval of the median (``pipeline.report.statistics.median_interval``; min..max below 6
    rounds); yes when the whole interval meets the target, no when none of it does, else inconclusive; None where a
    side was not measured. A target is judged for each variant a group ran (``oracle+grouped``); the plain model's
    own row is left out of a group that ran only its variants, and said not measured where none ran."""
    out = []
    for engine, mine, ref, limit in TARGET_RATIOS:
        for rec in records:
            if rec["engine"] != engine:
                continue
            tried = set(rec["rounds"]) | set(rec.get("skipped", [])) | set(rec.get("failed", {}))
            if variant(mine) and mine not in tried:
                continue  # a grouped / one-launch variant is judged where a run asked for it
            if not variant(mine) and mine not in tried and any(router_label(s) == mine for s in tried):
                continue  # only its variants ran in this group: they carry the target
            item = {"engine": engine, "strategy": mine, "versus": ref, "limit": limit, "targets": rec["targets"],
                    "batch_size": rec["batch_size"]}
            a, b = rec["rounds"].get(mine), rec["rounds"].get(ref)
            if not a or not b:
                out.append({**item, "verdict": None, "reason": f"{mine if not a else ref} not measured"})
                continue
            n = rec["new_tokens"]
            per = paired_time_ratios(a, b)
            if not per:
                out.append({**item, "verdict": None, "reason": "no decode time measured"})
                continue
            iv = median_interval(per)
            out.append({**item, "ratio": rounded(iv), "new_tokens": n, "verdict": median_verdict(iv, limit)})
    return out


def measured_at(records: list) -> list[str]:
    """"<engine> <targets> batch <b> at <git> <date> (<n> rounds[, kept graph | warm start])" per measured group,
    for a table merged from several calls (``bench.e2e.merge``): each group keeps the provenance and the round
    count of the call that measured it; where the groups ran on more than one device, each also names its own
    (a group's ratios are paired within its rounds, so they compare across groups only on one device)."""
    seen: dict = {}
    devices = {str((r.get("provenance") or {}).get("device")) for r in records}
    for r in records:
        p = r.get("provenance") or {}
        n = max((len(v) for v in r["rounds"].values()), default=0)
        how = ", kept graph" if r.get("keep_graph") else ", warm start" if r.get("warm_start") else ""
        on = f" on {p.get('device')}" if len(devices) > 1 else ""
        seen.setdefault((r["engine"], r["targets"], r["batch_size"]),
                        (str(p.get("git_sha"))[:7], str(p.get("date"))[:16] + on, f" ({n} rounds{how})"))
    return [f"{e} {tg} batch {b} at git {g} {d}{w}" for (e, tg, b), (g, d, w) in sorted(seen.items())]


def markdown(doc: dict) -> str:
    p, c = doc["provenance"], doc["config"]
    dtype = c.get("dtype", "bfloat16")  # (tables before the key: bf16 on CUDA)
    where = "bf16 on CUDA" if dtype == "bfloat16" and p["device"].startswith("cuda") else f"{dtype} on {p['device']}"
    lines = ["# e2e_decode: ms per generated token, loramux beside peft's single LoRA and the base model", "",
             written_by("e2e_decode", p),
             (f"Model: {c['shape']} (random weights, {where}); {c['num_adapters']} random r=8 adapters; prompt "
              f"{c['prompt_len']} tokens, {c['new_tokens']} new tokens, greedy; {c['warmup']} warm-up, then "
              "interleaved rounds (each group's count below), medians. Raw per-round times in the JSON beside this "
              "file; `python -m pipeline.e2e_decode <json>` rebuilds this page from them."),
             "Measured: " + "; ".join(measured_at(doc["records"])) + ".", "",
             "| engine | targets | batch | strategy | adapters | decode ms/token | x base | prefill ms | peak GB |",
             "|" + " --- |" * 9]
    base = {(r["engine"], r["targets"], r["batch_size"]): r["decode_ms_per_token"] for r in doc["rows"]
            if r["strategy"] == "base"}
    for r in doc["rows"]:
        ref = base.get((r["engine"], r["targets"], r["batch_size"]))
        ratio = round(r["decode_ms_per_token"] / ref, 3) if ref else None
        lines.append(f"| {r['engine']} | {r['targets']} | {r['batch_size']} | {r['strategy']} | {r['num_adapters']} "
                     f"| {r['decode_ms_per_token']} | {ratio} | {r['prefill_ms']} | {r['peak_gb']} |")
    for rec in doc["records"]:
        if rec.get("skipped"):
            lines.append(f"| {rec['engine']} | {rec['targets']} | {rec['batch_size']} | "
                         f"{', '.join(rec['skipped'])} | | not measured: bench.max_seconds spent | | | |")
        for s, err in (rec.get("failed") or {}).items():
            lines.append(f"| {rec['engine']} | {rec['targets']} | {rec['batch_size']} | {s} | | failed: "
                         f"{err.replace('|', '/')} | | | |")
        for s in rec.get("members_alone") or ():  # records up to 1df9a9e: MeteoRA's q / v bank, k without a gate
            lines.append(f"| {rec['engine']} | {rec['targets']} | {rec['batch_size']} | {s} | | measured above; "
                         "its decode ran the members alone (the groups did not serve its router) | | | |")
    lines += ["", ("## Targets (decode ms/token ratio, paired by round: median [95% interval of the median, order "
                   "statistics; min..max below 6 rounds])"), "",
              *targets_table(doc["targets"])]
    split = phases_table(doc["records"])
    if split:
        lines += ["", "## Where a graph-engine call's decode time goes", "",
                  ("Calls apart from the rounds, the device synchronised between phases (`bench.e2e.split_calls` "
                   "per strategy, medians): the eager first decode step (routers lay out what the capture reads) "
                   "and the capture are paid once a call, the replays once a token; decode ms/token above is "
                   "(first step + capture + replays) / (N - 1)."), "", *split]
    return "\n".join(lines) + "\n"


def phases_table(records: list[dict]) -> list[str]:
    """Markdown lines of each graph-engine record's ``phases`` (``split_calls``): per strategy the first step and
    the capture (ms a call; "–" where the calls took none: a warm start, a kept graph), the replays (ms a token)
    and their ratio to the base's; [] where none was taken."""
    lines = []
    for rec in records:
        phases = rec.get("phases") or {}
        base = phases.get("base") or {}
        ref = 1000 * base["replay"] / base["replayed_steps"] if base.get("replayed_steps") else None
        for s, ph in phases.items():
            steps = ph.get("replayed_steps") or 0
            if not steps or "replay" not in ph:
                continue
            per = 1000 * ph["replay"] / steps
            once = [f"{round(1000 * ph[k], 2)}" if k in ph else "–" for k in ("first_step", "capture")]
            lines.append(f"| {rec['engine']} | {rec['targets']} | {rec['batch_size']} | {s} | {once[0]} | {once[1]} | "
                         f"{round(per, 4)} | {round(per / ref, 3) if ref else None} |")
    if not lines:
        return []
    return ["| engine | targets | batch | strategy | first step ms | capture ms | replay ms/token | replay x base |",
            "|" + " --- |" * 8, *lines]


def targets_table(targets: list[dict]) -> list[str]:
    """Markdown lines of the decode targets with what was measured and the verdict (this page and README)."""
    lines = ["| engine | targets | batch | target | measured | verdict |", "| --- | --- | --- | --- | --- | --- |"]
    for t in targets:
        got = f"{interval_text(t['ratio'])}, {t['ratio']['n']} rounds" if t.get("ratio") else t.get("reason", "")
        lines.append(f"| {t['engine']} | {t['targets']} | {t['batch_size']} | {t['strategy']} <= {t['limit']}x "
                     f"{t['versus']} | {got} | {t['verdict']} |")
    return lines


def run(settings: dict, make_model, adapter_cfg: dict, vocab: int, device, records_out: list, routers: dict,
        max_seconds: float | None = None, profile_dir: Path | None = None) -> None:
    """Measure every (targets, engine, batch) of ``settings`` (``bench.e2e``), appending one record each; ``routers``:
    label -> the strategy of each loramux row (``pipeline.stages.bench.bench_routers``). No warm-up starts after
    ``max_seconds`` (``bench.max_seconds``): what was left is named in the records' ``skipped``."""
    unknown = [e for e in settings["engines"] if e not in ENGINE_LABELS]
    if unknown:
        raise ValueError(f"bench.e2e.engines has {unknown}: not an engine; use {', '.join(ENGINE_LABELS)}")
    deadline = None if max_seconds is None else time.perf_counter() + float(max_seconds)
    strategies = [s for s in settings["strategies"] if router_label(s) in STRATEGIES]
    with tempfile.TemporaryDirectory(prefix="loramux-e2e-") as tmp:
        for targets in settings["targets"]:
            contestants = Contestants(make_model, adapter_cfg, targets, int(settings["num_adapters"]), strategies,
                                      Path(tmp), routers)
            for engine in settings["engines"]:
                if engine == "static" and device.type != "cuda" and not settings.get("allow_static_on_cpu"):
                    log.warning("e2e_decode: the static engine needs CUDA; skipped")
                    continue
                for b in settings["batch_sizes"]:
                    rec = measure(contestants, engine, int(b), int(settings["prompt_len"]),
                                  int(settings["new_tokens"]), vocab, device, int(settings["warmup"]),
                                  int(settings["repeats"]), str(settings.get("compile_backend", "inductor")),
                                  deadline, int(settings.get("split_calls", 0)),
                                  tuple(settings.get("profile_calls") or ()), profile_dir,
                                  {k: bool(settings.get(k, False)) for k in ("warm_start", "keep_graph")})
                    records_out.append({**rec, "targets": targets, "num_adapters": int(settings["num_adapters"])})
                    log.info("e2e_decode: %s %s b=%s measured", targets, engine, b)
            del contestants
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()


def rebuild(json_path) -> Path:
    """Re-derive the rows, verdicts and Markdown page of a committed ``e2e_decode.json`` from its raw records."""
    def derive(doc):
        doc["rows"], doc["targets"] = rows_from(doc["records"]), verdicts(doc["records"])

    return rebuild_page(json_path, derive, markdown)


if __name__ == "__main__":
    rebuild_cli("e2e_decode", rebuild)
