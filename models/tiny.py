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

    cfg = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
               bos_token_id=vocab_size - 1, eos_token_id=vocab_size - 1, tie_word_embeddings=False)
    cfg.update(overrides)
    return LlamaConfig(**cfg)


def save_tiny_llama(path, seed: int = 0, **config_overrides) -> Path:
    """Write a random-weight tiny LLaMA + byte tokenizer to ``path`` (an ordinary HF dir) and return the path."""
    from transformers import LlamaForCausalLM

    path = Path(path)
    tokenizer = tiny_tokenizer()
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(vocab_size=len(tokenizer), **config_overrides))
    model.config.name_or_path = "loramux/tiny-random-llama"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
