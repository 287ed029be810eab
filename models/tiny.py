"""A tiny random LLaMA (2 layers, hidden 64) with a byte-level tokenizer, written as a normal HF directory.

For unit tests and smoke runs that must not depend on a downloaded model: ``save_tiny_llama(dir)`` writes
config + safetensors + tokenizer in well under a second, and ``load_base_model(dir)`` loads it like any other
model. The tokenizer is byte-level BPE with no merges (256 byte tokens + ``<|endoftext|>``), so every string
round-trips and no vocabulary file has to be fetched.
"""

from __future__ import annotations

from pathlib import Path

import torch

EOS = "<|endoftext|>"


def tiny_tokenizer():
    """Byte-level tokenizer with 257 tokens (256 bytes + EOS) and no pad token (the loader sets one)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab[EOS] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([EOS])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS)


def tiny_llama_config(vocab_size: int = 257, **overrides):
    """LlamaConfig of the unit-test model: 2 layers, hidden 64, 4 heads (2 KV heads), MLP 128."""
    from transformers import LlamaConfig

    cfg = {"vocab_size": vocab_size, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
               "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
               "bos_token_id": vocab_size - 1, "eos_token_id": vocab_size - 1, "tie_word_embeddings": False}
    cfg.update(overrides)
    return LlamaConfig(**cfg)


def save_tiny_llama(path, seed: int = 0, **config_overrides) -> Path:
    """Write a random-weight tiny LLaMA + byte tokenizer to ``path`` (an ordinary HF dir) and return the path."""
    from transformers import LlamaForCausalLM

    path = Path(path)
    tokenizer = tiny_tokenizer()
    torch.manual_seed(seed)
    overrides = {"vocab_size": len(tokenizer), **config_overrides}  # a larger vocab only adds unused rows
    model = LlamaForCausalLM(tiny_llama_config(**overrides))
    model.config.name_or_path = "loramux/tiny-random-llama"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def save_random_peft_adapter(base_dir, out_dir, *, r: int = 8, lora_alpha: int = 16, targets=("q_proj", "v_proj"),
                             seed: int = 0, b_std: float = 0.2, **lora_kwargs) -> Path:
    """Train-free PEFT LoRA for tests: ``peft.get_peft_model`` on the model in ``base_dir`` with lora_B drawn from
    N(0, b_std) (peft initialises it to zero, which would make every delta vanish), saved with save_pretrained."""
    from peft import LoraConfig, get_peft_model

    from models.base import load_base_model

    model, _ = load_base_model(base_dir)
    torch.manual_seed(seed)
    cfg = LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=list(targets), lora_dropout=0.0, **lora_kwargs)
    peft_model = get_peft_model(model, cfg)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, b_std)
    peft_model.save_pretrained(out_dir)
    return Path(out_dir)


#: the three test adapters: mixed ranks, rsLoRA, different target sets (a and c share r = 8 for peft's linear merge)
TEST_ADAPTERS = {
    "a": {"r": 8, "lora_alpha": 16, "targets": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")},
    "b": {"r": 4, "lora_alpha": 8, "targets": ("q_proj", "v_proj"), "use_rslora": True},
    "c": {"r": 8, "lora_alpha": 32, "targets": ("q_proj", "v_proj", "down_proj")},
}


def save_test_assets(root) -> tuple[Path, dict]:
    """Tiny LLaMA in ``root/tiny`` + the TEST_ADAPTERS in ``root/adapters/<name>``; returns (model dir, {name: dir})."""
    root = Path(root)
    base = save_tiny_llama(root / "tiny")
    dirs = {name: save_random_peft_adapter(base, root / "adapters" / name, seed=i + 1, **spec)
            for i, (name, spec) in enumerate(TEST_ADAPTERS.items())}
    return base, dirs
