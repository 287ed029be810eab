"""Kernel launches of a LoRA training step, loramux beside peft (pipeline.op_count): a count, never a timing."""


def test_training_launches_no_more_kernels_than_peft():
    """Not a timing: the kernels one forward + backward launches with LoRA trained (bf16 autocast, the CPU stand-in
    of the benchmark's SmolLM2 shape), loramux beside peft's LoRA. Each launch is a kernel of a CUDA graph, where at
    batch 16 the count, not the arithmetic, sets the step time. One adapter through autograd's slices of the bank:
    542 against peft's 487 (4 more zero fills a projection), 458 with the gradients written directly, 399 with the
    bank trimmed to the adapters' rank (no zero fill) and the scale in the products' alpha; a joint batch (4 rows,
    4 adapters) through the sentence form's masks and coefficients: 990, 542 through ``kernels.per_row``."""
    from pipeline.stages.op_count import training_launches

    peft, projections, peft_ops = training_launches("peft_single")
    single, _, ops = training_launches("loramux_single")
    assert projections == 14
    assert single <= peft, (single, peft, (ops - peft_ops).most_common(6))
    assert ops["aten::zero_"] <= peft_ops["aten::zero_"]  # a trained bank of one: the products are the gradients
    assert ops["aten::mul"] <= peft_ops["aten::mul"] and ops["aten::mul_"] == 0  # the scale rides in alpha
    joint, _, joint_ops = training_launches("loramux_joint")
    assert joint <= peft + 5 * projections, (joint, peft, (joint_ops - peft_ops).most_common(6))


def test_compiled_layers_generate_no_more_kernels_than_peft():
    """Not a timing: the kernels inductor generates for the compiled layers' training step (fp32, the CPU stand-in):
    besides the cuBLAS products each is a kernel of the captured step on the GPU, where loramux_single was 1-3% behind
    peft in the fastest form (outputs/tables/train_throughput_compiled_graph_all.md). One adapter: 99 against peft's
    68 when the bank's gradients were a fill and a copy into the rank-padded bank and each backward product was
    scaled by its own multiply; 57 now."""
    from pipeline.stages.op_count import compiled_kernels

    peft, single = compiled_kernels("peft_single"), compiled_kernels("loramux_single")
    assert 0 < single <= peft, (single, peft)
