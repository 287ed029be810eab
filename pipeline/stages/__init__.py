"""The stages, one module each (entry point + work + LightningModule); ``conf/<stage>.yaml`` is each one's config.

    finetune   one PEFT LoRA per task (or the mixed LoRA-B)       route      train a router over the adapters
    evaluate   score a routing strategy, or composite-n prompts   bench      end-to-end generation latency
    report     metrics.json -> tables, plots, paper tables        reproduce  an experiment's whole chain
    scaling    the route stage on 1 device vs DDP / FSDP (an argparse driver over ``python -m pipeline.route``)
    readme_results  README's generated Results blocks from the committed tables (``--check``: are they current)
    joint_speed  joint (``finetune task=all``) vs separate fine-tuning, timed (an argparse driver over finetune)

Beside them, the helpers of one stage: finetune's joint mode (``joint_finetune``, ``joint_batches``) and what its
two modes share (``lora_training``); bench's timing and suites (``bench_timing``, ``train_throughput``,
``e2e_decode``); evaluate's ``answer_budget`` and ``eos_gate``; route's ``target_accuracy``.
"""
