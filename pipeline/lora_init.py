"""The one place a fresh LoRA adapter is created: peft's own init, drawn from an explicitly seeded RNG.

    peft_model = init_lora(model, LoraConfig(...), seed=cfg.seed)        # the separate finetune run
    dirs = initial_adapters(model, LoraConfig(...), seed, tasks, tmp)     # the joint run: one PEFT dir per task

peft initialises ``lora_A`` with kaiming-uniform draws from torch's global RNG (``lora_B`` is zero) while it
injects the layers in model order, so an adapter's start depends on the RNG state at that moment. Loading the
base model, reading data and building samplers may all consume that RNG, and they differ between a separate
run (one task) and a joint run (every task). Seeding right before ``get_peft_model`` makes every adapter of an
experiment start from the same draws whichever mode trains it: a joint run's adapter ``t`` equals, step for step,
the separate run of ``t`` (pipeline/joint_finetune.py relies on it). Every adapter of an experiment starts from
the same init (seed ``cfg.seed``); they diverge through their data.
"""

from __future__ import annotations

from pathlib import Path

import torch


def init_lora(model, lora_config, seed: int):
    """``peft.get_peft_model(model, lora_config)`` with torch's RNG (every device's) seeded to ``seed`` just before."""
    from peft import get_peft_model

    torch.manual_seed(int(seed))  # seeds every device's default generator
    return get_peft_model(model, lora_config)


def initial_adapters(model, lora_config, seed: int, names, out_dir) -> dict[str, Path]:
    """Save the initial adapter of every name in ``names`` (each exactly :func:`init_lora`'s) as a PEFT dir
    ``out_dir/<name>`` and return ``{name: dir}``; ``model`` is left as it was (peft's layers unloaded)."""
    dirs = {}
    for name in names:
        peft_model = init_lora(model, lora_config, seed)
        dirs[name] = Path(out_dir) / str(name)
        peft_model.save_pretrained(str(dirs[name]))
        model = peft_model.unload()  # the original nn.Linear modules back, no LoRA left in the model
    return dirs
