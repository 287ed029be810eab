"""Triton kernels of ``kernels.gate_mix``: a learning gate's top-k route applied to every adapter's shrink, forward
and backward, one launch each.

Imported lazily (TRITON_INTERPRET is read when a kernel is decorated). Grid ``cdiv(T, BT)``: a program owns BT token
rows and holds, for them, the gate's logits as a [BT, BL] tile (BL = L padded to a power of two, padding at -inf)
and the shrink as a [BT, BL, BR] tile (adapter a's R columns at ``a * R``; BR = R padded, padding masked).

Forward, per row: the top-k of ``logits / temperature`` as k row maxima (each masked out before the next: the first
maximum's index on ties, as ``tl.argmax`` gives), ``coef`` = their softmax, zero elsewhere; a routed adapter
(``coef != 0``) marked broken gives NaN in its coefficient; ``hc = h * coef`` (the coefficient rounded to h's dtype
first, as the torch form multiplies in that dtype); with labels, the row's cross-entropy of the raw logits against
its label (``-100``: none), summed over the program's rows and added atomically into one fp32 scalar (the order of
those adds is not fixed: the sum may differ in its last bits from run to run).

Backward, per row, from ``dhc`` and the scalar ``dce``: ``dh = dhc * coef``; ``dcoef[a] = sum_r dhc[a, r] h[a, r]``
(0 where the coefficient was made NaN: the select takes no gradient there); the top-k softmax's gradient
``coef * (dcoef - sum coef * dcoef) / temperature`` at the chosen logits; with labels, ``dce * (softmax(logits) -
onehot(label))`` added. Everything is computed in fp32 and stored in the inputs' dtypes. Nothing is read back to the
host: a CUDA graph captures both.
"""

import triton
import triton.language as tl


@triton.jit
def _route(z_ptr, rows, row_ok, aa, a_ok, szt, inv_temp, K: tl.constexpr):
    """The rows' raw logits [BT, BL] (fp32, -inf in padding) and their top-K softmax coefficients (0 elsewhere)."""
    z = tl.load(z_ptr + rows[:, None] * szt + aa[None, :], mask=row_ok[:, None] & a_ok[None, :],
                other=float("-inf")).to(tl.float32)
    v = z * inv_temp
    rest = v
    chosen = aa[None, :] < 0  # all False
    top = tl.where(row_ok, tl.max(v, axis=1), 0.0)  # padding rows: no -inf - -inf
    for _ in tl.static_range(K):
        idx = tl.argmax(rest, axis=1)
        hit = aa[None, :] == idx[:, None]
        chosen = chosen | hit
        rest = tl.where(hit, float("-inf"), rest)
    e = tl.where(chosen, tl.exp(v - top[:, None]), 0.0)
    coef = e / tl.sum(e, axis=1)[:, None]
    return z, coef


@triton.jit
def _shrink_offsets(rows, aa, rr, sht, R):
    return rows[:, None, None] * sht + aa[None, :, None] * R + rr[None, None, :]


@triton.jit
def _tile(z_ptr, brk_ptr, T, L, R, szt, inv_temp, K: tl.constexpr, BT: tl.constexpr, BL: tl.constexpr,
          BR: tl.constexpr):
    """A program's rows, adapters and rank columns with their masks (``m3``: the [BT, BL, BR] shrink tile), the
    rows' logits and route, and where a routed adapter is broken (its coefficient made NaN)."""
    rows = tl.program_id(0) * BT + tl.arange(0, BT)
    aa = tl.arange(0, BL)
    rr = tl.arange(0, BR)
    row_ok, a_ok = rows < T, aa < L
    z, coef = _route(z_ptr, rows, row_ok, aa, a_ok, szt, inv_temp, K)
    broken = tl.load(brk_ptr + aa, mask=a_ok, other=0) != 0
    m3 = row_ok[:, None, None] & a_ok[None, :, None] & (rr < R)[None, None, :]
    return rows, aa, rr, row_ok, a_ok, m3, z, coef, (coef != 0.0) & broken[None, :]


@triton.jit
def gate_mix_fwd_kernel(h_ptr, z_ptr, y_ptr, brk_ptr, hc_ptr, ce_ptr, T, L, R, sht, szt, shct, inv_temp,
                        K: tl.constexpr, BT: tl.constexpr, BL: tl.constexpr, BR: tl.constexpr,
                        HAS_LABELS: tl.constexpr):  # fmt: skip
    rows, aa, rr, row_ok, a_ok, m3, z, coef, made_nan = _tile(z_ptr, brk_ptr, T, L, R, szt, inv_temp, K, BT, BL, BR)
    c = tl.where(made_nan, float("nan"), coef)
    h = tl.load(h_ptr + _shrink_offsets(rows, aa, rr, sht, R), mask=m3, other=0.0)
    cq = c.to(h.dtype).to(tl.float32)  # the coefficient in h's dtype, as the torch form multiplies
    hc = h.to(tl.float32) * cq[:, :, None]
    tl.store(hc_ptr + _shrink_offsets(rows, aa, rr, shct, R), hc.to(hc_ptr.dtype.element_ty), mask=m3)
    if HAS_LABELS:
        y = tl.load(y_ptr + rows, mask=row_ok, other=-100)
        labelled = row_ok & (y >= 0)
        zmax = tl.where(row_ok, tl.max(z, axis=1), 0.0)
        lse = zmax + tl.log(tl.sum(tl.where(a_ok[None, :], tl.exp(z - zmax[:, None]), 0.0), axis=1))
        zy = tl.sum(tl.where(aa[None, :] == y[:, None], z, 0.0), axis=1)
        tl.atomic_add(ce_ptr, tl.sum(tl.where(labelled, lse - zy, 0.0), axis=0))


