"""GPU benchmark of the multi-LoRA op: ``python -m kernels.bench --out DIR`` writes kernel_bench.{json,md}.

LLaMA-3-8B projection shapes, an adapter bank of L = 28, top-2 token routing, r in {8, 16, 64}, T in
{1, 16, 64, 1024, 4096}, bf16. Variants, each a whole layer (base projection included):
  base         y = x @ W^T
  loramux      base + kernels.multi_lora (Triton), forward path as dispatched; fwd rows also for each path forced:
               loramux_bank (every adapter, routing as a coefficient) and loramux_routed (the sort-free token
               kernels at T <= 64, the grouped kernels above), so the dispatch thresholds are checked in the same run
  meteora_bmm  base + MeteoRA's batched torch path: gather A[ids], B[ids] per token, two batched matmuls
  loop         base + a Mixtral-style loop over adapters (torch.where per adapter, index_add), eager: its
               data-dependent shapes synchronise with the host and cannot be captured
  peft_single  base + one unmerged LoRA, emulated as peft's LoRA Linear computes it: y + (x @ A) @ B * s
fwd: the layer's forward. bwd: the layer's backward, grads of x and W (the "base dx + dW") plus, for the LoRA
variants, of A, B and the gate weights. Timing: CUDA graphs (except where noted), several input sets rotated
inside one graph so weights are read from memory rather than L2, triton.testing.do_bench median.
ratio_to_base = ms / ms(base, same shape and T, same direction, same run).
"""

from __future__ import annotations

import json
import os
import time

import torch
import torch.nn.functional as F

from common.atomic import atomic_write_text
from common.cli_args import ArgumentParser, user_error
from kernels import multi_lora, switches
from kernels.bench.timing import provenance, time_ms

SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096)]
RANKS = [8, 16, 64]
TOKENS = [1, 16, 64, 1024, 4096]
L, K = 28, 2
DTYPE = torch.bfloat16
GATHER_CAP_FWD = 24e9  # bytes of A[ids] + B[ids] above which meteora_bmm is not run (memory)
GATHER_CAP_BWD = 6e9
METHOD = "CUDA graph replay of several rotated input sets, triton.testing.do_bench median, ms per call"


def make_bank(d_in, d_out, r, gen, L=L):
    A = (torch.randn(L, d_in, r, generator=gen, device="cuda") / d_in**0.5).to(DTYPE)
    B = (torch.randn(L, r, d_out, generator=gen, device="cuda") / r**0.5).to(DTYPE)
    scales = torch.full((L,), 2.0, device="cuda")
    ranks = torch.full((L,), r, dtype=torch.int32, device="cuda")
    return A, B, scales, ranks


def make_routing(T, gen, L=L):
    logits = torch.randn(T, L, generator=gen, device="cuda")
    top, ids = logits.topk(K, dim=1)
    return ids.contiguous(), torch.softmax(top, 1).to(DTYPE).contiguous()


FORCED = {"loramux_bank": "bank", "loramux_routed": "token"}  # kernels.switches.forced_path per variant


def layer(variant, x, W, A, B, scales, ranks, ids, w):
    y = F.linear(x, W)
    if variant == "base":
        return y
    if variant == "loramux":
        return multi_lora(x, y, A, B, scales, ranks, ids, w)
    if variant in FORCED:
        with switches.forced_path(FORCED[variant]):
            return multi_lora(x, y, A, B, scales, ranks, ids, w)
    if variant == "peft_single":
        return y + (x @ A[0]) @ B[0] * scales[0].to(x.dtype)
    if variant == "meteora_bmm":
        Asel, Bsel = A[ids], B[ids]  # [T, K, d_in, r], [T, K, r, d_out]: the per-token copies
        h = torch.matmul(x[:, None, None, :], Asel) * (w * scales[ids].to(w.dtype))[..., None, None]
        return y + torch.matmul(h, Bsel).sum(1).squeeze(1)
    if variant == "loop":
        for a in range(A.shape[0]):
            tok, slot = torch.where(ids == a)
            if tok.numel() == 0:
                continue
            delta = (x[tok] @ A[a]) @ B[a] * (w[tok, slot] * scales[a].to(w.dtype))[:, None]
            y = y.index_add(0, tok, delta)
        return y
    raise ValueError(variant)


