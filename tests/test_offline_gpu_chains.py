"""The offline-GPU chains (scripts/offline_gpu/chains/*.sh) parse, and ``beside.sh`` staggers its experiments: each
starts only once the previous one's fine-tuning has finished (two joint fine-tunings of 28 adapters side by side ran
out of an H200's memory). The chain runs as written under bash; only its ``reproduce`` step (a GPU run) is replaced
by one that writes the run dirs the way ``pipeline.reproduce`` does, with times."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

CHAINS = Path(__file__).resolve().parents[1] / "scripts" / "offline_gpu" / "chains"


@pytest.mark.parametrize("chain", sorted(p.name for p in CHAINS.glob("*.sh")))
def test_each_chain_parses(chain):
    subprocess.run(["bash", "-n", str(CHAINS / chain)], check=True)


def test_beside_starts_the_next_experiment_once_the_previous_one_has_fine_tuned(tmp_path):
    chains = tmp_path / "scripts" / "offline_gpu" / "chains"
    chains.mkdir(parents=True)
    shutil.copy(CHAINS / "beside.sh", chains / "beside.sh")
    root = tmp_path / "lmx"
    (chains / "common.sh").write_text(f"""
reproduce() {{  # the finetune steps' run dirs appear at once; all/ finishes, then lora_b/, then the rest
  local d={root}/$1/finetune; echo "$1 start $(date +%s.%N)" >> {tmp_path}/times
  mkdir -p $d/all $d/lora_b; sleep 1; touch $d/all/metrics.json; sleep 2; touch $d/lora_b/metrics.json
  echo "$1 finetuned $(date +%s.%N)" >> {tmp_path}/times; sleep 3; echo "$1 end $(date +%s.%N)" >> {tmp_path}/times
}}
""")
    beside = (chains / "beside.sh").read_text().replace("sleep 10", "sleep 0.2")
    (chains / "beside.sh").write_text(beside)
    out = subprocess.run(["bash", "scripts/offline_gpu/chains/beside.sh", "A", "B", "C"], cwd=tmp_path, check=True,
                         capture_output=True, text=True, timeout=120, env={"LMX_ROOT": str(root), "PATH": "/usr/bin:/bin"})
    assert out.stdout.strip().splitlines()[-1] == "DONE"
    t = {tuple(line.split()[:2]): float(line.split()[2]) for line in (tmp_path / "times").read_text().splitlines()}
    assert t[("B", "start")] >= t[("A", "finetuned")] and t[("C", "start")] >= t[("B", "finetuned")]
    assert t[("B", "start")] < t[("A", "end")]  # side by side after the fine-tuning: not one after the other


def _composed_steps(tmp_path, *names, env: dict | None = None, check: bool = True):
    """Run bench_steps.sh's step functions with ``step`` replaced by one that records the step's command line; then
    compose each recorded ``python3 -m pipeline.<stage> <overrides>`` here, as that stage's ``--cfg job`` prints it
    (``pipeline.runtime.compose``: the same composition, without a Python process per step), into ``<step>.yaml``:
    a typo in an override fails here, not on the GPU. A step that runs anything but a pipeline stage fails too."""
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    from pipeline.runtime.compose import compose

    chains = tmp_path / "scripts" / "offline_gpu" / "chains"
    chains.mkdir(parents=True)
    shutil.copy(CHAINS / "bench_steps.sh", chains / "bench_steps.sh")
    (chains / "common.sh").write_text(f"""
step() {{ local n=$1; shift; [ "$1" = timeout ] && shift 2; [ "$1" = env ] && {{ shift; while [[ $1 == *=* ]]; do shift; done; }}
         printf '%s\\0' "${{@:2}}" > {tmp_path}/$n.args; }}
