"""The stages, one module each (entry point + work + LightningModule); ``conf/<stage>.yaml`` is each one's config.

    finetune   one PEFT LoRA per task (or the mixed LoRA-B)       route      train a router over the adapters
    evaluate   score a routing strategy, or composite-n prompts   bench      end-to-end generation latency
    report     metrics.json -> tables, plots, paper tables        reproduce  an experiment's whole chain
    scaling    the route stage on 1 device vs DDP / FSDP (an argparse driver over ``python -m pipeline.route``)
    readme_results  README's generated Results blocks from the committed tables (``--check``: are they current)

Beside them, what one stage alone uses: ``bench_timing``, ``train_throughput``, ``e2e_decode`` (bench);
``answer_budget``, ``eos_gate`` (evaluate); ``target_accuracy`` (route).
"""
