"""The ``models.MultiLoRAModel`` a stage needs, from its config: base model + adapters + the strategy of ``cfg.router``.

    plan = plan_multilora(cfg)                    # reads no model: strategy, adapter dirs, router checkpoint, checked
    mm, tokenizer = build_multilora(cfg, plan=plan)

``conf/router/<name>.yaml`` names the strategy's builder by ``_target_`` (``_partial_``: the adapter bank is bound
when the model is built) and holds its knobs; the rest of the file is what the stages read about it (``label``,
``checkpoint``, ``adapters``, ``train``, ``composite``: ``pipeline.runtime.settings.ROUTER_KEYS``). A knob left
null is unset: a trained router keeps the value saved in its ``router.json``, a fresh one takes the builder's
default; a knob given (in the file, an experiment or the command line) wins over both. ``composite[n]`` holds the
knobs composite-n prompts use (MeteoRA's temperature). Adapters are the standard PEFT dirs
``${paths.adapters_dir}/<name>`` of ``router.adapters`` (null: the experiment's ``tasks``); a router trained
together with its adapters (``router.train.train_loras``) is loaded with those instead, the dirs its
``router.json`` names (``pipeline.runtime.cotrained_adapters``); ``router.adapters_from: <router dir>`` runs any
strategy on another router's co-trained adapters (the oracle over MeteoRA's: how much of MeteoRA's score the
adapters' change costs, apart from the routing); ``router.adapters_from: experiment`` runs a co-trained router on
the experiment's own adapters instead (MeteoRA's gates over the adapters as fine-tuned).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from models import MultiLoRAModel
from models.routing import registry
from pipeline.runtime.adapter_dirs import verify_adapter
from pipeline.runtime.cotrained_adapters import EXPERIMENT, cotrained_dirs
from pipeline.runtime.settings import ROUTER_KEYS


@dataclass(frozen=True)
class Strategy:
    """A routing strategy as the config gives it: its builder and the knobs the config sets."""

    build: object  # a Router subclass, or a function of the route context that builds one
    knobs: dict

    @property
    def router_class(self) -> type:
        return registry.router_class(self.build)

    @property
    def name(self) -> str:
        return registry.strategy_name(self.build)

    @property
    def trainable(self) -> bool:
        return bool(getattr(self.router_class, "trainable", False))

    @property
    def needs_task_ids(self) -> bool:
        return bool(getattr(self.router_class, "needs_task_ids", False))

    def check(self, adapters: list, saved: dict | None = None) -> None:
        """The strategy's own knob rules (``check`` of its builder, where it has one) on the knobs it will get."""
        rule = getattr(self.build, "check", None)
        if rule is not None:
            rule(list(adapters), **{**(saved or {}), **self.knobs})


def strategy_of(router: DictConfig, composite_n: int | None = None) -> Strategy:
    """``cfg.router``'s builder (by ``_target_``) and the knobs it sets (null = unset), composite-n's on top."""
    resolved = OmegaConf.to_container(router, resolve=True)  # a knob may name another key (dlp: ${router.train...})
    partial = instantiate({k: v for k, v in resolved.items() if k not in ROUTER_KEYS}, _partial_=True)
    knobs = {k: v for k, v in partial.keywords.items() if v is not None}
    per_n = router.composite.get(composite_n) if composite_n else None
    if per_n:
        knobs.update(OmegaConf.to_container(per_n, resolve=True))
    return Strategy(partial.func, knobs)


@dataclass(frozen=True)
class MultiLoRAPlan:
    """What a stage's MultiLoRAModel is built from, checked before any model loads."""

    strategy: Strategy
    adapters: dict  # name -> PEFT dir
    checkpoint: Path | None  # the trained router's dir (what route writes, evaluate reads)
    load: bool  # True: install the trained router from ``checkpoint``; False: a fresh one

    @staticmethod
    def trainable_names() -> list[str]:
        return [n for n in registry.names() if getattr(registry.router_class(n), "trainable", False)]


def adapter_paths(cfg: DictConfig) -> dict[str, Path]:
    """``{name: PEFT dir}`` the strategy reads (``router.adapters``, null: the experiment's ``tasks``), whether or
    not they exist yet (reproduce orders its steps by them: ``pipeline/runtime/step_dag.py``)."""
    root = Path(str(cfg.paths.adapters_dir))
    names = [str(a) for a in (cfg.router.adapters if cfg.router.adapters is not None else cfg.tasks)]
    return {name: root / name for name in names}


def _missing_fix(cfg: DictConfig, key: str, own_command: str) -> str:
    """How to make a missing adapter or router of ``paths.<key>``: where that dir is another experiment's
    (meteora_composite and head_to_head read meteora_tasks' adapters: ``outputs/meteora_tasks/adapters``), that
    experiment's reproduce; else ``own_command``, this experiment's finetune or route."""
    d, root = Path(str(cfg.paths[key])), Path(str(cfg.paths.output_root))
    if d.parent == Path(str(cfg.paths.exp_dir)) or d.parent.parent != root:
        return f"train it first: {own_command}"
    return f"run the experiment that trains it first: python -m pipeline.reproduce experiment={d.parent.name}"


