"""Public entry of the multi-LoRA op and its dispatch.

Backends (keyword ``backend=`` or env ``LORAMUX_KERNEL_BACKEND``; default ``auto``):
  triton     the Triton kernels through the ``loramux::multi_lora`` custom op (autograd registered with
             torch.library, so torch.compile and CUDA graphs hold it); on CPU tensors it needs TRITON_INTERPRET=1
  torch      the vectorised torch path (``kernels.dense``: dense, or gathered at decode), plain autograd
  reference  the readable loop (``kernels.reference``), plain autograd
  auto       triton on CUDA tensors when no gradient is needed, torch elsewhere (CPU; training on CUDA).

Host cost per call matters: a decoding LM calls the op once per wrapped projection per token (210 calls for
SmolLM2-135M with 7 targets), so the inference path does nothing per call but the shape checks and the launch.
When no gradient is needed (``torch.no_grad``, or no input requires grad) and neither torch.compile nor a CUDA
graph capture is running, ``triton`` skips the custom op (its dispatch costs more than the kernels' launches at
decode), casts a bank held in another dtype once per (tensor, version) (``kernels.cast_cache``) and hands sentence
routing to the kernels as it is ([S, K] + seq_ids, no per-token gather). Training and torch.compile go through
the custom op with its registered autograd.
"""

from __future__ import annotations

import os

import torch

from kernels import cast_cache, switches
from kernels.dense import multi_lora_torch
from kernels.reference import check_ids, expand_sequence_routing, multi_lora_reference

BACKENDS = ("auto", "triton", "torch", "reference")


@torch.library.custom_op("loramux::multi_lora", mutates_args=())
def _multi_lora_op(
    x: torch.Tensor,
    base: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    scales: torch.Tensor,
    ranks: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
) -> torch.Tensor:
    # lazy: Triton loads only when a Triton path runs (after TRITON_INTERPRET is chosen)
    from kernels import triton_ops

    return triton_ops.forward(x, base, A, B, scales, ranks, ids, weights)


@_multi_lora_op.register_fake
def _(x, base, A, B, scales, ranks, ids, weights):
    return torch.empty_like(base)


