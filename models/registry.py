"""Model sizes by name. `debug` is the tiny size unit tests build in milliseconds; the others
carry the shape of a real checkpoint (their weights come from hvdinfer.assets)."""
from __future__ import annotations

from models.bert import BertConfig
from models.gpt import GPTConfig

SIZES: dict[str, BertConfig] = {
    "debug": BertConfig(vocab_size=128, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                        max_position=64),
    "minilm-l6": BertConfig(vocab_size=30522, hidden_size=384, num_layers=6, num_heads=12,
                            intermediate_size=1536, max_position=512),
}

# Decoders. The real sizes are OpenAI's GPT-2 family (vocabulary 50257, 1024 positions).
GPT_SIZES: dict[str, GPTConfig] = {
    "debug": GPTConfig(vocab_size=512, n_positions=128, n_embd=64, n_layer=2, n_head=4),
    "gpt2": GPTConfig(n_embd=768, n_layer=12, n_head=12),
    "gpt2-medium": GPTConfig(n_embd=1024, n_layer=24, n_head=16),
    "gpt2-large": GPTConfig(n_embd=1280, n_layer=36, n_head=20),
    "gpt2-xl": GPTConfig(n_embd=1600, n_layer=48, n_head=25),
}


def _lookup(table: dict, name: str, family: str):
    try:
        return table[name]
    except KeyError:
        raise KeyError(f"unknown {family} size {name!r}; known: {', '.join(sorted(table))}") from None


def size(name: str) -> BertConfig:
    return _lookup(SIZES, name, "model")


def gpt_size(name: str) -> GPTConfig:
    return _lookup(GPT_SIZES, name, "GPT")
