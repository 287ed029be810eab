"""Adapters trained together with a router, kept beside it.

MeteoRA's script trains its gates and the LoRA weights together (it unfreezes ``lora_`` too): the MeteoRA model it
releases is the gates plus those co-trained adapters, not the gates over the adapters it started from. In the route
stage, ``router.train.train_loras=true`` does the same. The adapters it ends with are then part of the router:

    written = write_cotrained(mm, adapter_dirs, checkpoint / "adapters")  # route: the bank's adapters, PEFT dirs
    mirror_dirs(written, run_copy / "adapters")     # the run's own copy: hard links, not twice the bytes
    save_router_checkpoint(..., adapters="adapters")  # router.json names them (written after them)
    cotrained_dirs(checkpoint, names)               # evaluate / bench: {name: dir} or None

Each adapter is written as a standard PEFT dir (``adapter_config.json`` copied from the dir it started from, so rank,
alpha and targets are the same; ``adapter_model.safetensors`` in peft's saved key layout; ``loramux.json`` with the
size and sha256 of the weights, as ``save_adapter`` writes them), atomically, so ``peft.PeftModel.from_pretrained``
loads it. ``router.json`` is written after the adapters: a crash in between leaves the previous router, whose own
``adapters`` field (or lack of one) still says which adapters it goes with.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from safetensors.torch import save_file

from common.atomic import atomic_dir, file_digest
from pipeline.runtime.distributed import is_global_zero

#: ``router.adapters_from: experiment``: the experiment's own adapters (as fine-tuned), also under a router whose
#: checkpoint was trained together with its adapters: MeteoRA's gates over the adapters they did not change
EXPERIMENT = "experiment"


def write_cotrained(mm, started_from: dict, out_dir, meta: dict | None = None) -> dict[str, Path]:
    """Write every adapter of ``mm``'s bank into ``out_dir/<name>`` as a PEFT dir (fp32 weights), its
    ``adapter_config.json`` copied from ``started_from[name]`` (the dir it was loaded from); ``meta`` goes into
    each ``loramux.json`` with ``{"task": name, "cotrained_from": <that dir>}``. The model is left as it was.
    Returns ``{name: dir}``."""
    out = {}
    for name in mm.adapter_names:
        dest = Path(out_dir) / name
        out[name] = dest
        if not is_global_zero():  # DDP: every rank holds the same adapters; rank 0 writes them
            continue
        state = {k: v.float().cpu() for k, v in mm.bank.peft_state(mm.bank.index(name)).items()}
        with atomic_dir(dest) as tmp:
            shutil.copyfile(Path(started_from[name]) / "adapter_config.json", Path(tmp) / "adapter_config.json")
            weights = Path(tmp) / "adapter_model.safetensors"
            save_file(state, str(weights), metadata={"format": "pt"})
            record = {**(meta or {}), "task": name, "cotrained_from": str(started_from[name]),
                      "files": {weights.name: file_digest(weights)}}
            (Path(tmp) / "loramux.json").write_text(json.dumps(record, indent=2) + "\n")
    return out


def mirror_dirs(dirs: dict, dest) -> None:
    """``dest/<name>`` for every ``{name: dir}`` of ``dirs`` (what ``write_cotrained`` returns): the same files,
    hard-linked where the filesystem allows (copied where not), each dir swapped in atomically. The route stage
    keeps its run's copy of the co-trained adapters this way; a later run that rewrites the source dirs replaces
    their files (new inodes), so the run's copy keeps what that run wrote."""
    if not is_global_zero():
        return
    for name, d in dirs.items():
        with atomic_dir(Path(dest) / name) as tmp:
            for f in Path(d).iterdir():
                try:
                    os.link(f, Path(tmp) / f.name)
                except OSError:  # another filesystem, or one without hard links
                    shutil.copy2(f, Path(tmp) / f.name)


def cotrained_dirs(checkpoint, names: list[str]) -> dict[str, Path] | None:
    """``{name: dir}`` of the adapters a router checkpoint was trained with (its ``router.json`` ``adapters``
    field, a dir relative to the checkpoint), None for a router trained over adapters it did not change. A
    named dir that lacks one of ``names`` is one ValueError line."""
    checkpoint = Path(checkpoint)
    try:
        sub = json.loads((checkpoint / "router.json").read_text()).get("adapters")
    except (OSError, ValueError, AttributeError):
        return None  # no readable router.json: load_router refuses it with its own line
    if not sub:
        return None
    root = checkpoint / str(sub)
    missing = [n for n in names if not (root / n / "adapter_config.json").is_file()]
    if missing:
        raise ValueError(f"router {checkpoint}: it was trained with its adapters (router.json adapters: {sub!r}) but "
                         f"{', '.join(missing)} is missing under {root}; retrain it with the route stage")
    return {n: root / n for n in names}
