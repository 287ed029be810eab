"""What every stage runs inside: the entry point and its one-line errors (``entry``), ``StageRun`` (``stage``),
typed settings (``settings``), the config tree, metrics.json, tracking, requeue / rerun, distributed helpers, and
the model set-up of the routed stages (``multilora``)."""
