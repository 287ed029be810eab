"""Projections that read the same input, run as one: q / k / v of an attention block, gate / up of an MLP (and
o / down alone, for the shrink below).

    q, k, v = x @ W_q.T, x @ W_k.T, x @ W_v.T, each + s (x @ A) @ B        9 launches (3 base, 6 LoRA)
    [qkv | h] = x @ [W_q; W_k; W_v; A_q^T; A_k^T; A_v^T].T                  1 launch: base and shrink together
    qkv += h @ blockdiag(s_q B_q, s_k B_k, s_v B_v)                         1 launch: the expand
    q, k, v = qkv.split(...)

Why. Decoding a batch of one is launch-bound: the base projections are memory-bound GEMVs of a few microseconds each
and every LoRA adds two tiny GEMMs of about the same cost, so an 8B model with adapters on all 7 projections of
its 32 layers pays for 224 base and 448 LoRA launches per token. Grouped, a layer takes 4 base GEMMs (q/k/v,
o, gate/up, down) that also compute the shrink, and 4 expands: 8 launches where the base model takes 7 (vLLM packs
the same slices in its LoRA layers; here the shrink also rides in the base GEMM).

How.
- Base: the members' weights are copied once into one ``[sum d_out + extra, d_in]`` tensor and each member's
  ``base_layer.weight`` becomes a view of its rows (the member still works alone; the old weights are freed).
  The ``extra`` rows (the members' largest adapter ranks summed, rounded up to 8) hold the shrink.
- One adapter for every row (a uniform route: lora_b, the oracle on a batch of one task): that adapter's
  ``[A_q | A_k | A_v]^T`` is written into the extra rows (once per adapter and bank version), so the base GEMM's
  last columns are ``h = x @ A``, and one ``addmm`` adds ``h @ B`` with ``B`` block-diagonal, each member's scale
  folded into its block (rsLoRA, rank patterns and adapters that skip a member pack too).
- Any other route that is the same for every projection of the forward (``Router.shares_route``: the oracle with
  mixed tasks, dlp): the routed kernels on a packed bank, ``A = [A_q | A_k | A_v]`` (``[L, d_in, sum R]``) and
  ``B`` block-diagonal (``[L, sum R, sum d_out]``), scales folded, rank padding zeroed by a select (a NaN in
  padding never enters), ranks ``sum R``; copies in the activations' dtype, rebuilt when ``AdapterBank.version``
  moves.
- The first member (the one HF calls first: q_proj, gate_proj) computes the group and keeps the other members'
  outputs for the input it was given; a later member called with that same tensor takes its output, any other call
  computes itself as before.
- Routers that route each projection from ``x`` itself (MeteoRA's per-projection gates): at decode their group
  route (``Router.route_group``: the members' gates as one GEMM, each member's top-k from its block) indexes a
  virtual bank of members x adapters (adapter ``m * L + a`` is ``A_m[a]`` with ``s B_m[a]`` in member m's output
  columns), one routed LoRA for the group. Merge's per-projection LoRA, and any prefill on a packed or virtual
  bank (the routed kernels' dense form would compute its zero blocks), run each member alone (on its view).

Inference only: with gradients enabled (training) every member runs as before, so autograd sees the bank's own
parameters. ``MultiLoRAModel.group_projections()`` turns it on (``group_projections(False)`` gives every member its own weight again).
"""

from __future__ import annotations

import torch
from torch import nn

from models.adapter_bank import RANK_MULTIPLE

#: sibling projection names that read the same input, in the order the HF blocks call them
GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("o_proj",), ("down_proj",))
SHRINK_ALIGN = 8  # the shrink rows appended to a packed weight, rounded up to this many


