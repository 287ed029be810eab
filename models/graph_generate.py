"""Greedy generation with a static KV cache whose decode step is one CUDA graph: the host launches one graph per
new token instead of every kernel of every layer.

Why. A batch of 256 prompts of SmolLM2-135M decodes in well under a millisecond of GPU work per token, but eager
``generate`` launches each layer's kernels from Python (30 layers, 7 routed projections each, plus the gates or the
routing of the strategy): tens of milliseconds of host time per token, and five evaluate processes sharing one GPU
queue them behind each other. Captured once per generate call, the decode step replays with no Python at all.

How it equals ``MultiLoRAModel.generate(do_sample=False)``:

- prefill: one eager forward over the left-padded prompts with their 2-D mask and generate's position ids
  (``cumsum(mask) - 1``, 1 on padding), writing a static KV cache of length prompt + new tokens; the
  routers see it as the prefill (sentence routers decide here, ``RouteContext.prefill``);
- decode: the new token of each row at position ``real prompt tokens + t``, attending to its row's real prompt
  tokens and to every generated position up to the current one, through a 4-D mask kept in a fixed buffer
  (boolean for SDPA, additive for the eager attention; transformers uses a 4-D mask as given: no mask
  construction, which reads the device, inside the graph);
- after each step, on the graph's logits: the logits processors (``EOSUntilAnswers`` for composite-n), argmax,
  pad for rows that have finished, stop when every row has (or after ``max_new_tokens``).

Every tensor the graph reads is this call's (its cache, buffers, the routers' prefill decisions), so a graph is
captured per call and dropped after it; capture costs about one decode step. The eager first decode step before it
is the capture's warm-up: it runs whatever a step does lazily (routers and projection groups lay out the rows the
step reads, caches fill, kernels compile) outside the capture, where a capture could not. A later call whose
``_decode_signature`` (shapes, dtype, router and its parameters, bank version, task ids, every projection group's
layout) equals one a warm-up left behind finds nothing lazy to do: with ``warm_start`` it captures at once and its
first decode step is the graph's first replay, one eager decode step less per call (the routed models' eager steps
cost two to three times the base model's host time on the H200). With ``keep_graph`` the graph itself stays on
the model (``_KeptGraph``, up to ``KEPT_GRAPHS`` by shape, router and task ids) with its KV cache and buffers: a later
call of the same signature empties the cache in place, refills the buffers with its prompt, copies its sentence
router's decision into the tensors the graph reads, and replays from its first decode step, with no eager step and
no capture. Both are off by default until their GPU test has run; on the CPU ``simulate_graphs`` runs their
bookkeeping against generate (tests/test_graph_generate.py). ``capture=False`` runs the same loop
eagerly (the CPU, and the tests that check it against ``generate`` token for token). Sliding-window layers
(Gemma 3) keep full static layers and get their own decode mask, the full one cut to the last ``sliding_window``
cache positions (transformers takes a dict of prepared masks by layer type).

Under autocast (evaluate's bf16-mixed) the keys leave the rotary embedding in fp32 (bf16 ``k_proj`` output times
fp32 cos / sin) while the values stay bf16; transformers 5.17's static layer allocates both buffers in the keys'
dtype, and then refused the bf16 values. The cache here stores keys and values in autocast's dtype: the attention,
which autocast runs in bf16, would cast an fp32 cache to bf16 anyway, so the logits are the same to the bit as an
fp32 cache's, at half its memory and without that cast of the whole cache in every layer at every decode step. At
evaluate's long prompts the cache is most of the memory and of a decode step's traffic: 256 prompts of up to 4096
tokens with 574 new ones (paragraph_segmentation) hold 55 GB of SmolLM2 keys and values in fp32. Outside autocast
the values take the keys' dtype (the same).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import time

import torch

from models.attention import SDPA, gqa_decode


def _text_config(mm):
    cfg = (mm.model if hasattr(mm, "ctx") else mm).config
    return getattr(cfg, "get_text_config", lambda: cfg)()


def _layer_types(cfg) -> list[str]:
    return list(getattr(cfg, "layer_types", None) or ["full_attention"] * int(cfg.num_hidden_layers))


def supports(mm) -> bool:
    """Can this model decode here? Decoder layers of full attention or sliding-window attention (Gemma 3) only."""
    cfg = _text_config(mm)
    return hasattr(cfg, "num_hidden_layers") and set(_layer_types(cfg)) <= {"full_attention", "sliding_attention"}


@functools.cache
def _static_layer_class():
    """transformers' static KV layer, storing keys and values in autocast's dtype where autocast is on, else in the
    keys' dtype (module docstring)."""
    from transformers.cache_utils import StaticLayer

    class SameDtypeStaticLayer(StaticLayer):
        def update(self, key_states, value_states, *args, **kwargs):
            dtype = _cache_dtype(key_states.device) or key_states.dtype
            return super().update(key_states.to(dtype), value_states.to(dtype), *args, **kwargs)

    return SameDtypeStaticLayer


