"""Regional compilation: ``torch.compile`` each decoder layer of a HF causal LM, not the whole model.

A decoder stack is one layer class repeated (30 times in SmolLM2-135M), so compiling each layer in place gives one
graph that every layer reuses (its parameters are graph inputs), compiled in the time of one layer rather than of
the whole model, while what runs once per forward (embedding, the routers' per-forward decisions in the model's
pre-hook, the LM head and loss) stays in eager Python. For that reuse to hold, nothing a layer does may depend on
*which* layer it is through a Python value: ``MultiLoRALinear`` therefore holds its bank slots and its router state
by reference instead of looking them up by name (a name used as a key would make dynamo compile a graph per layer).
The pipeline's trainers and ``python -m pipeline.bench experiment=train_throughput`` compile this way.
"""

from __future__ import annotations


def decoder_layers(model) -> list:
    """The repeated blocks of a HF causal LM (the classes it names in ``_no_split_modules``), in model order."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names]


def compile_layers(model, backend: str = "inductor", mode: str | None = None, dynamic: bool | None = None) -> int:
    """``torch.compile`` every decoder layer of ``model`` in place; returns how many. The model keeps its type and
    state dict (``nn.Module.compile`` only swaps the call path). ``dynamic``: torch.compile's (None: static shapes
    first, dynamic after a second shape; True: dynamic from the first call)."""
    layers = decoder_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} names no decoder layer class in _no_split_modules; cannot compile "
                         "it by layer")
    for layer in layers:
        layer.compile(backend=backend, mode=mode, dynamic=dynamic)
    return len(layers)


def uncompile_layers(model) -> int:
    """Undo ``compile_layers``: every decoder layer runs its eager forward again (``nn.Module.compile`` keeps the
    compiled callable in ``_compiled_call_impl``; None restores the plain call). Returns how many layers were
    compiled. Used where compiled layers cannot be captured in a CUDA graph (``pipeline.runtime.step_graph``):
    the eager layers captured are the next best form."""
    n = 0
    for layer in decoder_layers(model):
        if getattr(layer, "_compiled_call_impl", None) is not None:
            layer._compiled_call_impl = None
            n += 1
    return n
