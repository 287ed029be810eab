"""pipeline/: the stages users run, each a Hydra entry point over the models/ and data/ layers.

    python -m pipeline.finetune  experiment=<name> task=<t>      one PEFT LoRA per task (or task=lora_b)
    python -m pipeline.route     experiment=<name> router=meteora|dlp
    python -m pipeline.evaluate  experiment=<name> router=<strategy> [composite_n=n]
    python -m pipeline.bench     experiment=<name>
    python -m pipeline.report    experiment=<name>
    python -m pipeline.reproduce experiment=<name>             the whole chain, skipping finished steps

Three rooms:

    stages/    one module per stage: its entry point (``main``), its work and its LightningModule; a stage is
               ``conf/<stage>.yaml`` + ``pipeline/stages/<stage>.py``
    report/    metrics.json records -> tables, paper tables, Markdown, plots (reads records only)
    runtime/   what every stage runs inside: the entry / one-line errors, StageRun (seed, config tree, tracker,
               metrics.json), typed settings, tracking, requeue / rerun, distributed helpers, model set-up

Every stage writes ``metrics.json`` (``pipeline.runtime.metrics_file``) into its run dir through
``pipeline.runtime.stage.StageRun`` and returns its main metric for sweepers. Configs live in conf/.
"""

import os

# ``python -m pipeline.<stage>`` runs ``pipeline/stages/<stage>.py``: the stages are also found directly under the
# package (``pipeline.report`` is the report room, so ``pipeline/report/__main__.py`` runs the report stage).
__path__.append(os.path.join(os.path.dirname(__file__), "stages"))