def _static_layer(max_cache_len: int):
    return _static_layer_class()(max_cache_len=max_cache_len)


def _cache_kwarg(model) -> str:
    """The forward's name for the KV cache: ``past_key_values``, or ``cache`` from transformers 5.2x."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.no_grad()
def graph_generate(mm, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, max_new_tokens: int,
                   eos_token_id: int | None, pad_token_id: int, task_ids=None, logits_processor=None,
                   capture: bool = True, phases: dict | None = None, warm_start: bool = False,
                   keep_graph: bool = False) -> torch.Tensor:
    """Greedy decoding of left-padded ``input_ids`` [B, P]: ``[B, P + n]`` as ``generate`` returns it (n <= the
    budget: it stops when every row has produced EOS; a finished row continues with ``pad_token_id``; no EOS:
    exactly ``max_new_tokens``). ``mm``: a ``MultiLoRAModel`` (``task_ids`` route its rows), or any transformers
    causal LM, peft's ``PeftModel`` included (the benchmarks' base and peft rows). ``phases``: a dict to fill with
    the seconds of each phase (``PHASES``) and ``replayed_steps``, the device synchronised at each boundary (a
    benchmark's split of one call; it costs the overlap of host and device there, so time the call apart).
    ``warm_start``: a call whose decode signature a warm-up left captures at once (module doc). ``keep_graph``
    (implies ``warm_start``): the captured graph, its KV cache and buffers stay on the model after the call, and a
    later call with the same signature replays it without capturing (``_KeptGraph``; ``release_graphs`` frees
    them).
    Both off by default until their GPU test (tests/test_models_gpu.py) has passed on the H200.
    A model on SDPA attends through ``models.attention.gqa_decode`` for the call (grouped KV heads not repeated at
    decode)."""
    with gqa_decode(mm):
        return _graph_generate(mm, input_ids, attention_mask, max_new_tokens=max_new_tokens,
                               eos_token_id=eos_token_id, pad_token_id=pad_token_id, task_ids=task_ids,
                               logits_processor=logits_processor, capture=capture, phases=phases,
                               warm_start=warm_start, keep_graph=keep_graph)


def _graph_generate(mm, input_ids, attention_mask, *, max_new_tokens, eos_token_id, pad_token_id, task_ids,
                    logits_processor, capture, phases, warm_start, keep_graph) -> torch.Tensor:
    from transformers.cache_utils import Cache

    routed = hasattr(mm, "routing") and hasattr(mm, "ctx")
    model = mm.model if routed else mm
    B, P = input_ids.shape
    N = int(max_new_tokens)
    dev = input_ids.device
    dtype = next(model.parameters()).dtype
    if dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        dtype = torch.float32
    cfg = _text_config(mm)
    types = _layer_types(cfg)
    # captured: on CUDA a CUDA graph; on the CPU only for the tests (``simulate_graphs``: a stand-in replaying the
    # captured call's step, reading that call's tensors as a graph would)
    graphing = capture and (dev.type == "cuda" or _SIMULATE[0])
    keep_graph = keep_graph and graphing
    warm_start = warm_start or keep_graph
    window = int(cfg.sliding_window) if "sliding_attention" in types else None
    ckw = _cache_kwarg(model.get_base_model() if hasattr(model, "get_base_model") else model)
    mask = attention_mask.to(dev).long()
    real = mask.sum(-1)  # [B] real prompt tokens per row
    seq = torch.full((B, P + N), pad_token_id, dtype=input_ids.dtype, device=dev)
    seq[:, :P] = input_ids
    finished = torch.zeros(B, dtype=torch.bool, device=dev)
    processors = list(logits_processor or [])

    clock = _PhaseClock(dev, phases)
    with _phase(mm, routed, task_ids, B, prefill=True):
        kept, key = None, None
        if keep_graph and _keeps_graphs(mm, routed):
            key = (B, P, N, dev, _cache_dtype(dev), *_route_key(mm, routed))
            kept = _kept_graphs(mm).get(key)
        if kept is not None:  # its cache again (the graph reads it), emptied as a fresh one is
            cache = kept.cache
            for layer in cache.layers:
                for name in ("keys", "values", "cumulative_length"):
                    t = getattr(layer, name, None)
                    if torch.is_tensor(t):
                        t.zero_()
        else:
            # every layer a full static layer (a sliding-window layer too: its window is in its mask), so one buffer
            # layout and one mask per layer type serve every step
            cache = Cache(layers=[_static_layer(P + N) for _ in types])
        pos = mask.cumsum(-1) - 1
        pos.masked_fill_(mask == 0, 1)
        logits = model(input_ids=input_ids, attention_mask=mask, position_ids=pos, use_cache=True,
                       logits_to_keep=1, **{ckw: cache}).logits[:, -1]
    nxt = _choose(logits, seq[:, :P], processors, finished, eos_token_id, pad_token_id)
    seq[:, P] = nxt
    n = 1  # tokens generated so far
    clock.mark("prefill")
    if N == 1 or bool(finished.all()):
        clock.close()
        return seq[:, :P + n]

    # decode state in fixed buffers: the token fed, its position, the key mask. SDPA takes a boolean mask (True:
    # attend) in any compute dtype, autocast included; the eager attention adds the mask (0: attend, min: not)
    if getattr(model.config, "_attn_implementation", None) in SDPA:
        attend, blocked, mask_dtype = True, False, torch.bool
    else:
        attend, blocked, mask_dtype = 0.0, torch.finfo(dtype).min, dtype
    if kept is not None:  # the kept graph's buffers, refilled in place for this call
        tok, dpos, dmask, cur, smask, idx = kept.buffers
        tok.copy_(nxt[:, None])
        dpos.copy_(real[:, None])
        dmask.fill_(blocked)
        cur.fill_(P)
    else:
        tok = nxt[:, None].clone()
        dpos = real[:, None].clone()  # the first generated token sits at position real (0-based)
        dmask = torch.full((B, 1, 1, P + N), blocked, dtype=mask_dtype, device=dev)
        cur = torch.tensor([P], dtype=torch.long, device=dev)  # the cache index the fed token is written at
        smask = idx = None
        if window is not None:  # sliding-window layers see the keys of the last `window` cache positions only
            idx = torch.arange(P + N, device=dev)
            smask = dmask.clone()
    dmask[:, 0, 0, :P].masked_fill_(mask.bool(), attend)
    masks = dmask if window is None else {"full_attention": dmask, "sliding_attention": smask}

    def step():
        dmask.index_fill_(3, cur, attend)
        if window is not None:
            smask.copy_(dmask).masked_fill_(idx <= cur - window, blocked)
        return model(input_ids=tok, attention_mask=masks, position_ids=dpos, use_cache=True,
                     **{ckw: cache}).logits[:, -1]

    def advance(out):
        nonlocal n
        nxt = _choose(out, seq[:, :P + n], processors, finished, eos_token_id, pad_token_id)
        seq[:, P + n] = nxt
        n += 1
        tok.copy_(nxt[:, None])
        dpos.add_(1)
        cur.add_(1)

    with _phase(mm, routed, task_ids, B, prefill=False):
        graph, out = None, None
        if graphing:
            sig = _decode_signature(mm, routed, B, P, N) if warm_start else None
            if kept is not None and kept.signature == sig:  # the same work as the kept graph's capture: replay it
                kept.take_decision(mm, routed)
                graph, out = kept.graph, kept.out
            else:
                if kept is not None:  # another signature: its graph goes, its cache and buffers stay (in use)
                    kept.graph = kept.out = None
                    _kept_graphs(mm).pop(key)
                warmed = _warm_signatures(mm)
                if not warm_start or sig not in warmed:
                    # warm-up on a side stream (as CUDA graph capture asks), as the real first decode step
                    clock.begin("first_step")
                    if dev.type == "cuda":
                        side = torch.cuda.Stream()
                        side.wait_stream(torch.cuda.current_stream())
                        with torch.cuda.stream(side):
                            out = step()
                        torch.cuda.current_stream().wait_stream(side)
                    else:
                        out = step()
                    advance(out)
                    clock.mark("first_step")
                    if warm_start:
                        if len(warmed) >= WARM_SIGNATURES:
                            warmed.clear()
                        sig = _decode_signature(mm, routed, B, P, N)  # the state this warm-up left
                        warmed.add(sig)
                clock.begin("capture")
                if n < N and not bool(finished.all()):
                    decision = _decision(mm, routed)  # what the graph reads of the router's prefill decision
                    if dev.type == "cuda":
                        graph = torch.cuda.CUDAGraph()
                        with torch.cuda.graph(graph):
                            out = step()
                    else:
                        graph = _StepGraph(step, _cache_dtype(dev) or dtype, mm.ctx.router if routed else None,
                                           decision)
                        out = graph.out
                    if key is not None:
                        _keep(mm, key, _KeptGraph(sig, graph, out, cache, (tok, dpos, dmask, cur, smask, idx),
                                                  decision))
                clock.mark("capture")
        first = n
        clock.begin("replay")
        while n < N and not bool(finished.all()):
            if graph is not None:
                graph.replay()
            else:
                out = step()
            advance(out)
        clock.mark("replay", replayed_steps=n - first)
    clock.close()
    if graph is not None and key is None and dev.type == "cuda":  # the graph's private pool back to the driver,
        del graph, out  # not kept reserved by this process: the evaluate processes of a reproduce share one GPU (an
        torch.cuda.empty_cache()  # H200 run had a finetune beside two evaluates go out of memory)
    return seq[:, :P + n]


_SIMULATE = [False]  # simulate_graphs() sets it


@contextlib.contextmanager
def simulate_graphs():
    """Tests on the CPU: ``graph_generate(capture=True)`` "captures" a ``_StepGraph`` where CUDA would capture a
    graph, so the warm start and the kept graphs' bookkeeping (a later call's prompt, cache and router decision in
    the tensors the captured step reads) run without a GPU."""
    _SIMULATE[0] = True
    try:
        yield
    finally:
        _SIMULATE[0] = False


class _StepGraph:
    """A CUDA graph's stand-in on the CPU: ``replay`` runs the captured call's step closure, so it reads that call's
    tensors (cache, buffers) as the graph would, and the router's decision tensors of the capture (put back on the
    router first: a graph reads their storage, whatever the router holds now), and writes its logits into one
    ``out`` tensor kept across replays. Capturing runs nothing (as a capture computes nothing)."""

    def __init__(self, step, dtype: torch.dtype, router=None, decision=None):
        self.step, self.out = step, torch.empty(0, dtype=dtype)
        self.router, self.decision = router, decision

    def replay(self) -> None:
        if self.decision is not None:
            self.router._seq = self.decision
        res = self.step()
        if res.dtype != self.out.dtype:
            raise RuntimeError(f"_StepGraph: logits in {res.dtype}, expected {self.out.dtype} (the parameters' or "
                               "autocast's)")
        self.out.resize_(res.shape).copy_(res)


#: decode graphs a model keeps (``graph_generate(keep_graph=True)``), the oldest dropped first: one per router and
#: shape a benchmark interleaves (each holds its KV cache: ~100 MB at LLaMA-3-8B, batch 8, 192 positions)
KEPT_GRAPHS = 4


class _KeptGraph:
    """A decode graph kept on its model between calls: the ``signature`` it was captured for, the graph and its
    logits, and everything it reads that a call would otherwise make anew: the KV cache, the decode buffers (token,
    position, masks, cache index) and the router's prefill decision (a sentence router's ``_seq`` tensors, into
    which a later call's decision is copied)."""

    def __init__(self, signature, graph, out, cache, buffers, decision):
        self.signature, self.graph, self.out = signature, graph, out
        self.cache, self.buffers, self.decision = cache, buffers, decision

    def take_decision(self, mm, routed: bool) -> None:
        """This call's router decision into the tensors the graph reads (equal shapes: the signature says so)."""
        if not routed or self.decision is None:
            return
        router = mm.ctx.router
        for held, new in zip(self.decision, router._seq, strict=True):
            if held is not new:
                held.copy_(new)
        router._seq = self.decision


