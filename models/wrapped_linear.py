"""What every module standing in for a projection's ``nn.Linear`` shares: the ``nn.Linear`` face HF code reads
(``weight``, ``bias``, ``in_features``, ``out_features``, all the wrapped ``base_layer``'s) and, when the projection
is in a group (``models.projection_groups``), its output from the group: the leader (``group_index`` 0) computes
the whole group, the others take their share of it for that very input. ``MultiLoRALinear`` (a projection with
adapters) and ``PlainMember`` (a sibling without) are the two kinds.
"""

from __future__ import annotations

import torch
from torch import nn


class WrappedLinear(nn.Module):
    def __init__(self, base_layer: nn.Linear):
        super().__init__()
        self.base_layer = base_layer
        # the q / k / v or gate / up group this projection belongs to when grouped (models.projection_groups)
        object.__setattr__(self, "group", None)
        object.__setattr__(self, "group_index", 0)

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self):
        return self.base_layer.bias

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def group_output(self, x: torch.Tensor) -> torch.Tensor | None:
        """This projection's output as its group computes it, or None where it must compute itself (not grouped,
        another input, training, a route the group leaves to its members)."""
        group = self.group
        if group is None:
            return None
        return group.lead(x) if self.group_index == 0 else group.take(self.group_index, x)
