"""Router checkpoints on their own: ``router.safetensors`` (the router's state_dict) + ``router.json``.

    router.json = {"format": "loramux-router", "version": 1, "strategy": "meteora" | "dlp" | ...,
                   "config": {...constructor kwargs...}, "adapter_names": [...], "base_model": "...",
                   "shapes": {tensor name: shape}, "weights": {"bytes": n, "sha256": hex}}

No Lightning, no pickles. Both files are written atomically (``common.atomic``: temp file in the same dir +
``os.replace``), the weights first and the JSON last; the JSON records the weights' size and sha256, so a reader
never trusts weights that are truncated, damaged or from an interrupted re-save (new weights, old JSON): each is
one ``RouterCheckpointError`` line. Loading also checks the format, the strategy, the adapter names (a different
order is fine: rows are permuted to the bank's order; a different set is an error naming the missing / extra
adapters), and every tensor's shape.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from common.atomic import atomic_write_text, atomic_write_with, file_digest

FORMAT = "loramux-router"
WEIGHTS, CONFIG = "router.safetensors", "router.json"


class RouterCheckpointError(ValueError):
    """A router checkpoint that does not fit the model; the message names the dir and the field."""


def save_router_checkpoint(directory, strategy: str, config: dict, state: dict, adapter_names: list,
                           base_model: str | None = None, adapters: str | None = None) -> Path:
    """Write ``router.safetensors`` + ``router.json`` into ``directory`` (created if missing). ``adapters``: the
    dir (relative to ``directory``) of adapters trained together with the router, which it goes with
    (``pipeline.runtime.cotrained_adapters``); None: it routes the adapters it was trained over, unchanged."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    atomic_write_with(d / WEIGHTS, lambda p: save_file(tensors, p, metadata={"format": FORMAT, "strategy": strategy}))
    meta = {"format": FORMAT, "version": 1, "strategy": strategy, "config": config,
            "adapter_names": list(adapter_names), "base_model": base_model,
            "shapes": {k: list(v.shape) for k, v in tensors.items()}, "weights": file_digest(d / WEIGHTS),
            **({"adapters": adapters} if adapters else {})}
    atomic_write_text(d / CONFIG, json.dumps(meta, indent=2))
    return d


def read_router_checkpoint(directory) -> tuple[dict, dict]:
    """Return ``(meta, tensors)``; ``RouterCheckpointError`` (one line) if files are missing or inconsistent."""
    d = Path(directory)
    if not (d / CONFIG).is_file() or not (d / WEIGHTS).is_file():
        raise RouterCheckpointError(f"router checkpoint {d}: {CONFIG} / {WEIGHTS} missing; train a router with the "
                                    "route stage or save one with save_router(dir)")
    try:
        meta = json.loads((d / CONFIG).read_text())
    except json.JSONDecodeError as e:
        raise RouterCheckpointError(f"router checkpoint {d}: {CONFIG} is not valid JSON ({e.msg}); re-save it") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise RouterCheckpointError(f"router checkpoint {d}: format: not a {FORMAT} checkpoint; re-save it with save_router")
    for field in ("strategy", "config", "adapter_names", "shapes"):
        if field not in meta:
            raise RouterCheckpointError(f"router checkpoint {d}: {field}: missing from {CONFIG}; re-save it")
    want = meta.get("weights")  # size + sha256 (checkpoints saved before they were recorded have none)
    if isinstance(want, dict):
        size = (d / WEIGHTS).stat().st_size
        if size != want.get("bytes"):
            raise RouterCheckpointError(f"router checkpoint {d}: {WEIGHTS}: {size} bytes, {CONFIG} says "
                                        f"{want.get('bytes')} (truncated or interrupted save); re-save it or rerun route")
        if file_digest(d / WEIGHTS)["sha256"] != want.get("sha256"):
            raise RouterCheckpointError(f"router checkpoint {d}: {WEIGHTS}: sha256 differs from {CONFIG} (damaged or "
                                        "interrupted save); re-save it or rerun route")
    try:
        tensors = load_file(str(d / WEIGHTS))
    except Exception as e:  # noqa: BLE001 safetensors raises its own error types for a broken file
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise RouterCheckpointError(f"router checkpoint {d}: {WEIGHTS} cannot be read ({first}); re-save it or "
                                    "rerun route") from None
    if {k: list(v.shape) for k, v in tensors.items()} != meta["shapes"]:
        raise RouterCheckpointError(f"router checkpoint {d}: shapes: {WEIGHTS} does not match {CONFIG}; re-save it")
    return meta, tensors


def align_router_state(directory, meta: dict, tensors: dict, target_state: dict, adapter_names: list,
                       row_keys: list) -> dict:
    """Check a checkpoint against a freshly built router's ``target_state`` and reorder per-adapter rows
    (``row_keys``: tensors whose dim 0 is the adapter axis) from the checkpoint's adapter order to the bank's."""
    saved = list(meta["adapter_names"])
    if sorted(saved) != sorted(adapter_names):
        missing = sorted(set(adapter_names) - set(saved))
        extra = sorted(set(saved) - set(adapter_names))
        raise RouterCheckpointError(f"router checkpoint {directory}: adapter_names: trained for {saved}, the bank holds "
                                    f"{list(adapter_names)} (not in checkpoint: {missing}, not in bank: {extra}); "
                                    "retrain the router for these adapters")
    missing = sorted(set(target_state) - set(tensors))
    extra = sorted(set(tensors) - set(target_state))
    if missing or extra:
        raise RouterCheckpointError(f"router checkpoint {directory}: tensors: missing {missing[:3]}, unexpected "
                                    f"{extra[:3]}; it was trained with other targets / router settings")
    perm = torch.tensor([saved.index(n) for n in adapter_names], dtype=torch.long)
    out = {}
    for k, v in tensors.items():
        if k in row_keys:
            v = v[perm]
        if v.shape != target_state[k].shape:
            raise RouterCheckpointError(f"router checkpoint {directory}: shape of {k} is {list(v.shape)}, the model "
                                        f"needs {list(target_state[k].shape)}; it was trained on another base model")
        out[k] = v
    return out
