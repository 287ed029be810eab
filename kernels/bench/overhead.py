"""Host overhead of the op at decode: one decoded token's worth of projection calls, eager, end to end.

    python -m kernels.bench --overhead [--device cuda|cpu] [--out DIR]

A decoding LM calls the op once per wrapped projection per token (SmolLM2-135M with MeteoRA's 7 targets:
30 layers x 7 = 210 calls). Each call's kernels take microseconds on a GPU, so eager decode is bound by the host:
Python, the dispatcher and kernel launches. This times CALLS back-to-back projection calls, each a whole layer
(base linear included), cycling over SETS distinct weight sets, synchronising only around the whole batch:

  linear        F.linear alone (the base model's cost)
  loramux       F.linear + kernels.multi_lora under no_grad (the inference path: direct launches)
  loramux_op    the same through the torch.library custom op (the path before direct launches; training's path)
  peft_single   F.linear + one unmerged LoRA as peft computes it: y + (x @ A) @ B * s
  loramux_graph (CUDA) the CALLS loramux calls captured in one CUDA graph and replayed: the device time alone
  launch_only   (CUDA) F.linear + ``triton_ops.forward`` called with ready arguments: the kernel launcher's own cost
  python_only   F.linear + multi_lora(backend="triton") with the launch replaced by an empty output: the Python
                around the kernels (on a CPU too, where loramux / loramux_op are the torch backend)

Shapes: d in {576, 1536} (SmolLM2-135M hidden / MLP sizes), T in {1, 8, 64, 128} tokens (the decode batch), a bank
of L = 28 adapters of rank 16, sentence routing K = 1 (the oracle: ids [B, 1] + seq_ids) and token routing K = 2 (MeteoRA top-2).
Rows: us per call (ms per CALLS calls = per token) and ratio to ``linear``. Writes kernel_overhead.{json,md}.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import statistics
import time

import torch
import torch.nn.functional as F

from common.atomic import atomic_write_text
from common.provenance import git_sha
from kernels import multi_lora, switches

CALLS, SETS, L, R = 210, 30, 28, 16
SHAPES = [(576, 576), (576, 1536), (1536, 576)]
TOKENS = [1, 8, 64, 128]


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _sets(d_in, d_out, T, K, device, dtype, gen):
    out = []
    for _ in range(SETS):
        W = (torch.randn(d_out, d_in, generator=gen) / d_in**0.5).to(device, dtype)
        A = (torch.randn(L, d_in, R, generator=gen) / d_in**0.5).to(device, dtype)
        B = (torch.randn(L, R, d_out, generator=gen) / R**0.5).to(device, dtype)
        scales = torch.full((L,), 2.0, device=device)
        ranks = torch.full((L,), R, dtype=torch.int32, device=device)
        out.append((W, A, B, scales, ranks))
    x = torch.randn(T, d_in, generator=gen).to(device, dtype)
    if K == 1:  # sentence routing: one adapter per sequence, one token per sequence at decode
        ids = torch.randint(0, L, (T, 1), generator=gen).to(device)
        w = torch.ones(T, 1, device=device, dtype=dtype)
        seq = torch.arange(T, device=device)
    else:  # token routing, top-K
        ids = torch.randperm(L, generator=gen)[: T * K].reshape(T, K).to(device) if T * K <= L else \
            torch.randint(0, L, (T, K), generator=gen).to(device)  # fmt: skip
        w = torch.softmax(torch.randn(T, K, generator=gen), -1).to(device, dtype)
        seq = None
    return out, x, ids, w, seq


def _variant_fn(variant, sets, x, ids, w, seq):
    from kernels import triton_ops  # lazy: Triton loads only for the variants that launch it

    def one(W, A, B, scales, ranks):
        y = F.linear(x, W)
        if variant == "linear":
            return y
        if variant == "peft_single":
            return y + (x @ A[0]) @ B[0] * 2.0
        if variant == "launch_only":  # the launcher alone, arguments already prepared
            return triton_ops.forward(x, y, A, B, scales, ranks, ids, w, seq)
        if variant == "python_only":  # the triton backend's Python with the launch stubbed (runs on a CPU too)
            return multi_lora(x, y, A, B, scales, ranks, ids, w, seq, backend="triton")
        return multi_lora(x, y, A, B, scales, ranks, ids, w, seq)

    def run():
        for i in range(CALLS):
            one(*sets[i % SETS])

    return run


def _time(run, device, reps=7):
    """Median seconds of ``run()``: wall time on CUDA; on the CPU this thread's CPU time (one intra-op thread), which
    a machine shared with other jobs does not inflate."""
    clock = time.perf_counter if device.type == "cuda" else time.thread_time
    run()
    run()
    times = []
    for _ in range(reps):
        _sync(device)
        t0 = clock()
        run()
        _sync(device)
        times.append(clock() - t0)
    return statistics.median(times)


def measure(device: torch.device, shapes=SHAPES, tokens=TOKENS, log=print) -> list:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    gen = torch.Generator().manual_seed(0)
    rows = []
    with torch.no_grad():
        for d_in, d_out in shapes:
            for T in tokens:
                for K in (1, 2):
                    sets, x, ids, w, seq = _sets(d_in, d_out, T, K, device, dtype, gen)
                    res = {}
                    variants = ["linear", "loramux", "loramux_op", "peft_single", "python_only"]
                    if device.type == "cuda":
                        variants.append("launch_only")
                    for variant in variants:
                        # loramux_op: through the custom op; python_only: multi_lora with the launcher stubbed out
                        switch = {"loramux_op": switches.custom_op_only, "python_only": switches.stubbed_launches}
                        with switch.get(variant, contextlib.nullcontext)():
                            res[variant] = _time(_variant_fn(variant, sets, x, ids, w, seq), device)
                    if device.type == "cuda":
                        run = _variant_fn("loramux", sets, x, ids, w, seq)
                        s = torch.cuda.Stream()
                        s.wait_stream(torch.cuda.current_stream())
                        with switches.custom_op_only(), torch.cuda.stream(s):  # warm up what capture runs: the op
                            run()
                        torch.cuda.current_stream().wait_stream(s)
                        g = torch.cuda.CUDAGraph()
                        with torch.cuda.graph(g):
                            run()
                        res["loramux_graph"] = _time(g.replay, device)
                    for variant, sec in res.items():
                        rows.append({"d_in": d_in, "d_out": d_out, "T": T, "K": K, "variant": variant,
                                     "us_per_call": 1e6 * sec / CALLS, "ms_per_token": 1e3 * sec,
                                     "ratio_to_linear": sec / res["linear"]})  # fmt: skip
                    log(f"{d_in:>5}->{d_out:<5} T={T} K={K}  " + "  ".join(
                        f"{v} {1e6 * s / CALLS:7.1f} us (x{s / res['linear']:.2f})" for v, s in res.items()))  # fmt: skip
    return rows


def markdown(doc) -> str:
    p = doc["provenance"]
    variants = [v for v in ("linear", "loramux", "loramux_op", "peft_single", "loramux_graph", "launch_only",
                            "python_only")
                if any(r["variant"] == v for r in doc["rows"])]  # fmt: skip
    lines = ["# kernel_overhead: host cost per projection call at decode (eager, back-to-back calls)", "",
             (f"{p['device']}, torch {p['torch']}, git {p['git_sha'][:10]}, {p['date']}, {p['dtype']}. "
              f"{CALLS} calls (one SmolLM2-135M token) over {SETS} weight sets, L = {L}, r = {R}; "
              "us per call (ratio to linear). K = 1: sentence routing (seq_ids); K = 2: token routing."), "",
             "| d_in -> d_out | T | K | " + " | ".join(variants) + " |", "|" + "---|" * (3 + len(variants))]
    keys = sorted({(r["d_in"], r["d_out"], r["T"], r["K"]) for r in doc["rows"]})
    for key in keys:
        sel = {r["variant"]: r for r in doc["rows"] if (r["d_in"], r["d_out"], r["T"], r["K"]) == key}
        cells = [f"{sel[v]['us_per_call']:.1f} ({sel[v]['ratio_to_linear']:.2f})" if v in sel else "-" for v in variants]
        lines.append(f"| {key[0]} -> {key[1]} | {key[2]} | {key[3]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(device: str, out: str | None, quick: bool = False) -> None:
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("kernels.bench --overhead: no CUDA GPU here; pass --device cpu to time the CPU path")
    if dev.type == "cpu":
        torch.set_num_threads(1)
    shapes, tokens = (SHAPES[:2], [1, 8, 128]) if quick else (SHAPES, TOKENS)
    t0 = time.time()
    rows = measure(dev, shapes, tokens, log=lambda s: print(s, flush=True))
    doc = {"provenance": {"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
                          "torch": torch.__version__, "git_sha": git_sha(),
                          "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                          "dtype": "bf16" if dev.type == "cuda" else "fp32",
                          "seconds": round(time.time() - t0, 1)}, "rows": rows}  # fmt: skip
    md = markdown(doc)
    print(md)
    if out:
        os.makedirs(out, exist_ok=True)
        atomic_write_text(os.path.join(out, "kernel_overhead.json"), json.dumps(doc, indent=1))
        atomic_write_text(os.path.join(out, "kernel_overhead.md"), md)