def _kept_graphs(mm) -> dict:
    """The model's kept graphs by (B, P, N, device, cache dtype under autocast, router, task ids), oldest first."""
    return mm.__dict__.setdefault("_lmx_kept_graphs", {})


def _keep(mm, key, kept: _KeptGraph) -> None:
    graphs = _kept_graphs(mm)
    graphs.pop(key, None)
    while len(graphs) >= KEPT_GRAPHS:
        graphs.pop(next(iter(graphs)))
    graphs[key] = kept


def _cache_dtype(dev) -> torch.dtype | None:
    """The dtype a static cache made now holds where autocast decides it (``_static_layer_class``), else None (the
    keys' own): a kept cache serves only calls that would make the same."""
    return torch.get_autocast_dtype(dev.type) if torch.is_autocast_enabled(dev.type) else None


def _route_key(mm, routed: bool) -> tuple:
    """The part of a kept graph's key known before the prefill: the router object and the task ids in force."""
    return (id(mm.ctx.router), _task_tuple(mm.ctx)) if routed else (None, None)


def _task_tuple(ctx) -> tuple | None:
    """The task ids in force, read to the host (one device read), or None."""
    return None if ctx.task_ids is None else tuple(torch.as_tensor(ctx.task_ids).reshape(-1).tolist())


