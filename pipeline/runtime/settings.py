"""Typed settings: what conf/ may hold, registered with Hydra before any config is composed, and checked before any
model loads.

Schemas (dataclasses in Hydra's ConfigStore under ``schema/``): a YAML names its schema first in its defaults list
(``- /schema/data@_here_``), so a value of the wrong type is refused while Hydra composes, one ``error: config:``
line. The values themselves live in the YAML files (the schemas hold types; the few keys no YAML spells out have
their default here):

    schema/paths       conf/paths/*.yaml            schema/data        conf/data/*.yaml
    schema/optim       optim (finetune)             schema/generation  generation (evaluate)
    schema/checkpoint  checkpoint (finetune, route) schema/bench       bench (+ bench.static)
    schema/train_speed train_speed (finetune, route)
    schema/router      the keys a stage reads from conf/router/<name>.yaml (the strategy's knobs sit beside them)
    schema/router_train  router.train of a trainable strategy

``check_settings(cfg)``, the first thing every stage does, refuses what a type cannot say (a range, a task name, a
model path, a GPU that is not there) before any model loads: one ValueError line naming the key, the value and the
fix (``RULES``). ``refuse_unread_overrides`` refuses, at the command line, a group a stage does not read
(``adapter=dlp`` on evaluate), which would otherwise do nothing.

Resolvers (usable anywhere in conf/):

    ${selection:meteora28}   the task names of a selection of data/task_table.py (meteora28, dlp26, composite3/5/10)
    ${cache_dir:}            $LORAMUX_CACHE, else ~/.cache/loramux (data.assets.cache_dir: one reader of the variable)
    ${output_root:}          $LORAMUX_OUTPUTS, else ./outputs
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf

from data.assets import cache_dir
from data.task_rows import JOINT_TASK, LORA_B
from data.task_table import get_task, select
from models.base import DTYPES, check_source

#: what the stages read from ``conf/router/<name>.yaml`` beside the strategy's knobs (every other key but ``_target_``
#: and ``_partial_`` is a knob, passed to the builder)
ROUTER_KEYS = ("label", "checkpoint", "adapters", "adapters_from", "composite", "train")


# ------------------------------------------------------------------------------------------------------ schemas
@dataclass
class PathsSettings:
    cache_dir: str = MISSING  # read-only assets (models/, bigbench/)
    output_root: str = MISSING  # every experiment
    exp_dir: str = MISSING  # one experiment: adapters/, routers/, <stage>/ run dirs, report.md
    adapters_dir: str = MISSING
    routers_dir: str = MISSING
    run_dir: str = MISSING  # this run's dir (Hydra's output dir)


@dataclass
class DataSettings:
    train_split: str = MISSING
    val_split: str = MISSING
    test_split: str = MISSING
    split_seed: int = MISSING
    max_length: int = MISSING
    max_prompt_tokens: int = MISSING
    train_limit: int | None = MISSING
    val_limit: int | None = MISSING
    test_limit: int | None = MISSING
    mix_cap_per_task: int = MISSING
    append_eos: bool = MISSING
    num_workers: int = MISSING


@dataclass
class OptimSettings:
    lr: float = MISSING
    weight_decay: float = MISSING
    warmup_steps: int = MISSING
    batch_size: int = MISSING  # per device


#: how evaluate's generate calls run (pipeline/stages/decode_engine.py)
GENERATION_ENGINES = ("auto", "graph", "generate")


@dataclass
class GenerationSettings:
    batch_size: int = MISSING  # prompts per generate call
    max_batch_tokens: int | None = MISSING  # KV-cache positions per generate call (data.batches.plan_jobs)
    engine: str = MISSING  # auto | graph | generate (pipeline/stages/decode_engine.py)
    group_projections: Any = MISSING  # auto | true | false: q / k / v and gate / up as one projection each
    max_new_tokens: Any = MISSING  # a number of tokens, or auto (pipeline/stages/answer_budget.py)
    composite_max_new_tokens_per_task: Any = MISSING  # a number of tokens, or auto
    composite_suppress_eos: bool = MISSING  # composite-n: EOS held back until n answers (pipeline/stages/eos_gate.py)
    no_repeat_ngram_size: int | None = MISSING  # no n-gram twice in a row (pipeline/stages/no_repeat.py); null: off
    answer_quantile: float = MISSING  # auto: the quantile of the training answers' token lengths
    max_new_tokens_cap: int | None = MISSING  # auto: at most this many (null: no cap)


@dataclass
class CheckpointSettings:
    every_n_steps: int = MISSING


@dataclass
class BenchStatic:
    compile: bool = MISSING
    backend: str = MISSING
    mode: str | None = MISSING
    fullgraph: bool = MISSING
    allow_on_cpu: bool = MISSING
    shapes: list[str] | None = MISSING
    strategies: list[str] | None = MISSING
    num_adapters: list[int] | None = MISSING


@dataclass
class BenchSettings:
    suite: str = MISSING  # latency | train_throughput | e2e_decode
    table_dir: str | None = MISSING
    shapes: list[str] = MISSING
    device: str = MISSING
    engines: list[str] = MISSING
    static: BenchStatic = MISSING
    strategies: list[str] = MISSING
    routers: dict[str, list[str]] = MISSING
    num_adapters: list[int] = MISSING
    batch_sizes: list[int] = MISSING
    prompt_lengths: list[int] = MISSING
    new_tokens: int = MISSING
    warmup: int = MISSING
    repeats: int = MISSING
    kernel_micro: bool = MISSING
    group_projections: Any = MISSING  # auto | true | false: the bank's model grouped as evaluate's (latency suite)
    max_seconds: float | None = MISSING
    train: Any = MISSING  # suite=train_throughput (pipeline/stages/train_throughput.py)
    e2e: Any = MISSING  # suite=e2e_decode (pipeline/stages/e2e_decode.py)


@dataclass
class TrainSpeedSettings:
    """How a training step runs on a GPU (pipeline/runtime/train_speed.py): auto, true or false each."""

    compile: Any = MISSING
    backend: str = MISSING
    dynamic: bool = MISSING
    frozen_bf16: Any = MISSING
    cuda_graph: Any = MISSING
    graph_bucket: int = MISSING


@dataclass
class RouterKeys:
    """``conf/router/<name>.yaml``'s stage keys (its knobs sit beside them, untyped: the builder checks them)."""

    label: str | None = None  # name in results; null: the router's own (meteora-top2, dlp-segments, ...)
    checkpoint: str | None = None  # where route saves it and evaluate loads it; null: nothing trained
    adapters: list[str] | None = None  # the adapters the bank holds; null: the experiment's tasks
    # a router checkpoint trained together with its adapters (router.train.train_loras): run on the adapters it
    # ended with instead of the experiment's (e.g. the oracle over MeteoRA's co-trained adapters); null: the
    # experiment's, or this router's own checkpoint's where it was co-trained; "experiment": the experiment's own
    # adapters even under a co-trained checkpoint (its gates over the adapters as fine-tuned)
    adapters_from: str | None = None
    composite: dict = field(default_factory=dict)  # {n: {knob: value}} for composite-n prompts
    train: dict | None = None  # route's settings (schema/router_train) of a trainable strategy