def adapter_dirs(cfg: DictConfig) -> dict[str, Path]:
    """``{name: PEFT dir}`` the strategy runs on; a missing adapter is one clear error naming the fix."""
    paths = adapter_paths(cfg)
    if not paths:
        raise ValueError("no tasks to route over; set tasks=[...] or pick an experiment (experiment=demo)")
    out = {}
    for name, d in paths.items():
        if not (d / "adapter_config.json").is_file():
            fix = _missing_fix(cfg, "adapters_dir", f"python -m pipeline.finetune experiment={cfg.name} task={name}")
            raise FileNotFoundError(f"adapter {name!r} is missing at {d}; {fix}")
        out[name] = verify_adapter(d)  # size + sha256 recorded at save time
    return out


def _saved_config(checkpoint: Path) -> dict:
    try:
        return dict(json.loads((checkpoint / "router.json").read_text()).get("config") or {})
    except (OSError, ValueError, AttributeError):
        return {}  # load_router refuses a broken checkpoint with its own one line


def cotrained_source(cfg: DictConfig, checkpoint: Path | None) -> dict[str, Path] | None:
    """The co-trained adapters ``cfg`` runs on: those of ``router.adapters_from`` (another router's checkpoint,
    which must have been trained with its adapters), else those of its own ``checkpoint`` where it has some, else
    None (the experiment's adapters; also for ``router.adapters_from=experiment``, whatever the checkpoint)."""
    names = list(adapter_paths(cfg))
    source = cfg.router.get("adapters_from")
    if source is not None and str(source) == EXPERIMENT:
        return None
    if source is None:
        return cotrained_dirs(checkpoint, names) if checkpoint is not None else None
    source = Path(str(source))
    if not (source / "router.json").is_file():
        raise FileNotFoundError(f"router.adapters_from={source}: no router there; train it first: python -m "
                                f"pipeline.route experiment={cfg.name} router={source.name} "
                                f"router.train.train_loras=true")
    found = cotrained_dirs(source, names)
    if not found:
        raise ValueError(f"router.adapters_from={source}: that router was trained over adapters it left unchanged "
                         f"(router.train.train_loras=false), so there are none to run on; drop router.adapters_from")
    return found


def plan_multilora(cfg: DictConfig, *, fresh: bool = False, composite_n: int | None = None) -> MultiLoRAPlan:
    """Strategy, adapters and router checkpoint of ``cfg``, every one checked (one line each) before a model loads.

    ``fresh=True`` (route) plans an untrained router; otherwise a strategy with a ``router.checkpoint`` loads it."""
    strategy = strategy_of(cfg.router, composite_n)
    checkpoint = Path(str(cfg.router.checkpoint)) if cfg.router.checkpoint is not None else None
    load = checkpoint is not None and not fresh
    if load and not (checkpoint / "router.json").is_file():
        fix = _missing_fix(cfg, "routers_dir", f"python -m pipeline.route experiment={cfg.name} router={checkpoint.name}")
        raise FileNotFoundError(f"router {checkpoint.name!r} is missing at {checkpoint}; {fix}")
    cotrained = cotrained_source(cfg, checkpoint if load else None)
    # a router trained together with its adapters (router.train.train_loras) runs on those, not on the ones it
    # started from (which need not exist any more); only the adapters that run are verified
    dirs = {n: verify_adapter(d) for n, d in cotrained.items()} if cotrained else adapter_dirs(cfg)
    strategy.check(list(dirs), _saved_config(checkpoint) if load else None)
    return MultiLoRAPlan(strategy, dirs, checkpoint, load)


def groups_wanted(setting, mm: MultiLoRAModel) -> bool:
    """A ``group_projections`` setting (``generation.`` / ``bench.``): true / false, or auto = on where the model
    sits on a CUDA device (grouping saves launches, which only a GPU's decode pays for)."""
    if setting == "auto":
        return next(mm.parameters()).device.type == "cuda"
    return bool(setting)


def build_multilora(cfg: DictConfig, model=None, tokenizer=None, *, plan: MultiLoRAPlan | None = None):
    """``(MultiLoRAModel, tokenizer)``: ``plan``'s adapters and router on ``cfg.model`` (or the given model)."""
    plan = plan or plan_multilora(cfg)
    if model is None:
        model, tokenizer = instantiate(cfg.model)
    if not plan.load:
        mm = MultiLoRAModel.from_adapters(model, plan.adapters, router=plan.strategy.build, tokenizer=tokenizer,
                                          **plan.strategy.knobs)
    else:
        mm = MultiLoRAModel.from_adapters(model, plan.adapters, router="base", tokenizer=tokenizer)
        mm.load_router(plan.checkpoint, plan.strategy.build, **plan.strategy.knobs)
    return mm, tokenizer
