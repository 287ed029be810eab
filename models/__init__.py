"""models/: one base model, one bank of PEFT LoRA adapters, and the routing strategies of MeteoRA and DLP-LoRA.

Every strategy computes adapters through ``kernels.multi_lora``; a strategy only decides *which* adapters and
*what weights* (a route), never loops over adapters itself.

Entry points
------------
    load_base_model(name_or_path, *, dtype="float32", device=None, gguf_file=None) -> (model, tokenizer)
        hub id, local HF dir or .gguf; frozen, eval mode; tokenizer pads on the left with a pad token set.
    MultiLoRAModel.from_adapters(model, adapters, *, targets=None, router="oracle", tokenizer=None,
                                 check_base_name=True, **router_kwargs)
        adapters = {name: peft_dir} or [peft_dir, ...] (name = dir name); targets = projection names to wrap
        (METEORA_TARGETS = q,k,v,o,gate,up,down; DLP_TARGETS = q,v; None = what the adapters touch).

MultiLoRAModel
--------------
    mm(input_ids, attention_mask, labels=None, task_ids=None, route_mask=None, force_gates=None,
       right_padded=False) -> HF output
        task_ids: adapter names or indices, one per sequence (oracle's choice; meteora gate / dlp labels), or one
            for the whole batch (broadcast); any other length is refused.
        route_mask [B, S]: tokens a sentence router reads (e.g. prompt only in teacher-forced training).
        right_padded: rows padded on the right (training batches): the model runs without the mask (no host
            read in transformers' mask code), the router still gets it; real tokens' outputs are unchanged.
        meteora + labels + task_ids: out.loss = out.lm_loss + aux_loss_coef * out.aux_loss (MeteoRA's loss).
    mm.generate(input_ids, attention_mask=..., task_ids=None, **generate_kwargs)   batched, KV cache
        (mm.model.generate works too, after mm.set_routing(task_ids=...) where the strategy needs task ids)
    mm.set_router(name or builder, **kwargs) / mm.strategy / mm.last_route()
        oracle | meteora(top_k=2, temperature=1.0, aux_loss_coef=50.0) |
        dlp / dlp_segments(top_p=0.6, fusion="softmax"|"renorm", hidden=1408, layers=4, dropout=0.0) |
        lora_b(adapter=name) | merge(mode="delta"|"linear") | base
        merge "delta" = mean of the adapters' deltas = peft add_weighted_adapter(cat, 1/L); "linear" = peft's linear
    mm.set_routing(task_ids=None, route_mask=None, force_gates=False)   persistent routing inputs
    mm.set_trainable("router" | "gates" | "adapters" | "router+adapters" | "gates+adapters" | "none") -> params
    mm.router_loss(input_ids, attention_mask, task_ids)   dlp router CE (no LM forward needed)
    mm.add_adapter(name, dir) / replace_adapter(name, dir) / remove_adapter(name)   hot swap, no rebuild
    mm.save_router(dir) / mm.load_router(dir, strategy=None, **overrides)   router.safetensors + router.json, atomic
    mm.unwrap() -> the plain HF model again

Pieces (one concept per file)
-----------------------------
    base.py               load_base_model
    adapter_bank.py       AdapterBank, read_peft_adapter, AdapterError (validation of PEFT dirs)
    multilora_linear.py   MultiLoRALinear: base nn.Linear + kernels.multi_lora with the router's route
    routing/route.py      Route, RouteContext, Router / SequenceRouter, route_top_k, route_top_p
    routing/registry.py   strategy names -> builders (@strategy; every module of routing/ is found)
    routing/<name>.py     one strategy each: base, oracle, lora_b, merge, meteora (token gates, top-k, aux loss),
                          dlp (sentence MLP, top-p), dlp_segments (dlp + a segmenter); each owns its defaults,
                          its knob checks and, when trainable, its training_loss
    routing/checkpoint.py save / read / align router checkpoints
    multilora_model.py    MultiLoRAModel (ties it together)
    lora_input_dropout.py peft's lora_dropout for training a bank: dropout on the LoRA branch's input only
    tiny.py               tiny random LLaMA + byte tokenizer (HF dir or GGUF), random PEFT adapters (tests, smoke)
"""

from models.adapter_bank import AdapterBank, AdapterError, read_peft_adapter
from models.base import load_base_model
from models.multilora_linear import MultiLoRALinear
from models.multilora_model import DLP_TARGETS, METEORA_TARGETS, MultiLoRAModel
from models.routing.checkpoint import RouterCheckpointError
from models.routing.route import Route, Router, route_top_k, route_top_p

__all__ = [
           "DLP_TARGETS",
           "METEORA_TARGETS",
           "AdapterBank",
           "AdapterError",
           "MultiLoRALinear",
           "MultiLoRAModel",
           "Route",
           "Router",
           "RouterCheckpointError",
           "load_base_model",
           "read_peft_adapter",
           "route_top_k",
           "route_top_p",
]