@triton.jit
def gate_mix_bwd_kernel(dhc_ptr, dce_ptr, h_ptr, z_ptr, y_ptr, brk_ptr, dh_ptr, dz_ptr, T, L, R, sdt, sht, szt,
                        sdht, sdzt, inv_temp,
                        K: tl.constexpr, BT: tl.constexpr, BL: tl.constexpr, BR: tl.constexpr,
                        HAS_LABELS: tl.constexpr):  # fmt: skip
    rows, aa, rr, row_ok, a_ok, m3, z, coef, made_nan = _tile(z_ptr, brk_ptr, T, L, R, szt, inv_temp, K, BT, BL, BR)
    c = tl.where(made_nan, float("nan"), coef)
    d = tl.load(dhc_ptr + _shrink_offsets(rows, aa, rr, sdt, R), mask=m3, other=0.0).to(tl.float32)
    h = tl.load(h_ptr + _shrink_offsets(rows, aa, rr, sht, R), mask=m3, other=0.0)
    cq = c.to(h.dtype).to(tl.float32)
    tl.store(dh_ptr + _shrink_offsets(rows, aa, rr, sdht, R), (d * cq[:, :, None]).to(dh_ptr.dtype.element_ty),
             mask=m3)
    dc = tl.where(made_nan, 0.0, tl.sum(d * h.to(tl.float32), axis=2))
    dz = coef * (dc - tl.sum(coef * dc, axis=1)[:, None]) * inv_temp
    if HAS_LABELS:
        y = tl.load(y_ptr + rows, mask=row_ok, other=-100)
        labelled = row_ok & (y >= 0)
        zmax = tl.where(row_ok, tl.max(z, axis=1), 0.0)
        ez = tl.where(a_ok[None, :], tl.exp(z - zmax[:, None]), 0.0)
        p = ez / tl.sum(ez, axis=1)[:, None]
        dce = tl.load(dce_ptr).to(tl.float32)
        onehot = tl.where(aa[None, :] == y[:, None], 1.0, 0.0)
        dz += tl.where(labelled[:, None], dce * (p - onehot), 0.0)
    tl.store(dz_ptr + rows[:, None] * sdzt + aa[None, :], dz.to(dz_ptr.dtype.element_ty),
             mask=row_ok[:, None] & a_ok[None, :])


def _blocks(L: int, R: int, device_type: str) -> tuple:
    BL, BR = triton.next_power_of_2(max(L, 2)), triton.next_power_of_2(max(R, 2))
    # rows a program takes: its [BT, BL, BR] tiles stay near 8k elements on the GPU (registers), small interpreted
    BT = max(1, min(64, 8192 // (BL * BR))) if device_type == "cuda" else 4
    return triton.next_power_of_2(BT), BL, BR


def forward(h, logits, labels, broken, hc, ce, top_k: int, temperature: float, R: int) -> None:
    """Fill ``hc`` [T, L*R] and add the labelled rows' CE into the 0-d ``ce`` (zeroed by the caller)."""
    T, L = logits.shape
    BT, BL, BR = _blocks(L, R, h.device.type)
    has_labels = labels is not None
    gate_mix_fwd_kernel[(triton.cdiv(T, BT),)](
        h, logits, labels if has_labels else logits, broken, hc, ce, T, L, R, h.stride(0), logits.stride(0),
        hc.stride(0), 1.0 / temperature, K=top_k, BT=BT, BL=BL, BR=BR, HAS_LABELS=has_labels)


def backward(dhc, dce, h, logits, labels, broken, dh, dz, top_k: int, temperature: float, R: int) -> None:
    """Fill ``dh`` [T, L*R] and ``dz`` [T, L] from ``dhc`` and the CE's gradient ``dce`` (a 0-d or [1] tensor)."""
    T, L = logits.shape
    BT, BL, BR = _blocks(L, R, h.device.type)
    has_labels = labels is not None
    gate_mix_bwd_kernel[(triton.cdiv(T, BT),)](
        dhc, dce, h, logits, labels if has_labels else logits, broken, dh, dz, T, L, R, dhc.stride(0), h.stride(0),
        logits.stride(0), dh.stride(0), dz.stride(0), 1.0 / temperature, K=top_k, BT=BT, BL=BL, BR=BR,
        HAS_LABELS=has_labels)