@dataclass
class RouterTrain:
    """``router.train``: how the route stage trains a strategy's router."""

    steps: int = MISSING
    lr: float = MISSING
    weight_decay: float = MISSING
    batch_size: int = MISSING  # per device
    max_length: int = MISSING  # tokens of a training row
    rows_per_task: int = MISSING
    val_rows_per_task: int = MISSING
    lm_loss_on_prompt: bool = True  # a strategy that reads answers: the LM loss covers the prompt too (MeteoRA's script)
    gate_ce_on_prompt: bool = True  # MeteoRA's gates: their CE covers every token (the script); false: the answers'
    train_loras: bool = False  # also train the adapters, kept beside the router (MeteoRA's script does)
    lora_lr: float | None = None  # train_loras: the adapters' own lr (null: lr, as MeteoRA's script)
    val_check_interval: int | None = None  # validate every N steps (null: trainer.val_check_interval)
    target_accuracy: float | None = None  # stop once the validation routing accuracy reaches it (steps: the bound)
    schedule: str = "constant"  # the lr over the steps: constant | cosine (linear warm-up, cosine decay to 10%)
    warmup_ratio: float = 0.0  # cosine: the share of steps warming up
    grad_clip: float | None = None  # clip the gradients' global norm to this (null: no clipping)


# ------------------------------------------------------------------------------------------------------ rules
def _int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def at_least(lo) -> Callable[[Any], bool]:
    return lambda x: _int(x) and x >= lo


def positive(x) -> bool:
    return _number(x) and x > 0


def optional(rule) -> Callable[[Any], bool]:
    return lambda x: x is None or rule(x)


