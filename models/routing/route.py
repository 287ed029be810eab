"""The routing interface every strategy implements, the route it produces, and the two selection rules the papers use.

A *route* says, for the tokens of one projection call, which adapters to add and with which weights:

    token routing      ids/weights [T, K]                  (MeteoRA: each token picks its own top-k)
    sentence routing   ids/weights [S, K] + seq_ids [T]    (oracle, DLP-LoRA, merge: one choice per sequence)

``ids == -1`` is an empty slot. A ``Router`` is an ``nn.Module`` with two hooks:

    begin_forward(input_ids, attention_mask, inputs_embeds, is_prefill, ctx)
        called once per model forward (before any layer runs); sentence routers decide here, at prefill, and
        keep the decision for every later decode step of ``generate``;
    route(module_name, x) -> Route | None
        called by every ``MultiLoRALinear``; token routers (MeteoRA gates) compute the route from ``x`` here.

A strategy also says what the stages need to know about it, as class attributes: ``trainable`` (the route stage
trains it with its ``training_loss(mm, batch)``), ``needs_task_ids`` (the oracle: one task per prompt),
``reads_answers`` (its training rows hold prompt + answer, not the prompt alone); ``label`` names it in results.

``route_top_k`` (MeteoRA) and ``route_top_p`` (DLP-LoRA) are the selection rules, written once and tested.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from kernels.gate_mix import TopKGate


@dataclass
class Route:
    """Arguments of ``kernels.multi_lora`` beyond x/base.

    ``lora``: ``(A [d_in, r], B [r, d_out], scale)`` (scale a host float), one plain LoRA of the router's own that
    every row uses instead of the bank's adapters (merge: the merged adapter); the layer runs it as two GEMMs
    (``kernels.multi_lora_uniform``) at any rank, and ``ids`` / ``weights`` only record the route (one slot each).
    ``uniform``: the adapter index every row uses with weight 1, when the router knows it on the host (lora_b; the
    oracle when every sequence has the same task); the layer then runs that adapter as a plain LoRA
    (``kernels.multi_lora_uniform``) on the torch and Triton backends alike (only ``reference`` keeps its loop).
    ``coef``: the route as one [T, L] matrix of per-(token, adapter) weights instead of ids/weights (MeteoRA's gates
    while they train: ``kernels.multi_lora_coef``); ids and weights are then None.
    ``gate``: the same route still as its gate's logits and rule (``kernels.gate_mix.TopKGate``): the op applies it
    to the shrink in one kernel with the gate's CE (MeteoRA's gates while they train, on CUDA); ids, weights and
    coef are then None. ``per_token`` is whichever of the two is set.
    ``one_per_row``: sentence routing where ids [S, 1] give every sequence exactly one adapter with weight 1 (the
    oracle over a batch of several tasks: a joint fine-tuning step), known by the router without reading the
    device; on the torch backend the layer then runs ``kernels.multi_lora_per_row`` (two batched GEMMs) where the
    bank's adapters share one rank and scale at that projection."""

    ids: torch.Tensor | None
    weights: torch.Tensor | None
    seq_ids: torch.Tensor | None = None
    lora: tuple | None = None
    uniform: int | None = None
    coef: torch.Tensor | None = None
    one_per_row: bool = False
    gate: TopKGate | None = None

    @property
    def per_token(self):
        """The [T, L] form of a token route: ``coef`` or ``gate`` (None for ids/weights routes)."""
        return self.coef if self.coef is not None else self.gate


@dataclass
class GroupGates:
    """Per-token gates of a projection group (``Router.group_gates``): one ``[L, d_in]`` weight per member, and the
    rule that turns a member's logits into its route: top ``top_k``, ``softmax(top-k logits / temperature)``."""

    weights: list
    top_k: int
    temperature: float


