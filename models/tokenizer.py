"""Text -> padded id arrays, over a HF `tokenizer.json` (the Rust `tokenizers` library).

The file's own padding and truncation settings are switched off (all-MiniLM-L6-v2's pads every
text to a fixed 128): a batch is padded to its longest member, and truncated to `max_length`
tokens by the tokenizer itself, so the closing [SEP] survives truncation as it does in
sentence-transformers.
"""
from __future__ import annotations

import os
from typing import NamedTuple, Sequence

import numpy as np
import tokenizers


class Encoded(NamedTuple):
    """One padded batch."""

    input_ids: np.ndarray
    """int32 (n, L), L = the longest text in the batch after truncation; padding holds the pad id."""
    attention_mask: np.ndarray
    """int32 (n, L), 1 for real tokens, 0 for padding."""
    truncated: np.ndarray
    """bool (n,), True where a text lost tokens to max_length."""


class Tokenizer:
    """A `tokenizers.Tokenizer` with our padding and truncation."""

    def __init__(self, tokenizer: tokenizers.Tokenizer, max_length: int):
        if max_length < 2:
            raise ValueError(f"max_length must leave room for the special tokens, got {max_length}")
        padding = tokenizer.padding
        pad_id = padding["pad_id"] if padding else tokenizer.token_to_id("[PAD]")
        self.pad_id = 0 if pad_id is None else pad_id
        self.max_length = max_length
        tokenizer.no_padding()
        tokenizer.no_truncation()
        self._tokenizer = tokenizer

    @classmethod
    def from_file(cls, path: str | os.PathLike, max_length: int) -> "Tokenizer":
        return cls(tokenizers.Tokenizer.from_file(str(path)), max_length)

    def _encode(self, texts: Sequence[str], max_length: int | None) -> list[tokenizers.Encoding]:
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"text {i} is {type(text).__name__}, not str")
        self._tokenizer.enable_truncation(max_length or self.max_length)
        return self._tokenizer.encode_batch(list(texts), add_special_tokens=True)

    def encode_batch(self, texts: Sequence[str], max_length: int | None = None) -> Encoded:
        """Token ids and mask padded to the longest text; max_length defaults to the model's."""
        encodings = self._encode(texts, max_length)
        width = max((len(e.ids) for e in encodings), default=0)
        input_ids = np.full((len(encodings), width), self.pad_id, np.int32)
        attention_mask = np.zeros((len(encodings), width), np.int32)
        for row, encoding in enumerate(encodings):
            input_ids[row, :len(encoding.ids)] = encoding.ids
            attention_mask[row, :len(encoding.ids)] = 1
        truncated = np.array([bool(e.overflowing) for e in encodings], bool)
        return Encoded(input_ids, attention_mask, truncated)

    def encode_ids(self, texts: Sequence[str], max_length: int | None = None) -> tuple[list[list[int]], np.ndarray]:
        """Unpadded token ids per text (for length-bucketed batching) and the truncated flags."""
        encodings = self._encode(texts, max_length)
        return [e.ids for e in encodings], np.array([bool(e.overflowing) for e in encodings], bool)

    def lengths(self, texts: Sequence[str], max_length: int | None = None) -> np.ndarray:
        """int32 (n,) token counts after truncation, special tokens included (for length bucketing)."""
        return np.array([len(e.ids) for e in self._encode(texts, max_length)], np.int32)
