"""Mixed precision for training with frozen weights: what is not trained is stored in bf16, what is trained in fp32.

Under bf16 autocast every matmul casts its fp32 operands to bf16 on every call; for a frozen base model (all but the
LoRA / gate parameters of a fine-tuning step) that is a copy of every weight per forward for nothing. Storing the
frozen weights in bf16 once removes those copies, while the trained parameters and their optimizer state stay fp32
(fp32 master weights), as autocast expects. RMSNorm and softmax still compute in fp32 inside the HF modules.
"""

from __future__ import annotations

import torch
from torch import nn


def store_frozen(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> int:
    """Cast, in place, every floating parameter of ``model`` that does not require grad to ``dtype``; returns how
    many were cast. Call it after the trainable parameters are chosen (``set_trainable``, ``get_peft_model``)."""
    n = 0
    for p in model.parameters():
        if not p.requires_grad and p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)
            n += 1
    return n
