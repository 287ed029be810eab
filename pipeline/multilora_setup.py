"""Build the ``models.MultiLoRAModel`` a stage needs from its config: base model + adapters + routing strategy.

    mm, tokenizer = build_multilora(cfg, strategy="meteora", load_router=True)

Adapters are the standard PEFT dirs ``${paths.adapters_dir}/<task>`` of the experiment's ``tasks`` (the
``lora_b`` strategy uses ``<adapters_dir>/lora_b`` alone). Trainable routers (meteora, dlp) are either fresh
(``route`` trains them) or loaded from ``${paths.routers_dir}/<strategy>`` (``evaluate``, ``bench``) with the
config's inference knobs (top_k, temperature, top_p) applied on top of the saved ones.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

TRAINED = {"meteora": "meteora", "dlp": "dlp", "dlp_segments": "dlp"}  # strategy -> router checkpoint dir


def adapter_dirs(cfg: DictConfig, strategy: str) -> dict[str, Path]:
    """``{name: PEFT dir}`` the strategy runs on; a missing adapter is one clear error naming the fix."""
    root = Path(str(cfg.paths.adapters_dir))
    names = [str(cfg.router.get("adapter_name", "lora_b"))] if strategy == "lora_b" else [str(t) for t in cfg.tasks]
    if not names:
        raise ValueError("no tasks to route over; set tasks=[...] or pick an experiment (experiment=demo)")
    out = {}
    for name in names:
        d = root / name
        if not (d / "adapter_config.json").is_file():
            raise FileNotFoundError(f"adapter {name!r} is missing at {d}; train it first: python -m pipeline.finetune "
                                    f"experiment={cfg.name} task={name}")
        from pipeline.finetune import verify_adapter  # size + sha256 recorded at save time (issue 7)

        out[name] = verify_adapter(d)
    return out


def router_kwargs(router_cfg: DictConfig, composite_n: int | None = None) -> dict:
    """Inference (and construction) knobs of ``cfg.router`` in the form ``MultiLoRAModel.set_router`` takes."""
    s = str(router_cfg.strategy)
    if s == "meteora":
        temperature = float(router_cfg.temperature)
        table = router_cfg.get("composite_temperature") or {}
        if composite_n and composite_n in table:
            temperature = float(table[composite_n])
        return {"top_k": int(router_cfg.top_k), "temperature": temperature,
                "aux_loss_coef": float(router_cfg.train.aux_loss_coef)}
    if s in ("dlp", "dlp_segments"):
        return {"top_p": float(router_cfg.top_p), "fusion": str(router_cfg.fusion)}
    if s == "lora_b":
        return {"adapter": str(router_cfg.get("adapter_name", "lora_b"))}
    return {}


def build_multilora(cfg: DictConfig, model=None, tokenizer=None, *, load_router: bool = True,
                    composite_n: int | None = None):
    """``(MultiLoRAModel, tokenizer)`` with the experiment's adapters and ``cfg.router``'s strategy installed.

    ``load_router=False`` installs a fresh, untrained router (what ``route`` trains); True loads the trained one.
    """
    from hydra.utils import instantiate

    from models import MultiLoRAModel

    if model is None:
        model, tokenizer = instantiate(cfg.model)
    strategy = "dlp_segments" if (str(cfg.router.strategy) == "dlp" and cfg.router.get("segments")) \
        else str(cfg.router.strategy)
    dirs = adapter_dirs(cfg, strategy)
    kwargs = router_kwargs(cfg.router, composite_n)
    if strategy in TRAINED and not load_router:
        if strategy != "meteora":
            span = cfg.router.get("span_tokens")
            kwargs.update(hidden=int(cfg.router.hidden), layers=int(cfg.router.layers),
                          prefix_windows=[int(w) for w in cfg.router.get("prefix_windows") or []],
                          span_tokens=None if span is None else int(span))
        mm = MultiLoRAModel.from_adapters(model, dirs, router=strategy, tokenizer=tokenizer, **kwargs)
    elif strategy in TRAINED:
        ckpt = Path(str(cfg.paths.routers_dir)) / TRAINED[strategy]
        if not (ckpt / "router.json").is_file():
            raise FileNotFoundError(f"router {TRAINED[strategy]!r} is missing at {ckpt}; train it first: "
                                    f"python -m pipeline.route experiment={cfg.name} router={TRAINED[strategy]}")
        mm = MultiLoRAModel.from_adapters(model, dirs, router="base", tokenizer=tokenizer)
        router = mm.load_router(ckpt, **{k: v for k, v in kwargs.items() if k != "aux_loss_coef"})
        if strategy == "dlp_segments":  # the segment router is the trained dlp router, applied per segment
            seg = mm.build_router("dlp_segments", **router.config())
            seg.load_state_dict(router.state_dict())
            mm.set_router(seg)
    else:
        mm = MultiLoRAModel.from_adapters(model, dirs, router=strategy, tokenizer=tokenizer, **kwargs)
    return mm, tokenizer
