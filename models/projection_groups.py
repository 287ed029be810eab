"""Projections that read the same input, run as one: q / k / v of an attention block, gate / up of an MLP (and
o / down alone, for the shrink below).

    q, k, v = x @ W_q.T, x @ W_k.T, x @ W_v.T, each + s (x @ A) @ B        9 launches (3 base, 6 LoRA)
    [qkv | h] = x @ [W_q; W_k; W_v; A_q^T; A_k^T; A_v^T].T                  1 launch: base and shrink together
    qkv += h @ blockdiag(s_q B_q, s_k B_k, s_v B_v)                         1 launch: the expand
    q, k, v = qkv.split(...)

and with many adapters routed per token (decode):

    [qkv | h | logits] = x @ [W_q; W_k; W_v; every A_m[a]^T; gates].T       1 launch
    qkv += sum_k w_k h[m, a_k] @ s B_m[a_k]   (route from logits or given)  1 launch (kernels.expand_shrunk)

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
  last columns are ``h = x @ A``, and one in-place ``addmm_`` adds ``h @ B`` into the base columns with ``B``
  block-diagonal, each member's scale folded into its block (rsLoRA, rank patterns and adapters that skip a member pack too).
- With ``one_launch`` (``MultiLoRAModel.group_projections(one_launch=True)``), a uniform decode call (at most
  ONE_LAUNCH_MAX_TOKENS tokens, no bias, one dtype) is one launch instead: ``kernels.gemv_lora`` walks the base and
  shrink rows once and adds ``h @ B`` in its epilogue. Off by default until the H200 benchmarks say it beats
  cuBLAS's GEMM and the addmm.
- Any other route at decode (the oracle with mixed tasks, dlp, MeteoRA's per-projection gates): the packed weight
  also holds every adapter's ``A_m[a]^T`` (rank padding zeroed: ``n x L x R`` rows) and, for MeteoRA, the members'
  gates (``n x L`` rows), so the one base GEMM gives each token its base outputs, ``h[m, a] = x @ A_m[a]`` for
  every member and adapter, and the gate logits; one launch of ``kernels.expand_shrunk`` then picks each token's
  adapters (the shared route's ids and weights, or each member's top-k of its logits, softmax / T) and adds
  ``sum_k w_k h[m, a_k] @ s B_m[a_k]``, reading only the routed adapters' B. Two launches per group at decode
  whatever the route; the extra GEMM rows are the adapters' A (about 4% of an 8B model's weights at 28 adapters
  of rank 8 on all 7 projections). The rows are laid out when first needed (outside a CUDA graph capture) and
  rewritten when ``AdapterBank.version`` or a gate weight moves.
- The first member (the one HF calls first: q_proj, gate_proj) computes the group and keeps the other members'
  outputs for the input it was given; a later member called with that same tensor takes its output, any other call
  computes itself as before.
- Merge's per-projection LoRA, and any prefill but a uniform one, run each member alone (on its view): a prefill
  is compute-bound, where the members' own routed kernels are the right tool.
- A sibling no adapter touches (k_proj under DLP-LoRA's q / v adapters) joins its group as a
  ``models.plain_member.PlainMember``: its base rows are packed with the others and it takes its share of the
  group's GEMM; to the group it is a member whose adapters all have rank 0 (no shrink rows, zero expand columns).
  It has no bank rows in the packed weight and no gate row (MeteoRA has no gate for it): its expand columns read a
  zero B, so the gate they route by (the first banked member's) adds nothing. Siblings that are all plain (o_proj / down_proj
  under q / v adapters) form no group; wrapped members no adapter touches run their group's base GEMM alone.

Inference only: with gradients enabled (training) every member runs as before, so autograd sees the bank's own
parameters. ``MultiLoRAModel.group_projections()`` turns it on (``group_projections(False)`` gives every member its own weight again).
"""

from __future__ import annotations

import torch
from torch import nn

from models.plain_member import PlainMember

#: sibling projection names that read the same input, in the order the HF blocks call them
GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("o_proj",), ("down_proj",))
SHRINK_ALIGN = 8  # the shrink rows appended to a packed weight, rounded up to this many
# a packed weight's rows, rounded up to this many with zero rows (at the end, after the gates): its GEMM's output row
# is then 16-byte aligned. Unaligned row counts ran cuBLAS's bf16 decode GEMM a third slower on the H200 (epilogue
# benchmark: MeteoRA's q/k/v, 6924 rows, 25.4 us against 18.5 for the 6144 base rows; DLP's aligned 6840: 19.8 us)
PACK_ALIGN = 64
# a uniform route's decode in one launch (``one_launch``: kernels.gemv_lora, the LoRA in the GEMV's epilogue) up to
# this many tokens a call; a prefill keeps cuBLAS's GEMM and the addmm (a GEMV-shaped kernel is the wrong tool there)
ONE_LAUNCH_MAX_TOKENS = 16


