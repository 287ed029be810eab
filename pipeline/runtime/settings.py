"""Typed settings: what conf/ may hold, registered with Hydra before any config is composed.

Resolvers (usable anywhere in conf/):

    ${selection:meteora28}     the task names of a selection of data/task_table.py (meteora28, dlp26, composite3/5/10)
"""

from __future__ import annotations

from omegaconf import OmegaConf

from data.task_table import select


def _selection(name: str) -> list[str]:
    return list(select(str(name)))


if not OmegaConf.has_resolver("selection"):
    OmegaConf.register_new_resolver("selection", _selection)