def tokens_or_auto(x) -> bool:
    return at_least(1)(x) or x == "auto"


def boolean(x) -> bool:
    return isinstance(x, bool)


def ints_at_least(lo) -> Callable[[Any], bool]:
    return lambda x: isinstance(x, (list, ListConfig)) and len(x) > 0 and all(_int(v) and v >= lo for v in x)


SPLITS = ("train", "val", "test")

#: (key, the rule its value obeys, what that is, an example value, the stages it applies to or None for every stage
#: whose config holds the key): a value that breaks its rule is refused as ``<key>=<value> must be <what>; set e.g.
#: <key>=<example>``
RULES: list[tuple[str, Callable[[Any], bool], str, str, tuple | None]] = [
    ("seed", _int, "an integer", "0", None),
    ("composite_n", optional(at_least(1)), "null or a number of sub-tasks >= 1", "3", None),
    ("composite_rows", at_least(1), "a number of prompts >= 1", "200", None),
    ("composite_seed", _int, "an integer", "47", None),
    ("composite_shots", at_least(0), "a number of examples >= 0", "2", None),
    ("composite_repeat_short", boolean, "true or false", "true", None),
    ("allow_dirty", boolean, "true or false", "true", None),
    ("parallel", at_least(1), "a number of steps run at once >= 1 (1: one after another)", "1", None),
    ("joint_finetune", lambda x: isinstance(x, bool) or x == "auto", "auto, true or false", "auto", ("reproduce",)),
    ("adapter.r", at_least(1), "> 0", "8", None),
    ("adapter.lora_alpha", positive, "> 0", "16", None),
    ("adapter.lora_dropout", lambda x: _number(x) and 0 <= x < 1, "in [0, 1)", "0.0", None),
    ("optim.lr", positive, "> 0", "2e-4", None),
    ("optim.weight_decay", lambda x: _number(x) and x >= 0, ">= 0", "0.0", None),
    ("optim.warmup_steps", at_least(0), ">= 0", "5", None),
    ("optim.batch_size", at_least(1), "a number of rows >= 1", "4", None),
    ("trainer.max_steps", at_least(1), "> 0", "100", ("finetune",)),
    ("trainer.val_check_interval", at_least(1), "a number of steps >= 1", "50", ("finetune", "route")),
    ("trainer.log_every_n_steps", at_least(1), "a number of steps >= 1", "5", ("finetune", "route")),
    ("trainer.devices", lambda x: at_least(1)(x) or x == "auto", "a number of devices >= 1", "1", None),
    ("checkpoint.every_n_steps", at_least(0), "a number of steps >= 0 (0: never)", "25", None),
    ("router.train.steps", at_least(1), "> 0", "100", ("route",)),
    ("router.train.lr", positive, "> 0", "5e-4", ("route",)),
    ("router.train.schedule", lambda x: x in ("constant", "cosine"), "constant or cosine", "cosine", ("route",)),
    ("router.train.warmup_ratio", lambda x: _number(x) and 0 <= x < 1, "a share of the steps in [0, 1)", "0.005",
     ("route",)),
    ("router.train.grad_clip", optional(positive), "null (no clipping) or a norm > 0", "0.3", ("route",)),
    ("router.train.lora_lr", optional(positive), "null (the gates' lr) or > 0", "5e-5", ("route",)),
    ("router.train.batch_size", at_least(1), "a number of rows >= 1", "8", ("route",)),
    ("router.train.max_length", at_least(1), "a number of tokens >= 1", "256", ("route",)),
    ("router.train.rows_per_task", at_least(1), "a number of rows >= 1", "64", ("route",)),
    ("router.train.val_rows_per_task", at_least(1), "a number of rows >= 1", "16", ("route",)),
    ("router.train.val_check_interval", optional(at_least(1)),
     "null (trainer.val_check_interval) or a number of steps >= 1", "250", ("route",)),
    ("router.train.target_accuracy", optional(lambda x: _number(x) and 0 < x <= 1),
     "null (train every step) or an accuracy in (0, 1]", "0.9", ("route",)),
    ("data.train_split", lambda x: x in SPLITS, f"one of {', '.join(SPLITS)}", "train", None),
    ("data.val_split", lambda x: x in SPLITS, f"one of {', '.join(SPLITS)}", "val", None),
    ("data.test_split", lambda x: x in SPLITS, f"one of {', '.join(SPLITS)}", "test", None),
    ("data.max_length", at_least(1), "a number of tokens >= 1", "256", None),
    ("data.max_prompt_tokens", at_least(1), "a number of tokens >= 1", "4096", None),
    ("data.train_limit", optional(at_least(1)), "null (all rows) or a number of rows >= 1", "200", None),
    ("data.val_limit", optional(at_least(1)), "null (all rows) or a number of rows >= 1", "32", None),
    ("data.test_limit", optional(at_least(1)), "null (all rows) or a number of rows >= 1", "16", None),
    ("data.mix_cap_per_task", at_least(1), "a number of rows >= 1", "1000", None),
    ("data.num_workers", at_least(0), ">= 0", "0", None),
    ("generation.batch_size", at_least(1), "a number of prompts per generate call >= 1", "8", None),
    ("generation.max_batch_tokens", optional(at_least(1)),
     "null (no bound) or a number of KV-cache positions per generate call >= 1", "262144", None),
    ("generation.engine", lambda x: x in GENERATION_ENGINES, f"one of {', '.join(GENERATION_ENGINES)}", "auto", None),
    ("generation.group_projections", lambda x: x in (True, False, "auto"), "auto (on CUDA), true or false", "auto",
     None),
    ("generation.max_new_tokens", tokens_or_auto, "a number of tokens >= 1 or auto (from the gold answers)", "16",
     None),
    ("generation.composite_max_new_tokens_per_task", tokens_or_auto,
     "a number of tokens >= 1 or auto (from the gold answers)", "24", None),
    ("generation.answer_quantile", lambda x: _number(x) and 0 < x <= 1, "a quantile in (0, 1]", "0.99", None),
    ("generation.max_new_tokens_cap", optional(at_least(1)), "null (no cap) or a number of tokens >= 1", "256", None),
    ("generation.no_repeat_ngram_size", optional(at_least(1)), "null (off) or an n-gram length >= 1", "30", None),
    ("bench.num_adapters", ints_at_least(1), "a list of adapter counts >= 1", "[1,4]", ("bench",)),
    ("bench.batch_sizes", ints_at_least(1), "a list of batch sizes >= 1", "[1]", ("bench",)),
    ("bench.prompt_lengths", ints_at_least(1), "a list of prompt lengths >= 1", "[64]", ("bench",)),
    ("bench.new_tokens", at_least(2), "a number of tokens >= 2 (decode time is t_N - t_1)", "16", ("bench",)),
    ("bench.warmup", at_least(0), ">= 0", "1", ("bench",)),
    ("bench.repeats", at_least(1), ">= 1", "3", ("bench",)),
    ("bench.max_seconds", optional(positive), "null (no limit) or > 0", "360", ("bench",)),
    ("bench.group_projections", lambda x: x in (True, False, "auto"), "auto (on CUDA), true or false", "auto",
     ("bench",)),
    ("train_speed.compile", lambda x: x in (True, False, "auto"), "auto, true or false", "auto", None),
    ("train_speed.frozen_bf16", lambda x: x in (True, False, "auto"), "auto, true or false", "auto", None),
    ("train_speed.cuda_graph", lambda x: x in (True, False, "auto"), "auto, true or false", "auto", None),
    ("train_speed.graph_bucket", at_least(1), "a number of tokens >= 1", "64", None),
    ("bench.engines", lambda x: len(x) > 0 and all(e in ("eager", "static") for e in x),
     "a list of engines from eager, static", "[eager]", ("bench",)),
]

