"""loramux data layer: the asset cache (assets, fetch), the task registry (task_table, tasks), splits, metric
modules (metrics/, scoring) and composite-n test sets (composite). It knows no model beyond building the model
asset."""
