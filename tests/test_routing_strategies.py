"""A routing strategy is one Python file + one YAML: a toy strategy, written here into a temp dir (nothing in the
repo knows it), runs through the evaluate stage by its conf/router/<name>.yaml alone."""

from __future__ import annotations

import json
import sys
import textwrap

import pytest
from needs_assets import needs_task_files, needs_tiny_model

from data.assets import cache_dir
from models.tiny import save_random_peft_adapter
from pipeline.stages.evaluate import evaluate

pytestmark = [needs_tiny_model, needs_task_files]
TASKS = ("object_counting", "winowhy")

STRATEGY = '''
"""A toy strategy: every sequence takes the bank's last adapter, at weight ``weight``."""
import torch

from models.routing.route import SequenceRouter


class LastAdapterRouter(SequenceRouter):
    name = "last_adapter"

    def __init__(self, ctx, weight: float = 1.0):
        super().__init__(ctx)
        self.weight = float(weight)

    def config(self):
        return {"weight": self.weight}

    @property
    def label(self):
        return f"last-adapter-w{self.weight:g}"

    def decide(self, input_ids, attention_mask, inputs_embeds):
        ids = torch.full((input_ids.shape[0], 1), len(self.ctx.bank) - 1, dtype=torch.long, device=input_ids.device)
        return ids, torch.full(ids.shape, self.weight, device=input_ids.device)
'''

CONFIG = """
# The toy strategy: conf/router/last_adapter.yaml in a search path of its own.
defaults:
  - /schema/router@_here_
  - _self_

_target_: toy_strategy.LastAdapterRouter
_partial_: true
weight: 0.5
"""


@pytest.fixture
def toy(tmp_path, monkeypatch):
    """(search path holding router/last_adapter.yaml, outputs root with the smoke experiment's two adapters)."""
    (tmp_path / "code").mkdir()
    (tmp_path / "code" / "toy_strategy.py").write_text(textwrap.dedent(STRATEGY))
    (tmp_path / "conf" / "router").mkdir(parents=True)
    (tmp_path / "conf" / "router" / "last_adapter.yaml").write_text(CONFIG)
    monkeypatch.syspath_prepend(str(tmp_path / "code"))
    outputs = tmp_path / "outputs"
    for i, task in enumerate(TASKS):
        save_random_peft_adapter(cache_dir() / "models" / "tiny-random-llama", outputs / "smoke" / "adapters" / task,
                                 seed=i + 1)
    yield tmp_path / "conf", outputs
    sys.modules.pop("toy_strategy", None)


def test_a_strategy_added_by_one_yaml_and_one_python_file_runs_through_evaluate(toy, compose, tmp_path):
    search, outputs = toy
    run = tmp_path / "run"
    cfg = compose("evaluate", ["experiment=smoke", "router=last_adapter", f"hydra.searchpath=[file://{search}]",
                               f"paths.output_root={outputs}", "logger=none", "print_config=false",
                               "data.test_limit=2"], run_dir=run)
    evaluate(cfg)
    record = json.loads((run / "metrics.json").read_text())
    assert record["strategy"] == "last-adapter-w0.5" and record["router"] == "last_adapter"
    assert record["tasks"] == list(TASKS) and record["metrics"]["main"] is not None
    lines = [json.loads(x) for x in (run / "predictions.jsonl").read_text().splitlines()]
    assert len(lines) == 2 * len(TASKS)
    assert all(x["route"] == {"ids": [1], "weights": [0.5]} for x in lines)  # every prompt: the last adapter, w 0.5
