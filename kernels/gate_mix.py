"""A learning gate's top-k route, applied to every adapter's shrink, with the gate's cross-entropy: one launch forward,
one backward.

While MeteoRA's gates train, each projection's LoRA runs as the dense form of ``kernels.coef``:

    logits = x @ G^T                               [T, L]  (the gate)
    coef   = top-k softmax of logits / T           [T, L]  (zero off the k chosen)
    hc     = h * coef per adapter                  [T, L*R]   h = x @ A_cat, every adapter's shrink
    out    = base + hc @ (s B_cat)
    aux   += CE(logits, the token's task)          (MeteoRA's auxiliary loss, summed over projections)

The GEMMs are cuBLAS's; everything between them is small per token (L = 28 logits, L*R = 224 shrink columns) but
runs once per projection, forward and backward: torch.compile makes it five to seven kernels per projection (the
CE, the top-k softmax, the NaN select and the multiply, their gradients), each a pass over [T, L] or [T, L*R] and a
launch, which at SmolLM2's 210 projections and T = 16384 cost a gate-training step about as much as the extra GEMMs
(the H200 profile of a compiled, captured step at batch 64). Here they are one kernel each way
(``kernels.triton_gate_mix``): the forward reads the logits and h once and writes hc and the CE; the backward reads
the logits, h and dhc once and writes dh and dlogits.

    gate_mix(h, logits, labels, broken, top_k, temperature, R) -> (hc [T, L*R], ce_sum [])

``labels`` [T] (``-100``: no label) or None (no CE: ce_sum 0); ``broken`` [L] bool: an adapter holding a non-finite
value below its rank (``kernels.dense.bank_matrices``), whose coefficient becomes NaN where a token routes to it, as
the dense form does (that token's output is NaN; adapters it does not route to never reach it). Differentiable in
``h`` and ``logits``. Backends: ``triton`` (CUDA, or the CPU under TRITON_INTERPRET=1: the tests), ``torch`` (the
same arithmetic in plain ops with autograd: the CPU path and the reference the kernels are held to), ``auto``: triton
on CUDA. ``top_k_coef`` is the route alone, as a [T, L] matrix (the torch form's first half).

``TopKGate`` carries a projection's logits and rule from its router to the op (``models.routing.route.Route.gate``):
the router keeps the CE that the op returns.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kernels import switches

BACKENDS = ("auto", "triton", "torch")


def top_k_coef(logits: torch.Tensor, k: int, temperature: float = 1.0) -> torch.Tensor:
    """The top-k route of ``logits`` [T, L] as one [T, L] matrix: the softmax of the k largest ``logits /
    temperature`` of each row at their adapters, zeros elsewhere (fp32).

    The k adapters are found as k row maxima, each masked out before the next, not by ``torch.topk``: on a GPU topk
    is a sort (three kernels, ~80 us a call on a [16384, 28] gate), while a row maximum is one small reduction that
    torch.compile fuses with the softmax. The softmax over the chosen logits, the rest at -inf, is a top-k softmax;
    its gradient reaches the chosen logits only."""
    vals = logits.float()
    if temperature != 1.0:
        vals = vals / temperature
    left_out = torch.ones(vals.shape, dtype=torch.bool, device=vals.device)  # no gradient: masks built in place
    rest = vals.detach()
    for i in range(min(k, vals.shape[-1])):
        _, idx = rest.max(dim=-1, keepdim=True)
        left_out.scatter_(-1, idx, False)
        if i + 1 < k:
            rest = rest.scatter(-1, idx, float("-inf"))
    return torch.softmax(torch.where(left_out, float("-inf"), vals), dim=-1)


def gate_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """MeteoRA's gate loss before its mean: the cross-entropy of ``logits`` [T, L] (in fp32) against each token's
    task ``labels`` [T], summed over the labelled tokens (``-100``: none)."""
    return F.cross_entropy(logits.float(), labels, ignore_index=-100, reduction="sum")


def mix_coef(h: torch.Tensor, coef: torch.Tensor, broken: torch.Tensor, R: int, dtype: torch.dtype,
             select: bool = True) -> torch.Tensor:
    """Every adapter's shrink ``h`` [T, L*R] times its coefficient ``coef`` [T, L], in ``dtype``; with ``select``,
    NaN in the coefficient of a routed (``coef != 0``) ``broken`` adapter (a caller that knows the bank clean skips
    the select)."""
    T, L = coef.shape
    c = torch.where((coef != 0) & broken, float("nan"), coef) if select else coef
    return (h.to(dtype).view(T, L, R) * c.to(dtype)[:, :, None]).view(T, L * R)


def gate_mix_torch(h, logits, labels, broken, top_k: int, temperature: float, R: int):
    """The definition in plain torch ops (autograd differentiates it): ``(hc, ce_sum)``, hc in h's dtype."""
    coef = top_k_coef(logits, top_k, temperature)
    hc = mix_coef(h, coef, broken.to(coef.device), R, h.dtype)
    if labels is None:
        return hc, torch.zeros((), dtype=torch.float32, device=h.device)
    return hc, gate_ce(logits, labels)


