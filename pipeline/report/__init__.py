"""The report room: metrics.json records -> tables (``tables``), their Markdown / CSV / PNG (``render``) and the
papers' tables with computed claims (``paper_tables``). It reads records only; the stage is ``pipeline.stages.report``."""