class RouteContext:
    """Per-call routing inputs shared by the model, its router and every wrapped layer (plain object, no params).

    task_ids      [B] adapter index per sequence: the oracle's choice, the gate / router training label (one given
                  for a whole batch is broadcast: ``validate_task_ids``)
    route_mask    [B, S] tokens a sentence router reads (e.g. the prompt only, during teacher-forced training)
    force_gates   MeteoRA gates replaced by one-hot logits of task_ids (a test / teacher-forcing switch)
    bank, tokenizer, embedding   the adapter bank, the model's tokenizer and its (frozen) input embedding
    prefill       whether the next forwards start their sequences (True) or continue them from the KV cache (False),
                  set by a caller that knows (``models.graph_generate``); None: the model finds out from the call
    token_mask    [B, S] the call's attention mask where the model was not given it (``right_padded``): the router
                  still skips the pads
    """

    def __init__(self):
        self.task_ids: torch.Tensor | None = None
        self.route_mask: torch.Tensor | None = None
        self.force_gates: bool = False
        self.router: Router | None = None
        self.bank = None
        self.tokenizer = None
        self.embedding = None
        self.prefill: bool | None = None
        self.token_mask: torch.Tensor | None = None


def route_top_k(logits: torch.Tensor, k: int, temperature: float = 1.0):
    """MeteoRA: ``ids, w = topk(logits, k); w = softmax(top-k logits / T)`` over the last dim ([T, L] -> [T, k])."""
    vals, ids = torch.topk(logits, k, dim=-1)
    vals = vals.float()
    return ids, torch.softmax(vals / temperature if temperature != 1.0 else vals, dim=-1)


def route_top_p(probs: torch.Tensor, p: float, fusion: str = "softmax", max_kept: int | None = None):
    """DLP-LoRA: nucleus over ``probs`` [S, L]: keep the most likely adapters until their mass reaches ``p``
    (at least one, at most ``max_kept`` when given); fusion weights = softmax over the kept probabilities (DLP-LoRA's
    code) or the kept probabilities renormalised to sum 1 (``fusion="renorm"``). Returns ids/weights [S, K], K =
    most kept in a row, dropped slots id -1 weight 0. Differentiable in ``probs``.
    """
    sorted_p, order = torch.sort(probs, dim=-1, descending=True)
    mass_before = torch.cumsum(sorted_p, dim=-1) - sorted_p
    keep = mass_before < p
    keep[..., 0] = True
    if max_kept is not None:
        keep[..., max_kept:] = False
    K = int(keep.sum(-1).max())
    sorted_p, order, keep = sorted_p[..., :K], order[..., :K], keep[..., :K]
    if fusion == "softmax":
        w = torch.softmax(sorted_p.masked_fill(~keep, float("-inf")), dim=-1)
    elif fusion == "renorm":
        kept = sorted_p * keep
        w = kept / kept.sum(-1, keepdim=True)
    else:
        raise ValueError(f"fusion={fusion!r} is not known; use 'softmax' (DLP-LoRA's code) or 'renorm'")
    return order.masked_fill(~keep, -1), w.masked_fill(~keep, 0.0)


def sequence_ids(batch: int, seq_len: int, device) -> torch.Tensor:
    """seq_ids [B*S] for a [B, S, d] activation: the row index of every token."""
    return torch.arange(batch, device=device).repeat_interleave(seq_len)


