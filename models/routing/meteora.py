"""MeteoRA: a token-level gate in every wrapped projection.

Each wrapped projection (every layer, every target) owns ``gate = Linear(d_in, L, bias=False)``. For each token
``x`` of that projection's input: ``logits = gate(x)``, ``ids = topk(logits, k)``, ``w = softmax(topk / T)``, and
the projection adds ``sum_k w_k * s_a * B_a A_a x`` through the fused op, so the gate is trained by the LM loss
(through ``w``) as well as by MeteoRA's auxiliary loss:

    loss = LM loss + aux_loss_coef * CE(concat of every gate's logits, the token's task id)      (coef 50)

``aux_loss()`` returns the unscaled CE of the last forward (whenever task ids are set, so validation reports it
too); the model adds ``aux_loss_coef *`` it. Top-k is 1 or 2 in the paper (any k <= L works); T = 1 for single
tasks, 15 / 20 / 30 for composite-3 / 5 / 10. ``ctx.force_gates`` replaces the logits by one-hot task logits,
which makes the gated model exactly the oracle (a test and teacher-forcing switch).

Training (``training_loss``, the route stage): the full model runs with every gate routing every token; loss = LM
cross-entropy (on all tokens, prompt included, as MeteoRA's script does, or answers only) + ``aux_loss_coef`` x gate
cross-entropy against the row's task id (over every token, as the script, or with a batch's ``gate_ce_mask`` over
the answer tokens alone: those the gates route while the model writes, where a prompt's first tokens may read
alike across tasks); its routing accuracy (measured in eval mode: validation) is the fraction of
(token, projection) gates whose top-1 is the row's task, also counted per task (``gate_hits_by_task``) and per
projection (``gate_hits_by_projection``: which layers' gates lose it; a layer-0 gate sees no context). While the
gates learn (grad enabled, gate logits need a gradient) a projection's route is the [T, L] form of
``kernels.multi_lora_coef`` (the same weights, fewer ops per call): on CUDA the gate's logits and rule
(``kernels.gate_mix.TopKGate``: the route, the multiply with the shrink and this gate's CE in one kernel each way),
elsewhere the coefficient matrix; over a frozen bank each projection packs
its gate into its base GEMM (``packed_gate``, ``route_logits``: one GEMM for the base output, the shrink and the
logits, one for the input gradient; ``kernels.packed_gate``); inference routes with ids/weights, which the Triton
kernels read.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kernels.gate_mix import TopKGate, gate_ce, top_k_coef
from models.adapter_bank import slot_key
from models.routing.registry import strategy
from models.routing.route import GroupGates, Route, Router, expand_rows, route_top_k


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _gate(d_in: int, num_adapters: int, index, dtype, device) -> nn.Linear:
    """One projection's gate ``Linear(d_in, L, bias=False)``, holding its position among the router's gates as a
    non-persistent buffer ``projection_index`` ([1], long; not in the checkpoint): where ``route`` adds the gate's
    hits to the per-projection counts. A tensor, not an int attribute, so a compiled decoder layer reads it as
    data and one graph still serves every layer."""
    gate = nn.Linear(d_in, num_adapters, bias=False, dtype=dtype, device=device)
    gate.register_buffer("projection_index", torch.as_tensor(index, dtype=torch.long, device=device).reshape(1).clone(),
                         persistent=False)
    return gate


@strategy("meteora")
class MeteoraRouter(Router):
    keeps_decode_graph = True
    groups_gates = True
    trainable = True
    reads_answers = True

    @staticmethod
    def check(adapters: list, top_k: int = 2, temperature: float = 1.0, aux_loss_coef: float = 50.0) -> None:
        """Refuse knobs that cannot route ``adapters`` (one ValueError line); the stages call it before a model loads."""
        L = len(adapters)
        if not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= L:
            raise ValueError(f"meteora top_k={top_k!r} must be an integer in [1, number of adapters = {L}]")
        if not _number(temperature) or not temperature > 0:
            raise ValueError(f"meteora temperature={temperature!r} must be > 0 (MeteoRA: 1 single task, 15-30 composite)")
        if not _number(aux_loss_coef) or not aux_loss_coef >= 0:
            raise ValueError(f"meteora aux_loss_coef={aux_loss_coef!r} must be >= 0 (MeteoRA used 50)")

    def __init__(self, ctx, top_k: int = 2, temperature: float = 1.0, aux_loss_coef: float = 50.0):
        super().__init__(ctx)
        L = len(ctx.bank)
        self.check(range(L), top_k, temperature, aux_loss_coef)
        self.top_k, self.temperature, self.aux_loss_coef = top_k, float(temperature), float(aux_loss_coef)
        bank = ctx.bank
        p = next(bank.parameters())
        self.gates = nn.ModuleDict({
            slot_key(m): _gate(bank.module_shapes[m][0], L, i, p.dtype, p.device)
            for i, m in enumerate(bank.modules_wrapped)})
        self._labels: torch.Tensor | None = None
        self._ce_mask: torch.Tensor | None = None  # [B, S]: the tokens the gates' CE covers in a training step
        self._forced: torch.Tensor | None = None
        # gate CE and top-1 hits summed over this forward's projections. Eagerly (and in a captured CUDA graph)
        # each projection's logits are kept and the CE is taken once over all of them (aux_loss): one
        # log-softmax and one NLL, forward and backward, for the whole model instead of one per projection (a
        # graphed gate-training step is bound by its kernel count). Under torch.compile each projection adds its
        # CE to a tensor instead: a compiled decoder layer may reassign a tensor, while appending to a list would
        # specialise it to the list's length.
        self._ce_sum: torch.Tensor | None = None
        self._gate_logits: list = []  # this forward's [T, L] logits per projection, not yet in _ce_sum
        self._confusion: torch.Tensor | None = None  # [L * L] (task, chosen task) counts (eval mode)
        self._projection_hits: torch.Tensor | None = None  # [P] top-1 hits per gate, in self.gates order (eval mode)
        self._token_hits: torch.Tensor | None = None  # [B, S] top-1 hits per token, over every gate (eval mode)
        # while the gates learn (grad enabled, the gate's weight trained) each projection computes its adapters'
        # shrink and its gate's logits as one GEMM (kernels.packed_gate; pack_base: the base weight in it too,
        # Router's class default False): the same route and losses, tests compare the forms. With the fused route
        # below, on the H200 (batch 64, compiled layers, captured step, one run at 597b8ad) this form was the
        # fastest, 0.842x peft, against 0.752x with the three GEMMs apart and 0.774x apart and unfused
        # (outputs/tables/train_throughput_fused.md); without the fused route the forms were within 0.72-0.80x.
        # "auto": on CUDA (where it was measured; the CPU keeps the three GEMMs apart), True / False: everywhere
        self.pack_gates: bool | str = "auto"
        # while the gates learn: the top-k route, its NaN select, the multiply with the shrink and this gate's CE as
        # one Triton kernel forward and one backward (kernels.gate_mix; "auto": on CUDA), instead of the five to
        # seven kernels per projection torch.compile makes of them; "triton": everywhere (the CPU under
        # TRITON_INTERPRET=1, tests); "off": the coefficient matrix (kernels.coef)
        self.fused_route = "auto"

    def config(self):
        return {"top_k": self.top_k, "temperature": self.temperature, "aux_loss_coef": self.aux_loss_coef}

    @property
    def label(self) -> str:
        return f"meteora-top{self.top_k}"

    def training_loss(self, mm, batch) -> tuple[torch.Tensor, dict]:
        """MeteoRA's loss on a batch of ``input_ids / attention_mask / labels / task_ids`` (``mm``: the model that holds
        this router): ``(LM + aux_loss_coef x gate CE, {lm_loss, aux_loss, router_accuracy})``. The rows are
        right-padded, as ``data.batches`` pads them: the model runs without the mask (``right_padded``), so the
        step reads nothing back to the host and a CUDA graph can hold it."""
        # training with a ``gate_ce_mask`` (router.train.gate_ce_on_prompt=false): the gates' CE over its tokens
        # alone (the answers'); validation keeps MeteoRA's CE over every token, so its curve reads as before
        self._ce_mask = batch.get("gate_ce_mask") if self.training else None
        try:
            with torch.enable_grad():  # validation too: the route stage's Trainer runs with inference_mode off
                out = mm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
                         task_ids=batch["task_ids"], right_padded=True)
        finally:
            self._ce_mask = None
        parts = {k: out[k].detach() for k in ("lm_loss", "aux_loss") if out.get(k) is not None}
        accuracy = self.gate_accuracy()
        if accuracy is not None:
            parts["router_accuracy"] = accuracy  # a device tensor: NCCL reduces CUDA tensors only
        return out.loss, parts

    def adapter_row_keys(self):
        return [f"gates.{k}.weight" for k in self.gates]

    def begin_forward(self, input_ids, attention_mask, inputs_embeds, is_prefill):
        self._labels = self._ce_sum = self._confusion = self._projection_hits = self._token_hits = None
        self._gate_logits = []
        tid = self.ctx.task_ids
        if tid is None:
            return
        ref = input_ids if input_ids is not None else inputs_embeds
        B, S = ref.shape[0], ref.shape[1]
        tid = tid.to(ref.device)
        tid = expand_rows(tid, B, "task_ids")
        labels = tid[:, None].expand(B, S).clone()
        self._forced = labels.reshape(-1).clone()  # pad tokens too, exactly as the oracle routes them
        if attention_mask is not None:  # masked_fill, not a boolean index: no nonzero(), nothing read back to the host
            labels.masked_fill_(attention_mask[:, -S:] == 0, -100)
        if self.training and self._ce_mask is not None:  # the CE's tokens (training_loss): the answers alone
            labels.masked_fill_(self._ce_mask[:, -S:].to(labels.device) == 0, -100)
        self._labels = labels.reshape(-1)
        self._ce_sum = torch.zeros((), dtype=torch.float32, device=ref.device)
        # routing accuracy where it is read (validation, evaluation: eval mode), per task and per projection; a
        # training step skips its seven ops per projection
        if not self.training:
            self._confusion = torch.zeros(self._num_adapters() ** 2, dtype=torch.long, device=ref.device)
            self._projection_hits = torch.zeros(len(self.gates), dtype=torch.long, device=ref.device)
            self._token_hits = torch.zeros((B, S), dtype=torch.long, device=ref.device)

    def projection_state(self, module_name):
        return self.gates[slot_key(module_name)]

    def route(self, module_name, x, state=None):
        x2 = x.reshape(-1, x.shape[-1])
        gate = state if state is not None else self.gates[slot_key(module_name)]
        return self.route_logits(gate, gate(x2), x.dtype)

    def packed_gate(self, state):
        """While the gates learn (grad enabled, the gate's weight trained): this projection's gate weight, for the
        projection to compute its logits in its own base GEMM (``kernels.packed_gate``) and route from them with
        ``route_logits``; None otherwise."""
        if state is None or not torch.is_grad_enabled() or not state.weight.requires_grad:
            return None
        if not (self.pack_gates is True or (self.pack_gates == "auto" and state.weight.is_cuda)):
            return None
        return state.weight

    def route_logits(self, gate, logits, dtype=None):
        """The route of one projection from its gate's ``logits`` [T, L] (``gate``: that projection's gate module):
        the aux loss and accuracy counts of this projection, then the top-k route (inference weights in ``dtype``,
        the activations', default the logits'). While the gate learns the route is the [T, L] form: a ``TopKGate``
        whose op computes this projection's CE with the route (``fused_route``), else a coefficient matrix."""
        dtype = logits.dtype if dtype is None else dtype
        learning = torch.is_grad_enabled() and logits.requires_grad and not self.ctx.force_gates
        fused = learning and (self.fused_route == "triton" or (self.fused_route == "auto" and logits.is_cuda))
        raw = logits
        if not fused or self._confusion is not None:
            logits = logits.float()  # one cast (autocast: bf16 logits) for the CE, the top-k and its softmax
        if self._labels is not None:  # task ids known: the aux loss and gate accuracy of this projection
            if fused:  # the op computes this projection's CE with its route and adds it (_add_ce)
                pass
            elif torch.compiler.is_compiling():
                self._ce_sum = self._ce_sum + gate_ce(logits, self._labels)
            else:
                self._gate_logits.append(logits)
            if self._confusion is not None:
                chosen, labelled = logits.argmax(-1), self._labels != -100
                hit = (chosen == self._labels) & labelled
                # (true task, chosen task) counts, flattened [L * L]: the diagonal is each task's hits
                L = logits.shape[-1]
                self._confusion = self._confusion.index_add(0, self._labels.clamp(min=0) * L + chosen,
                                                            labelled.long())
                # this gate's slot, from a tensor it holds: a Python index (or its name as a key) would make a
                # compiled decoder layer specialise to each layer
                self._projection_hits = self._projection_hits.index_add(0, gate.projection_index,
                                                                        hit.sum().reshape(1))
                self._token_hits = self._token_hits + hit.long().view_as(self._token_hits)  # prompt or answer
        if fused:  # route, NaN select, multiply and CE in one kernel each way (kernels.gate_mix), raw logits in
            return Route(None, None, gate=TopKGate(raw, self.top_k, self.temperature, labels=self._labels,
                                                   on_ce=self._add_ce, backend="triton"))
        if self.ctx.force_gates:
            if self._labels is None:
                raise ValueError("force_gates needs task_ids: pass task_ids= with force_gates=True")
            onehot = F.one_hot(self._forced, logits.shape[-1]).to(torch.float32)
            logits = onehot * 1e4
        if learning:  # the gates learn: the [T, L] form, fewest ops
            return Route(None, None, coef=top_k_coef(logits, self.top_k, self.temperature))
        ids, w = route_top_k(logits, self.top_k, self.temperature)
        return Route(ids, w.to(dtype))

    def _add_ce(self, ce_sum: torch.Tensor) -> None:
        """One projection's summed gate CE, from the op that computed it with the route (``TopKGate.on_ce``)."""
        self._ce_sum = self._ce_sum + ce_sum

    def group_gates(self, states):
        """At inference (no task ids, no forced gates, no gradient, not compiling): the members' gate weights, for
        the group's GEMM, with this router's top-k and temperature (the same rule as ``route`` per projection);
        None otherwise (each projection then routes itself, recording its CE and hits)."""
        if (self._labels is not None or self.ctx.force_gates or torch.is_grad_enabled()
                or torch.compiler.is_compiling() or any(s is None for s in states)):
            return None
        return GroupGates([s.weight for s in states], self.top_k, self.temperature)

    def _pairs(self) -> torch.Tensor:
        """(token, projection) pairs with a label in the last forward: every wrapped projection routes once."""
        return (self._labels != -100).sum() * len(self.gates)

    def aux_loss(self):
        """Mean gate cross-entropy over every (token, projection) pair with a label: MeteoRA's CE of all gates'
        logits concatenated against the token's task."""
        if self._ce_sum is None:
            return None
        if self._gate_logits:  # the kept projections' CE, once over all of them (then folded into _ce_sum)
            n = len(self._gate_logits)
            self._ce_sum = self._ce_sum + gate_ce(torch.cat(self._gate_logits, 0), self._labels.repeat(n))
            self._gate_logits = []
        return self._ce_sum / self._pairs()

    def _num_adapters(self) -> int:
        return next(iter(self.gates.values())).out_features if len(self.gates) else 0

    def gate_hits_by_task(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(hits [L], pairs [L])`` of the last forward in eval mode: per task (adapter index), the (token,
        projection) pairs whose top-1 gate chose it, and all its labelled pairs; device tensors (None in train mode
        or without task ids). Summed over a validation set they give each task's routing accuracy."""
        confusion = self.gate_confusion()
        if confusion is None:
            return None
        return confusion.diagonal().clone(), confusion.sum(1)

    def gate_confusion(self) -> torch.Tensor | None:
        """``[L, L]`` counts of the last forward in eval mode: row = a labelled token's task, column = the task its
        top-1 gate chose, summed over every gate (each (token, projection) pair counts once; a row sums to that
        task's pairs, the diagonal is its hits). Summed over a validation set it says which tasks the gates confuse:
        tasks that read alike (the same prompt format, text in neighbouring languages) share their off-diagonal
        mass. A device tensor (None in train mode or without task ids)."""
        if self._confusion is None:
            return None
        L = self._num_adapters()
        return self._confusion.reshape(L, L)

    def gate_hits_by_projection(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(hits [P], tokens)`` of the last forward in eval mode: per gate (one per wrapped projection, in the
        order of ``self.gates``, whose keys name them), the labelled tokens whose top-1 gate choice was the token's
        task, and the number of labelled tokens (a 0-d tensor: every gate routes each of them once); device
        tensors (None in train mode or without task ids). The hits summed over the gates are ``gate_hits_by_task``'s
        summed over the tasks. Summed over a validation set, ``hits / tokens`` is each gate's routing accuracy:
        the pooled accuracy says how often the gates are right, this says where they are wrong. A layer-0 q / k / v
        gate reads only its token's embedding (no context before it), so it can know the task only from the token
        itself; gates of later layers read the context the attention has mixed in."""
        if self._projection_hits is None:
            return None
        return self._projection_hits, (self._labels != -100).sum()

    def gate_hits_in(self, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(hits [L], pairs [L])`` of the last forward in eval mode, over the labelled tokens where ``mask`` [B, S]
        is nonzero: per task, the (token, projection) pairs whose top-1 gate chose it and all its pairs there; device
        tensors, nothing read back to the host (None in train mode or without task ids). With the answer tokens as
        the mask (``data.batches.RoutedRowsCollator(answer_mask=True)``) it splits the routing accuracy into the
        answer's and the prompt's: an answer token is routed while the model writes, after the whole prompt has
        been read, where the gate's choice changes what is generated; a prompt's first tokens may read alike across
        tasks, so that no causal gate can tell them apart (``data.routing_ceiling``)."""
        if self._token_hits is None:
            return None
        labels = self._labels.view_as(self._token_hits)
        inside = ((mask.to(labels.device) != 0) & (labels != -100)).long()
        task, L = labels.clamp(min=0).reshape(-1), self._num_adapters()
        hits = torch.zeros(L, dtype=torch.long, device=labels.device).index_add(
            0, task, (self._token_hits * inside).reshape(-1))
        pairs = torch.zeros(L, dtype=torch.long, device=labels.device).index_add(0, task, inside.reshape(-1))
        return hits, pairs * len(self.gates)

    def gate_accuracy(self) -> torch.Tensor | None:
        """Fraction of (token, projection) pairs whose top-1 gate choice is the token's task, in the last forward in
        eval mode (None in train mode, or without task ids): a 0-d float tensor on the gates' device (NaN when no
        token has a label), computed there, so nothing is read back to the host for it until it is logged."""
        if self._confusion is None:
            return None
        return self.gate_confusion().diagonal().sum().float() / self._pairs().float()

    @torch.no_grad()
    def on_adapters_changed(self, old_names, new_names):
        for key, gate in self.gates.items():
            new = _gate(gate.in_features, len(new_names), gate.projection_index, gate.weight.dtype,
                        gate.weight.device)
            for j, n in enumerate(new_names):
                if n in old_names:
                    new.weight[j] = gate.weight[old_names.index(n)]
            new.weight.requires_grad_(gate.weight.requires_grad)
            self.gates[key] = new
        self.top_k = min(self.top_k, max(len(new_names), 1))