class ProjectionGroup:
    """The wrapped projections (``MultiLoRAModel``'s ``MultiLoRALinear``) of one block that read the same input
    (one, for o_proj / down_proj); members[0] leads."""

    def __init__(self, members: list):
        self.members = members
        self.sizes = [m.out_features for m in members]
        self.out = sum(self.sizes)
        self.weight = None  # [out + extra, d_in]: the members' base weights (views), then the shrink rows
        self.bias = None
        self.extra = 0
        self.views: list = []
        self.ptrs: list = []
        self._shrink: tuple | None = None  # (adapter, bank version) whose A^T fills the shrink rows
        self._pending: tuple | None = None  # (x, [outputs of members 1..], how many taken)
        self._packed: dict = {}  # (what, dtype, device) -> (bank.version, packed tensors)

    # ---- base weights ------------------------------------------------------------------------------------------
    @staticmethod
    def can_pack(members) -> bool:
        ws = [m.base_layer.weight for m in members]
        biases = [m.base_layer.bias for m in members]
        same = all(w.dtype == ws[0].dtype and w.device == ws[0].device and w.shape[1] == ws[0].shape[1] for w in ws)
        return same and (all(b is None for b in biases) or all(b is not None for b in biases))

    def pack(self) -> None:
        """Copy the members' base weights (and biases) into one tensor with room for the shrink rows (the sum of
        the members' largest adapter ranks), and point each member at its rows."""
        layers = [m.base_layer for m in self.members]
        w0 = layers[0].weight
        r = sum(max(m.slots.host_ranks, default=0) for m in self.members)
        self.extra = -(-r // SHRINK_ALIGN) * SHRINK_ALIGN
        with torch.no_grad():
            self.weight = torch.zeros(self.out + self.extra, w0.shape[1], dtype=w0.dtype, device=w0.device)
            torch.cat([lin.weight.detach() for lin in layers], 0, out=self.weight[:self.out])
            self.bias = None
            if layers[0].bias is not None:
                self.bias = torch.zeros(self.out + self.extra, dtype=layers[0].bias.dtype, device=w0.device)
                torch.cat([lin.bias.detach() for lin in layers], 0, out=self.bias[:self.out])
        o = 0
        self.views = []
        for lin, d in zip(layers, self.sizes):
            grad = lin.weight.requires_grad
            lin.weight = nn.Parameter(self.weight[o:o + d], requires_grad=grad)
            if self.bias is not None:
                lin.bias = nn.Parameter(self.bias[o:o + d], requires_grad=lin.bias.requires_grad)
            self.views.append(lin.weight)
            o += d
        self.ptrs = [v.data_ptr() for v in self.views]
        self._shrink = None

    def unpack(self) -> None:
        """Give every member its own contiguous weight again (before saving, or a change of dtype)."""
        for m in self.members:
            lin = m.base_layer
            lin.weight = nn.Parameter(lin.weight.detach().clone(), requires_grad=lin.weight.requires_grad)
            if lin.bias is not None:
                lin.bias = nn.Parameter(lin.bias.detach().clone(), requires_grad=lin.bias.requires_grad)
            object.__setattr__(m, "group", None)
        self.weight, self.bias, self.views, self.ptrs, self._pending, self._packed = None, None, [], [], None, {}

    def intact(self) -> bool:
        """The members still hold the packed views: a weight replaced, or moved off them by ``model.to(dtype)``
        (which swaps a parameter's data in place), breaks the group (its members then run alone). An in-place
        copy (``load_state_dict``) writes through the views into the packed weight and keeps it."""
        W = self.weight
        for m, v, ptr in zip(self.members, self.views, self.ptrs):
            w = m.base_layer.weight
            if w is not v or w.dtype != W.dtype or w.device != W.device:
                return False
            if not torch.compiler.is_compiling() and w.data_ptr() != ptr:  # (a compiled graph guards dtype, device)
                return False
        return True

    # ---- forward -----------------------------------------------------------------------------------------------
    def lead(self, x: torch.Tensor):
        """The first member's output, the others kept for their calls on ``x``; None: run the member alone."""
        if torch.is_grad_enabled() or not self.intact():
            return None
        y = self._output(x, self.members[0].ctx.router)
        if y is None:
            return None
        outs = list(y.split(self.sizes, dim=-1))
        self._pending = (x, outs, 1) if len(outs) > 1 else None
        return outs[0]

    def take(self, index: int, x: torch.Tensor):
        """Member ``index``'s output kept by the leader for this very ``x``; None otherwise."""
        p = self._pending
        if p is None or p[0] is not x:
            return None
        n = p[2] + 1
        self._pending = None if n == len(self.members) else (p[0], p[1], n)
        return p[1][index]

    def _output(self, x, router):
        """The group's packed output ``[..., sum d_out]`` (base + LoRA), or None where its members must run alone:
        a per-projection route form (merge's LoRA), or a prefill on a packed or virtual bank (the routed kernels'
        dense form would compute its zero blocks)."""
        from kernels import multi_lora

        leader, bank = self.members[0], self.members[0].ctx.bank
        prefill = x.dim() == 3 and x.shape[1] > 1
        if router is not None and not router.shares_route:  # per-projection routes: one over the virtual bank
            if len(bank) == 0 or prefill:
                return None
            route = router.route_group([m.module_name for m in self.members], x,
                                       [m.route_state for m in self.members])
            if route is None:
                return None
            y = nn.functional.linear(x, self.weight, self.bias)[..., :self.out]
            return multi_lora(x, y, *self._virtual_bank(bank, x.dtype, x.device), route.ids, route.weights)
        route = router.route(leader.module_name, x, leader.route_state) if router is not None else None
        if route is not None and len(bank) == 0:
            route = None
        if route is not None and (route.coef is not None or route.lora is not None):
            return None
        if route is not None and route.uniform is None and prefill:
            return None
        B_slot = None
        if route is not None and route.uniform is not None:
            B_slot = self._shrink_rows(bank, route.uniform, x.dtype)
        y_all = nn.functional.linear(x, self.weight, self.bias)
        y = y_all[..., :self.out]
        if B_slot is not None:  # the shrink came out of the base GEMM: x @ A is y_all's last columns
            y2 = y_all.reshape(-1, y_all.shape[-1])
            return torch.addmm(y2[:, :self.out], y2[:, self.out:], B_slot.to(y2.dtype)).reshape(*y.shape)
        if route is not None:
            return self._add_lora(x, y, route)
        return y

    def _add_lora(self, x, y, route):
        """The packed LoRA on the packed output, through the routed kernels (any shared route but uniform)."""
        from kernels import multi_lora, multi_lora_uniform

        bank = self.members[0].ctx.bank
        if route.uniform is not None:  # an adapter too wide for the shrink rows (hot-swapped in after packing)
            A, B = self._packed_tensors(bank, x.dtype, x.device, route.uniform)
            return multi_lora_uniform(x, y, A, B, 1.0)
        A, B, scales, ranks = self._packed_tensors(bank, x.dtype, x.device, None)
        return multi_lora(x, y, A, B, scales, ranks, route.ids, route.weights, route.seq_ids)

    # ---- packed adapters (copies, rebuilt when the bank changes) ------------------------------------------------
    def _cached(self, key, bank, build):
        """``build()``, kept under ``key`` until ``bank.version`` moves."""
        hit = self._packed.get(key)
        if hit is not None and hit[0] == bank.version:
            return hit[1]
        with torch.no_grad():
            value = build()
        self._packed[key] = (bank.version, value)
        return value

    def _adapter_blocks(self, adapter: int):
        """Adapter ``adapter`` over the members: ``[A_q | A_k | A_v]`` (``[d_in, sum r]``, the bank's dtype) and
        the block-diagonal B (``[sum r, sum d_out]``, fp32, each member's scale folded into its block)."""
        ranks = [m.slots.host_ranks[adapter] for m in self.members]
        A = torch.cat([m.slots.A[adapter, :, :r] for m, r in zip(self.members, ranks)], 1)
        B = torch.block_diag(*[m.slots.B[adapter, :r].float() * m.slots.host_scales[adapter]
                               for m, r in zip(self.members, ranks)])
        return A, B

    @staticmethod
    def _live_blocks(sl, w: int):
        """One member's adapters cut to ``w`` rank columns, rank padding zeroed by a select (a NaN there never
        enters): ``A [L, d_in, w]`` (its dtype) and ``s B [L, w, d_out]`` (fp32, the scales folded in)."""
        live = torch.arange(w, device=sl.A.device)[None, :] < sl.ranks[:, None]  # [L, w]
        zero = torch.zeros((), dtype=sl.A.dtype, device=sl.A.device)
        A = torch.where(live[:, None, :], sl.A[:, :, :w], zero)
        B = torch.where(live[:, :, None], sl.B[:, :w], zero).float() * sl.scales.float()[:, None, None]
        return A, B

    def _shrink_rows(self, bank, adapter: int, dtype):
        """Write adapter ``adapter``'s ``[A_q | A_k | A_v]^T`` into the packed weight's shrink rows (once per adapter
        and bank version), so the base GEMM also computes ``x @ A``; return the block-diagonal B of those rows
        (``[extra, out]``, scales folded in). None when the adapter's ranks need more rows than there are."""
        r = sum(m.slots.host_ranks[adapter] for m in self.members)
        if r == 0 or r > self.extra:
            return None
        blocks = None
        if self._shrink != (adapter, bank.version):
            with torch.no_grad():
                blocks = self._adapter_blocks(adapter)
                self.weight[self.out:self.out + r] = blocks[0].T.to(self.weight.dtype)
                self.weight[self.out + r:] = 0
            self._shrink = (adapter, bank.version)

        def build():
            B = (blocks or self._adapter_blocks(adapter))[1]
            return torch.cat([B, B.new_zeros(self.extra - r, self.out)], 0).to(dtype)
        return self._cached(("rows", adapter, dtype), bank, build)

    def _packed_tensors(self, bank, dtype, device, adapter: int | None):
        """The members' adapters as one (module docstring): adapter ``adapter``'s ``(A [d_in, sum r], B)``, or the
        whole bank's ``(A [L, d_in, R], B [L, R, sum d_out], scales = 1, ranks = R)``, R = the members' widest
        ranks summed, padded to ``RANK_MULTIPLE``."""
        def one():
            A, B = self._adapter_blocks(adapter)
            return A.to(dtype).contiguous(), B.to(dtype)

        def whole():  # each member's block as wide as its widest adapter, the total padded to the kernels' multiple
            slots = [m.slots for m in self.members]
            L = len(bank)
            widths = [max(sl.host_ranks, default=0) for sl in slots]
            total = max(RANK_MULTIPLE, -(-sum(widths) // RANK_MULTIPLE) * RANK_MULTIPLE)
            A = torch.zeros(L, slots[0].A.shape[1], total, dtype=dtype, device=device)
            B = torch.zeros(L, total, self.out, dtype=dtype, device=device)
            r0 = c0 = 0
            for sl, w, d in zip(slots, widths, self.sizes):
                a, b = self._live_blocks(sl, w)
                A[:, :, r0:r0 + w], B[:, r0:r0 + w, c0:c0 + d] = a.to(dtype), b.to(dtype)
                r0, c0 = r0 + w, c0 + d
            return (A, B, torch.ones(L, dtype=torch.float32, device=device),
                    torch.full((L,), total, dtype=torch.int32, device=device))
        return self._cached((adapter, dtype, device), bank, one if adapter is not None else whole)

    def _virtual_bank(self, bank, dtype, device):
        """Members x adapters as one bank: adapter ``m * L + a`` is ``A_m[a]`` (rank padding zeroed by a select, to
        the widest member's rank) with ``s_m[a] B_m[a]`` in member m's output columns, zeros elsewhere; scales 1."""
        def build():
            slots = [m.slots for m in self.members]
            L, n = len(bank), len(slots)
            width = max(max(sl.host_ranks, default=0) for sl in slots)
            width = max(RANK_MULTIPLE, -(-width // RANK_MULTIPLE) * RANK_MULTIPLE)
            A = torch.zeros(n * L, slots[0].A.shape[1], width, dtype=dtype, device=device)
            B = torch.zeros(n * L, width, self.out, dtype=dtype, device=device)
            c0 = 0
            for m, (sl, d) in enumerate(zip(slots, self.sizes)):
                w = min(sl.A.shape[2], width)
                a, b = self._live_blocks(sl, w)
                A[m * L:(m + 1) * L, :, :w], B[m * L:(m + 1) * L, :w, c0:c0 + d] = a.to(dtype), b.to(dtype)
                c0 += d
            return (A, B, torch.ones(n * L, dtype=torch.float32, device=device),
                    torch.full((n * L,), width, dtype=torch.int32, device=device))
        return self._cached(("virtual", dtype, device), bank, build)


def find_groups(model: nn.Module, wrapped_type) -> list[ProjectionGroup]:
    """Every group of sibling wrapped projections in ``model`` (``GROUPS``) whose base weights can be packed."""
    groups = []
    for parent in model.modules():
        for names in GROUPS:
            members = [getattr(parent, n, None) for n in names]
            if all(isinstance(m, wrapped_type) for m in members) and ProjectionGroup.can_pack(members):
                groups.append(ProjectionGroup(members))
    return groups