#: config groups a stage does not read: overriding one on its command line would do nothing, so it is refused
UNREAD_GROUPS = {"finetune": ("router",), "route": ("adapter",), "evaluate": ("adapter",),
                 "bench": ("router", "data", "trainer"), "report": ("adapter", "model", "router", "data", "trainer")}


def _shown(value) -> str:
    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value, resolve=True)
    return repr(value) if isinstance(value, str) else str(value).replace(" ", "")


def _select(cfg, key: str):
    """(present, value) of a dotted key."""
    node, *path = key.split(".")
    if node not in cfg:
        return False, None
    value = cfg[node]
    for part in path:
        if not isinstance(value, DictConfig) or part not in value:
            return False, None
        value = value[part]
    return True, value


def _task_list(cfg, key: str) -> list[str]:
    present, value = _select(cfg, key)
    if not present:
        return []
    if not isinstance(value, (list, ListConfig)):
        raise ValueError(f"{key}={_shown(value)} must be a list of task names; write {key}=[{value}]")  # noqa: TRY004 a user value
    return [get_task(str(t)).name for t in value]  # an unknown name is one line with close matches


def _check_model(cfg) -> None:
    present, model = _select(cfg, "model")
    if not present or cfg.stage in ("report", "reproduce"):
        return
    if cfg.stage == "bench" and "default" not in [str(s) for s in (cfg.get("bench") or {}).get("shapes") or []]:
        return  # every shape is a random-weight model built from its own config: cfg.model is never loaded
    name = model.get("name_or_path") if isinstance(model, DictConfig) else None
    if name is None:
        raise ValueError("model.name_or_path is missing; pass a hub id, an HF model directory or a .gguf file "
                         "(model=smollm2 is the cached SmolLM2-135M-Instruct)")
    check_source(str(name), model.get("gguf_file"))
    dtype = model.get("dtype", "float32")
    if str(dtype) not in DTYPES:
        raise ValueError(f"model.dtype={_shown(dtype)} is not supported; use one of {', '.join(sorted(DTYPES))}")
    device = model.get("device")
    if device is not None and str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"model.device={device} but no CUDA GPU is visible; use model.device=null (the CPU)")


