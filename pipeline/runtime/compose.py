"""Compose a stage's config in code, as ``python -m pipeline.<stage> <overrides>`` would: the one helper that
reproduce, scaling, bench and the tests use.

    cfg = compose("evaluate", ["experiment=smoke", "router=dlp"])
    cfg = compose("finetune", ["experiment=smoke"], run_dir=tmp / "run")     # paths.run_dir set (outside Hydra)

Inside a running Hydra app (a reproduce step) Hydra is already initialised on conf/ and is reused; elsewhere it is
initialised for the call. ``run_dir`` fills ``paths.run_dir``, which is Hydra's output dir only under ``@hydra.main``.
"""

from __future__ import annotations

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, open_dict

from pipeline.runtime.entry import CONF_DIR


def compose(stage: str, overrides=(), *, run_dir=None, return_hydra_config: bool = False) -> DictConfig:
    """``conf/<stage>.yaml`` with ``overrides`` (Hydra's override grammar), resolved lazily like a stage sees it."""
    overrides = list(overrides)
    if GlobalHydra.instance().is_initialized():
        cfg = hydra_compose(config_name=stage, overrides=overrides, return_hydra_config=return_hydra_config)
    else:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = hydra_compose(config_name=stage, overrides=overrides, return_hydra_config=return_hydra_config)
    if run_dir is not None:
        with open_dict(cfg):
            cfg.paths.run_dir = str(run_dir)
    return cfg
