"""Model sizes by name. `debug` is the tiny size unit tests build in milliseconds; the others
carry the shape of a real checkpoint (their weights come from hvdinfer.assets)."""
from __future__ import annotations

from models.bert import BertConfig

SIZES: dict[str, BertConfig] = {
    "debug": BertConfig(vocab_size=128, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                        max_position=64),
    "minilm-l6": BertConfig(vocab_size=30522, hidden_size=384, num_layers=6, num_heads=12,
                            intermediate_size=1536, max_position=512),
}


def size(name: str) -> BertConfig:
    try:
        return SIZES[name]
    except KeyError:
        raise KeyError(f"unknown model size {name!r}; known: {', '.join(sorted(SIZES))}") from None
