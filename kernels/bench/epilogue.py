"""A projection group's decode epilogue on the GPU: ``python -m kernels.bench --epilogue [--out DIR]`` writes
kernel_bench_epilogue.{json,md}; ``python -m kernels.bench.epilogue FILE.json`` rebuilds the page from the JSON.

A grouped projection at decode (``models/projection_groups.py``, ``ProjectionGroup._routed_expand``) is one GEMM
over a packed weight whose rows are

    [members' base rows (N) | uniform shrink rows (n R, rounded up to 8) | every adapter's A^T (n x L x R) |
     MeteoRA's gates (n x L)]

then one ``kernels.expand_shrunk`` launch, in place on the base columns of that GEMM's output (y, h and the
logits are strided views of it). This builds that layout for the LLaMA-3-8B groups (GROUPS: q/k/v, gate/up, o,
down), T in {1, 8} decode tokens, L = 28 adapters of rank 8, top-2, bf16, and times each piece. Modes:

  uniform   one adapter for every token (the oracle on one task): GEMM over the base + shrink rows, one addmm
  seq       DLP: ids / weights per sequence + seq_ids (a decode batch: one sequence per token), GEMM over the base,
            shrink and bank rows, expand_shrunk
  logits    MeteoRA: each member's top-2 of its gate logits (temperature 1), GEMM over every row, expand_shrunk

Per (group, T, mode, block_n, block_t), each the median us of one call over a CUDA graph replay
(``kernels.bench.timing.time_ms``: input sets rotated inside one graph, triton.testing.do_bench, which flushes L2
between replays):

  base_gemm_us            (a) F.linear over the members' base rows only (the base model's GEMM)
  packed_gemm_us          (b) F.linear over the mode's rows of the packed weight
  epilogue_us             (c) the epilogue alone on a ready GEMM output (expand_shrunk in place; uniform: addmm),
                              EPI_SETS sets per graph
  gemm_plus_epilogue_us   (d) (b) then (c), captured together in one graph

Uniform mode also times the one-launch form (``kernels.gemv_lora``: a Triton GEMV over the base and shrink rows
with the ``h @ B_slot`` epilogue inside, rows with ``form: one_launch``) for each (block_n, block_k) in
ONE_LAUNCH_BLOCKS:
``gemm_plus_epilogue_us`` is that one launch, ``triton_base_us`` the same kernel over the base rows alone (what the
Triton GEMV costs against cuBLAS's (a), before any adapter).

``programs``: expand_shrunk's grid, cdiv(T, block_t) x cdiv(N, block_n), for each block_n in BLOCK_NS (the op's
default is ``kernels.shrunk_expand.default_block_n``) with one token per program (block_t 1, the op's default) and,
at T > 1, all T tokens in one (block_t = T: fewer programs, each with T independent tokens' loads). ``rel_err``:
(b)+(c) in bf16 against the ungrouped fp32 reference (each member's base + its routed adapters' LoRA; MeteoRA's
route taken from the GEMM's own bf16 logits, so a bf16 near tie does not count). ``graph_kernel_floor_us`` (the
doc): one trivial kernel's time inside a graph on this GPU. The layout is checked against ``ProjectionGroup``'s
on CPU (tests/test_kernel_bench_epilogue.py).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

from common.atomic import atomic_write_text
from common.cli_args import user_error
from kernels import expand_shrunk, gemv_lora
from kernels.packed_gemv import BLOCK_T as ONE_LAUNCH_BLOCK_T
from kernels.shrunk_expand import default_block_n

#: name -> (members' out sizes, d_in): LLaMA-3-8B's projection groups (q/k/v, gate/up, o, down)
GROUPS = {"qkv": ((4096, 1024, 1024), 4096), "gate_up": ((14336, 14336), 4096), "o": ((4096,), 4096),
          "down": ((4096,), 14336)}  # fmt: skip
TOKENS = (1, 8)
L, R, K, TEMPERATURE = 28, 8, 2, 1.0
SCALE = 2.0  # each adapter's LoRA scale (folded into its B, as the model folds it)
MODES = ("uniform", "seq", "logits")
BLOCK_NS = (16, 32, 64, 128)
# gemv_lora's (output columns, d_in step) per program, swept (uniform mode): 16 columns give LLaMA-8B's o / down 256
# programs (no split-K: many small programs keep the loads in flight), 256 of d_in twice the bytes per step
ONE_LAUNCH_BLOCKS = tuple((bn, bk) for bn in (16, 32, 64) for bk in (128, 256))
SHRINK_ALIGN = 8  # models.projection_groups.SHRINK_ALIGN (the test checks they agree)
PACK_ALIGN = 64  # models.projection_groups.PACK_ALIGN: a routed mode's packed rows, zero rows up to a multiple
LAYERS = 32  # LLaMA-3-8B: each group runs once per layer per decode step
EPI_SETS = 6  # input sets of the epilogue-alone graph (its inputs are small: more sets, one graph launch)
GEMM_ROTATE_BYTES = 200e6  # the GEMM graphs rotate weight copies up to about this many bytes (as kernel_bench)
DTYPE = torch.bfloat16
METHOD = ("CUDA graph replay of several rotated input sets (kernels.bench.timing.time_ms), triton.testing.do_bench median, "
          "us per call")  # fmt: skip
OUT_NAME = "kernel_bench_epilogue"


@dataclasses.dataclass
class Group:
    """One projection group's decode inputs, laid out as ``ProjectionGroup`` lays them out.

    ``W`` holds every row (base | shrink of the uniform adapter | bank | gates | zero rows up to PACK_ALIGN); a
    mode's GEMM takes a prefix of it (``rows``: a routed mode's rounded up to PACK_ALIGN, as the model's;
    ``used_rows``: without the rounding). ``A[m]`` [L, d_in, R] and ``Bs[m]`` [L, R, d_m] (scale folded) are member m's adapters, ``gates``
    [n L, d_in] its gates' rows; ``B`` [L, R, N] and ``col_member`` [N] are expand_shrunk's, ``B_slot`` [extra, N]
    the uniform addmm's block-diagonal B. Route: ``ids`` / ``weights`` [S, K] + ``seq_ids`` [T] (seq), the
    ``adapter`` of every token (uniform), or the gates with ``top_k`` / ``temperature`` (logits)."""

    sizes: tuple
    x: torch.Tensor
    W: torch.Tensor
    A: list
    Bs: list
    gates: torch.Tensor
    B: torch.Tensor
    col_member: torch.Tensor
    B_slot: torch.Tensor
    adapter: int
    ids: torch.Tensor
    weights: torch.Tensor
    seq_ids: torch.Tensor
    top_k: int
    temperature: float

    @property
    def n(self) -> int:
        return len(self.sizes)

    @property
    def N(self) -> int:
        return sum(self.sizes)

    @property
    def L(self) -> int:
        return self.A[0].shape[0]

    @property
    def R(self) -> int:
        return self.A[0].shape[2]

    @property
    def extra(self) -> int:
        return -(-self.n * self.R // SHRINK_ALIGN) * SHRINK_ALIGN

    def used_rows(self, mode: str) -> int:
        """The rows the mode's GEMM needs: base | shrink (| bank A^T for a routed mode | gates for logits)."""
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; use one of {MODES}")
        r = self.N + self.extra
        if mode != "uniform":
            r += self.n * self.L * self.R
        if mode == "logits":
            r += self.n * self.L
        return r

    def rows(self, mode: str) -> int:
        """How many rows of ``W`` the mode's GEMM takes (the model's packed weight for that route: a routed mode's
        rows rounded up to PACK_ALIGN; the uniform prefix is the base and shrink rows alone)."""
        r = self.used_rows(mode)
        return r if mode == "uniform" else -(-r // PACK_ALIGN) * PACK_ALIGN


def build_group(sizes, d_in, T, *, L=L, R=R, K=K, S=None, temperature=TEMPERATURE, dtype=DTYPE, device="cuda",
                gen=None) -> Group:  # fmt: skip
    """Random weights, adapters, gates, one decode batch ``x`` [T, d_in] and a DLP route over ``S`` sequences
    (default T: one per token) in ``ProjectionGroup``'s packed layout (``pack`` + ``_ready_rows`` +
    ``_shrink_rows`` of adapter 0 + ``_expand_weights``)."""
    gen = gen if gen is not None else torch.Generator(device=device).manual_seed(0)
    n, N = len(sizes), sum(sizes)
    S = T if S is None else S

    def randn(*shape, std=1.0):
        return (torch.randn(*shape, generator=gen, device=device) * std).to(dtype)

    extra = -(-n * R // SHRINK_ALIGN) * SHRINK_ALIGN
    used = N + extra + n * L * R + n * L
    W = torch.zeros(-(-used // PACK_ALIGN) * PACK_ALIGN, d_in, dtype=dtype, device=device)
    W[:N] = randn(N, d_in, std=d_in**-0.5)
    A = [randn(L, d_in, R, std=d_in**-0.5) for _ in sizes]
    Bs = [randn(L, R, d, std=SCALE * R**-0.5) for d in sizes]
    gates = randn(n * L, d_in, std=d_in**-0.5)
    adapter = 0
    W[N:N + extra] = 0
    W[N:N + n * R] = torch.cat([a[adapter] for a in A], 1).T  # the uniform adapter's [A_q | A_k | A_v]^T
    o = N + extra
    for a in A:  # every adapter's A_m[a]^T, member by member
        W[o:o + L * R] = a.transpose(1, 2).reshape(L * R, d_in)
        o += L * R
    W[o:o + n * L] = gates
    B = torch.cat(Bs, 2).contiguous()
    col_member = torch.repeat_interleave(torch.arange(n, device=device), torch.tensor(sizes, device=device))
    B_slot = torch.zeros(extra, N, dtype=dtype, device=device)
    c = 0
    for m, b in enumerate(Bs):
        B_slot[m * R:(m + 1) * R, c:c + b.shape[2]] = b[adapter]
        c += b.shape[2]
    top, ids = torch.randn(S, L, generator=gen, device=device).topk(K, dim=1)
    return Group(tuple(sizes), randn(T, d_in), W, A, Bs, gates, B, col_member.to(torch.int32), B_slot, adapter,
                 ids.contiguous(), torch.softmax(top, 1).contiguous(), torch.arange(T, device=device) % S, K,
                 float(temperature))  # fmt: skip


def base_gemm(g: Group) -> torch.Tensor:
    """(a) The base model's GEMM: the members' base rows only."""
    return F.linear(g.x, g.W[:g.N])


def packed_gemm(g: Group, mode: str, aligned: bool = True) -> torch.Tensor:
    """(b) The group's GEMM over the mode's rows of the packed weight; ``aligned=False``: (b0), over the rows it
    needs, not rounded up to PACK_ALIGN."""
    return F.linear(g.x, g.W[:g.rows(mode) if aligned else g.used_rows(mode)])


def epilogue(g: Group, mode: str, y_all: torch.Tensor, block_n=None, backend="auto", block_t=1) -> torch.Tensor:
    """(c) What ``ProjectionGroup`` runs on the GEMM output ``y_all``: the members' [T, N] outputs (expand_shrunk
    in place on y_all's base columns; uniform: a new tensor from one addmm)."""
    N, n, L, R = g.N, g.n, g.L, g.R
    if mode == "uniform":
        return torch.addmm(y_all[:, :N], y_all[:, N:], g.B_slot)
    o = N + g.extra
    y = y_all[:, :N]
    h = y_all[:, o:o + n * L * R].unflatten(1, (n, L, R))
    if mode == "logits":
        logits = y_all[:, o + n * L * R:o + n * L * R + n * L].unflatten(1, (n, L))
        expand_shrunk(y, h, g.B, g.col_member, logits=logits, top_k=g.top_k, temperature=g.temperature, out=y,
                      backend=backend, block_n=block_n, block_t=block_t)  # fmt: skip
    else:
        expand_shrunk(y, h, g.B, g.col_member, ids=g.ids, weights=g.weights, seq_ids=g.seq_ids, out=y,
                      backend=backend, block_n=block_n, block_t=block_t)  # fmt: skip
    return y


def step(g: Group, mode: str, block_n=None, backend="auto", block_t=1) -> torch.Tensor:
    """(d) = (b) then (c): the group's decode output [T, N]."""
    return epilogue(g, mode, packed_gemm(g, mode), block_n, backend, block_t)


def one_launch(g: Group, block_n: int, lora: bool = True, block_k=None) -> torch.Tensor:
    """(e) The uniform route in one launch (``kernels.gemv_lora``): base + shrink rows with the LoRA epilogue, or
    (``lora=False``) the Triton GEMV over the base rows alone."""
    return gemv_lora(g.x, g.W, g.N, g.extra if lora else 0, g.B_slot if lora else None, block_n=block_n,
                     block_k=block_k)


def programs(g: Group, block_n: int, block_t: int = 1) -> int:
    """expand_shrunk's grid size: cdiv(T, block_t) x cdiv(N, block_n)."""
    return -(-g.x.shape[0] // block_t) * -(-g.N // block_n)


def reference(g: Group, mode: str, logits=None) -> torch.Tensor:
    """The ungrouped group in fp32: per member m, ``x @ W_m^T + sum_k w_k (x @ A_m[a_k]) @ s B_m[a_k]`` with the
    route of ``mode`` (logits: each member's top-k of ``x @ gates_m^T``, or of ``logits`` [T, n, L] if given)."""
    x = g.x.float()
    T, n, L = x.shape[0], g.n, g.L
    if mode == "uniform":
        ids = torch.full((T, n, 1), g.adapter, dtype=torch.long, device=x.device)
        w = torch.ones(T, n, 1, device=x.device)
    elif mode == "seq":
        ids = g.ids.index_select(0, g.seq_ids)[:, None, :].expand(T, n, -1)
        w = g.weights.float().index_select(0, g.seq_ids)[:, None, :].expand(T, n, -1)
    elif mode == "logits":
        if logits is None:
            logits = (x @ g.gates.float().T).unflatten(1, (n, L))
        top, ids = logits.float().topk(g.top_k, dim=-1)
        w = torch.softmax(top / g.temperature, -1)
    else:
        raise ValueError(f"unknown mode {mode!r}; use one of {MODES}")
    outs, r0 = [], 0
    for m, d in enumerate(g.sizes):
        y = x @ g.W[r0:r0 + d].float().T
        a = ids[:, m]  # [T, K]
        hk = torch.einsum("td,tkdr->tkr", x, g.A[m][a].float()) * w[:, m, :, None]
        outs.append(y + torch.einsum("tkr,tkrc->tc", hk, g.Bs[m][a].float()))
        r0 += d
    return torch.cat(outs, 1)


# ---- timing (GPU) ------------------------------------------------------------------------------------------------
def rel_err(got, want) -> float:
    got, want = got.double(), want.double()
    return ((got - want).norm() / want.norm().clamp_min(1e-30)).item()


def check(g: Group, mode: str, block_n=None, block_t=1) -> float:
    """(b)+(c) against the ungrouped fp32 reference (MeteoRA's route from the GEMM's own logits)."""
    y_all = packed_gemm(g, mode)
    logits = None
    if mode == "logits":
        o = g.N + g.extra + g.n * g.L * g.R
        logits = y_all[:, o:o + g.n * g.L].unflatten(1, (g.n, g.L)).clone()
    return rel_err(epilogue(g, mode, y_all, block_n, block_t=block_t), reference(g, mode, logits))


def bench_group(name, T, rows, log, block_ns=BLOCK_NS):
    """Time (a)-(d) of one group at T tokens for every mode (and block_n), appending rows."""
    from kernels.bench.timing import time_ms  # lazy: imports triton.testing

    sizes, d_in = GROUPS[name]
    gen = torch.Generator(device="cuda").manual_seed(1000 * T + sum(sizes) // 7 + d_in)
    probe = build_group(sizes, d_in, T, gen=gen)
    w_bytes = probe.W.numel() * probe.W.element_size()
    n_w = max(1, min(6, int(GEMM_ROTATE_BYTES // w_bytes) + 1))
    groups = [probe] + [build_group(sizes, d_in, T, gen=gen) for _ in range(n_w - 1)]
    # the epilogue-alone sets: their own B / route / GEMM output (W shared: the GEMM is not timed there)
    epi = [dataclasses.replace(groups[i % n_w], B=groups[i % n_w].B.clone(), B_slot=groups[i % n_w].B_slot.clone(),
                               ids=groups[i % n_w].ids.clone(), weights=groups[i % n_w].weights.clone(),
                               seq_ids=groups[i % n_w].seq_ids.clone(), col_member=groups[i % n_w].col_member.clone())
           for i in range(EPI_SETS)]  # fmt: skip
    stream = torch.cuda.Stream()

    def us(make_fn, sets):
        torch.cuda.synchronize()
        return 1e3 * time_ms(make_fn, sets, True, stream)

    t0 = time.time()
    base = us(lambda i: lambda: base_gemm(groups[i]), n_w)
    for mode in MODES:
        gemm = us(lambda i, mode=mode: lambda: packed_gemm(groups[i], mode), n_w)
        unaligned = None  # the same GEMM over the rows it needs, not rounded up: what the alignment buys
        if groups[0].used_rows(mode) != groups[0].rows(mode):
            unaligned = us(lambda i, mode=mode: lambda: packed_gemm(groups[i], mode, aligned=False), n_w)
        # (block_n, block_t): every block_n with one token per program, and where T > 1 also all T tokens in one
        combos = [(None, 1)] if mode == "uniform" else [(bn, bt) for bn in block_ns for bt in sorted({1, T})]
        for bn, bt in combos:

            def make_epi(i, mode=mode, bn=bn, bt=bt):
                y_all = packed_gemm(epi[i], mode)  # a ready GEMM output, the epilogue's in-place target
                return lambda: epilogue(epi[i], mode, y_all, bn, block_t=bt)

            epi_us = us(make_epi, EPI_SETS)
            both = us(lambda i, mode=mode, bn=bn, bt=bt: lambda: step(groups[i], mode, bn, block_t=bt), n_w)
            err = check(groups[0], mode, bn, bt)
            row = {"group": name, "T": T, "mode": mode, "block_n": bn, "block_t": bt,
                   "programs": None if bn is None else programs(groups[0], bn, bt), "base_gemm_us": base,
                   "packed_gemm_us": gemm, "packed_unaligned_us": unaligned, "epilogue_us": epi_us,
                   "gemm_plus_epilogue_us": both, "rel_err": err, "weight_sets": n_w}  # fmt: skip
            rows.append(row)
            log(f"{name:<7} T={T} {mode:<7} bn={bn!s:<4} bt={bt} progs={row['programs']!s:<4} base {base:7.2f}  "
                f"gemm {gemm:7.2f}  epi {epi_us:6.2f}  gemm+epi {both:7.2f} us  rel err {err:.1e}  "
                f"({time.time() - t0:.1f}s)")  # fmt: skip
    for bn, bk in ONE_LAUNCH_BLOCKS:  # the uniform route in one launch, and its Triton GEMV over the base alone
        fused = us(lambda i, bn=bn, bk=bk: lambda: one_launch(groups[i], bn, block_k=bk), n_w)
        tbase = us(lambda i, bn=bn, bk=bk: lambda: one_launch(groups[i], bn, lora=False, block_k=bk), n_w)
        err = rel_err(one_launch(groups[0], bn, block_k=bk), reference(groups[0], "uniform"))
        rows.append({"group": name, "T": T, "mode": "uniform", "form": "one_launch", "block_n": bn, "block_k": bk,
                     "block_t": 1,
                     "programs": -(-T // ONE_LAUNCH_BLOCK_T) * -(-groups[0].N // bn), "base_gemm_us": base, "packed_gemm_us": None,
                     "packed_unaligned_us": None, "epilogue_us": None, "gemm_plus_epilogue_us": fused,
                     "triton_base_us": tbase, "rel_err": err, "weight_sets": n_w})  # fmt: skip
        log(f"{name:<7} T={T} one launch bn={bn:<3} bk={bk:<3} base {base:7.2f}  triton base {tbase:7.2f}  one launch "
            f"{fused:7.2f} us  rel err {err:.1e}  ({time.time() - t0:.1f}s)")  # fmt: skip


def graph_floor_us() -> float:
    """One trivial kernel (a one-element add) per call, EPI_SETS of them in a graph: what any launch costs there."""
    from kernels.bench.timing import time_ms

    bufs = [torch.zeros(1, device="cuda") for _ in range(EPI_SETS)]
    torch.cuda.synchronize()
    return 1e3 * time_ms(lambda i: lambda: bufs[i].add_(1.0), EPI_SETS, True, torch.cuda.Stream())


def main(out_dir="outputs/tables", block_ns=BLOCK_NS, tokens=TOKENS, groups=None) -> dict:
    """Run every (group, T) and write ``OUT_NAME``.{json,md} under ``out_dir`` (after each group: a partial page
    survives a run cut short). CUDA only."""
    if not torch.cuda.is_available():
        raise SystemExit(user_error("kernels.bench --epilogue needs a CUDA GPU; run it on the GPU machine "
                                    "(python -m kernels.bench --epilogue --out DIR)"))
    from kernels.bench.timing import provenance  # lazy: imports triton

    os.makedirs(out_dir, exist_ok=True)
    t0 = time.time()
    rows: list = []
    with torch.no_grad():
        floor = graph_floor_us()
        print(f"graph kernel floor {floor:.2f} us", flush=True)
        doc = {}
        for name in groups or GROUPS:
            for T in tokens:
                bench_group(name, T, rows, lambda s: print(s, flush=True), block_ns)
                torch.cuda.empty_cache()  # the group's weights, freed with bench_group's frame
                doc = document(rows, provenance(t0, METHOD), floor)
                write(doc, out_dir)
    print(markdown(doc))
    return doc


def document(rows, provenance, floor) -> dict:
    return {"provenance": provenance, "config": {"L": L, "R": R, "K": K, "temperature": TEMPERATURE,
            "dtype": str(DTYPE).removeprefix("torch."), "layers": LAYERS, "default_block_n": default_block_n(R, "cuda"),
            "pack_align": PACK_ALIGN,
            "groups": {k: {"sizes": list(v[0]), "d_in": v[1]} for k, v in GROUPS.items()}},
            "graph_kernel_floor_us": floor, "rows": rows}  # fmt: skip


def write(doc, out_dir) -> str:
    atomic_write_text(os.path.join(out_dir, f"{OUT_NAME}.json"), json.dumps(doc, indent=1) + "\n")
    md = markdown(doc)
    atomic_write_text(os.path.join(out_dir, f"{OUT_NAME}.md"), md)
    return md


# ---- the page ----------------------------------------------------------------------------------------------------
def _f(v, digits=2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _unaligned(r) -> float | None:
    """(b0): the packed GEMM over the rows it needs, not rounded up; (b) itself where the two are the same rows,
    and in records made before the rounding (their (b) was this)."""
    v = r.get("packed_unaligned_us")
    return r["packed_gemm_us"] if v is None else v


def _one_launch(r) -> bool:
    """A row of the one-launch form (``kernels.gemv_lora``); the others (and every record made before it) are the
    two-launch GEMM + epilogue."""
    return r.get("form") == "one_launch"


def _diff(a, b):
    return None if a is None or b is None else a - b


def per_token(doc, all_tokens: bool = False) -> list:
    """Per (T, mode) at the op's default block_n (uniform: its addmm) and one token per program (``all_tokens``:
    all T tokens in one program, for T > 1): the 8B's decode step summed over the groups present x LAYERS, in ms:
    (b - a) the packed GEMM's extra rows, (c) the epilogue alone, (d - a) all over base."""
    cfg = doc["config"]
    layers, dflt = cfg["layers"], cfg["default_block_n"]
    out = []
    Ts = sorted({r["T"] for r in doc["rows"]})
    for T in Ts:
        for mode in MODES:
            bt = T if all_tokens and mode != "uniform" else 1
            sel = [r for r in doc["rows"] if r["T"] == T and r["mode"] == mode and r.get("block_t", 1) == bt
                   and not _one_launch(r)
                   and (r["block_n"] is None if mode == "uniform" else r["block_n"] == dflt)]  # fmt: skip
            if not sel:
                continue

            def total(fn, sel=sel):
                vals = [fn(r) for r in sel]
                return None if any(v is None for v in vals) else layers * sum(vals) / 1e3

            out.append({"T": T, "mode": mode, "groups": [r["group"] for r in sel],
                        "gemm_rows_ms": total(lambda r: _diff(r["packed_gemm_us"], r["base_gemm_us"])),
                        "unaligned_rows_ms": total(lambda r: _diff(_unaligned(r), r["base_gemm_us"])),
                        "epilogue_ms": total(lambda r: r["epilogue_us"]),
                        "over_base_ms": total(lambda r: _diff(r["gemm_plus_epilogue_us"], r["base_gemm_us"])),
                        "base_ms": total(lambda r: r["base_gemm_us"])})  # fmt: skip
    return out


def one_launch_per_token(doc) -> list:
    """Per (T, block_n, block_k) of the one-launch rows, summed over the groups present x LAYERS, in ms: cuBLAS's base (a),
    the Triton GEMV over the base alone, the one launch, and the one launch over (a); beside the two-launch
    uniform form over (a) (d - a) from the same run."""
    layers, out = doc["config"]["layers"], []
    ones = [r for r in doc["rows"] if _one_launch(r)]
    for T in sorted({r["T"] for r in ones}):
        two = {r["group"]: r for r in doc["rows"] if r["T"] == T and r["mode"] == "uniform" and not _one_launch(r)}
        for bn, bk in sorted({(r["block_n"], r.get("block_k")) for r in ones if r["T"] == T}, key=str):
            sel = [r for r in ones if r["T"] == T and r["block_n"] == bn and r.get("block_k") == bk]

            def total(fn, sel=sel):
                return layers * sum(fn(r) for r in sel) / 1e3

            two_over = (total(lambda r, two=two: two[r["group"]]["gemm_plus_epilogue_us"] - r["base_gemm_us"])
                        if all(r["group"] in two for r in sel) else None)  # fmt: skip
            out.append({"T": T, "block_n": bn, "block_k": bk, "groups": [r["group"] for r in sel],
                        "base_ms": total(lambda r: r["base_gemm_us"]),
                        "triton_base_ms": total(lambda r: r["triton_base_us"]),
                        "one_launch_ms": total(lambda r: r["gemm_plus_epilogue_us"]),
                        "one_over_base_ms": total(lambda r: r["gemm_plus_epilogue_us"] - r["base_gemm_us"]),
                        "two_over_base_ms": two_over})  # fmt: skip
    return out


TOKEN_HEADER = (("| T | mode | base GEMMs (a) | GEMM rows (b - a) | epilogue (c) | GEMM + epilogue over base "
                 "(d - a) | groups | rows unaligned (b0 - a) |"), "|---|---|---|---|---|---|---|---|")


def _token_line(t) -> str:
    return (f"| {t['T']} | {t['mode']} | {_f(t['base_ms'], 3)} | {_f(t['gemm_rows_ms'], 3)} | "
            f"{_f(t['epilogue_ms'], 3)} | {_f(t['over_base_ms'], 3)} | {', '.join(t['groups'])} | "
            f"{_f(t['unaligned_rows_ms'], 3)} |")


def markdown(doc) -> str:
    """The page, from the JSON document alone (``rebuild`` re-derives it)."""
    p, cfg = doc["provenance"], doc["config"]
    dflt = cfg["default_block_n"]
    align = cfg.get("pack_align")
    rounding = (f", a routed mode's rounded up to a multiple of {align} with zero rows, as the model packs them; (b0) "
                "the same GEMM over the rows it needs, not rounded up ('-': the same rows)" if align else
                ", not rounded up (a record made before the model rounded its packed rows up: (b0) is (b))")
    lines = [
        "# kernel_bench_epilogue: a projection group's decode epilogue (expand_shrunk) against its GEMM",
        "",
        (f"{p['device']}, torch {p['torch']}, triton {p['triton']}, git {p['git_sha'][:10]}, {p['date']}. "
         f"LLaMA-3-8B groups, L = {cfg['L']} adapters of rank {cfg['R']}, top-{cfg['K']}, {cfg['dtype']}; "
         f"median us of one call ({p['method']}). One trivial kernel inside a graph here: "
         f"{_f(doc.get('graph_kernel_floor_us'))} us. Rebuild: `python -m kernels.bench.epilogue <json>`."),
        "",
        ("(a) base GEMM: the members' base rows only; (b) packed GEMM: the mode's rows (base | shrink | bank A^T | "
         f"gates){rounding}; (c) the epilogue alone on a ready GEMM output (expand_shrunk in place; uniform: one "
         "addmm); (d) (b) and (c) in one graph. uniform = one adapter for every token (the oracle), seq = DLP (ids / "
         "weights per sequence + seq_ids), logits = MeteoRA (each member's top-k of its gate logits). rel err: (d) "
         f"in bf16 against the ungrouped fp32 reference. Default block_n: {dflt} (bold)."),
        "",
        f"## Per decode token (x {cfg['layers']} layers, summed over the groups; block_n = {dflt}), ms",
        "",
        *TOKEN_HEADER,
    ]
    for t in per_token(doc):
        lines.append(_token_line(t))
    wide = [t for t in per_token(doc, all_tokens=True) if t["T"] > 1 and t["mode"] != "uniform"]
    if wide:
        lines += ["", f"The same with all T tokens in one program (block_t = T; block_n = {dflt}):", "",
                  *TOKEN_HEADER, *map(_token_line, wide)]
    ones = one_launch_per_token(doc)
    if ones:
        lines += ["", (f"Uniform in one launch (kernels.gemv_lora: a Triton GEMV over the base and shrink rows with "
                       f"the LoRA in its epilogue; x {cfg['layers']} layers, summed over the groups), ms per token:"), "",
                  ("| T | block_n | block_k | cuBLAS base (a) | Triton base GEMV | one launch | one launch over (a) | "
                   "two launches over (a) (d - a) | groups |"),
                  "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        lines += [f"| {t['T']} | {t['block_n']} | {t['block_k'] or '-'} | {_f(t['base_ms'], 3)} | {_f(t['triton_base_ms'], 3)} | "
                  f"{_f(t['one_launch_ms'], 3)} | {_f(t['one_over_base_ms'], 3)} | {_f(t['two_over_base_ms'], 3)} | "
                  f"{', '.join(t['groups'])} |" for t in ones]
    lines.append("")
    for name in [g for g in cfg["groups"] if any(r["group"] == g for r in doc["rows"])]:
        spec = cfg["groups"][name]
        lines += [f"## {name}: members {' + '.join(map(str, spec['sizes']))}, d_in {spec['d_in']}", "",
                  ("| T | mode | block_n | block_t | programs | (a) base GEMM | (b) packed GEMM | (c) epilogue | (d) "
                   "GEMM + epilogue | d - a | d - b | rel err | (b0) rows unaligned |"),
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in doc["rows"]:
            if r["group"] != name:
                continue
            bn = "-" if r["block_n"] is None else (f"**{r['block_n']}**" if r["block_n"] == dflt else str(r["block_n"]))
            err = "-" if r.get("rel_err") is None else f"{r['rel_err']:.1e}"
            mode = r["mode"] + (" (one launch)" if _one_launch(r) else "")
            lines.append(
                f"| {r['T']} | {mode} | {bn} | {r.get('block_t', 1)} | "
                f"{'-' if r['programs'] is None else r['programs']} | "
                f"{_f(r['base_gemm_us'])} | {_f(r['packed_gemm_us'])} | {_f(r['epilogue_us'])} | "
                f"{_f(r['gemm_plus_epilogue_us'])} | {_f(_diff(r['gemm_plus_epilogue_us'], r['base_gemm_us']))} | "
                f"{_f(_diff(r['gemm_plus_epilogue_us'], r['packed_gemm_us']))} | {err} | "
                f"{_f(r.get('packed_unaligned_us'))} |"
            )
        lines.append("")
    return "\n".join(lines)


def rebuild(json_path) -> str:
    """Re-write the .md next to a ``kernel_bench_epilogue.json`` from it; returns the .md's path."""
    with open(json_path) as f:
        doc = json.load(f)
    md_path = os.path.splitext(json_path)[0] + ".md"
    atomic_write_text(md_path, markdown(doc))
    return md_path


if __name__ == "__main__":
    if len(sys.argv) != 2 or not sys.argv[1].endswith(".json"):
        sys.exit("usage: python -m kernels.bench.epilogue outputs/tables/kernel_bench_epilogue.json (rebuilds the .md); "
                 "the benchmark itself: python -m kernels.bench --epilogue")  # fmt: skip
    print(rebuild(sys.argv[1]))
