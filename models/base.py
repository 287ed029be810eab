"""Load the frozen base model every adapter sits on: one function for hub ids, local dirs and GGUF files.

``load_base_model`` hands back ``(model, tokenizer)`` ready for batched generation: the tokenizer always has a
pad token (the EOS token where the model has none) and pads on the left, so the last position of every row is
a real token and ``generate`` can append to all rows at once. The model is in eval mode with ``requires_grad``
off; a routing strategy or a LoRA trainer turns on exactly what it trains.

    model, tok = load_base_model("~/.cache/loramux/models/SmolLM2-135M-Instruct")
    model, tok = load_base_model("/path/to/dir", gguf_file="smollm2.gguf")     # dequantised to fp32
    model, tok = load_base_model("/path/to/smollm2.gguf")                      # the same, by file path
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16, "float64": torch.float64}


def resolve_dtype(dtype) -> torch.dtype:
    """``"float32"`` / ``"bf16"`` / ``torch.float32`` -> ``torch.dtype``; one-line error for anything else."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if str(dtype) not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported; use one of {sorted(DTYPES)}")
    return DTYPES[str(dtype)]


def _split_gguf(name_or_path: str, gguf_file: str | None) -> tuple[str, str | None]:
    """A path to a .gguf file becomes (its dir, its file name), as transformers' ``gguf_file=`` expects."""
    if gguf_file is None and name_or_path.endswith(".gguf"):
        p = Path(name_or_path)
        return str(p.parent), p.name
    return name_or_path, gguf_file


def _looks_local(name_or_path: str) -> bool:
    """Hub ids are ``name`` or ``org/name``; anything absolute, relative-dotted or deeper is a local path."""
    return name_or_path.startswith(("/", ".", "~")) or name_or_path.count("/") > 1


def check_source(name_or_path, gguf_file=None) -> tuple[str, str | None]:
    """``(path or hub id, gguf file or None)`` of a model source; a local one that does not exist, or a dir that
    holds no model, is one FileNotFoundError line naming it and the fix. Reads no weights (stages call it before
    they load anything)."""
    name_or_path = os.path.expanduser(str(name_or_path))
    if not name_or_path.strip():
        raise FileNotFoundError("model.name_or_path is empty; pass a hub id, an HF model directory or a .gguf file "
                                "(the cached models: python -m data.fetch --model)")
    path, gguf = _split_gguf(name_or_path, gguf_file)
    local = os.path.exists(path) or _looks_local(path)
    if local and not os.path.exists(path):
        raise FileNotFoundError(
            f"base model {name_or_path!r} does not exist; build the cached models with "
            f"`python -m data.fetch --model` or pass a hub id / an existing HF directory")
    if gguf is not None and not os.path.exists(os.path.join(path, gguf)) and local:
        raise FileNotFoundError(f"GGUF file {os.path.join(path, gguf)!r} does not exist; pass gguf_file= a file "
                                f"inside {path!r} or the full path of a .gguf file")
    if local and gguf is None and os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
        ggufs = sorted(f for f in os.listdir(path) if f.endswith(".gguf"))
        hint = f"pass gguf_file={ggufs[0]!r}" if ggufs else "pass a HF model directory or a .gguf file"
        raise FileNotFoundError(f"cannot load base model {name_or_path!r} (no config.json in it); {hint}")
    return path, gguf


def load_base_model(name_or_path, *, dtype="float32", device=None, gguf_file=None):
    """Return ``(model, tokenizer)`` for a hub id, a local HF dir or a GGUF file (``gguf_file=`` or a *.gguf path).

    The model is frozen (``requires_grad=False``) and in eval mode; the tokenizer pads on the left with a pad
    token set (EOS where the model has none). ``device`` is anything ``torch.device`` accepts (default: CPU).
    """
    # lazy: transformers takes seconds to import, and the adapter bank and kernels need none of it
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name_or_path = os.path.expanduser(str(name_or_path))
    path, gguf = check_source(name_or_path, gguf_file)
    torch_dtype = resolve_dtype(dtype)
    kwargs = {"gguf_file": gguf} if gguf else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, **kwargs)
    except (OSError, ValueError) as e:  # hub id not reachable offline, unreadable files
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise OSError(f"cannot load base model {name_or_path!r} ({first}); pass a local HF directory "
                      f"(config.json + weights) or a .gguf file, or go online for hub ids") from e
    if gguf:  # a GGUF-loaded model is dequantised; drop the quantizer so save_pretrained / peft treat it as plain
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model = model.to(torch_dtype)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if device is not None:
        model = model.to(torch.device(device))
    model.eval()
    model.requires_grad_(False)
    return model, tokenizer