@torch.library.custom_op("loramux::gate_mix", mutates_args=())
def _gate_mix_op(h: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor | None, broken: torch.Tensor,
                 top_k: int, temperature: float, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    from kernels import triton_gate_mix  # lazy: after TRITON_INTERPRET is chosen

    hc = _empty(h.shape, h.dtype, h.device)
    ce = torch.zeros((), dtype=torch.float32, device=h.device)
    triton_gate_mix.forward(h, logits, labels, broken, hc, ce, top_k, temperature, rank)
    return hc, ce


@_gate_mix_op.register_fake
def _(h, logits, labels, broken, top_k, temperature, rank):
    return h.new_empty(h.shape), h.new_empty((), dtype=torch.float32)


@torch.library.custom_op("loramux::gate_mix_backward", mutates_args=())
def _gate_mix_backward_op(dhc: torch.Tensor, dce: torch.Tensor, h: torch.Tensor, logits: torch.Tensor,
                          labels: torch.Tensor | None, broken: torch.Tensor, top_k: int, temperature: float,
                          rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    from kernels import triton_gate_mix  # lazy: after TRITON_INTERPRET is chosen

    dh = _empty(h.shape, h.dtype, h.device)
    dz = _empty(logits.shape, logits.dtype, logits.device)
    triton_gate_mix.backward(_unit_cols(dhc), dce.float(), h, logits, labels, broken, dh, dz, top_k,
                             temperature, rank)
    return dh, dz


@_gate_mix_backward_op.register_fake
def _(dhc, dce, h, logits, labels, broken, top_k, temperature, rank):
    return h.new_empty(h.shape), logits.new_empty(logits.shape)


def _setup_context(ctx, inputs, output):
    h, logits, labels, broken, top_k, temperature, rank = inputs
    ctx.save_for_backward(h, logits, labels, broken)
    ctx.rule = (top_k, temperature, rank)


def _backward(ctx, dhc, dce):
    h, logits, labels, broken = ctx.saved_tensors
    dh, dz = _gate_mix_backward_op(dhc, dce, h, logits, labels, broken, *ctx.rule)
    return dh, dz, None, None, None, None, None


_gate_mix_op.register_autograd(_backward, setup_context=_setup_context)


def _empty(shape, dtype, device) -> torch.Tensor:
    if switches.state.poison:  # tests (kernels.switches.poisoned_buffers): an element no kernel wrote shows as NaN
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _unit_cols(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def gate_mix(h: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor | None, broken: torch.Tensor, top_k: int,
             temperature: float, R: int, *, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """``(hc [T, L*R] in h's dtype, ce_sum [] fp32)`` (see the module doc). h [T, L*R] and logits [T, L] may be
    row-strided views (a packed GEMM's column blocks); labels [T] long or None; broken [L] bool."""
    if backend not in BACKENDS:
        raise ValueError(f"gate_mix: unknown backend {backend!r}; use one of {BACKENDS}")
    T, L = logits.shape
    if h.shape != (T, L * R) or broken.shape != (L,) or (labels is not None and labels.shape != (T,)):
        raise ValueError(f"gate_mix: need h [T, L*R] = [{T}, {L * R}], broken [{L}], labels [{T}] or None; got h "
                         f"{tuple(h.shape)}, broken {tuple(broken.shape)}, labels "
                         f"{None if labels is None else tuple(labels.shape)}")
    if not 1 <= top_k <= L or not temperature > 0:
        raise ValueError(f"gate_mix: need 1 <= top_k <= L = {L} and temperature > 0; got {top_k}, {temperature}")
    if backend == "auto":
        backend = "triton" if h.is_cuda else "torch"
    if backend == "torch":
        return gate_mix_torch(h, logits, labels, broken, top_k, float(temperature), R)
    return _gate_mix_op(_unit_cols(h), _unit_cols(logits), labels, broken.to(torch.bool).contiguous(), int(top_k),
                        float(temperature), int(R))


@dataclass
class TopKGate:
    """A projection's learning gate as its route: its ``logits`` [T, L], top ``top_k``, ``temperature``, the tokens'
    ``labels`` (None: no CE) and where the CE goes (``on_ce(ce_sum)``, called once by the op that consumes it).
    ``backend``: gate_mix's."""

    logits: torch.Tensor
    top_k: int
    temperature: float
    labels: torch.Tensor | None = None
    on_ce: Callable | None = None
    backend: str = "auto"

    def mix(self, h: torch.Tensor, broken: torch.Tensor, R: int) -> torch.Tensor:
        """``h * coef`` per adapter through ``gate_mix``; hands the CE to ``on_ce``."""
        hc, ce = gate_mix(h, self.logits, self.labels, broken, self.top_k, self.temperature, R, backend=self.backend)
        if self.labels is not None and self.on_ce is not None:
            self.on_ce(ce)
        return hc

    def dense(self) -> torch.Tensor:
        """The route as a [T, L] coefficient matrix (the reference loop's input), its CE handed to ``on_ce``."""
        if self.labels is not None and self.on_ce is not None:
            self.on_ce(gate_ce(self.logits, self.labels))
        return top_k_coef(self.logits, self.top_k, self.temperature)
