"""The report room: metrics.json records -> tables (``tables``), their Markdown / CSV / PNG (``render``) and the
papers' tables with computed claims (``paper_tables``): each claim's point estimate, paired bootstrap interval and
verdict (``paper_claims`` over ``claim_rows``, with ``statistics``), from the runs' raw records (``records``: what is
committed under ``outputs/records/``). It reads records only; the stage is ``pipeline.stages.report``."""
