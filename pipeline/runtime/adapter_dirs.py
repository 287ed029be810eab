"""PEFT adapter dirs as the stages keep them: written atomically with a record of their weights, checked on read.

    save_adapter(peft_model, outputs / "adapters" / "winowhy", {"task": "winowhy", ...})   # finetune writes
    verify_adapter(outputs / "adapters" / "winowhy")                                      # route / evaluate read

``loramux.json`` beside the weights holds the training facts and the size + sha256 of
``adapter_model.safetensors``; a file truncated, damaged or swapped after training is refused in one line.
"""

from __future__ import annotations

import json
from pathlib import Path

from common.atomic import atomic_dir, file_digest
from pipeline.runtime.distributed import is_global_zero


def save_adapter(peft_model, dest, meta: dict) -> Path:
    """``save_pretrained`` into ``dest`` atomically, with ``loramux.json`` (task, base model, training facts and
    the size + sha256 of ``adapter_model.safetensors``)."""
    if not is_global_zero():  # DDP: every rank holds the same adapter; rank 0 writes it
        return Path(dest)
    with atomic_dir(dest) as tmp:
        peft_model.save_pretrained(tmp)
        weights = Path(tmp) / "adapter_model.safetensors"
        files = {weights.name: file_digest(weights)} if weights.is_file() else {}
        (Path(tmp) / "loramux.json").write_text(json.dumps({**meta, "files": files}, indent=2) + "\n")
    return Path(dest)


def verify_adapter(adapter_dir) -> Path:
    """Check the weights of an adapter saved by :func:`save_adapter` against the size and sha256 in its
    ``loramux.json``; a truncated, damaged or swapped file is one ValueError line. Dirs without the record pass."""
    d = Path(adapter_dir)
    try:
        files = json.loads((d / "loramux.json").read_text()).get("files") or {}
    except (OSError, ValueError, AttributeError):
        return d
    for name, want in files.items():
        if not (d / name).is_file():
            continue  # the bank names a missing file itself
        got = {"bytes": (d / name).stat().st_size}
        if got["bytes"] == want.get("bytes"):
            got = file_digest(d / name)
        if got != {k: want.get(k) for k in got}:
            what = "size" if "sha256" not in got else "sha256"
            raise ValueError(f"adapter {d}: {name}: {what} does not match loramux.json (truncated, damaged or replaced "
                             f"after training); retrain it with the finetune stage, or delete loramux.json if these "
                             f"weights are intended")
    return d
