"""AdapterBank: N standard PEFT LoRA adapters stacked into one tensor pair per wrapped projection.

For every wrapped projection (a base ``nn.Linear`` such as ``model.layers.3.self_attn.q_proj``) the bank holds

    A [L, d_in, R]    lora_A.weight of adapter a, transposed, in A[a, :, :r_a]
    B [L, R, d_out]   lora_B.weight of adapter a, transposed, in B[a, :r_a, :]
    ranks [L]         r_a of that projection (peft's rank_pattern may vary it per module)
    scales [L]        peft's scaling: lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora (alpha_pattern honoured)

R is the largest rank rounded up to a multiple of 16, so mixed ranks share one tensor and the kernel skips the
padding. An adapter that does not touch a wrapped projection gets zeros there (a zero delta).

Adapters come in exactly as ``peft`` saves them (``adapter_config.json`` + ``adapter_model.safetensors``); anything
the bank can't represent faithfully (another PEFT method, DoRA, trained biases, modules_to_save, embedding LoRA,
another base model) or that would poison the model (a NaN or Inf weight, a non-finite lora_alpha) is refused with
one ``AdapterError`` line naming the adapter dir and the field or tensor. A refused ``add`` / ``replace`` leaves
the bank as it was.

Hot swap: ``add`` / ``replace`` / ``remove`` change the stacked tensors in place; wrapped layers read them on
every forward, so the model is never rebuilt. ``version`` increases on every change (routers watch it).
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import nn

RANK_MULTIPLE = 16
PEFT_PREFIX = "base_model.model."


class AdapterError(ValueError):
    """A PEFT adapter the bank cannot take; the message names the adapter dir and the offending field."""


def _fail(adapter_dir, field_name: str, problem: str, fix: str):
    raise AdapterError(f"adapter {adapter_dir}: {field_name}: {problem}; {fix}")


def slot_key(module_name: str) -> str:
    """``model.layers.0.self_attn.q_proj`` -> ``model__layers__0__self_attn__q_proj`` (nn.Module names can't hold dots)."""
    return module_name.replace(".", "__")


def _pattern_value(patterns: dict, module_name: str, default):
    """peft's rank_pattern / alpha_pattern lookup: a key matches ``(.*\\.)?key$`` of the module name."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module_name):
            return value
    return default


@dataclass
class LoraAdapter:
    """One PEFT LoRA adapter read from disk: per module name, A [d_in, r], B [r, d_out] and its scale."""
    name: str
    path: str
    config: dict
    A: dict = field(default_factory=dict)
    B: dict = field(default_factory=dict)
    scale: dict = field(default_factory=dict)

    @property
    def use_rslora(self) -> bool:
        return bool(self.config.get("use_rslora", False))


def read_peft_adapter(adapter_dir, name: str, module_shapes: dict, wrapped: set, base_name: str | None = None,
                      check_base_name: bool = True) -> LoraAdapter:
    """Read and validate one PEFT LoRA dir against the base model's linear layers.

    ``module_shapes`` maps every nn.Linear module name of the base model to ``(d_in, d_out)``; ``wrapped`` is the
    subset the bank wraps. Raises ``AdapterError`` (one line: adapter dir, field, fix) on anything unusable.
    """
    d = Path(os.path.expanduser(str(adapter_dir)))
    if not d.is_dir():
        _fail(d, "path", "is not a directory", "pass a PEFT adapter dir (adapter_config.json + adapter_model.safetensors)")
    cfg_path = d / "adapter_config.json"
    if not cfg_path.is_file():
        _fail(d, "adapter_config.json", "missing", "save the adapter with peft's save_pretrained")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        _fail(d, "adapter_config.json", f"is not valid JSON ({e.msg}, line {e.lineno})", "re-save the adapter")
    if not isinstance(cfg, dict):
        _fail(d, "adapter_config.json", "is not a JSON object", "re-save the adapter with peft")
    if cfg.get("peft_type") != "LORA":
        _fail(d, "peft_type", f"is {cfg.get('peft_type')!r}, not 'LORA'", "only LoRA adapters can join the bank")
    if cfg.get("use_dora"):
        _fail(d, "use_dora", "is true", "DoRA adapters are not supported; train a plain LoRA (use_dora=False)")
    if cfg.get("fan_in_fan_out"):
        _fail(d, "fan_in_fan_out", "is true", "only nn.Linear projections (fan_in_fan_out=False) are supported")
    want = (cfg.get("base_model_name_or_path") or "").rstrip("/")
    if check_base_name and want and base_name and Path(want).name != Path(str(base_name).rstrip("/")).name:
        _fail(d, "base_model_name_or_path", f"is {want!r} but the base model is {base_name!r}",
              "use adapters trained on this base model, or pass check_base_name=False if they are compatible")
    r_default = cfg.get("r")
    if not isinstance(r_default, int) or r_default <= 0:
        _fail(d, "r", f"is {r_default!r}", "r must be a positive integer")
    alpha_default = cfg.get("lora_alpha", r_default)
    weights_path = d / "adapter_model.safetensors"
    if not weights_path.is_file():
        hint = " (found adapter_model.bin: re-save with safe_serialization=True)" if (d / "adapter_model.bin").exists() else ""
        _fail(d, "adapter_model.safetensors", "missing" + hint, "save the adapter with peft's save_pretrained")
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as e:
        _fail(d, "adapter_model.safetensors", f"cannot be read ({str(e).splitlines()[0]})", "re-save the adapter")

    adapter = LoraAdapter(name=name, path=str(d), config=cfg)
    for key, t in tensors.items():
        m = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[^.]+)?\.weight", key)
        if m is None:
            _fail(d, *_foreign_tensor(key, cfg))
        module, which = m.group(1), m.group(2)
        if module not in module_shapes:
            _fail(d, "target_modules", f"module {module!r} is not a linear layer of the base model",
                  "the adapter was trained on another base model architecture")
        if module not in wrapped:
            _fail(d, "target_modules", f"module {module!r} ({module.rsplit('.', 1)[-1]}) is not wrapped by the bank",
                  f"add {module.rsplit('.', 1)[-1]!r} to targets=")
        bad = t.numel() - int(torch.isfinite(t).sum()) if t.is_floating_point() else 0
        if bad:
            _fail(d, "adapter_model.safetensors", f"tensor {key!r} holds {bad} non-finite value(s) (NaN or Inf)",
                  "the adapter's training diverged or the file is damaged; retrain it or save a good checkpoint")
        (adapter.A if which == "A" else adapter.B)[module] = t
    if not adapter.A:
        _fail(d, "adapter_model.safetensors", "holds no lora_A/lora_B weights", "re-save the adapter with peft")
    for module in [m for m in module_shapes if m in adapter.A or m in adapter.B]:  # model order
        if module not in adapter.A or module not in adapter.B:
            _fail(d, "adapter_model.safetensors", f"module {module!r} has only one of lora_A/lora_B", "re-save the adapter")
        a, b = adapter.A[module], adapter.B[module]
        d_in, d_out = module_shapes[module]
        r = _pattern_value(cfg.get("rank_pattern"), module, r_default)
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != d_in or b.shape[0] != d_out or a.shape[0] != b.shape[1]:
            _fail(d, "shape", f"{module}: lora_A {list(a.shape)} / lora_B {list(b.shape)} do not fit the base layer "
                  f"[{d_out} x {d_in}] (expected lora_A [r, {d_in}], lora_B [{d_out}, r])",
                  "the adapter was trained on a base model with other hidden sizes")
        if a.shape[0] != r:
            _fail(d, "r", f"is {r} in adapter_config.json but {module}.lora_A has rank {a.shape[0]}",
                  "the config and the weights disagree; re-save the adapter")
        alpha = _pattern_value(cfg.get("alpha_pattern"), module, alpha_default)
        if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha):
            _fail(d, "lora_alpha", f"is {alpha!r} for {module}", "lora_alpha (and alpha_pattern) must be finite numbers")
        adapter.A[module] = a.t().contiguous()  # [d_in, r]
        adapter.B[module] = b.t().contiguous()  # [r, d_out]
        adapter.scale[module] = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
    return adapter


def _foreign_tensor(key: str, cfg: dict) -> tuple[str, str, str]:
    """(config field, problem, fix) for a saved tensor that is no LoRA A/B weight of a linear layer, naming the field
    of adapter_config.json that put it there."""
    module = re.sub(r"^base_model\.model\.", "", key).rsplit(".", 1)[0]
    if ".lora_embedding_" in key or key.endswith(".base_layer.weight"):
        # LoRA on an embedding (lora_embedding_A/B), or a layer peft saves whole when it is a target
        # (save_embedding_layers: embed_tokens, lm_head): either way target_modules asked for it
        name = module.split(".lora_embedding_")[0].removesuffix(".base_layer").rsplit(".", 1)[-1]
        problem = f"includes {name!r}: peft saved tensor {key!r} for it, which is no LoRA weight of a linear layer"
        return "target_modules", problem, "train without embed_tokens / lm_head in target_modules"
    if key.endswith(".bias") and ".lora_" in key:
        return "lora_bias", f"tensor {key!r} is a trained LoRA bias", "train with lora_bias=False"
    if "modules_to_save" in key or any(module == n or module.endswith("." + n) for n in cfg.get("modules_to_save") or []):
        return ("modules_to_save", f"tensor {key!r} is a fully trained copy of a base layer",
                "the bank adds LoRA deltas only: train without modules_to_save")
    return ("weights", f"tensor {key!r} is not a LoRA A/B weight of a linear layer",
            "only plain LoRA on nn.Linear projections can join the bank (no modules_to_save, biases, embeddings)")


class ProjectionSlots(nn.Module):
    """The stacked adapters of one wrapped projection: A [L, d_in, R], B [L, R, d_out], ranks [L], scales [L]."""
    def __init__(self, d_in: int, d_out: int, dtype, device):
        super().__init__()
        self.d_in, self.d_out = d_in, d_out
        self.A = nn.Parameter(torch.zeros(0, d_in, RANK_MULTIPLE, dtype=dtype, device=device), requires_grad=False)
        self.B = nn.Parameter(torch.zeros(0, RANK_MULTIPLE, d_out, dtype=dtype, device=device), requires_grad=False)
        self.register_buffer("ranks", torch.zeros(0, dtype=torch.int32, device=device))
        self.register_buffer("scales", torch.zeros(0, dtype=torch.float32, device=device))
        # host copies of ranks / scales (set with them by AdapterBank._set): a layer reads an adapter's rank and
        # scale here without a device read, e.g. to slice A[a, :, :r] for a route that is one adapter for all rows
        self.host_ranks: list[int] = []
        self.host_scales: list[float] = []
        self._tight: tuple | None = None

    def shared_rank_and_scale(self) -> tuple[int, float] | None:
        """``(r, scale)`` when every adapter of the bank has that rank and scale at this projection (host copies),
        else None."""
        if not self.host_ranks or len(set(self.host_ranks)) != 1 or len(set(self.host_scales)) != 1:
            return None
        return self.host_ranks[0], self.host_scales[0]

    def tight(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A[:, :, :r_max], B[:, :r_max])``: views without the rank padding, for the torch forms of the op
        (the Triton kernels take the padded tensors). Made once and reused while the parameters keep their storage
        and grad flag, so a derived value keyed on them (``kernels.derived_cache``) stays valid; an in-place update
        shows through (a view shares its base's version counter); a compiled graph slices in the graph."""
        r = max(self.host_ranks, default=0)
        if torch.compiler.is_compiling() or r == self.A.shape[2]:
            return self.A[:, :, :r], self.B[:, :r]
        key = (self.A.data_ptr(), self.B.data_ptr(), self.A.requires_grad, self.B.requires_grad, self.A.dtype,
               self.B.dtype, self.A.device, r)
        if self._tight is None or self._tight[0] != key:
            self._tight = (key, (self.A[:, :, :r], self.B[:, :r]))
        return self._tight[1]


def padded_rank(r: int) -> int:
    return max(RANK_MULTIPLE, -(-r // RANK_MULTIPLE) * RANK_MULTIPLE)


class AdapterBank(nn.Module):
    """Stacked LoRA adapters for a fixed set of wrapped projections of one base model; hot-swappable slots.

    ``AdapterBank(model, targets=["q_proj", "v_proj"])`` picks every nn.Linear whose last name component is in
    ``targets``; ``bank.add(name, dir)`` / ``replace`` / ``remove`` change adapters; ``bank.tensors(module)``
    gives ``(A, B, scales, ranks)`` for the kernel op.
    """
    def __init__(self, model: nn.Module, targets, *, check_base_name: bool = True):
        super().__init__()
        self.targets = list(targets)
        linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
        self.module_shapes = {n: (m.in_features, m.out_features) for n, m in linears.items()}
        self.modules_wrapped = [n for n in linears if n.rsplit(".", 1)[-1] in self.targets]
        if not self.modules_wrapped:
            raise ValueError(f"targets={self.targets} match no nn.Linear of the base model; use projection names such "
                             f"as {sorted({n.rsplit('.', 1)[-1] for n in linears})}")
        p = next(model.parameters())
        self.base_name = getattr(getattr(model, "config", None), "name_or_path", None)
        self.check_base_name = check_base_name
        self.names: list[str] = []
        self.paths: list[str] = []
        self.use_rslora: list[bool] = []
        self.version = 0
        self.slots = nn.ModuleDict({slot_key(n): ProjectionSlots(*self.module_shapes[n], p.dtype, p.device)
                                    for n in self.modules_wrapped})

    # ---- reading -------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.names)

    def index(self, name: str) -> int:
        if name not in self.names:
            raise KeyError(f"adapter {name!r} is not in the bank; it holds {self.names}")
        return self.names.index(name)

    def tensors(self, module_name: str):
        """``(A, B, scales, ranks)`` of one wrapped projection, as the kernel op takes them."""
        s = self.slots[slot_key(module_name)]
        return s.A, s.B, s.scales, s.ranks

    def peft_state(self, index: int) -> dict:
        """Adapter ``index`` as peft's saved state dict (``get_peft_model_state_dict``'s keys and layouts): only its
        first r columns of A / rows of B, transposed back to ``lora_A.weight`` [r, d_in], ``lora_B.weight``
        [d_out, r]; detached views of the bank's tensors (their dtype and device)."""
        state = {}
        for module in self.modules_wrapped:
            A, B, _, ranks = self.tensors(module)
            r = int(ranks[index])
            if r:
                state[f"{PEFT_PREFIX}{module}.lora_A.weight"] = A[index, :, :r].detach().t().contiguous()
                state[f"{PEFT_PREFIX}{module}.lora_B.weight"] = B[index, :r].detach().t().contiguous()
        return state

    @property
    def max_rank(self) -> int:
        return max((int(s.ranks.max()) for s in self.slots.values() if len(s.ranks)), default=0)

    def fit_rank_to_adapters(self) -> bool:
        """Trim each projection's rank padding to its adapters' largest rank there (``RANK_MULTIPLE`` pads r = 8 to
        16 for the Triton kernels, which mask any rank): what a bank that trains wants. Its A / B are then the
        trained tensors at their own size, so a bank of one adapter gets the gradient products themselves, with no
        zero fill and no copy into a padded tensor per tensor and projection (``kernels.uniform``), and AdamW
        keeps no state for padding. Values are unchanged; a later ``add`` pads again. True where anything changed."""
        changed = False
        for s in self.slots.values():
            r = max(s.host_ranks, default=0)
            if 0 < r < s.A.shape[2]:
                self._set(s, s.A.data[:, :, :r], s.B.data[:, :r], s.ranks, s.scales)
                changed = True
        if changed:
            self.version += 1
        return changed

    # ---- hot swap ------------------------------------------------------------------------------------------
    def read(self, name: str, adapter_dir) -> LoraAdapter:
        return read_peft_adapter(adapter_dir, name, self.module_shapes, set(self.modules_wrapped),
                                 self.base_name, self.check_base_name)

    def add(self, name: str, adapter_dir) -> None:
        """Append an adapter (read and validated from its PEFT dir) as the last slot."""
        if name in self.names:
            raise AdapterError(f"adapter {adapter_dir}: name: {name!r} is already in the bank; use replace() or another name")
        self._write(self.read(name, adapter_dir), len(self.names))

    def replace(self, name: str, adapter_dir) -> None:
        """Swap the weights of slot ``name`` for those in ``adapter_dir``; its index (and routers' rows) stay."""
        self._write(self.read(name, adapter_dir), self.index(name))

    def remove(self, name: str) -> None:
        """Drop slot ``name``; later slots move up by one."""
        i = self.index(name)
        keep = [j for j in range(len(self.names)) if j != i]
        for s in self.slots.values():
            self._set(s, s.A.data[keep], s.B.data[keep], s.ranks[keep], s.scales[keep])
        for lst in (self.names, self.paths, self.use_rslora):
            del lst[i]
        self.version += 1

    def _set(self, s: ProjectionSlots, A, B, ranks, scales):
        grad = s.A.requires_grad
        s.A = nn.Parameter(A.contiguous(), requires_grad=grad)
        s.B = nn.Parameter(B.contiguous(), requires_grad=grad)
        s.ranks = ranks
        s.scales = scales
        s.host_ranks = [int(r) for r in ranks.tolist()]
        s.host_scales = [float(v) for v in scales.tolist()]

    def _write(self, adapter: LoraAdapter, i: int) -> None:
        """Slot ``i`` := ``adapter`` (appended when i == len(self)). Every projection's new tensors are built before
        any is installed, so a failure part-way (out of memory, say) leaves the bank as it was."""
        new_r = max(a.shape[1] for a in adapter.A.values())
        R = padded_rank(max(new_r, self.max_rank))
        L = max(len(self.names), i + 1)
        staged = []
        for module in self.modules_wrapped:
            s = self.slots[slot_key(module)]
            dt, dev = s.A.dtype, s.A.device
            A = torch.zeros(L, s.d_in, R, dtype=dt, device=dev)
            B = torch.zeros(L, R, s.d_out, dtype=dt, device=dev)
            ranks = torch.zeros(L, dtype=torch.int32, device=dev)
            scales = torch.zeros(L, dtype=torch.float32, device=dev)
            n_old, r_old = s.A.shape[0], min(s.A.shape[2], R)
            A[:n_old, :, :r_old] = s.A.data[:, :, :r_old]
            B[:n_old, :r_old] = s.B.data[:, :r_old]
            ranks[:n_old], scales[:n_old] = s.ranks, s.scales
            A[i].zero_()
            B[i].zero_()
            if module in adapter.A:
                a, b = adapter.A[module], adapter.B[module]
                r = a.shape[1]
                A[i, :, :r] = a.to(dt)
                B[i, :r] = b.to(dt)
                for which, t in (("A", A[i, :, :r]), ("B", B[i, :r])):
                    if not bool(torch.isfinite(t).all()):  # finite on disk, out of range in the bank's dtype
                        _fail(adapter.path, "adapter_model.safetensors",
                              f"tensor {module}.lora_{which}.weight overflows the bank's dtype {dt} (a value past its range)",
                              "load the base model in a wider dtype (float32 / bfloat16) or rescale the adapter")
                ranks[i], scales[i] = r, adapter.scale[module]
            else:  # the adapter leaves this projection alone: zero delta
                ranks[i], scales[i] = 0, 0.0
            staged.append((s, A, B, ranks, scales))
        for new in staged:
            self._set(*new)
        if i == len(self.names):
            self.names.append(adapter.name)
            self.paths.append(adapter.path)
            self.use_rslora.append(adapter.use_rslora)
        else:
            self.paths[i], self.use_rslora[i] = adapter.path, adapter.use_rslora
        self.version += 1

    @classmethod
    def from_peft_dirs(cls, model: nn.Module, adapters, targets=None, *, check_base_name: bool = True) -> AdapterBank:
        """Build a bank from ``{name: dir}`` or a list of dirs (names = dir names).

        ``targets=None`` wraps exactly the projections the adapters touch (their union), in model order.
        """
        if isinstance(adapters, (str, os.PathLike)):
            adapters = [adapters]
        items = list(adapters.items()) if isinstance(adapters, dict) else [(Path(str(p)).name, p) for p in adapters]
        if not items:
            raise ValueError("no adapters given; pass {name: peft_dir} or a list of PEFT adapter dirs")
        names = [n for n, _ in items]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"adapter names {dup} appear twice; pass a dict {{name: dir}} with unique names")
        if targets is None:
            targets = sorted({t for _, p in items for t in _adapter_projection_names(p)})
            if not targets:  # let read_peft_adapter report what is wrong with the first adapter
                targets = ["q_proj", "v_proj"]
        bank = cls(model, targets, check_base_name=check_base_name)
        for name, path in items:
            bank.add(name, path)
        return bank


def _adapter_projection_names(adapter_dir) -> set:
    """Last name components of the modules an adapter's safetensors touches (empty if unreadable)."""
    f = Path(os.path.expanduser(str(adapter_dir))) / "adapter_model.safetensors"
    if not f.is_file():
        return set()
    try:
        with safe_open(str(f), "pt") as fh:
            keys = list(fh.keys())
    except (SafetensorError, OSError, ValueError):
        return set()
    out = set()
    for k in keys:
        m = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.lora_[AB](?:\.[^.]+)?\.weight", k)
        if m:
            out.add(m.group(1).rsplit(".", 1)[-1])
    return out