""")
    (tmp_path / "outputs" / "tables").mkdir(parents=True)
    (tmp_path / "outputs" / "tables" / "e2e_decode.json").write_text("{}")
    script = "source scripts/offline_gpu/chains/bench_steps.sh; " + "; ".join(names)
    env = {"LMX_ROOT": str(tmp_path / "lmx"), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", **(env or {})}
    done = subprocess.run(["bash", "-euc", script], cwd=tmp_path, check=check, timeout=300, env=env,
                          capture_output=not check, text=True)
    assert (tmp_path / "lmx" / "tables" / "e2e_decode.json").is_file()  # the e2e steps' merge base
    if done.returncode == 0:
        for args_file in sorted(tmp_path.glob("*.args")):
            args = args_file.read_text().split("\0")[:-1]
            assert args[:1] == ["-m"] and args[1].startswith("pipeline."), f"{args_file.stem}: not a stage: {args}"
            GlobalHydra.instance().clear()
            cfg = compose(args[1].removeprefix("pipeline."), args[2:])
            args_file.with_suffix(".yaml").write_text(OmegaConf.to_yaml(cfg))
        GlobalHydra.instance().clear()
    return done


def test_e2e_steps_refuse_comma_separated_targets(tmp_path):
    """E2E_TARGETS="all7,qv" would be one call named after both: refused in one line that names the fix, exit 2,
    before any bench call is composed."""
    for step in ("e2e", "e2e_eager"):
        done = _composed_steps(tmp_path / step, step, env={"E2E_TARGETS": "all7,qv"}, check=False)
        assert done.returncode == 2 and 'separate targets by spaces (E2E_TARGETS="all7 qv")' in done.stderr
        assert not list((tmp_path / step).glob("*.yaml"))


def test_dlp_latency_step_takes_its_overrides_from_the_environment(tmp_path):
    """DLP_LATENCY_ARGS reaches the step's reproduce call, one override per word (a shorter budget where less device
    time is left)."""
    from omegaconf import OmegaConf

    _composed_steps(tmp_path, "dlp_latency", env={"DLP_LATENCY_ARGS": "bench.max_seconds=300 bench.repeats=5"})
    lat = OmegaConf.load(tmp_path / "dlp_latency.yaml")
    assert (lat.bench.max_seconds, lat.bench.repeats, lat.name) == (300, 5, "dlp_latency")


def test_bench_steps_compose_and_train_decides_every_target_in_one_run(tmp_path):
    from omegaconf import OmegaConf

    from pipeline.stages import train_throughput as tt

    _composed_steps(tmp_path, "train", "train_gates_compiled", "train_precision", "train_compiled_graph", "e2e",
                    "e2e_eager", "train_profile", "train_packed", "train_fused", "train_autotune", "e2e_profile",
                    "dlp_latency")
    train = OmegaConf.load(tmp_path / "train.yaml").bench.train
    settings = tt.settings_from(train)
    # every variant a target names at 16 and 64, eager and compiled layers, each captured as one step; the gates also
    # at 256 (the packed gates' variants are forms of the gates, timed by their own step, train_packed)
    targeted = ("peft_single", "loramux_single", "loramux_joint", "loramux_gates")
    assert set(targeted) < set(tt.VARIANTS)
    for v in targeted:
        for b in (16, 64):
            assert {(s.compiled, s.graph) for s in settings if s.variant == v and s.batch_size == b} == {
                (False, True), (True, True)}
    assert {s.variant for s in settings if s.batch_size == 256} == {"loramux_gates"}
    gates = tt.settings_from(OmegaConf.load(tmp_path / "train_gates_compiled.yaml").bench.train)
    assert [(s.variant, s.compiled, s.graph, s.batch_size) for s in gates] == [("loramux_gates", True, False, 256)]
    both = tt.settings_from(OmegaConf.load(tmp_path / "train_compiled_graph.yaml").bench.train)
    assert {(s.compiled, s.graph) for s in both} == {(False, True), (True, True)}  # eager or compiled, captured
    prec = tt.settings_from(OmegaConf.load(tmp_path / "train_precision.yaml").bench.train)
    assert {(s.variant, s.precision) for s in prec} == {(v, p) for v in targeted for p in ("bf16", "fp32")}
    assert {(s.compiled, s.graph, s.batch_size) for s in prec} == {(False, True, 64)}
    prof = OmegaConf.load(tmp_path / "train_profile.yaml").bench.train
    assert set(prof.profile) == {s.label for s in tt.settings_from(prof)}  # every setting it times is profiled
    for b in (1, 8):
        e2e = OmegaConf.load(tmp_path / f"e2e_all7_b{b}.yaml").bench.e2e
        assert list(e2e.batch_sizes) == [b] and e2e.merge and list(e2e.engines) == ["graph"]
        assert list(e2e.targets) == ["all7"] and e2e.keep_graph  # the kept graphs unless E2E_KEEP=false
    for b in (1, 8):  # the eager target at both batches too
        eager = OmegaConf.load(tmp_path / f"e2e_eager_all7_b{b}.yaml").bench.e2e
        assert list(eager.engines) == ["eager"] and list(eager.batch_sizes) == [b] and eager.merge
    prof = OmegaConf.load(tmp_path / "e2e_profile.yaml").bench
    assert set(prof.e2e.profile_calls) == set(prof.e2e.strategies) and prof.table_dir.endswith("e2e_profile")
    packed = tt.settings_from(OmegaConf.load(tmp_path / "train_packed.yaml").bench.train)
    assert {s.variant for s in packed} == {"loramux_gates_packed", "loramux_gates_packed_lora", "loramux_gates",
                                           "peft_single", "loramux_single"}
    assert {(s.compiled, s.graph, s.batch_size) for s in packed} == {(True, True, 64)}
    fused = tt.settings_from(OmegaConf.load(tmp_path / "train_fused.yaml").bench.train)
    assert {s.variant for s in fused} == {"loramux_gates_unfused", "loramux_gates", "loramux_gates_packed_lora",
                                          "peft_single", "loramux_single"}
    assert {(s.compiled, s.graph, s.batch_size) for s in fused} == {(True, True, 64)}
    tuned = tt.settings_from(OmegaConf.load(tmp_path / "train_autotune.yaml").bench.train)
    assert {(s.compile_mode, s.graph) for s in tuned} == {(None, True), ("max-autotune-no-cudagraphs", True)}
    lat = OmegaConf.load(tmp_path / "dlp_latency.yaml")  # a node with the packages only: no shape reads an asset
    from pipeline.stages.bench import SHAPES

    assert lat.name == "dlp_latency" and lat.bench.shapes[0] == "llama3_8b"
    assert all(s in SHAPES for s in lat.bench.shapes) and lat.plan.bench and not lat.plan.finetune


def test_dry_run_runs_an_experiments_plan_on_the_tiny_model(tmp_path):
    """scripts/offline_gpu/dry_run.sh: an experiment's whole reproduce plan on the CPU (here dlp_latency's bench step,
    on the SmolLM2 shape's 2-layer stand-in) into DRY_ROOT, its table written; no experiment named: exit 2."""
    import os
    import sys

    script = CHAINS.parent / "dry_run.sh"
    env = {**os.environ, "DRY_ROOT": str(tmp_path), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    run = subprocess.run(["bash", str(script), "dlp_latency", "bench.shapes=[smollm2_135m_tiny]",
                          "bench.num_adapters=[1]", "bench.repeats=1", "bench.new_tokens=3"],
                         cwd=CHAINS.parents[2], env=env, capture_output=True, text=True, timeout=600, check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    assert (tmp_path / "tables" / "dlp_latency.md").is_file()
    bad = subprocess.run(["bash", str(script)], cwd=CHAINS.parents[2], env=env, capture_output=True, text=True,
                         check=False)
    assert bad.returncode == 2 and "name the experiment" in bad.stderr


def test_reproduce_gives_then_experiments_one_override_as_one_argument(tmp_path):
    """reproduce.sh: the first experiment with its own overrides, then each of $THEN with $THEN_ARG (one override,
    spaces and quotes kept) where it is set, with nothing where it is not."""
    chains = tmp_path / "scripts" / "offline_gpu" / "chains"
    chains.mkdir(parents=True)
    shutil.copy(CHAINS / "reproduce.sh", chains / "reproduce.sh")
    (chains / "common.sh").write_text(f"""
reproduce() {{ printf '%s|' "$@" >> {tmp_path}/calls; echo >> {tmp_path}/calls; }}
""")
    cap = 'plan.route.meteora=["checkpoint.every_n_steps=1000", "+trainer.max_time=00:00:05:00"]'
    for env, want in (({"THEN": "B C", "THEN_ARG": cap}, [f"B|{cap}|", f"C|{cap}|"]), ({"THEN": "B"}, ["B|"])):
        (tmp_path / "calls").unlink(missing_ok=True)
        out = subprocess.run(["bash", "scripts/offline_gpu/chains/reproduce.sh", "A", "x=1"], cwd=tmp_path, check=True,
                             capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin", **env})
        assert out.stdout.strip() == "DONE"
        assert (tmp_path / "calls").read_text().splitlines() == ["A|x=1|", *want]
