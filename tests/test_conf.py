"""The conf/ tree: every experiment composes with every stage, resolves, and builds its objects; typos fail."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate
from omegaconf import OmegaConf

from models.routing.route import Router
from pipeline.runtime.multilora import strategy_of
from pipeline.stages.reproduce import plan_steps

CONF = Path(__file__).resolve().parent.parent / "conf"
STAGES = ["finetune", "route", "evaluate", "bench", "report", "reproduce"]
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
PAPER_TABLES = {"meteora_tasks", "meteora_composite", "dlp_tasks", "dlp_latency", "head_to_head", "smoke", "demo"}


@pytest.fixture(autouse=True)
def _clean_hydra():
    GlobalHydra.instance().clear()
    yield
    GlobalHydra.instance().clear()


@pytest.fixture
def _compose(compose):
    return lambda stage, overrides=(), tmp_path=None: compose(stage, overrides, tmp_path or "/tmp/loramux-conf-test",
                                                              hydra=True)


def test_every_paper_table_has_an_experiment():
    assert PAPER_TABLES <= set(EXPERIMENTS)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
@pytest.mark.parametrize("stage", STAGES)
def test_experiment_composes_with_stage(stage, experiment, tmp_path, _compose):
    cfg = _compose(stage, [f"experiment={experiment}"], tmp_path)
    assert cfg.stage == stage
    assert cfg.name == experiment, "an experiment names its outputs after its file"
    plain = {k: OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v
             for k, v in cfg.items() if k != "hydra"}  # every interpolation of the job config resolves
    assert plain["paths"]["exp_dir"].endswith(experiment)
    assert cfg.hydra.run.dir.startswith(plain["paths"]["exp_dir"])
    lora = instantiate(cfg.adapter)
    assert lora.r > 0 and lora.lora_alpha > 0 and lora.target_modules
    assert cfg.model._target_ == "models.base.load_base_model"


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_reproduce_plan_steps_compose(experiment, _compose):
    """Every run the reproduce plan would start is a valid config of its stage."""
    reproduce = _compose("reproduce", [f"experiment={experiment}"])
    for s in plan_steps(reproduce):
        if s["stage"] in ("route", "evaluate"):  # a route step's overrides name its router
            _compose(s["stage"], [f"experiment={experiment}", *s["overrides"]])
    finetune = [s["step"] for s in plan_steps(reproduce) if s["stage"] == "finetune"]
    for task in finetune[:1] + [t for t in finetune if t == "lora_b"]:
        _compose("finetune", [f"experiment={experiment}", f"task={task}"])


def test_an_experiment_drops_an_inherited_step_by_setting_it_to_null(_compose):
    """meteora_composite_noeos = meteora_tasks' training plan + meteora_composite's runs, on adapters trained
    without EOS: meteora_tasks' single-task evaluations, set to null, are no steps."""
    cfg = _compose("reproduce", ["experiment=meteora_composite_noeos"])
    steps = [(s["stage"], s["step"]) for s in plan_steps(cfg)]
    assert steps[:3] == [("finetune", "all"), ("finetune", "lora_b"), ("route", "meteora")]
    assert steps[3:] == [("evaluate", f"composite{n}-{s}") for n in (3, 5, 10) for s in ("meteora-top2", "lora_b")]
    tasks = _compose("reproduce", ["experiment=meteora_tasks"])
    assert {s for st, s in [(s["stage"], s["step"]) for s in plan_steps(tasks)] if st == "evaluate"} == set(
        cfg.plan.evaluate)  # every single-task evaluation of meteora_tasks, each dropped
    assert all(v is None for v in cfg.plan.evaluate.values())
    assert cfg.data.append_eos is False and cfg.paths.adapters_dir.endswith("meteora_composite_noeos/adapters")
    assert cfg.trainer.max_steps == tasks.trainer.max_steps and cfg.router.train.steps == tasks.router.train.steps
    assert cfg.composite_rows == 200 and cfg.paper_table_file == "meteora_composite_noeos"


