"""A tiny random LLaMA (2 layers, hidden 64) with a byte-level tokenizer, written as a normal HF directory.

For unit tests and smoke runs that must not depend on a downloaded model: ``save_tiny_llama(dir)`` writes
config + safetensors + tokenizer in well under a second, and ``load_base_model(dir)`` loads it like any other
model. The tokenizer is byte-level BPE with no merges (256 byte tokens + ``<|endoftext|>``), so every string
round-trips and no vocabulary file has to be fetched.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import torch
from peft import LoraConfig, get_peft_model
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, PreTrainedTokenizerFast

from common.random_llama import random_llama
from models.base import load_base_model

EOS = "<|endoftext|>"


def tiny_tokenizer():
    """Byte-level tokenizer with 257 tokens (256 bytes + EOS) and no pad token (the loader sets one)."""
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
    cfg = {"vocab_size": vocab_size, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
               "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
               "bos_token_id": vocab_size - 1, "eos_token_id": vocab_size - 1, "tie_word_embeddings": False}
    cfg.update(overrides)
    return LlamaConfig(**cfg)


def save_tiny_llama(path, seed: int = 0, **config_overrides) -> Path:
    """Write a random-weight tiny LLaMA + byte tokenizer to ``path`` (an ordinary HF dir) and return the path."""
    path = Path(path)
    tokenizer = tiny_tokenizer()
    overrides = {"vocab_size": len(tokenizer), **config_overrides}  # a larger vocab only adds unused rows
    model = random_llama(tiny_llama_config(**overrides), seed=seed)
    model.config.name_or_path = "loramux/tiny-random-llama"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def save_random_peft_adapter(base_dir, out_dir, *, r: int = 8, lora_alpha: int = 16, targets=("q_proj", "v_proj"),
                             seed: int = 0, b_std: float = 0.2, **lora_kwargs) -> Path:
    """Train-free PEFT LoRA for tests: ``peft.get_peft_model`` on the model in ``base_dir`` with lora_B drawn from
    N(0, b_std) (peft initialises it to zero, which would make every delta vanish), saved with save_pretrained."""
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


def save_tiny_gguf(path, seed: int = 0) -> Path:
    """Write the same tiny LLaMA (same seed, same weights as ``save_tiny_llama``) as a float32 GGUF file.

    Tensor names and the rotary permutation of q/k follow llama.cpp's ``convert_hf_to_gguf``; the byte-level
    vocabulary is stored as a ``gpt2`` tokenizer, so ``load_base_model(path)`` exercises transformers' GGUF path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tokenizer = tiny_tokenizer()
    cfg = tiny_llama_config(vocab_size=len(tokenizer))
    state = {k: v.numpy() for k, v in random_llama(cfg, seed=seed).state_dict().items()}
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-random-llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(float((getattr(cfg, "rope_parameters", None) or {}).get("rope_theta", 10000.0)))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    tokens = [t for t, _ in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])]
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([1] * (len(tokens) - 1) + [3])  # the last token (EOS) is a control token
    w.add_token_scores([0.0] * len(tokens))
    w.add_bos_token_id(len(tokens) - 1)
    w.add_eos_token_id(len(tokens) - 1)

    def rotary(W, heads):  # HF -> GGUF layout of q/k rows (llama.cpp's LlamaModel.permute)
        return W.reshape(heads, 2, W.shape[0] // heads // 2, *W.shape[1:]).swapaxes(1, 2).reshape(W.shape)

    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    parts = [("input_layernorm", "attn_norm"), ("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k"),
             ("self_attn.v_proj", "attn_v"), ("self_attn.o_proj", "attn_output"),
             ("post_attention_layernorm", "ffn_norm"), ("mlp.gate_proj", "ffn_gate"), ("mlp.up_proj", "ffn_up"),
             ("mlp.down_proj", "ffn_down")]
    for i in range(cfg.num_hidden_layers):
        names.update({f"model.layers.{i}.{hf}.weight": f"blk.{i}.{gg}.weight" for hf, gg in parts})
    for hf, gg in names.items():
        t = state[hf]
        if gg.endswith("attn_q.weight"):
            t = rotary(t, cfg.num_attention_heads)
        elif gg.endswith("attn_k.weight"):
            t = rotary(t, cfg.num_key_value_heads)
        w.add_tensor(gg, np.ascontiguousarray(t, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