@torch.library.custom_op("loramux::multi_lora_backward", mutates_args=())
def _multi_lora_backward_op(
    grad: torch.Tensor,
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    scales: torch.Tensor,
    ranks: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    # lazy: Triton loads only when a Triton path runs (after TRITON_INTERPRET is chosen)
    from kernels import triton_ops

    return triton_ops.backward(grad, x, A, B, scales, ranks, ids, weights)


@_multi_lora_backward_op.register_fake
def _(grad, x, A, B, scales, ranks, ids, weights):
    return torch.empty_like(x), torch.empty_like(A), torch.empty_like(B), torch.empty_like(weights)


def _setup_context(ctx, inputs, output):
    x, _base, A, B, scales, ranks, ids, weights = inputs
    ctx.save_for_backward(x, A, B, scales, ranks, ids, weights)


def _backward(ctx, grad):
    x, A, B, scales, ranks, ids, weights = ctx.saved_tensors
    dx, dA, dB, dw = _multi_lora_backward_op(grad.contiguous(), x, A, B, scales, ranks, ids, weights)
    return dx, grad, dA, dB, None, None, None, dw


_multi_lora_op.register_autograd(_backward, setup_context=_setup_context)


def _check(x, base, A, B, scales, ranks, ids, weights, seq_ids):
    """Shape checks only (no value is read, so nothing synchronises with the device)."""
    if A.dim() != 3 or B.dim() != 3 or A.shape[0] != B.shape[0] or A.shape[2] != B.shape[1]:
        raise ValueError(
            f"multi_lora: A must be [L, d_in, R] and B [L, R, d_out], got {tuple(A.shape)} / {tuple(B.shape)}"
        )
    if x.shape[-1] != A.shape[1] or base.shape[-1] != B.shape[2] or x.shape[:-1] != base.shape[:-1]:
        raise ValueError(
            f"multi_lora: x {tuple(x.shape)} / base {tuple(base.shape)} do not match A {tuple(A.shape)} / B {tuple(B.shape)}"
        )
    if scales.shape != (A.shape[0],) or ranks.shape != (A.shape[0],):
        raise ValueError(
            f"multi_lora: scales and ranks must be [L={A.shape[0]}], got {tuple(scales.shape)} / {tuple(ranks.shape)}"
        )
    if ids.dim() != 2 or ids.shape != weights.shape:
        raise ValueError(
            f"multi_lora: ids and weights must both be [T or S, K], got {tuple(ids.shape)} / {tuple(weights.shape)}"
        )
    rows = x.numel() // max(x.shape[-1], 1)
    if seq_ids is None and ids.shape[0] != rows:
        raise ValueError(
            f"multi_lora: token routing needs ids [T={rows}, K], got {tuple(ids.shape)}; pass seq_ids for sentence routing"
        )
    if seq_ids is not None and seq_ids.numel() != rows:
        raise ValueError(
            f"multi_lora: seq_ids must name the sequence of each of the {rows} tokens, got {tuple(seq_ids.shape)}"
        )


def _needs_autograd(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _on(t: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``t`` as a contiguous ``dtype`` tensor on ``device``; returns ``t`` itself (no op call) when it already is."""
    if t.dtype == dtype and t.device == device and t.is_contiguous():
        return t
    return t.to(device, dtype).contiguous()


def _no_launch(x, base, *args):
    return torch.empty_like(base)


def _triton_forward(x2, b2, A, B, scales, ranks, ids, weights, seq_ids):
    # lazy: Triton loads only when a Triton path runs (after TRITON_INTERPRET is chosen)
    from kernels import triton_ops

    dev = x2.device
    if switches.state.direct_launch and cast_cache.may_cache(x2, b2, A, B, weights):
        # inference outside compile and capture (the custom op is what those see): launch the kernels directly (the
        # custom op's dispatch costs more than the launches), keep sentence routing per sequence (the kernels read
        # seq_ids) and cast the bank once per dtype, not per call
        launch = triton_ops.forward if not switches.state.launch_stub else _no_launch
        return launch(
            x2, b2, cast_cache.cast(A, x2.dtype), cast_cache.cast(B, x2.dtype), _on(scales, torch.float32, dev),
            _on(ranks, torch.int32, dev), _on(ids, ids.dtype, dev), _on(weights, weights.dtype, dev),
            None if seq_ids is None else _on(seq_ids, seq_ids.dtype, dev),
        )  # fmt: skip
    ids, weights = expand_sequence_routing(ids, weights, seq_ids)
    return _multi_lora_op(
        x2, b2, A.to(x2.dtype), B.to(x2.dtype), _on(scales, torch.float32, dev), _on(ranks, torch.int32, dev),
        _on(ids, ids.dtype, dev), weights.contiguous(),
    )  # fmt: skip


def resolve_backend(x: torch.Tensor, *tensors: torch.Tensor, backend: str | None = None) -> str:
    """The backend a call on ``x`` runs: ``backend``, else ``$LORAMUX_KERNEL_BACKEND``, else ``auto``, which is the
    Triton kernels on CUDA when no gradient is needed (inference: decode and prefill) and the torch forms
    everywhere else: on the CPU, and for training on CUDA (when ``x`` or any of ``tensors`` (A, B, weights) needs
    a gradient), where a few cuBLAS products with plain autograd cost less host time per call than the custom op
    with its routing metadata, and torch.compile traces them (see kernels/NOTES.md, training)."""
    backend = backend or os.environ.get("LORAMUX_KERNEL_BACKEND", "auto")
    if backend not in BACKENDS:
        raise ValueError(f"multi_lora: unknown backend {backend!r}; use one of {BACKENDS}")
    if backend == "auto":
        return "triton" if x.is_cuda and not _needs_autograd(x, *tensors) else "torch"
    return backend


def multi_lora(x, base, A, B, scales, ranks, ids, weights, seq_ids=None, *, backend=None) -> torch.Tensor:
    """``base + routed LoRA deltas``; x/base may have leading batch dims, they are flattened to tokens.

    Shapes: x [..., d_in], base [..., d_out], A [L, d_in, R], B [L, R, d_out], scales [L], ranks [L],
    ids/weights [T, K] (token routing) or [S, K] with seq_ids [T] (sentence routing), T = prod(leading dims).
    Sentence routing gathers only the [T, K] ids/weights (K numbers a token), never per-token adapter copies; on
    the inference path (no gradient needed) the Triton kernels read ``seq_ids`` themselves and nothing is gathered.
    """
    backend = resolve_backend(x, base, A, B, weights, backend=backend)
    _check(x, base, A, B, scales, ranks, ids, weights, seq_ids)
    if ids.device.type == "cpu":  # on the host already: no sync (CUDA ids are in range by route construction)
        check_ids(ids, A.shape[0])
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    b2 = base.reshape(-1, base.shape[-1])
    if backend == "reference":
        out = multi_lora_reference(x2, b2, A, B, scales, ranks, ids, weights, seq_ids)
    elif backend == "torch":
        out = multi_lora_torch(x2, b2, A, B, scales, ranks, ids, weights, seq_ids)
    else:
        out = _triton_forward(x2, b2, A, B, scales, ranks, ids, weights, seq_ids)
    return out.reshape(*lead, out.shape[-1])
