"""A projection group's decode GEMV with the uniform LoRA in its epilogue: one launch where there are two.

When one adapter serves every token (the oracle on one task, LoRA-B), a projection group (q/k/v, gate/up: members
that read the same x) packs its weight as

    W = [members' base rows (N) | the adapter's shrink rows A^T, every member's (E, zero rows up to a multiple of 8)]

and today decodes in two launches (``models.projection_groups``): cuBLAS's GEMM ``y_all = x W^T`` (base outputs
and h = x A side by side), then one ``addmm`` adding ``h @ B_slot`` (B_slot [E, N]: member m's ``scale * B_m`` in
its rank rows and columns, zeros elsewhere). At decode the GEMM is a memory-bound GEMV over W's bytes and the
addmm is a second kernel over a few KB, so the adapter's cost is a launch, not bytes. This op is both in one
launch:

    out[t, c] = x[t] . W[c] + (x[t] W[N:N+E]^T) . B_slot[:, c]          t < T, c < N

Backends: ``triton`` (``kernels.triton_packed_gemv``: a program per 16 tokens x ``block_n`` columns walks d_in once
for its base rows and the E shrink rows, then adds its block's ``h @ B_slot``; CUDA, or CPU under
TRITON_INTERPRET=1); ``torch``: the two-launch form above (the CPU path and the reference the kernel is held to);
``auto``: triton on CUDA, torch elsewhere. ``E = 0`` is the base GEMV alone, so the benchmark can time this form
against cuBLAS's base GEMM with and without the epilogue (``kernels.bench.epilogue``). The model takes it only
when asked (``MultiLoRAModel.group_projections(one_launch=True)``) until that benchmark and the e2e table say where
it wins. Inference only: no autograd (an input that requires grad under grad mode is refused).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels import switches

BACKENDS = ("auto", "triton", "torch")
BLOCK_T = 16  # token rows a program takes: tl.dot's smallest M (a decode call's rows past T are masked)
BLOCK_K = 128  # d_in per loop step: x [16, 128] and W [block_n, 128] tiles, bf16
NUM_STAGES = 4  # software-pipelined loads in flight per program (a GEMV is bound by them)


def default_block_n(device_type: str) -> int:
    """Output columns a program takes: 32 on CUDA (a guess until the H200 epilogue benchmark's sweep decides;
    LLaMA-8B's q/k/v group is then 192 programs, gate/up 896), 16 under the interpreter (blocks straddle
    members in the tests' small groups)."""
    return 32 if device_type == "cuda" else 16


def _check(x, W, N, E, B_slot, out, block_n, block_k):
    def bad(msg):
        raise ValueError(f"gemv_lora: {msg}")

    if x.dim() != 2 or W.dim() != 2:
        bad(f"x must be [T, d_in] and W [rows, d_in]; got {tuple(x.shape)} / {tuple(W.shape)}")
    if W.shape[1] != x.shape[1]:
        bad(f"W's d_in {W.shape[1]} differs from x's {x.shape[1]}")
    if not (0 < N and 0 <= E and N + E <= W.shape[0]):
        bad(f"need 0 < N, 0 <= E and N + E <= W's {W.shape[0]} rows; got N={N}, E={E}")
    if E and (B_slot is None or tuple(B_slot.shape) != (E, N)):
        bad(f"B_slot must be [E={E}, N={N}], got {None if B_slot is None else tuple(B_slot.shape)}")
    dts = {x.dtype, W.dtype} | ({B_slot.dtype} if E else set())
    if len(dts) != 1:
        bad(f"x, W and B_slot must share one dtype, got {sorted(map(str, dts))}")
    if E > 128:
        bad(f"at most 128 shrink rows (E = {E}): a wider adapter set takes the two-launch form")
    if out is not None and (tuple(out.shape) != (x.shape[0], N) or out.dtype != x.dtype or out.stride(-1) != 1):
        bad(f"out must be [T, N] = {(x.shape[0], N)} of x's dtype {x.dtype}, columns contiguous; got {out.dtype} "
            f"{tuple(out.shape)}")
    for name, v in (("block_n", block_n), ("block_k", block_k)):
        if v is not None and (not isinstance(v, int) or v < 16 or v & (v - 1)):
            bad(f"{name} must be a power of two >= 16 (or None), got {v!r}")
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, W, B_slot)):
        bad("inference only (no autograd): call it under torch.no_grad() or on detached tensors")


def gemv_lora_torch(x, W, N, E, B_slot) -> torch.Tensor:
    """The two-launch form: the packed GEMM, then ``addmm`` of h and B_slot onto the base columns (a new tensor)."""
    y_all = F.linear(x, W[:N + E])
    if not E:
        return y_all.contiguous()
    return torch.addmm(y_all[:, :N], y_all[:, N:], B_slot)


def _unit_cols(t):
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


def gemv_lora(x, W, N, E, B_slot=None, *, out=None, backend="auto", block_n=None, block_k=None,
              num_stages=NUM_STAGES) -> torch.Tensor:  # fmt: skip
    """``x W[:N]^T + (x W[N:N+E]^T) B_slot`` as [T, N] of x's dtype (into ``out`` if given).

    x [T, d_in]; W [>= N + E, d_in] (rows past N + E are never read: the routed modes' bank and gate rows may
    follow); B_slot [E, N] with each member's scale folded in (None at E = 0). Any row strides; a column stride
    other than 1 is copied. ``block_n`` / ``block_k``: the Triton program's output columns and d_in step (powers
    of two >= 16; None: ``default_block_n`` / ``BLOCK_K``); the torch backend ignores them."""
    if backend not in BACKENDS:
        raise ValueError(f"gemv_lora: unknown backend {backend!r}; use one of {BACKENDS}")
    _check(x, W, N, E, B_slot, out, block_n, block_k)
    if backend == "auto":
        backend = "triton" if x.is_cuda else "torch"
    if backend == "torch":
        res = gemv_lora_torch(x, W, N, E, B_slot)
        return res if out is None else out.copy_(res)
    from kernels import triton_packed_gemv  # lazy: after TRITON_INTERPRET is chosen

    if out is None:
        out = torch.empty(x.shape[0], N, dtype=x.dtype, device=x.device)
        if switches.state.poison:  # tests: a column the kernel misses shows as NaN
            out.fill_(float("nan"))
    return triton_packed_gemv.launch(_unit_cols(x), _unit_cols(W), N, E, _unit_cols(B_slot), out, BLOCK_T,
                                   block_n or default_block_n(x.device.type), block_k or BLOCK_K, num_stages)
