"""AdapterBank validation (bad or foreign PEFT adapters, one clear line each), hot swap, and base-model loading."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from peft import IA3Config, PeftModel, get_peft_model

from models import AdapterBank, AdapterError, MultiLoRAModel, load_base_model
from models.tiny import save_random_peft_adapter, save_test_assets, save_tiny_gguf, save_tiny_llama


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return save_test_assets(tmp_path_factory.mktemp("bank"))


def _copy(src, dst):
    shutil.copytree(src, dst)
    return Path(dst)


def _edit_config(d, **changes):
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg.update(changes)
    (d / "adapter_config.json").write_text(json.dumps(cfg))


def _error(base, adapter_dir, **kw) -> str:
    model, _ = load_base_model(base)
    with pytest.raises(AdapterError) as e:
        AdapterBank.from_peft_dirs(model, {"x": str(adapter_dir)}, **kw)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"adapter {adapter_dir}: ")
    return msg


def test_missing_and_unreadable(assets, tmp_path):
    base, dirs = assets
    assert "path: is not a directory" in _error(base, tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "adapter_config.json: missing" in _error(base, empty)
    d = _copy(dirs["a"], tmp_path / "badjson")
    (d / "adapter_config.json").write_text("{not json")
    assert "adapter_config.json: is not valid JSON" in _error(base, d)
    d = _copy(dirs["a"], tmp_path / "noweights")
    (d / "adapter_model.safetensors").unlink()
    assert "adapter_model.safetensors: missing" in _error(base, d)


def test_foreign_adapters_rejected(assets, tmp_path):
    base, _ = assets
    model, _ = load_base_model(base)
    ia3 = get_peft_model(model, IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]))
    ia3.save_pretrained(tmp_path / "ia3")
    assert "peft_type: is 'IA3', not 'LORA'" in _error(base, tmp_path / "ia3")
    dora = save_random_peft_adapter(base, tmp_path / "dora", use_dora=True)
    assert "use_dora: is true" in _error(base, dora)
    mts = save_random_peft_adapter(base, tmp_path / "mts", modules_to_save=["lm_head"])
    assert "modules_to_save: tensor 'base_model.model.lm_head" in _error(base, mts)
    for targets, name in ((("q_proj", "embed_tokens"), "embed_tokens"), (("embed_tokens",), "embed_tokens"),
                          (("v_proj", "lm_head"), "lm_head")):
        emb = save_random_peft_adapter(base, tmp_path / "_".join(targets), targets=targets)
        msg = _error(base, emb)
        assert f"target_modules: includes {name!r}: peft saved tensor " in msg, msg
        assert "without embed_tokens / lm_head in target_modules" in msg


def _poisoned_copy(src, dst, key_part: str, value: float) -> Path:
    """A copy of a PEFT adapter dir with one element of the first tensor whose name contains ``key_part`` set."""
    from safetensors.torch import load_file, save_file

    d = _copy(src, dst)
    tensors = load_file(d / "adapter_model.safetensors")
    key = next(k for k in sorted(tensors) if key_part in k)
    tensors[key][1, 2] = value
    save_file(tensors, d / "adapter_model.safetensors", metadata={"format": "pt"})
    return d, key


def _bank_state(bank):
    return (list(bank.names), list(bank.paths), bank.version,
            {k: [t.clone() for t in bank.tensors(m)] for k, m in zip(bank.slots, bank.modules_wrapped)})


def _assert_unchanged(bank, state):
    names, paths, version, tensors = state
    assert bank.names == names and bank.paths == paths and bank.version == version
    for k, m in zip(bank.slots, bank.modules_wrapped):
        for got, want in zip(bank.tensors(m), tensors[k]):
            assert torch.equal(got, want), f"{m} changed"


def test_non_finite_adapters_refused_and_the_bank_left_unchanged(assets, tmp_path):
    """A NaN / Inf weight (or lora_alpha) is one line naming the dir and the tensor; a refused add or replace leaves
    names, paths, version and every stacked tensor as they were."""
    base, dirs = assets
    model, _ = load_base_model(base)
    bank = AdapterBank.from_peft_dirs(model, {"a": str(dirs["a"]), "b": str(dirs["b"])})
    state = _bank_state(bank)
    nan_b, key = _poisoned_copy(dirs["c"], tmp_path / "nan_b", "lora_B", float("nan"))
    inf_a, key_a = _poisoned_copy(dirs["a"], tmp_path / "inf_a", "lora_A", float("-inf"))
    for call, d, k in ((lambda d: bank.add("c", d), nan_b, key), (lambda d: bank.replace("a", d), inf_a, key_a),
                       (lambda d: bank.replace("b", d), nan_b, key)):
        with pytest.raises(AdapterError) as e:
            call(d)
        msg = str(e.value)
        assert "\n" not in msg and msg.startswith(f"adapter {d}: adapter_model.safetensors: tensor {k!r} holds 1 ")
        assert "non-finite" in msg
        _assert_unchanged(bank, state)
    bad_alpha = _copy(dirs["c"], tmp_path / "bad_alpha")
    (bad_alpha / "adapter_config.json").write_text(
        (bad_alpha / "adapter_config.json").read_text().replace('"lora_alpha": 32', '"lora_alpha": NaN'))
    with pytest.raises(AdapterError, match=r"lora_alpha: is nan for model\.layers\.0\.self_attn\.q_proj"):
        bank.add("c", bad_alpha)
    _assert_unchanged(bank, state)
    assert "non-finite" in _error(base, nan_b)  # from_peft_dirs too
    bank.add("c", dirs["c"])  # the bank still takes good adapters
    assert bank.names == ["a", "b", "c"]


def test_weights_that_overflow_the_bank_dtype_are_refused_part_way_without_a_trace(assets, tmp_path):
    """Finite on disk, Inf once cast to a float16 bank: found while the new stacked tensors are built (after some
    projections are done), and the bank keeps its old tensors."""
    from safetensors.torch import load_file, save_file

    base, dirs = assets
    model, _ = load_base_model(base, dtype="float16")
    bank = AdapterBank.from_peft_dirs(model, {"a": str(dirs["a"])})
    state = _bank_state(bank)
    big = _copy(dirs["a"], tmp_path / "big")
    tensors = load_file(big / "adapter_model.safetensors")
    key = "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"  # one of the last projections
    tensors[key][0, 0] = 1e6
    save_file(tensors, big / "adapter_model.safetensors", metadata={"format": "pt"})
    with pytest.raises(AdapterError, match=r"tensor model\.layers\.1\.mlp\.down_proj\.lora_B\.weight overflows "
                                           r"the bank's dtype torch\.float16"):
        bank.replace("a", big)
    _assert_unchanged(bank, state)


def test_wrong_base_model_rejected(assets, tmp_path):
    base, _dirs = assets
    other = save_tiny_llama(tmp_path / "narrow", hidden_size=32, intermediate_size=64)
    narrow = save_random_peft_adapter(other, tmp_path / "narrow_lora")
    assert "base_model_name_or_path: is " in _error(base, narrow)
    msg = _error(base, narrow, check_base_name=False)
    assert "shape: model.layers.0.self_attn.q_proj: lora_A [8, 32]" in msg and "other hidden sizes" in msg
    deep = save_tiny_llama(tmp_path / "deep", num_hidden_layers=3)
    deep_lora = save_random_peft_adapter(deep, tmp_path / "deep_lora")
    assert "target_modules: module 'model.layers.2.self_attn.q_proj' is not a linear layer" in _error(
        base, deep_lora, check_base_name=False)


def test_config_weight_disagreement_and_unwrapped_targets(assets, tmp_path):
    base, dirs = assets
    d = _copy(dirs["a"], tmp_path / "r16")
    _edit_config(d, r=16)
    assert "r: is 16 in adapter_config.json but model.layers.0.self_attn.q_proj.lora_A has rank 8" in _error(base, d)
    msg = _error(base, dirs["b"], targets=["q_proj"])
    assert "target_modules: module 'model.layers.0.self_attn.v_proj' (v_proj) is not wrapped" in msg
    assert "add 'v_proj' to targets=" in msg
    model, _ = load_base_model(base)
    with pytest.raises(ValueError, match="appear twice"):
        AdapterBank.from_peft_dirs(model, [str(dirs["a"]), str(dirs["a"])])
    with pytest.raises(ValueError, match="match no nn.Linear"):
        AdapterBank(model, ["qkv"])


def test_alpha_pattern_and_rank_pattern(assets, tmp_path):
    base, _ = assets
    d = save_random_peft_adapter(base, tmp_path / "pat", r=4, lora_alpha=8, targets=("q_proj", "v_proj"),
                                 rank_pattern={"v_proj": 12}, alpha_pattern={"v_proj": 6})
    model, tok = load_base_model(base)
    mm = MultiLoRAModel.from_adapters(model, {"p": str(d)}, router="lora_b")
    _, _, s, r = mm.bank.tensors("model.layers.1.self_attn.v_proj")
    assert r.tolist() == [12] and s.tolist() == pytest.approx([6 / 12])
    assert mm.bank.tensors("model.layers.1.self_attn.q_proj")[2].tolist() == pytest.approx([2.0])
    batch = tok(["pattern test"], return_tensors="pt")
    ref = PeftModel.from_pretrained(load_base_model(base)[0], str(d)).eval()
    with torch.no_grad():
        torch.testing.assert_close(mm(**batch).logits, ref(**batch).logits, atol=1e-5, rtol=0)


@torch.no_grad()
def test_hot_swap_add_replace_remove(assets, tmp_path):
    base, dirs = assets
    model, tok = load_base_model(base)
    mm = MultiLoRAModel.from_adapters(model, {"a": str(dirs["a"]), "b": str(dirs["b"])}, router="oracle")
    layers = [m for m in mm.model.modules() if type(m).__name__ == "MultiLoRALinear"]
    batch = tok(["swap me in", "and out"], return_tensors="pt", padding=True)

    def peft_logits(adapter_dir):
        return PeftModel.from_pretrained(load_base_model(base)[0], str(adapter_dir)).eval()(**batch).logits

    mm.set_router("meteora", top_k=1)
    gate = mm.router.gates["model__layers__0__self_attn__q_proj"]
    rows_ab = gate.weight.clone()
    mm.add_adapter("c", dirs["c"])
    assert mm.adapter_names == ["a", "b", "c"]
    assert torch.equal(mm.router.gates["model__layers__0__self_attn__q_proj"].weight[:2], rows_ab)
    # the new gates keep their slots in the per-projection hit counts (gate_hits_by_projection)
    assert [int(g.projection_index) for g in mm.router.gates.values()] == list(range(len(mm.router.gates)))
    mm.set_router("oracle")
    torch.testing.assert_close(mm(**batch, task_ids=["c", "c"]).logits, peft_logits(dirs["c"]), atol=1e-5, rtol=0)
    big = save_random_peft_adapter(base, tmp_path / "big", r=20, lora_alpha=20, seed=9)
    mm.replace_adapter("a", big)  # slot 'a' now holds 'big'; rank 20 re-pads the bank to R = 32
    assert mm.bank.tensors("model.layers.0.self_attn.q_proj")[0].shape[2] == 32
    torch.testing.assert_close(mm(**batch, task_ids=["a", "a"]).logits, peft_logits(big), atol=1e-5, rtol=0)
    torch.testing.assert_close(mm(**batch, task_ids=["b", "b"]).logits, peft_logits(dirs["b"]), atol=1e-5, rtol=0)
    mm.remove_adapter("b")
    assert mm.adapter_names == ["a", "c"] and len(mm.bank) == 2
    torch.testing.assert_close(mm(**batch, task_ids=["c", "c"]).logits, peft_logits(dirs["c"]), atol=1e-5, rtol=0)
    assert layers == [m for m in mm.model.modules() if type(m).__name__ == "MultiLoRALinear"]  # never rebuilt
    with pytest.raises(AdapterError, match="already in the bank"):
        mm.add_adapter("c", dirs["c"])
    with pytest.raises(KeyError, match="'b' is not in the bank"):
        mm.remove_adapter("b")


def test_unwrap_restores_plain_model(assets):
    base, dirs = assets
    model, tok = load_base_model(base)
    batch = tok(["plain"], return_tensors="pt")
    with torch.no_grad():
        before = model(**batch).logits
        mm = MultiLoRAModel.from_adapters(model, [str(dirs["a"])], router="lora_b")
        assert mm.adapter_names == ["a"]
        plain = mm.unwrap()
        assert not any(type(m).__name__ == "MultiLoRALinear" for m in plain.modules())
        torch.testing.assert_close(plain(**batch).logits, before)


def test_load_base_model_local_dir_and_errors(assets, tmp_path):
    base, _ = assets
    model, tok = load_base_model(base)
    assert tok.pad_token is not None and tok.padding_side == "left"
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    with pytest.raises(FileNotFoundError, match="does not exist; build the cached models with"):
        load_base_model(tmp_path / "missing-model")
    with pytest.raises(FileNotFoundError, match="GGUF file .* does not exist"):
        load_base_model(base, gguf_file="nope.gguf")
    (tmp_path / "empty").mkdir()
    with pytest.raises(OSError, match="cannot load base model .*no config.json in it"):
        load_base_model(tmp_path / "empty")
    with pytest.raises(ValueError, match="dtype='int4' is not supported"):
        load_base_model(base, dtype="int4")


def test_load_gguf_file_equals_hf_weights(assets, tmp_path):
    """A GGUF written from the same seed loads (file path or dir + gguf_file) to the same logits as the HF dir."""
    base, dirs = assets
    f = save_tiny_gguf(tmp_path / "gguf" / "tiny.gguf")
    ref, tok = load_base_model(base)
    batch = tok(["[INST] gguf? [/INST]", "hi"], return_tensors="pt", padding=True)
    for model, gtok in (load_base_model(f), load_base_model(f.parent, gguf_file=f.name)):
        assert gtok.padding_side == "left" and gtok.pad_token is not None
        assert getattr(model, "hf_quantizer", None) is None and not hasattr(model.config, "quantization_config")
        assert torch.equal(gtok(["[INST] gguf? [/INST]", "hi"], return_tensors="pt", padding=True)["input_ids"],
                           batch["input_ids"])
        with torch.no_grad():
            torch.testing.assert_close(model(**batch).logits, ref(**batch).logits, atol=1e-5, rtol=0)
    model.save_pretrained(tmp_path / "from_gguf")  # a dequantised GGUF model saves as a plain HF dir
    mm = MultiLoRAModel.from_adapters(model, {"a": str(dirs["a"])}, router="lora_b", check_base_name=False)
    with torch.no_grad():
        assert mm(**batch).logits.shape == ref(**batch).logits.shape


CACHE = Path(os.environ.get("LORAMUX_CACHE", Path.home() / ".cache" / "loramux"))


@pytest.mark.slow
def test_real_smollm2_oracle_equals_peft(tmp_path):
    """SmolLM2-135M (fp32, logits up to ~30) with a realistically scaled adapter on all 7 projections (peft's own
    init for lora_A, lora_B drawn at the scale a few hundred training steps give). The tiny model's 1e-5 holds
    relative to the logits' scale, not absolutely: the oracle differs from peft's unmerged forward by fp32
    rounding, as peft's merged forward does, and is about as far from a float64 forward as peft itself."""
    real = CACHE / "models" / "SmolLM2-135M-Instruct"
    if not (real / "config.json").is_file():
        pytest.skip(f"{real} not built yet (python -m data.fetch --model)")
    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    d = save_random_peft_adapter(real, tmp_path / "real", r=8, lora_alpha=16, b_std=0.02, targets=targets)
    model, tok = load_base_model(real)
    assert tok.padding_side == "left" and tok.pad_token is not None
    mm = MultiLoRAModel.from_adapters(model, {"t": str(d)}, router="oracle", tokenizer=tok)
    batch = tok(["[INST] Which choice is correct? [/INST]\n", "hi"], return_tensors="pt", padding=True)
    real_tokens = batch["attention_mask"].bool()
    with torch.no_grad():
        ours = mm(**batch, task_ids=["t", "t"]).logits[real_tokens].double()
        ref = PeftModel.from_pretrained(load_base_model(real)[0], str(d)).eval()
        peft = ref(**batch).logits[real_tokens].double()
        exact = PeftModel.from_pretrained(load_base_model(real, dtype="float64")[0], str(d)).eval()(**batch)
        exact = exact.logits[real_tokens]
        merged = ref.merge_and_unload()(**batch).logits[real_tokens].double()
    scale = exact.abs().max()

    def gap(a, b):
        return (a - b).abs().max()

    assert gap(ours, peft) <= 1e-5 * scale, f"oracle vs peft {gap(ours, peft):.2e} (logits up to {scale:.1f})"
    assert gap(ours, exact) <= 2 * gap(peft, exact), f"oracle {gap(ours, exact):.2e} from float64, peft {gap(peft, exact):.2e}"
    assert gap(merged, peft) > 1e-5, "peft's own merged and unmerged forwards should differ by fp32 rounding too"
