"""MultiLoRAModel: one HF causal LM, one AdapterBank, one routing strategy chosen by name.

    mm = MultiLoRAModel.from_adapters(model, {"a": dir_a, "b": dir_b}, router="oracle", tokenizer=tok)
    out = mm(input_ids, attention_mask, labels=labels, task_ids=["a", "b"])     # HF output; loss (+ aux)
    gen = mm.generate(input_ids, attention_mask=mask, task_ids=["a", "b"], max_new_tokens=8)
    mm.set_router("meteora", top_k=2, temperature=1.0)      # same model and bank, new strategy (by name or builder)
    mm.set_trainable("gates")                                # -> the parameters to optimise
    mm.save_router("routers/meteora"); mm.load_router("routers/meteora", temperature=30)

Construction replaces every wrapped ``nn.Linear`` of ``model`` in place by a ``MultiLoRALinear`` and registers a
forward pre-hook on ``model`` that tells the router a forward is starting (and whether it is a prefill); so the
HF model's own ``model.generate`` works too, with the KV cache and batched left-padded inputs. Routing inputs
(``task_ids``: adapter names or indices per sequence; ``route_mask``; ``force_gates``) are passed per call to
``forward`` / ``generate`` or set persistently with ``set_routing``.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from models.adapter_bank import AdapterBank
from models.multilora_linear import MultiLoRALinear
from models.projection_groups import find_groups
from models.routing import registry
from models.routing.base import BaseRouter
from models.routing.checkpoint import (
    RouterCheckpointError,
    align_router_state,
    read_router_checkpoint,
    save_router_checkpoint,
)
from models.routing.route import RouteContext, Router, task_ids_for_batch, validate_task_ids

METEORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DLP_TARGETS = ("q_proj", "v_proj")
TRAINABLE = ("none", "router", "gates", "adapters", "router+adapters", "gates+adapters")


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def _batch(input_ids, kwargs: dict) -> int | None:
    """Number of sequences of a forward / generate call (from input_ids or inputs_embeds), None if neither is given."""
    ref = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
    return None if ref is None else ref.shape[0]


def is_prefill_call(kwargs: dict) -> bool:
    """Does this forward start a sequence (a sentence router decides here) or continue one from the KV cache?

    Decided from host-side facts only, never by reading a device tensor: a read would synchronise every decode
    step and break ``torch.compile``'s graph (dynamo cannot branch on a tensor). No cache: every call is a full
    forward. Compiling: transformers' generate runs the prefill eagerly and compiles only the decode step, so a
    compiled call with a cache is decode. Otherwise the cache's length (an int in DynamicCache; a 0-d tensor in
    newer StaticCache, read eagerly) or, on older transformers, ``cache_position``. The KV cache arrives as
    ``past_key_values`` or, from transformers 5.2x, ``cache``.
    """
    pkv = kwargs.get("past_key_values")
    if pkv is None:
        pkv = kwargs.get("cache")
    cache_pos = kwargs.get("cache_position")
    if pkv is None and cache_pos is None:
        return True
    if torch.compiler.is_compiling():
        return False
    if pkv is not None and hasattr(pkv, "get_seq_length"):
        return int(pkv.get_seq_length()) == 0
    if cache_pos is not None:
        return int(cache_pos.reshape(-1)[0]) == 0
    return False


class MultiLoRAModel(nn.Module):
    """A causal LM whose wrapped projections add routed LoRA deltas from a shared, hot-swappable AdapterBank."""

    def __init__(self, model: nn.Module, bank: AdapterBank, router: str | Router = "oracle", tokenizer=None,
                 **router_kwargs):
        super().__init__()
        self.model = model
        self.bank = bank
        self.tokenizer = tokenizer
        self.ctx = RouteContext()
        self.ctx.bank, self.ctx.tokenizer, self.ctx.embedding = bank, tokenizer, model.get_input_embeddings()
        for name in bank.modules_wrapped:
            base = model.get_submodule(name)
            if isinstance(base, MultiLoRALinear):
                raise ValueError(f"{name} is already wrapped; build one MultiLoRAModel per base model")  # noqa: TRY004
            _set_submodule(model, name, MultiLoRALinear(base, name, self.ctx))
        self._hook = model.register_forward_pre_hook(self._before_forward, with_kwargs=True)
        self._groups: list = []
        self.router: Router = BaseRouter(self.ctx)
        self.set_router(router, **router_kwargs)

    @classmethod
    def from_adapters(cls, model, adapters, *, targets=None, router="oracle", tokenizer=None,
                      check_base_name: bool = True, group_projections: bool = False,
                      **router_kwargs) -> MultiLoRAModel:
        """Build from PEFT LoRA dirs: ``adapters`` is ``{name: dir}`` or a list of dirs (names = dir names).

        ``targets`` = projection names to wrap (e.g. ``METEORA_TARGETS``, ``DLP_TARGETS``); None wraps the union
        of what the adapters touch. ``router`` and ``router_kwargs`` as in ``set_router``. ``group_projections``:
        see ``group_projections``.
        """
        bank = AdapterBank.from_peft_dirs(model, adapters, targets, check_base_name=check_base_name)
        mm = cls(model, bank, router, tokenizer, **router_kwargs)
        if group_projections:
            mm.group_projections()
        return mm

    def group_projections(self, on: bool = True, one_launch: bool | str = False) -> int:
        """Run q / k / v and gate / up of each block as one projection at inference (``models.projection_groups``):
        their base weights packed into one tensor (each member's weight a view of it), and one packed LoRA where
        the router routes every projection alike. ``on=False`` gives every member its own weight again. Call it
        again after anything replaces the base weights (a dtype cast): a broken group runs its members alone.
        ``one_launch``: a uniform route's decode call is one ``kernels.gemv_lora`` launch per group (the LoRA in the
        base GEMV's epilogue) instead of cuBLAS's GEMM and an addmm (a str names gemv_lora's backend). Returns the
        number of groups."""
        for g in self._groups:
            g.unpack()
        self._groups = find_groups(self.model, MultiLoRALinear) if on else []
        for g in self._groups:
            g.pack()
            g.one_launch = one_launch
            for i, m in enumerate(g.members):
                object.__setattr__(m, "group", g)
                object.__setattr__(m, "group_index", i)
        return len(self._groups)

    def decodes_grouped(self, router=None, compiled: bool = False) -> bool:
        """Does ``router`` (default the installed one) decode through the projection groups? Where groups are
        formed, a router whose route every projection shares (oracle, DLP) and one that hands a group its members'
        gates (MeteoRA: ``Router.groups_gates``) do; merge's per-projection LoRA runs the members alone, and so do
        MeteoRA's gates in a decode under ``torch.compile`` (``compiled``: its ``group_gates`` declines there)."""
        router = self.router if router is None else router
        return bool(self._groups) and (router is None or router.shares_route or (router.groups_gates and not compiled))

    # ---- strategy ----------------------------------------------------------------------------------------------
    def build_router(self, strategy, **kwargs) -> Router:
        """A fresh router for this model and bank (not installed): ``strategy`` is a registered name
        (``models.routing.registry``) or a builder (a Router subclass or a function of the route context)."""
        build = registry.builder(strategy) if isinstance(strategy, str) else strategy
        try:
            return build(self.ctx, **kwargs)
        except TypeError as e:
            raise ValueError(f"router={registry.strategy_name(build)!r}: {e}") from None

    def set_router(self, router, **kwargs) -> Router:
        """Switch the routing strategy: ``oracle | meteora | dlp | dlp_segments | lora_b | merge | base`` (a name), a
        builder, or a ready ``Router`` instance (installed as is).

        meteora: top_k=2, temperature=1.0, aux_loss_coef=50.0 — dlp / dlp_segments: top_p=0.6,
        fusion="softmax"|"renorm", hidden=1408, layers=4, dropout=0.0 — lora_b: adapter=<name> —
        merge: mode="delta"|"linear" (each strategy's constructor in models/routing/ holds its defaults).
        """
        r = router if isinstance(router, Router) else self.build_router(router, **kwargs)
        self.router = r
        self.ctx.router = r
        self._attach_projection_state()
        return r

    def _wrapped(self):
        return [m for m in self.model.modules() if isinstance(m, MultiLoRALinear)]

    def _attach_projection_state(self) -> None:
        """Hand every wrapped layer the router's module for its projection (or None), held by reference."""
        for layer in self._wrapped():
            object.__setattr__(layer, "route_state", self.router.projection_state(layer.module_name))

    @property
    def strategy(self) -> str:
        return self.router.name

    @property
    def adapter_names(self) -> list[str]:
        return list(self.bank.names)

    def set_routing(self, task_ids=None, route_mask=None, force_gates: bool = False) -> None:
        """Persistent routing inputs (used until changed): task per sequence (adapter names or indices; the oracle's
        choice and the meteora / dlp training label), tokens the sentence router reads, forced one-hot gates."""
        self.ctx.task_ids = validate_task_ids(task_ids, self.bank)
        self.ctx.route_mask = route_mask
        self.ctx.force_gates = bool(force_gates)

    @contextlib.contextmanager
    def routing(self, task_ids=None, route_mask=None, force_gates=None, batch: int | None = None):
        """Temporarily override routing inputs (None keeps the persistent value). With ``batch`` (the call's number
        of sequences) the task ids in force must be one per sequence or one for all (broadcast)."""
        old = (self.ctx.task_ids, self.ctx.route_mask, self.ctx.force_gates)
        if task_ids is not None:
            self.ctx.task_ids = validate_task_ids(task_ids, self.bank, batch)
        elif batch is not None and self.ctx.task_ids is not None:
            self.ctx.task_ids = task_ids_for_batch(self.ctx.task_ids, batch)
        if route_mask is not None:
            self.ctx.route_mask = route_mask
        if force_gates is not None:
            self.ctx.force_gates = bool(force_gates)
        try:
            yield
        finally:
            self.ctx.task_ids, self.ctx.route_mask, self.ctx.force_gates = old

    def _before_forward(self, module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        prefill = self.ctx.prefill if self.ctx.prefill is not None else is_prefill_call(kwargs)
        mask = kwargs.get("attention_mask")
        self.router.begin_forward(input_ids, mask if mask is not None else self.ctx.token_mask,
                                  kwargs.get("inputs_embeds"), prefill)

    # ---- compute -----------------------------------------------------------------------------------------------
    def forward(self, input_ids=None, attention_mask=None, labels=None, task_ids=None, route_mask=None,
                force_gates=None, right_padded: bool = False, **kwargs):
        """HF forward with routing inputs. With ``labels`` and a router that has an auxiliary loss (meteora with
        task_ids), ``out.loss = lm_loss + aux_loss_coef * aux_loss`` and ``out.lm_loss`` / ``out.aux_loss`` are set.

        ``right_padded``: every row's pads come after its tokens (training batches), so causal attention never
        shows a token a pad and the model runs without the mask: each real token's output, and so the loss over
        labels that skip the pads, is the masked forward's. The router still gets the mask (its token labels
        skip the pads). What it saves: transformers' mask code reads the mask back to the host on every forward
        (is any of it padding?), a sync per step, which a CUDA graph capture of the step refuses."""
        if labels is not None:  # a loss, not generation: no KV cache (it costs a copy per layer and, under
            kwargs.setdefault("use_cache", False)  # per-layer torch.compile, a recompile per layer index)
        model_mask = None if right_padded else attention_mask
        self.ctx.token_mask = attention_mask if right_padded else None
        try:
            with self.routing(task_ids, route_mask, force_gates, _batch(input_ids, kwargs)):
                out = self.model(input_ids=input_ids, attention_mask=model_mask, labels=labels, **kwargs)
                aux = self.router.aux_loss()
        finally:
            self.ctx.token_mask = None
        if aux is not None:
            out["aux_loss"] = aux
            if out.get("loss") is not None:
                out["lm_loss"] = out["loss"]
                out["loss"] = out["loss"] + self.router.aux_loss_coef * aux
        return out

    @torch.no_grad()
    def generate(self, input_ids=None, attention_mask=None, task_ids=None, route_mask=None, **kwargs):
        """``model.generate`` with routing inputs; sentence routers decide once per sequence at prefill."""
        with self.routing(task_ids, route_mask, None, _batch(input_ids, kwargs)):
            return self.model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    def last_route(self):
        """``(ids [B, K], weights [B, K])`` a sentence router chose at the last prefill (None for token routers)."""
        return self.router.last_route()

    # ---- training ----------------------------------------------------------------------------------------------
    def set_trainable(self, which: str = "router") -> list[nn.Parameter]:
        """Freeze everything, then unfreeze ``which``: none | router | gates | adapters | router+adapters |
        gates+adapters ("gates" = the meteora router). Returns the trainable parameters (make the optimizer after
        this call: training the adapters trims the bank's rank padding, ``AdapterBank.fit_rank_to_adapters``, which
        replaces its A / B parameters)."""
        if which not in TRAINABLE:
            raise ValueError(f"trainable={which!r} is not known; choose one of {TRAINABLE}")
        self.requires_grad_(False)
        if "router" in which or "gates" in which:
            if "gates" in which and self.router.name != "meteora":
                raise ValueError(f"trainable={which!r} needs router='meteora' (current: {self.router.name!r})")
            if not self.router.trainable:
                raise ValueError(f"router {self.router.name!r} has no parameters to train; use meteora or dlp")
            self.router.requires_grad_(True)
        if "adapters" in which:
            self.bank.fit_rank_to_adapters()  # trained at their own rank: no padding in the gradients or AdamW
            for s in self.bank.slots.values():
                s.A.requires_grad_(True)
                s.B.requires_grad_(True)
        return [p for p in self.parameters() if p.requires_grad]

    def router_loss(self, input_ids, attention_mask, task_ids) -> torch.Tensor:
        """A sentence classifier's objective (dlp: CE on the task id), computed without the LM."""
        loss = getattr(self.router, "classification_loss", None)
        if loss is None:
            raise ValueError(f"router_loss is the dlp router's objective; router is {self.router.name!r} "
                             "(meteora trains through forward(labels=..., task_ids=...))")
        return loss(input_ids, attention_mask, validate_task_ids(task_ids, self.bank, input_ids.shape[0]))

    # ---- hot swap ----------------------------------------------------------------------------------------------
    def add_adapter(self, name: str, adapter_dir) -> None:
        """Add a PEFT adapter as a new slot; routers with per-adapter rows get a fresh (untrained) row."""
        old = self.adapter_names
        self.bank.add(name, adapter_dir)
        self.router.on_adapters_changed(old, self.adapter_names)
        self._attach_projection_state()

    def replace_adapter(self, name: str, adapter_dir) -> None:
        """Swap slot ``name``'s weights for another PEFT dir; routing rows stay."""
        self.bank.replace(name, adapter_dir)

    def remove_adapter(self, name: str) -> None:
        old = self.adapter_names
        self.bank.remove(name)
        self.router.on_adapters_changed(old, self.adapter_names)
        self._attach_projection_state()

    # ---- router checkpoints ------------------------------------------------------------------------------------
    def save_router(self, directory, adapters: str | None = None):
        """Save the current router (weights + strategy + config + adapter names) atomically into ``directory``;
        ``adapters``: the subdir of ``directory`` holding the adapters it was trained with, if it changed them."""
        return save_router_checkpoint(directory, self.router.name, self.router.config(), self.router.state_dict(),
                                      self.adapter_names, getattr(self.model.config, "name_or_path", None), adapters)

    def load_router(self, directory, strategy=None, **overrides) -> Router:
        """Install the router saved in ``directory``, built with its saved config; ``overrides`` (explicit knobs:
        top_k, temperature, top_p, fusion) win over it. ``strategy`` (a name or a builder) loads the weights into
        another strategy that builds the same router class (``dlp_segments`` applies a trained dlp router per
        segment, and back). Rows are reordered to the bank's adapter order; mismatches raise one-line errors."""
        meta, tensors = read_router_checkpoint(directory)
        saved = meta["strategy"]
        strategy = strategy or saved
        if registry.router_class(strategy) is not registry.router_class(saved):
            name = strategy if isinstance(strategy, str) else registry.strategy_name(strategy)
            raise RouterCheckpointError(f"router checkpoint {directory}: strategy: saved as {saved!r}, cannot load as "
                                        f"{name!r} (only strategies that build the same router share weights)")
        # a knob the router class added after this checkpoint was saved takes the value it stood for then
        saved_config = {**getattr(registry.router_class(saved), "saved_before", {}), **meta["config"]}
        router = self.build_router(strategy, **{**saved_config, **overrides})
        state = align_router_state(directory, meta, tensors, router.state_dict(), self.adapter_names,
                                   router.adapter_row_keys())
        p = next(self.bank.parameters())
        router.load_state_dict({k: v.to(p.device) for k, v in state.items()})
        return self.set_router(router)

    def unwrap(self) -> nn.Module:
        """Put the original nn.Linear layers back, drop the hook, and return the plain HF model."""
        self.group_projections(False)
        for name in self.bank.modules_wrapped:
            _set_submodule(self.model, name, self.model.get_submodule(name).base_layer)
        self._hook.remove()
        return self.model
