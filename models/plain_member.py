"""A sibling projection without adapters, taken into a projection group.

DLP-LoRA's adapters touch q and v only, so k_proj stays a plain ``nn.Linear``; yet k reads the same x as q and v.
Grouping q / k / v (``models.projection_groups``) then still packs the three base weights into one GEMM:

    [q | k | v | every adapter's x @ A_q, x @ A_v] = x @ [W_q; W_k; W_v; A_q[*]^T; A_v[*]^T].T     1 launch
    q, v += routed expand                                                                          1 launch

where ungrouped the layer pays three base GEMMs and the routed LoRA of q and v apart. ``PlainMember`` stands in for
the plain sibling while its group is packed: HF calls it like the ``nn.Linear`` it wraps, and it returns the share
of the group's output the leader kept for that very input (else it computes its own base output). To the group it
looks like a wrapped projection whose adapters all have rank 0 (``EmptySlots``): no shrink or bank rows, zero expand
columns. It is put on the block when its group is found and taken off again when the group is unpacked, so a
saved or ungrouped model never sees it.
"""

from __future__ import annotations

import torch
from torch import nn

from models.wrapped_linear import WrappedLinear


class EmptySlots:
    """``ProjectionSlots``' view of a projection no adapter touches: as many adapters as the bank has (``like``,
    a member's slots, gives the count, dtype and device), each of rank 0."""

    def __init__(self, like, d_in: int, d_out: int):
        self.like, self.d_in, self.d_out = like, d_in, d_out

    @property
    def host_ranks(self) -> list[int]:
        return [0] * len(self.like.host_ranks)

    @property
    def host_scales(self) -> list[float]:
        return [0.0] * len(self.like.host_scales)

    @property
    def ranks(self) -> torch.Tensor:
        return torch.zeros_like(self.like.ranks)

    @property
    def scales(self) -> torch.Tensor:
        return torch.zeros_like(self.like.scales)

    @property
    def A(self) -> torch.Tensor:  # [L, d_in, 0]
        a = self.like.A
        return a.new_zeros(a.shape[0], self.d_in, 0)

    @property
    def B(self) -> torch.Tensor:  # [L, 0, d_out]
        b = self.like.B
        return b.new_zeros(b.shape[0], 0, self.d_out)


class PlainMember(WrappedLinear):
    """A plain ``nn.Linear`` in a projection group (module doc): its output is the group's share when the leader
    computed it for this input, else its own."""

    def __init__(self, base_layer: nn.Linear, like):
        super().__init__(base_layer)
        object.__setattr__(self, "slots", EmptySlots(like, base_layer.in_features, base_layer.out_features))
        object.__setattr__(self, "route_state", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.group_output(x)
        return self.base_layer(x) if out is None else out