def release_graphs(mm) -> None:
    """Frees the decode graphs, KV caches and buffers ``graph_generate(keep_graph=True)`` kept on ``mm``."""
    if mm.__dict__.pop("_lmx_kept_graphs", None) and torch.cuda.is_available():
        torch.cuda.empty_cache()


def _keeps_graphs(mm, routed: bool) -> bool:
    """Can a graph of this model be replayed by a later call? A plain model, or a router whose only per-call state
    the graph reads is a sentence router's prefill decision (``_seq``: the oracle, LoRA-B, DLP) or none (MeteoRA's
    gates, no router); not merge (its merged adapter is made anew per call) nor a per-token prefill route."""
    if not routed:
        return True
    router = mm.ctx.router
    return router is None or bool(getattr(router, "keeps_decode_graph", False))


def _decision(mm, routed: bool):
    router = mm.ctx.router if routed else None
    seq = getattr(router, "_seq", None)
    return None if seq is None else tuple(seq)


#: decode signatures a model remembers as warmed (``_decode_signature``); past this many it forgets them all
WARM_SIGNATURES = 64


def _warm_signatures(mm) -> set:
    """The signatures whose warm-up ran on ``mm`` (kept on the model object itself)."""
    return mm.__dict__.setdefault("_lmx_warm_decode", set())