def _check_trainer(cfg) -> None:
    present, accelerator = _select(cfg, "trainer.accelerator")
    if (present and cfg.stage in ("finetune", "route", "evaluate") and str(accelerator) in ("gpu", "cuda")
            and not torch.cuda.is_available()):
        raise ValueError("trainer.accelerator=gpu (trainer=gpu / ddp / fsdp) but no CUDA GPU is visible; use "
                         "trainer=cpu (or trainer=ddp_cpu for two CPU processes)")


def check_settings(cfg) -> None:
    """Refuse a bad value before any model loads: one ValueError line naming the key, the value and the fix."""
    stage = str(cfg.stage)
    for key, rule, what, example, stages in RULES:
        if stages is not None and stage not in stages:
            continue
        present, value = _select(cfg, key)
        if present and not rule(value):
            raise ValueError(f"{key}={_shown(value)} must be {what}; set e.g. {key}={example}")
    tasks = _task_list(cfg, "tasks")
    if cfg.get("composite_n") and cfg.get("composite_tasks") is not None:  # null: MeteoRA's list for n
        _task_list(cfg, "composite_tasks")
    if stage == "finetune" and cfg.task not in (None, "") and str(cfg.task) not in (*tasks, LORA_B, JOINT_TASK):
        get_task(str(cfg.task))
    _check_model(cfg)
    _check_trainer(cfg)


def refuse_unread_overrides(stage: str, overrides) -> None:
    """A command-line override of a config group the stage does not read (``adapter=dlp`` on evaluate) is refused."""
    for o in overrides:
        key = str(o).lstrip("+~").split("=")[0]
        group = key.split(".")[0].split("@")[0]
        if group in UNREAD_GROUPS.get(stage, ()):
            raise ValueError(f"{o}: the {stage} stage does not read `{group}`, so it would change nothing; drop it "
                             f"(the stages that read it: {', '.join(s for s in UNREAD_GROUPS if group not in UNREAD_GROUPS[s])})")


def passed_to(stage: str, overrides) -> list[str]:
    """The overrides a stage reads, of a list given to several stages (reproduce's steps)."""
    return [o for o in overrides if str(o).lstrip("+~").split("=")[0].split(".")[0] not in UNREAD_GROUPS.get(stage, ())]


# ------------------------------------------------------------------------------------------------------ registry
def _selection(name: str) -> list[str]:
    return list(select(str(name)))


def output_root() -> str:
    """$LORAMUX_OUTPUTS, else ``outputs`` (an empty value counts as unset)."""
    return os.environ.get("LORAMUX_OUTPUTS") or "outputs"


def register() -> None:
    """Put the schemas into Hydra's ConfigStore and the resolvers into OmegaConf (idempotent)."""
    cs = ConfigStore.instance()
    for name, node in (("paths", PathsSettings), ("data", DataSettings), ("optim", OptimSettings),
                       ("generation", GenerationSettings), ("checkpoint", CheckpointSettings),
                       ("bench", BenchSettings), ("router_train", RouterTrain), ("train_speed", TrainSpeedSettings)):
        cs.store(group="schema", name=name, node=node)
    cs.store(group="schema", name="router", node={k: getattr(RouterKeys(), k) for k in ROUTER_KEYS})
    for name, fn in (("selection", _selection), ("cache_dir", lambda: str(cache_dir())), ("output_root", output_root)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


register()
