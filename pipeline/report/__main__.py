"""``python -m pipeline.report``: the report stage (``pipeline/stages/report.py``); this package is the report room."""

from pipeline.runtime.entry import cli
from pipeline.stages.report import main

cli(main)