def _decode_signature(mm, routed: bool, B: int, P: int, N: int) -> tuple:
    """Everything that decides what a decode step of this call does lazily, read on the host (one device read: the
    task ids in force). Equal signatures: the step reads the same layouts, caches and compiled kernels, all made by
    the warm-up that left the signature. Shapes, parameter dtype, autocast; a plain model's active peft adapters; a
    ``MultiLoRAModel``'s router (the object, its class and knobs, every parameter's storage and version: gates that
    trained since re-lay their rows; a sentence router's prefill decision shapes), bank version and size, task ids,
    forced gates, and every projection group's ``decode_state``."""
    dtype = next(mm.parameters()).dtype
    cast = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else None
    sig = (B, P, N, dtype, cast)
    if not routed:
        return (*sig, type(mm).__name__, repr(getattr(mm, "active_adapters", None)))
    router, ctx = mm.ctx.router, mm.ctx
    knobs = repr(router.config()) if router is not None and hasattr(router, "config") else None
    params = () if router is None else tuple((p.data_ptr(), p._version) for p in router.parameters())
    tasks = _task_tuple(ctx)
    groups = tuple(g.decode_state() for g in getattr(mm, "_groups", ()))
    # a sentence router's prefill decision: its shapes (the nucleus width K is a kernel's compile-time constant), the
    # adapter every row uses when known on the host, a per-token prefill route
    seq = getattr(router, "_seq", None)
    decision = (None if seq is None else tuple(tuple(t.shape) for t in seq), getattr(router, "_uniform", None),
                getattr(router, "_tok", None) is not None)
    return (*sig, id(router), type(router).__name__, knobs, params, decision, ctx.bank.version, len(ctx.bank),
            tasks, bool(ctx.force_gates), groups)


