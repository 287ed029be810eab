"""pipeline/: the stages users run, each a Hydra entry point over the models/ and data/ layers.

    python -m pipeline.finetune  experiment=<name> task=<t>      one PEFT LoRA per task (or task=lora_b)
    python -m pipeline.route     experiment=<name> router=meteora|dlp
    python -m pipeline.evaluate  experiment=<name> router=<strategy> [composite_n=n]
    python -m pipeline.bench     experiment=<name>
    python -m pipeline.report    experiment=<name>
    python -m pipeline.reproduce experiment=<name>             the whole chain, skipping finished steps

Every stage writes ``metrics.json`` (``pipeline.metrics_file``) into its run dir through ``pipeline.stage.StageRun``
(seed, config tree, tracker, provenance) and returns its main metric for sweepers. Configs live in conf/.
"""