class ProjectionGroup:
    """The wrapped projections (``MultiLoRAModel``'s ``MultiLoRALinear``) of one block that read the same input
    (one, for o_proj / down_proj); members[0] leads.

    The packed weight's rows: ``[members' base rows (out) | uniform shrink (extra) | every adapter's A^T
    (n x L x R, n the members with adapters: not a plain one) | gates (n x L, or none) | zero rows up to a multiple
    of PACK_ALIGN]``."""

    def __init__(self, members: list, parent: nn.Module | None = None, names: tuple = ()):
        self.members = members
        # the block and member names, where a plain sibling (models.plain_member) stands in for an nn.Linear that
        # unpack puts back; routes and the bank are read through the first wrapped member
        self.parent, self.names = parent, names
        # the members with bank rows (every adapter's A^T) in the packed weight: a plain member has none
        self.banked = [m for m in members if not isinstance(m, PlainMember)]
        self.router_member = self.banked[0]
        self.sizes = [m.out_features for m in members]
        self.out = sum(self.sizes)
        self.weight = None  # [rows, d_in]: the members' base weights (views), then the rows above
        self.bias = None
        self.extra = 0
        self.L = self.R = 0  # the bank rows: L adapters x R rank rows per member (0: not laid out)
        self.gate_rows = 0  # n x L when the gates are packed, else 0
        self.views: list = []
        self.ptrs: list = []
        self._shrink: tuple | None = None  # (adapter, bank version) whose A^T fills the shrink rows
        self._rows = None  # the bank version the bank rows hold (None: not written since the last pack)
        self._gates_key: tuple | None = None  # the gates' (ptr, version) the gate rows hold
        self._pending: tuple | None = None  # (x, [outputs of members 1..], how many taken)
        self._packed: dict = {}  # (what, dtype, device) -> (bank.version, packed tensors)
        self._touch: tuple | None = None  # (bank.version, whether an adapter has a rank in a member)
        self.one_launch: bool | str = False  # a uniform decode as one kernels.gemv_lora launch (a str: its backend)

    # ---- base weights ------------------------------------------------------------------------------------------
    @staticmethod
    def can_pack(layers) -> bool:
        """Can these base ``nn.Linear`` layers share one packed weight (one dtype, device and input width; biases
        on all or none)?"""
        ws = [lin.weight for lin in layers]
        biases = [lin.bias for lin in layers]
        same = all(w.dtype == ws[0].dtype and w.device == ws[0].device and w.shape[1] == ws[0].shape[1] for w in ws)
        return same and (all(b is None for b in biases) or all(b is not None for b in biases))

    def pack(self, bank_rows: tuple[int, int] = (0, 0), gates: bool = False) -> None:
        """Copy the members' base weights (and biases) into one tensor with room for the shrink rows (the sum of
        the members' largest adapter ranks), ``bank_rows = (L, R)``: every adapter's A^T per member, and the
        members' gates (``gates``); point each member at its rows. The added rows start at zero."""
        layers = [m.base_layer for m in self.members]
        w0 = layers[0].weight
        r = sum(max(m.slots.host_ranks, default=0) for m in self.members)
        self.extra = -(-r // SHRINK_ALIGN) * SHRINK_ALIGN
        n = len(self.banked)
        self.L, self.R = bank_rows
        self.gate_rows = n * self.L if gates else 0
        rows = self.out + self.extra + n * self.L * self.R + self.gate_rows
        rows = -(-rows // PACK_ALIGN) * PACK_ALIGN
        with torch.no_grad():
            weight = torch.zeros(rows, w0.shape[1], dtype=w0.dtype, device=w0.device)
            torch.cat([lin.weight.detach() for lin in layers], 0, out=weight[:self.out])
            bias = None
            if layers[0].bias is not None:
                bias = torch.zeros(rows, dtype=layers[0].bias.dtype, device=w0.device)
                torch.cat([lin.bias.detach() for lin in layers], 0, out=bias[:self.out])
        self.weight, self.bias = weight, bias
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
        self._shrink = self._rows = self._gates_key = None

    def unpack(self) -> None:
        """Give every member its own contiguous weight again (before saving, or a change of dtype)."""
        for m in self.members:
            lin = m.base_layer
            lin.weight = nn.Parameter(lin.weight.detach().clone(), requires_grad=lin.weight.requires_grad)
            if lin.bias is not None:
                lin.bias = nn.Parameter(lin.bias.detach().clone(), requires_grad=lin.bias.requires_grad)
            object.__setattr__(m, "group", None)
        for name, m in zip(self.names, self.members):
            if isinstance(m, PlainMember) and getattr(self.parent, name, None) is m:
                setattr(self.parent, name, m.base_layer)
        self.weight, self.bias, self.views, self.ptrs, self._pending, self._packed = None, None, [], [], None, {}
        self._rows = self._gates_key = None

    def decode_state(self) -> tuple:
        """What a decode step finds laid out in this group: its bank layout (L, R), the bank version and gate
        weights its rows hold, the uniform adapter in its shrink rows, the packed weight's storage and the launch
        form (``models.graph_generate`` keys a warm capture on it: equal states, nothing to lay out)."""
        ptr = None if self.weight is None else self.weight.data_ptr()
        return (self.L, self.R, self._rows, self._gates_key, self._shrink, ptr, self.one_launch, self.intact())

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
        router = self.router_member.ctx.router
        if torch.is_grad_enabled() or not self.intact():
            return None
        y = self._output(x, router)
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

    def _rows_of(self, count: int):
        """The packed weight's (and bias') first ``count`` rows."""
        return self.weight[:count], (self.bias[:count] if self.bias is not None else None)

    def _output(self, x, router):
        """The group's packed output ``[..., sum d_out]`` (base + LoRA), or None where its members must run alone:
        a per-projection route form (merge's LoRA, MeteoRA's gates while they record a loss), or a prefill that
        is not uniform."""
        leader = self.router_member  # the route of the first wrapped member (a plain leader has none)
        bank = leader.ctx.bank
        prefill = x.dim() == 3 and x.shape[1] > 1
        if router is None or len(bank) == 0 or (router.shares_route and not self._touched(bank)):
            return nn.functional.linear(x, *self._rows_of(self.out))  # (per-projection gates still record)
        if not router.shares_route:  # per-projection routes (MeteoRA's gates): the group's gates in its GEMM, one
            # per member with adapters; a plain member (no gate) has zero expand columns, so whichever gate its
            # columns read (banked member 0's, ``_expand_weights``) they add nothing
            gates = None if prefill else router.group_gates([m.route_state for m in self.banked])
            return None if gates is None else self._routed_expand(x, bank, gates=gates)
        route = router.route(leader.module_name, x, leader.route_state)
        if route is None:
            return nn.functional.linear(x, *self._rows_of(self.out))
        if route.per_token is not None or route.lora is not None:
            return None
        if route.uniform is not None:
            return self._uniform(x, bank, route.uniform)
        return None if prefill else self._routed_expand(x, bank, route=route)

    def _touched(self, bank) -> bool:
        """Does any adapter of the bank have a rank in this group (a group of projections none touches, e.g. o_proj
        under q / v adapters, is its base GEMM alone)? Kept per bank version."""
        if self._touch is None or self._touch[0] != bank.version:
            self._touch = (bank.version, any(any(m.slots.host_ranks) for m in self.members))
        return self._touch[1]

    def _uniform(self, x, bank, adapter: int):
        """One adapter for every row: its shrink in the base GEMM (the shrink rows), one ``addmm`` for the expand."""
        B_slot = self._shrink_rows(bank, adapter, x.dtype)
        if B_slot is None:  # an adapter too wide for the shrink rows (hot-swapped in after packing): two GEMMs
            from kernels import multi_lora_uniform

            A, B = self._cached((adapter, x.dtype, x.device), bank, lambda: self._one_adapter(adapter, x.dtype))
            return multi_lora_uniform(x, nn.functional.linear(x, *self._rows_of(self.out)), A, B, 1.0)
        x2 = x.reshape(-1, x.shape[-1])
        if (self.one_launch and x2.shape[0] <= ONE_LAUNCH_MAX_TOKENS and self.bias is None
                and x.dtype == self.weight.dtype == B_slot.dtype):  # fmt: skip
            from kernels import gemv_lora

            backend = self.one_launch if isinstance(self.one_launch, str) else "auto"
            y = gemv_lora(x2, self.weight, self.out, self.extra, B_slot, backend=backend)
            return y.reshape(*x.shape[:-1], self.out)
        y_all = nn.functional.linear(x, *self._rows_of(self.out + self.extra))
        y2 = y_all.reshape(-1, y_all.shape[-1])  # x @ A is y_all's last columns
        # the expand accumulates in place into the base columns (cuBLAS reads them with y_all's row stride): an
        # out-of-place addmm would first copy them into a new tensor, one more kernel per group and decode step
        y = y2[:, :self.out]
        y.addmm_(y2[:, self.out:], B_slot.to(y2.dtype))
        return y.reshape(*y_all.shape[:-1], self.out)

    def _routed_expand(self, x, bank, route=None, gates=None):
        """Any route at decode: the base GEMM over every row (base outputs, every adapter's shrink, the gate
        logits), then one ``kernels.expand_shrunk`` launch that routes and expands in place; None when the rows
        cannot be laid out now (inside a CUDA graph capture or a compile)."""
        from kernels import expand_shrunk

        if not self._ready_rows(bank, gates.weights if gates is not None else None):
            return None
        n, L, R = len(self.banked), self.L, self.R
        o = self.out + self.extra
        # every row of the packed weight, a shared route's too (DLP, the oracle with mixed tasks: the gate logits
        # unread). Two narrower forms were slower on the H200 in the interleaved e2e run: stopping the GEMM before
        # the gate rows (row counts 8- but not PACK_ALIGN-aligned) and computing only the shrink of the adapters a
        # route's rows use (rows rewritten at each generate call: a new batch of prompts, a new subset). DLP's
        # 2-nucleus at batch 8 went from 1.156x base to 1.20-1.21x, MeteoRA's top-2 (its full rows rewritten after
        # each DLP call) from 1.18x to 1.23-1.24x
        y_all = nn.functional.linear(x, self.weight, self.bias)
        y2 = y_all.reshape(-1, y_all.shape[-1])
        h = y2[:, o:o + n * L * R].unflatten(1, (n, L, R))
        y = y2[:, :self.out]
        Bc, col_member = self._expand_weights(bank, x.dtype, x.device)
        if gates is not None:
            logits = y2[:, o + n * L * R:o + n * L * R + n * L].unflatten(1, (n, L))
            expand_shrunk(y, h, Bc, col_member, logits=logits, top_k=gates.top_k, temperature=gates.temperature,
                          out=y)
        else:
            expand_shrunk(y, h, Bc, col_member, ids=route.ids, weights=route.weights, seq_ids=route.seq_ids, out=y)
        return y.reshape(*y_all.shape[:-1], self.out)

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

    def _one_adapter(self, adapter: int, dtype):
        A, B = self._adapter_blocks(adapter)
        return A.to(dtype).contiguous(), B.to(dtype)

    @staticmethod
    def _live(sl, w: int):
        """``(have, live [L, have])``: the columns of one member's bank that fit ``w`` rank columns (this group's R),
        and which of them are inside each adapter's rank (the rest is padding, zeroed by a select: a NaN there
        never enters)."""
        have = min(w, sl.A.shape[2])
        return have, torch.arange(have, device=sl.A.device)[None, :] < sl.ranks[:, None]

    @classmethod
    def _live_A(cls, sl, w: int):
        """One member's ``A [L, d_in, w]`` (its dtype), rank padding and columns past its own width zero."""
        have, live = cls._live(sl, w)
        A = torch.where(live[:, None, :], sl.A[:, :, :have], torch.zeros((), dtype=sl.A.dtype, device=sl.A.device))
        return nn.functional.pad(A, (0, w - have)) if have < w else A

    @classmethod
    def _live_B(cls, sl, w: int):
        """One member's ``s B [L, w, d_out]`` (fp32, the scales folded in), rank padding and rows past its own
        width zero."""
        have, live = cls._live(sl, w)
        B = torch.where(live[:, :, None], sl.B[:, :have], torch.zeros((), dtype=sl.B.dtype, device=sl.B.device))
        B = B.float() * sl.scales.float()[:, None, None]
        return nn.functional.pad(B, (0, 0, 0, w - have)) if have < w else B

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
                self.weight[self.out + r:self.out + self.extra] = 0
            self._shrink = (adapter, bank.version)

        def build():
            B = (blocks or self._adapter_blocks(adapter))[1]
            return torch.cat([B, B.new_zeros(self.extra - r, self.out)], 0).to(dtype)
        return self._cached(("rows", adapter, dtype), bank, build)

    def _ready_rows(self, bank, gates) -> bool:
        """Make the bank rows hold every adapter's ``A_m[a]^T`` (R rows each, rank padding zero) and, for MeteoRA,
        the gate rows the members' gates: re-packed for a layout that does not fit (another L or R, or gates wanted
        where there are no gate rows), rewritten in place for new contents (``bank.version``; a gate weight's
        pointer or version). A layout with gate rows also serves a route without gates (DLP, the oracle with mixed
        tasks: the GEMM computes the unused logits, about 1% more rows), so a model whose router alternates
        between MeteoRA and another packs once, not at every switch (a re-pack copies every base weight of the
        group). False where that cannot happen now (a CUDA graph capture or a compile in progress): the members
        then run alone."""
        L = len(bank)
        R = max(max(m.slots.host_ranks, default=0) for m in self.members)
        fits = (self.L, self.R) == (L, R) and (gates is None or self.gate_rows > 0)
        bank_key = bank.version
        gate_key = tuple((w.data_ptr(), w._version) for w in gates) if gates is not None else None
        if fits and self._rows == bank_key and (gates is None or self._gates_key == gate_key):
            return True
        if torch.compiler.is_compiling() or (self.weight.is_cuda and torch.cuda.is_current_stream_capturing()):
            return False
        if not fits:
            self.pack((L, R), gates is not None)
        bank_at = self.out + self.extra  # member i's A^T rows at bank_at + i L R; the gate rows after them all
        with torch.no_grad():
            if self._rows != bank_key:
                for i, m in enumerate(self.banked):
                    A = self._live_A(m.slots, R)  # [L, d_in, R]
                    o = bank_at + i * L * R
                    self.weight[o:o + L * R] = A.transpose(1, 2).reshape(L * R, A.shape[1]).to(self.weight.dtype)
            if gates is not None and self._gates_key != gate_key:
                o = bank_at + len(self.banked) * L * R
                self.weight[o:o + self.gate_rows] = torch.cat([w.detach() for w in gates], 0).to(self.weight.dtype)
        self._rows = bank_key
        if gates is not None:
            self._gates_key = gate_key
        return True

    def _expand_weights(self, bank, dtype, device):
        """``(B [L, R, sum d_out], col_member [sum d_out])`` for ``kernels.expand_shrunk``: column c holds its
        member's ``s B_m[a]`` (scales folded, rank padding zeroed by a select); ``col_member`` names c's member."""
        def build():
            B = torch.cat([self._live_B(m.slots, self.R) for m in self.members], 2).to(dtype).contiguous()
            sizes = torch.tensor(self.sizes, device=device)
            # column c's member in h: its banked index; a plain member's columns (B zero) read banked member 0
            owner = [self.banked.index(m) if m in self.banked else 0 for m in self.members]
            col = torch.repeat_interleave(torch.tensor(owner, device=device), sizes).to(torch.int32)
            return B, col
        return self._cached(("expand", self.R, dtype, device), bank, build)


def find_groups(model: nn.Module, wrapped_type) -> list[ProjectionGroup]:
    """Every group of sibling projections in ``model`` (``GROUPS``) with at least one wrapped member, the others
    wrapped or plain ``nn.Linear`` (each put on its block as a ``PlainMember``: DLP-LoRA's q / v adapters still group
    with k), whose base weights can be packed."""
    found = []
    for parent in model.modules():
        for names in GROUPS:
            mods = [getattr(parent, n, None) for n in names]
            wrapped = [m for m in mods if isinstance(m, wrapped_type)]
            if not wrapped or not all(isinstance(m, wrapped_type) or type(m) is nn.Linear for m in mods):
                continue
            if ProjectionGroup.can_pack([m.base_layer if isinstance(m, wrapped_type) else m for m in mods]):
                found.append((parent, names, mods, wrapped[0].slots))
    groups = []
    for parent, names, mods, like in found:  # the blocks changed only after the walk over them
        members = [m if isinstance(m, wrapped_type) else PlainMember(m, like) for m in mods]
        for name, m in zip(names, members):
            if isinstance(m, PlainMember):
                setattr(parent, name, m)
        groups.append(ProjectionGroup(members, parent, names))
    return groups