#: the phases of a call ``graph_generate(phases=...)`` times: the prefill with the first token's choice; the eager
#: first decode step (on CUDA: the capture's warm-up, where routers lay out what the capture reads; absent in a warm
#: call); the capture; the replays (or, uncaptured, the eager steps) of the remaining tokens. A phase that did not run
#: is absent.
PHASES = ("prefill", "first_step", "capture", "replay")


class _PhaseClock:
    """Wall seconds between marks, the device synchronised at each (``graph_generate(phases=...)``); nothing at all
    when ``phases`` is None. Under ``torch.profiler`` each phase is also a range (``graph_generate.<phase>``) in the
    trace, so a profiled call's ops and kernels can be told apart by phase."""

    def __init__(self, device, phases: dict | None):
        self.device, self.phases = device, phases
        self.last = self._now() if phases is not None else 0.0
        self._range = None
        self.begin(PHASES[0])

    def begin(self, name: str) -> None:
        """Opens phase ``name``'s profiler range (only while a profiler records)."""
        self.close()
        if torch.autograd.profiler._is_profiler_enabled:
            self._range = torch.profiler.record_function(f"graph_generate.{name}")
            self._range.__enter__()

    def close(self) -> None:
        """Ends the open phase's profiler range (a call that returns before its last phase)."""
        if self._range is not None:
            self._range.__exit__(None, None, None)
            self._range = None

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def mark(self, name: str, **extra) -> None:
        """Ends phase ``name``: its range, and with ``phases`` its seconds (the device synchronised first)."""
        self.close()
        if self.phases is None:
            return
        now = self._now()
        self.phases[name] = now - self.last
        self.phases.update(extra)
        self.last = now


def _choose(logits, seq_so_far, processors, finished, eos_token_id, pad_token_id):
    """generate's greedy choice: processors, argmax, pad where a row had finished; marks rows that now finish."""
    scores = logits.float()
    for p in processors:
        scores = p(seq_so_far, scores)
    nxt = scores.argmax(-1)
    nxt = torch.where(finished, torch.full_like(nxt, pad_token_id), nxt)
    if eos_token_id is not None:
        finished |= nxt == eos_token_id
    return nxt


@contextlib.contextmanager
def _phase(mm, routed: bool, task_ids, batch: int, prefill: bool):
    """A MultiLoRAModel's routing inputs for the call, and the phase of the next forwards for its routers
    (``RouteContext.prefill``): known here, so the model's pre-hook reads nothing from the device to find out (a
    read inside a CUDA graph capture is an error). Nothing for a plain model."""
    if not routed:
        yield
        return
    old = mm.ctx.prefill
    with mm.routing(task_ids, None, None, batch):
        mm.ctx.prefill = prefill
        try:
            yield
        finally:
            mm.ctx.prefill = old