def expand_rows(t: torch.Tensor, batch: int, what: str) -> torch.Tensor:
    """Per-sequence tensor of S rows -> ``batch`` rows (beam search / num_return_sequences repeat each row)."""
    if t.shape[0] == batch:
        return t
    if t.shape[0] > 0 and batch % t.shape[0] == 0:
        return t.repeat_interleave(batch // t.shape[0], dim=0)
    raise ValueError(f"{what} has {t.shape[0]} rows but the batch has {batch}; give one per sequence")


class Router(nn.Module):
    """The interface of all routing strategies (registered under a ``name``); a strategy overrides the hooks it needs."""

    name = "router"
    #: True when the router has trainable parameters (meteora gates, dlp MLP) and a ``training_loss(mm, batch)``
    trainable = False
    #: True when the route comes from the task of each sequence (``task_ids``), as the oracle's does
    needs_task_ids = False
    #: True when its training rows are prompt + answer (a LM loss runs through the routed model), else the prompt
    reads_answers = False
    #: True when every projection of a forward gets the same route (from ``route`` of any one of them): grouped
    #: projections (``models.projection_groups``) then run one packed LoRA
    shares_route = False
    #: True when ``group_gates`` gives a projection group its members' gates at decode (MeteoRA at inference), so
    #: grouped projections decode as one packed GEMM and routed expand though each member routes itself
    groups_gates = False
    #: with a packed gate (``packed_gate``): whether the projection's base weight joins the gate's GEMM
    pack_base = False
    #: True when a captured decode step reads no per-call state of the router but a sentence router's prefill
    #: decision (``_seq``), so ``graph_generate(keep_graph=True)`` may replay it in a later call
    keeps_decode_graph = False

    def __init__(self, ctx: RouteContext):
        super().__init__()
        object.__setattr__(self, "ctx", ctx)  # shared, not a submodule

    def begin_forward(self, input_ids, attention_mask, inputs_embeds, is_prefill: bool) -> None:
        """Called before every model forward; default: nothing."""

    def route(self, module_name: str, x: torch.Tensor, state: nn.Module | None = None) -> Route | None:
        """The route for one projection call on ``x`` [B, S, d_in]; None = base output only. ``state`` is what
        ``projection_state(module_name)`` gave that projection (the layer holds it by reference)."""
        return None

    def group_gates(self, states: list) -> GroupGates | None:
        """The gates of projections that read the same ``x`` (``models.projection_groups``), for the group to
        compute in its own base GEMM and route from (each projection its top-k of its own logits): a router that
        routes each projection from ``x`` itself returns them where it may (MeteoRA at inference); None (the
        default) leaves each projection to route itself. A router whose route is the same for every projection
        (``shares_route``) needs none."""
        return None

    def packed_gate(self, state) -> torch.Tensor | None:
        """A gate weight [L, d_in] that the projection holding ``state`` may compute in its own base GEMM, then
        route with ``route_logits(state, logits)`` (MeteoRA's gates while they learn); None (the default): the
        projection asks ``route``."""
        return None

    def projection_state(self, module_name: str) -> nn.Module | None:
        """This router's own module for one projection (MeteoRA's gate), handed to the wrapped layer when the router
        is installed so the layer's forward needs no lookup by name; None (the default) for routers without one."""
        return None

    def aux_loss(self) -> torch.Tensor | None:
        """Extra training loss from the last forward (MeteoRA's gate CE), unscaled; None when there is none."""
        return None

    def config(self) -> dict:
        """Hyper-parameters saved with a router checkpoint and passed back to the constructor on load."""
        return {}

    @property
    def label(self) -> str:
        """The strategy's name in results (metrics.json ``strategy``, tables)."""
        return self.name

    def last_route(self):
        """``(ids [B, K], weights [B, K])`` chosen at the last prefill by a sentence router; None for the others."""

    def gate_hits_by_task(self):
        """``(hits [L], pairs [L])`` per task of the last forward, for a router that counts them (MeteoRA's gates,
        in eval mode); None for the others."""

    def gate_confusion(self):
        """``[L, L]`` (task, chosen task) counts of the last forward, for a router that counts them (MeteoRA's gates,
        in eval mode); None for the others."""

    def gate_hits_by_projection(self):
        """``(hits [P], tokens)`` of the last forward: per projection gate, the labelled tokens its top-1 routed to
        their task, and the labelled tokens (each gate routes every one), for a router with a gate per projection
        that counts them (MeteoRA's gates, in eval mode, in the order of its ``gates``); None for the others."""

    def gate_hits_in(self, mask):
        """``(hits [L], pairs [L])`` per task of the last forward over the tokens where ``mask`` [B, S] is nonzero
        (e.g. the answers), for a router that counts them (MeteoRA's gates, in eval mode); None for the others."""

    def adapter_row_keys(self) -> list:
        """Names of state tensors whose dim 0 runs over adapters (reordered when a checkpoint's order differs)."""
        return []

    def on_adapters_changed(self, old_names: list, new_names: list) -> None:
        """The bank was hot-swapped; routers with per-adapter rows remap them (kept rows stay, new rows are fresh)."""


class SequenceRouter(Router):
    """A router that decides once per sequence at prefill (``decide``) and reuses it for every decode step.

    Within one forward every wrapped projection gets the same ``Route`` object (built once for the forward's
    shape and dtype), so the 100-odd projection calls of a step add no routing work of their own.
    """

    shares_route = True
    one_adapter_per_row = False  # ``decide`` always gives each sequence one adapter (K = 1) with weight 1

    def __init__(self, ctx: RouteContext):
        super().__init__(ctx)
        self._seq: tuple | None = None  # (ids [B, K], weights [B, K])
        self._tok: tuple | None = None  # optional per-token prefill route (ids [B, S, K], weights [B, S, K])
        self._uniform: int | None = None  # the one adapter of every row, when known on the host (Route.uniform)
        self._cache: dict = {}  # (B, S, dtype, device) -> Route of the current forward

    def decide(self, input_ids, attention_mask, inputs_embeds):
        """Return ``(ids [B, K], weights [B, K])`` for the sequences of this prefill."""
        raise NotImplementedError

    def uniform_adapter(self) -> int | None:
        """The adapter index every sequence of this prefill uses with weight 1, if the router knows it without
        reading the device; None otherwise (the default)."""
        return None

    def begin_forward(self, input_ids, attention_mask, inputs_embeds, is_prefill):
        self._cache = {}
        if is_prefill:
            self._tok = None
            self._seq = self.decide(input_ids, attention_mask, inputs_embeds)
            self._uniform = self.uniform_adapter()

    def last_route(self):
        return self._seq

    def route(self, module_name, x, state=None):
        if torch.compiler.is_compiling():  # a compiled layer builds the (few, cheap) route tensors in its graph
            return self._build_route(x)
        key = (x.shape[:-1], x.dtype, x.device)
        hit = self._cache.get(key)
        if hit is None:
            hit = self._cache[key] = self._build_route(x)
        return hit

    def _build_route(self, x):
        if self._seq is None:
            raise RuntimeError(f"router {self.name!r} has no route: call the model (forward / generate) through the "
                               "MultiLoRAModel or its wrapped HF model, not a submodule")
        B, S = x.shape[0], (x.shape[1] if x.dim() == 3 else 1)
        if self._tok is not None and self._tok[0].shape[:2] == (B, S):
            ids, w = self._tok
            return Route(ids.reshape(B * S, -1), w.reshape(B * S, -1).to(x.dtype))
        ids, w = self._seq
        if ids.shape[0] != B:
            ids, w = expand_rows(ids, B, "the route"), expand_rows(w, B, "the route")
            self._seq = (ids, w)
        return Route(ids, w.to(x.dtype), sequence_ids(B, S, x.device), uniform=self._uniform,
                     one_per_row=self.one_adapter_per_row)


def validate_task_ids(task_ids, bank, batch: int | None = None) -> torch.Tensor:
    """Adapter names or indices -> LongTensor of bank indices; one-line error for unknown names / out of range.

    One task for the whole batch (a name, or a one-element list or tensor) is broadcast to every sequence; with
    ``batch`` given the result has ``batch`` rows, and any other length than 1 or ``batch`` is refused (a list
    that is one short would otherwise route every sequence after the gap to its neighbour's adapter).
    The range is checked where the ids are on the host (names, lists, CPU tensors); a CUDA tensor is taken as it
    is, as ``kernels.reference.check_ids`` takes CUDA ids: reading it would synchronise every training step (the
    stages' collators build their task ids in range; a CUDA graph could not be captured around the read).
    """
    if task_ids is None:
        return None
    if isinstance(task_ids, str):
        task_ids = [task_ids]
    if isinstance(task_ids, (list, tuple)):
        task_ids = [bank.index(t) if isinstance(t, str) else int(t) for t in task_ids]
    t = torch.as_tensor(task_ids, dtype=torch.long).reshape(-1)
    if len(t) and t.device.type == "cpu" and (int(t.min()) < 0 or int(t.max()) >= len(bank)):
        raise ValueError(f"task ids {t.tolist()} are out of range for {len(bank)} adapters {bank.names}")
    return t if batch is None else task_ids_for_batch(t, batch)


def task_ids_for_batch(t: torch.Tensor, batch: int) -> torch.Tensor:
    """Validated task ids for a batch of ``batch`` sequences: as they are, or one broadcast to all."""
    if len(t) == batch:
        return t
    if len(t) == 1:
        return t.expand(batch)
    raise ValueError(f"{len(t)} task ids for a batch of {batch} sequences; give one per sequence, or a single one "
                     "for the whole batch")