def test_the_answers_gate_ce_survives_a_cap_on_the_gates_time(_compose):
    """meteora_tasks_gate_ce_answers' one change (the gates' CE on the answers alone) is set where an override of
    the route step's list (the offline README's cap on the gates' time) cannot remove it, and reaches the composed
    route step; its plan trains nothing but the gates and drops the evaluations that read no gate."""
    cap = 'plan.route.meteora=["checkpoint.every_n_steps=1000","+trainer.max_time=00:00:05:00"]'
    for extra in ([], [cap]):
        cfg = _compose("reproduce", ["experiment=meteora_tasks_gate_ce_answers", *extra])
        steps = {(s["stage"], s["step"]): s for s in plan_steps(cfg)}
        assert sorted(steps) == [("evaluate", "meteora-top1"), ("evaluate", "meteora-top2"), ("evaluate", "oracle"),
                                 ("route", "meteora")]
        route = _compose("route", ["experiment=meteora_tasks_gate_ce_answers", *extra,
                                   *steps[("route", "meteora")]["overrides"]])
        assert route.router.train.gate_ce_on_prompt is False and route.router.train.target_accuracy is None
        assert route.paths.adapters_dir.endswith("meteora_tasks/adapters")
    assert route.trainer.max_time == "00:00:05:00"
    assert _compose("route", ["experiment=meteora_tasks"]).router.train.gate_ce_on_prompt is True


def test_adapter_defaults_match_the_papers(_compose):
    m = _compose("finetune", ["adapter=meteora"]).adapter
    assert (m.r, m.lora_alpha, m.lora_dropout) == (8, 16, 0.0)
    assert set(m.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    d = _compose("finetune", ["adapter=dlp"]).adapter
    assert (d.r, d.lora_alpha, d.lora_dropout, set(d.target_modules)) == (8, 16, 0.1, {"q_proj", "v_proj"})


@pytest.mark.parametrize("router", sorted(p.stem for p in (CONF / "router").glob("*.yaml")))
def test_router_configs_compose(router, _compose):
    """conf/router/<name>.yaml builds, by _target_, the strategy registered as <name>; a set label is a string."""
    cfg = _compose("evaluate", [f"router={router}"])
    strategy = strategy_of(cfg.router)
    assert strategy.name == router and issubclass(strategy.router_class, Router)
    label = OmegaConf.to_container(cfg.router, resolve=True)["label"]
    assert label is None or isinstance(label, str)


def test_strict_mode_rejects_a_typo(_compose):
    with pytest.raises(ConfigCompositionException, match="optim.lrr"):
        _compose("finetune", ["optim.lrr=1e-3"])
    with pytest.raises(ConfigCompositionException, match="nosuch"):
        _compose("finetune", ["experiment=nosuch"])


@pytest.mark.parametrize("trainer", ["cpu", "gpu", "ddp"], ids=lambda t: f"trainer_{t}")
def test_trainer_configs(trainer, _compose):
    cfg = _compose("finetune", [f"trainer={trainer}"])
    assert cfg.trainer._target_ == "lightning.Trainer"
    if trainer == "cpu":
        t = instantiate(cfg.trainer, logger=False, enable_progress_bar=False)
        assert t.max_steps == cfg.trainer.max_steps


@pytest.mark.parametrize("logger", ["csv", "none"])
def test_logger_configs_build_trackers(logger, tmp_path, _compose):
    cfg = _compose("finetune", [f"logger={logger}"], tmp_path)
    tracker = instantiate(cfg.logger)
    tracker.log_metrics({"x": 1.0})
    tracker.log_table("t", ["a"], [[1]])
    tracker.finish()
    assert tracker.name == logger


def test_cache_dir_follows_env(monkeypatch, _compose):
    monkeypatch.setenv("LORAMUX_CACHE", "/somewhere/cache")
    cfg = _compose("finetune", ["model=tiny"])
    assert OmegaConf.to_container(cfg.model, resolve=True)["name_or_path"] == "/somewhere/cache/models/tiny-random-llama"


def test_sweep_dirs_are_unique_to_the_microsecond(_compose):
    cfg = _compose("finetune")
    assert "%f" in OmegaConf.to_container(cfg.hydra, resolve=False)["sweep"]["dir"]


def test_launchers_and_search_compose(_compose):
    for launcher in sorted(p.stem for p in (CONF / "launcher").glob("*.yaml")):
        _compose("finetune", [f"launcher={launcher}"])
    cfg = _compose("finetune", ["hparams_search=adapter_optuna", "task=winowhy"])
    assert cfg.hydra.sweeper.direction == "minimize"