def bench_config(d_in, d_out, T, results, log, ranks=RANKS, adapters=L, path_variants=False):
    """Time every variant of one (shape, T) for each rank in ``ranks`` over a bank of ``adapters``; ``path_variants``
    (--paths) also times the forced forward paths (fwd rows only)."""
    gen = torch.Generator(device="cuda").manual_seed(1000 * T + d_in // 7 + d_out)
    w_bytes = d_in * d_out * 2
    n_sets = max(1, min(6, int(200e6 // w_bytes) + 1)) if T <= 64 else 2
    Ws = [
        (torch.randn(d_out, d_in, generator=gen, device="cuda") / d_in**0.5).to(DTYPE) for _ in range(n_sets)
    ]
    xs = [torch.randn(T, d_in, generator=gen, device="cuda").to(DTYPE) for _ in range(n_sets)]
    routes = [make_routing(T, gen, adapters) for _ in range(n_sets)]
    stream = torch.cuda.Stream()
    base_ms = {}
    for r in ranks:
        banks = [make_bank(d_in, d_out, r, gen, adapters) for _ in range(n_sets)]
        gather = T * K * r * (d_in + d_out) * 2
        forced = tuple(FORCED) if path_variants else ()
        for variant in ("base", "loramux", *forced, "meteora_bmm", "loop", "peft_single"):
            if variant == "base" and r != ranks[0]:
                for direction in ("fwd", "bwd"):
                    results.append(row(d_in, d_out, r, T, variant, direction, base_ms[direction], 1.0))
                continue
            for direction in ("fwd",) if variant in FORCED else ("fwd", "bwd"):
                cap = GATHER_CAP_FWD if direction == "fwd" else GATHER_CAP_BWD
                if variant == "meteora_bmm" and gather > cap:
                    results.append(
                        row(
                            d_in,
                            d_out,
                            r,
                            T,
                            variant,
                            direction,
                            None,
                            None,
                            f"skipped: gathers {gather / 1e9:.0f} GB",
                        )
                    )
                    continue
                graph = variant != "loop" and not (variant == "meteora_bmm" and T >= 1024)
                sets = 1 if variant == "meteora_bmm" and T >= 1024 else n_sets

                def make_fn(i, variant=variant, direction=direction, banks=banks):
                    A, B, scales, ranks = banks[i % len(banks)]
                    ids, w = routes[i]
                    if direction == "fwd":
                        return lambda: layer(variant, xs[i], Ws[i], A, B, scales, ranks, ids, w)
                    if variant == "peft_single":  # one adapter's own A, B are the trained leaves
                        A, B = A[:1], B[:1]
                    x, W, A, B, w = (t.detach().requires_grad_(True) for t in (xs[i], Ws[i], A, B, w))
                    leaves = {"base": [x, W], "peft_single": [x, W, A, B]}.get(variant, [x, W, A, B, w])
                    out = layer(variant, x, W, A, B, scales, ranks, ids, w)
                    grad = torch.randn_like(out)
                    return lambda: torch.autograd.grad(out, leaves, grad, retain_graph=True)

                t0 = time.time()
                try:
                    ms = time_ms(make_fn, sets, graph, stream)
                    note = None if graph else "eager (not graph-captured)"
                except torch.OutOfMemoryError:
                    ms, note = None, "out of memory"
                torch.cuda.empty_cache()
                if variant == "base":
                    base_ms[direction] = ms
                ratio = None if ms is None else ms / base_ms[direction]
                results.append(row(d_in, d_out, r, T, variant, direction, ms, ratio, note))
                log(f"{d_in:>5}->{d_out:<5} r={r:<2} T={T:<4} {variant:<11} {direction} "
                    f"{'-' if ms is None else f'{ms:9.4f} ms  x{ratio:6.3f}'}  ({time.time() - t0:.1f}s) {note or ''}")  # fmt: skip
        # correctness of the benchmarked op on these shapes: loramux vs the fp32 reference of the same inputs
        A, B, scales, ranks = banks[0]
        ids, w = routes[0]
        y = F.linear(xs[0], Ws[0])
        got = multi_lora(xs[0], y, A, B, scales, ranks, ids, w).float()
        ref = multi_lora(xs[0], y, A, B, scales, ranks, ids, w, backend="torch").float()
        err = ((got - ref).norm() / ref.norm()).item()
        delta_err = ((got - ref).norm() / (ref - y.float()).norm()).item()
        results.append({"check": "fwd_rel_err_vs_torch_fp32", "d_in": d_in, "d_out": d_out, "r": r, "T": T,
                        "rel_err_out": err, "rel_err_delta": delta_err})  # fmt: skip
        log(f"   check r={r} T={T}: rel err out {err:.2e}, of the delta {delta_err:.2e}")
        torch.cuda.empty_cache()


def row(d_in, d_out, r, T, variant, direction, ms, ratio, note=None):
    out = {"d_in": d_in, "d_out": d_out, "r": r, "T": T, "variant": variant, "direction": direction,
           "ms": ms, "ratio_to_base": ratio}  # fmt: skip
    if note:
        out["note"] = note
    return out


def markdown(doc) -> str:
    p = doc["provenance"]
    lines = [
        "# kernel_bench: multi-LoRA layer time as a ratio to the base linear (same shape, same run)",
        "",
        (
            f"{p['device']}, torch {p['torch']}, triton {p['triton']}, git {p['git_sha'][:10]}, {p['date']}. "
            f"L = {L}, top-{K}, bf16, CUDA graphs, median ({p['method']})."
        ),
        "",
    ]
    rows = [r for r in doc["rows"] if "variant" in r]
    variants = ["loramux", "meteora_bmm", "loop", "peft_single"]
    fwd_variants = ["loramux", *FORCED, "meteora_bmm", "loop", "peft_single"]
    for d_in, d_out in SHAPES:
        lines += [f"## {d_in} -> {d_out}", ""]
        head = "| r | T | base fwd ms | " + " | ".join(f"{v} fwd" for v in fwd_variants)
        head += " | base bwd ms | " + " | ".join(f"{v} bwd" for v in variants) + " |"
        lines += [head, "|" + "---|" * (3 + 1 + len(fwd_variants) + len(variants))]
        for r in sorted({x["r"] for x in rows}):
            for T in sorted({x["T"] for x in rows}):
                sel = {(x["variant"], x["direction"]): x for x in rows if (x["d_in"], x["d_out"], x["r"], x["T"]) == (d_in, d_out, r, T)}  # fmt: skip
                if not sel:
                    continue

                def cell(v, d, sel=sel):
                    x = sel.get((v, d))
                    return "-" if x is None or x["ratio_to_base"] is None else f"{x['ratio_to_base']:.2f}"

                def ms(d, sel=sel):
                    x = sel.get(("base", d))
                    return "-" if x is None or x["ms"] is None else f"{x['ms']:.4f}"

                lines.append(
                    f"| {r} | {T} | {ms('fwd')} | " + " | ".join(cell(v, "fwd") for v in fwd_variants)
                    + f" | {ms('bwd')} | " + " | ".join(cell(v, "bwd") for v in variants) + " |"
                )  # fmt: skip
        lines.append("")
    checks = [r for r in doc["rows"] if "check" in r]
    if checks:
        worst = max(c["rel_err_out"] for c in checks)
        worst_d = max(c["rel_err_delta"] for c in checks)
        lines += [(f"Correctness on every benchmarked configuration: loramux output vs the torch path (fp32 accumulation) "
                  f"on the same bf16 inputs, worst relative error {worst:.2e} of the output, {worst_d:.2e} of the delta."), ""]  # fmt: skip
    lines += [("Notes: loop runs eager (data-dependent shapes sync with the host); meteora_bmm runs eager at T >= 1024 and "
              "is skipped where its per-token gathers exceed the memory caps; peft_single is emulated as peft's unmerged "
              "LoRA Linear computes it (y + (x @ A) @ B * s)."), ""]  # fmt: skip
    return "\n".join(lines)


def paths_markdown(doc) -> str:
    """kernel_bench_paths.md: the forward paths forced one by one (routed = sort-free token kernels at T <= 64,
    grouped above; bank = every adapter, routing as a coefficient), per bank size L, as ratios to the base."""
    p = doc["provenance"]
    lines = ["# kernel_bench_paths: the multi-LoRA forward paths against each other (ratio to the base linear)", "",
             (f"{p['device']}, torch {p['torch']}, triton {p['triton']}, git {p['git_sha'][:10]}, {p['date']}. "
              f"Top-{K} uniform token routing, bf16, CUDA graphs, median. `loramux` = what the dispatch "
              f"(`kernels.triton_ops.forward_path`) picks at the code of the run."), ""]  # fmt: skip
    rows = [r for r in doc["rows"] if r.get("direction") == "fwd"]
    for n in sorted({r.get("L", L) for r in rows}):
        lines += [f"## L = {n} adapters", "", "| d_in -> d_out | r | T | base ms | routed | bank | loramux | faster |",
                  "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        keys = sorted({(r["d_in"], r["d_out"], r["r"], r["T"]) for r in rows if r.get("L", L) == n})
        for key in keys:
            sel = {r["variant"]: r for r in rows if r.get("L", L) == n and (r["d_in"], r["d_out"], r["r"], r["T"]) == key}
            routed, bank = sel.get("loramux_routed"), sel.get("loramux_bank")
            if not routed or not bank or "base" not in sel:
                continue

            def ratio(v, sel=sel):
                x = sel.get(v)
                return "-" if x is None or x["ratio_to_base"] is None else f"{x['ratio_to_base']:.2f}"

            faster = "bank" if bank["ms"] < 0.97 * routed["ms"] else ("routed" if routed["ms"] < 0.97 * bank["ms"] else "tie")
            lines.append(f"| {key[0]} -> {key[1]} | {key[2]} | {key[3]} | {sel['base']['ms']:.4f} | {ratio('loramux_routed')} "
                         f"| {ratio('loramux_bank')} | {ratio('loramux')} | {faster} |")  # fmt: skip
        lines.append("")
    if p.get("note"):
        lines += [p["note"], ""]
    return "\n".join(lines)


def profile(d_in, d_out, T, r, path):
    """Per-kernel CUDA time of one loramux forward + backward (torch.profiler), forward path forced, to see where
    the time goes."""
    with switches.forced_path(path):
        _profile(d_in, d_out, T, r, path)


def _profile(d_in, d_out, T, r, path):
    gen = torch.Generator(device="cuda").manual_seed(0)
    A, B, scales, ranks = make_bank(d_in, d_out, r, gen)
    ids, w = make_routing(T, gen)
    x = torch.randn(T, d_in, generator=gen, device="cuda").to(DTYPE).requires_grad_(True)
    y = torch.randn(T, d_out, generator=gen, device="cuda").to(DTYPE)
    A.requires_grad_(True)
    for _ in range(3):
        multi_lora(x, y, A, B, scales, ranks, ids, w).sum().backward()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            multi_lora(x, y, A, B, scales, ranks, ids, w).sum().backward()
        torch.cuda.synchronize()
    print(f"--- profile {d_in}->{d_out} T={T} r={r} forward path {path} (5 fwd+bwd)")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60))


def main(argv=None) -> None:
    ap = ArgumentParser(prog="python -m kernels.bench", description=__doc__.splitlines()[0])
    ap.add_argument(
        "--out", default="outputs/tables", help="directory for kernel_bench.json and kernel_bench.md"
    )
    ap.add_argument("--tokens", type=int, nargs="*", default=TOKENS)
    ap.add_argument("--shapes", type=int, nargs="*", default=None, choices=range(len(SHAPES)),
                    help="indices into SHAPES")
    ap.add_argument(
        "--profile", action="store_true", help="only print per-kernel profiles of a few configurations"
    )
    ap.add_argument("--ranks", type=int, nargs="*", default=None, help=f"ranks to run (default {RANKS})")
    ap.add_argument("--quick", action="store_true",
                    help="4096->4096 only, T in {1, 16, 64, 4096}, r in {8, 64} (with --overhead: fewer shapes)")
    ap.add_argument("--overhead", action="store_true",
                    help="time the host cost of 210 back-to-back decode calls instead (kernels.bench.overhead)")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                    help="--overhead only: cuda, or cpu to time the CPU path")
    ap.add_argument("--paths", action="store_true",
                    help="A/B of the forward paths (routed vs bank, fwd) per bank size: writes kernel_bench_paths.*")
    ap.add_argument("--adapters", type=int, nargs="*", default=None, help=f"--paths: bank sizes L (default {L})")
    ap.add_argument("--epilogue", action="store_true",
                    help="time a projection group's decode GEMM and its expand_shrunk epilogue (8B groups, T 1 / 8, "
                         "per block_n): writes kernel_bench_epilogue.* (kernels.bench.epilogue)")
    args = ap.parse_args(argv)
    if args.epilogue:
        from kernels.bench import epilogue as bench_epilogue  # lazy: only the --epilogue mode uses it

        bench_epilogue.main(args.out)
        return
    if args.overhead:
        from kernels.bench import overhead as bench_overhead  # lazy: only the --overhead mode uses it

        bench_overhead.main(args.device, args.out, quick=args.quick)
        return
    ranks = list(RANKS)
    if args.quick:
        args.shapes, args.tokens, ranks = [0], [1, 16, 64, 4096], [8, 64]
    if args.ranks:
        ranks = list(args.ranks)
    if not torch.cuda.is_available():
        raise SystemExit(user_error("kernels.bench needs a CUDA GPU; run it on the GPU machine "
                                    "(python -m kernels.bench --out DIR)"))
    if args.profile:
        for d_in, d_out, T, r, path in [(4096, 4096, 4096, 16, "bank"), (4096, 4096, 4096, 16, "grouped"),
                                        (4096, 4096, 64, 8, "bank"), (4096, 4096, 64, 8, "token"),
                                        (4096, 4096, 1, 8, "bank"), (4096, 14336, 4096, 64, "grouped")]:  # fmt: skip
            profile(d_in, d_out, T, r, path)
        return
    os.makedirs(args.out, exist_ok=True)
    results: list = []
    t0 = time.time()
    shapes = SHAPES if args.shapes is None else [SHAPES[i] for i in args.shapes]
    if args.paths:
        paths_main(args, shapes, t0, ranks)
        return

    def save():
        doc = {"provenance": provenance(t0, METHOD), "rows": results}
        atomic_write_text(os.path.join(args.out, "kernel_bench.json"), json.dumps(doc, indent=1))
        md = markdown(doc)
        atomic_write_text(os.path.join(args.out, "kernel_bench.md"), md)
        return md

    for d_in, d_out in shapes:
        for T in args.tokens:
            bench_config(d_in, d_out, T, results, lambda s: print(s, flush=True), ranks)
            save()  # a partial table survives a run cut short
    print(save())


def paths_main(args, shapes, t0, ranks) -> None:
    """--paths: every config once per bank size, with the forced-path variants; writes kernel_bench_paths.*"""
    rows = []
    for n in args.adapters or [L]:
        for d_in, d_out in shapes:
            for T in args.tokens:
                res: list = []
                bench_config(d_in, d_out, T, res, lambda s, n=n: print(f"L={n} {s}", flush=True), ranks, n, True)
                rows += [dict(r, L=n) for r in res if r.get("direction") == "fwd"]
                doc = {"provenance": provenance(t0, METHOD), "rows": rows}
                atomic_write_text(os.path.join(args.out, "kernel_bench_paths.json"), json.dumps(doc, indent=1))
                atomic_write_text(os.path.join(args.out, "kernel_bench_paths.md"), paths_markdown(doc))
    print(paths_markdown(doc))


if __name__ == "__main__":
    main()
