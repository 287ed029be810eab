"""Kernel launches of a LoRA training step, loramux beside peft (pipeline.op_count): a count, never a timing."""


def test_training_launches_no_more_kernels_than_peft():
    """Not a timing: the kernels one forward + backward launches with LoRA trained (bf16 autocast, the CPU stand-in
    of the benchmark's SmolLM2 shape), loramux beside peft's LoRA. Each launch is a kernel of a CUDA graph, where at
    batch 16 the count, not the arithmetic, sets the step time. One adapter through autograd's slices of the bank:
    542 against peft's 487 (4 more zero fills a projection), now 458; a joint batch (4 rows, 4 adapters) through the
    sentence form's masks and coefficients: 990, now 542 through ``kernels.per_row``."""
    from pipeline.stages.op_count import training_launches

    peft, projections, peft_ops = training_launches("peft_single")
    single, _, ops = training_launches("loramux_single")
    assert projections == 14
    assert single <= peft, (single, peft, (ops - peft_ops).most_common(6))
    assert ops["aten::zero_"] <= peft_ops["aten::zero_"] + 2 * projections  # one zero fill per trained tensor
    joint, _, joint_ops = training_launches("loramux_joint")
    assert joint <= peft + 5 * projections, (joint, peft, (joint_ops - peft_ops).most_common(6))
