"""Generated stand-ins for a real GPT-2: a tiny byte-level BPE vocabulary, a debug-size HF
checkpoint of random tensors written straight from numpy (no Keras), and a model directory in
GPT2LMHeadModel layout made of both. No downloads."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import safetensors.numpy
from tokenizers import pre_tokenizers

from models import gpt, registry

EOS = "<|endoftext|>"
# Each word becomes one token through a chain of merges, left to right ("Ġ" is a leading space).
WORDS = ["Ġthe", "the", "Ġcat", "Ġsat", "Ġon", "Ġmat", "Ġdog", "Hello", "Ġworld", "ing", "Ġa", "Ġand"]


def vocabulary() -> tuple[dict[str, int], list[str]]:
    """(token -> id, merges): the 256 byte symbols, the merges that build WORDS, then <|endoftext|>."""
    tokens = sorted(pre_tokenizers.ByteLevel.alphabet())
    merges = []
    for word in WORDS:
        for end in range(2, len(word) + 1):
            left, right = word[:end - 1], word[end - 1]
            if f"{left} {right}" not in merges:
                merges.append(f"{left} {right}")
                tokens.append(left + right)
    return {token: i for i, token in enumerate(tokens + [EOS])}, merges


def write_vocab(path: Path, names: tuple[str, str] = ("vocab.json", "merges.txt")) -> Path:
    """The tiny vocabulary as a (vocabulary, merges) file pair named `names` in `path`."""
    vocab, merges = vocabulary()
    path.mkdir(parents=True, exist_ok=True)
    (path / names[0]).write_text(json.dumps(vocab))
    (path / names[1]).write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return path


def random_checkpoint(config: gpt.GPTConfig, seed: int, prefix: str = "transformer.") -> dict[str, np.ndarray]:
    """Every GPT-2 tensor under its HF name, random (biases and LayerNorms included), float32."""
    rng = np.random.default_rng(seed)
    e = config.n_embd
    shapes = {"wte.weight": (config.vocab_size, e), "wpe.weight": (config.n_positions, e),
              "ln_f.weight": (e,), "ln_f.bias": (e,)}
    for i in range(config.n_layer):
        shapes.update({f"h.{i}.ln_1.weight": (e,), f"h.{i}.ln_1.bias": (e,),
                       f"h.{i}.attn.c_attn.weight": (e, 3 * e), f"h.{i}.attn.c_attn.bias": (3 * e,),
                       f"h.{i}.attn.c_proj.weight": (e, e), f"h.{i}.attn.c_proj.bias": (e,),
                       f"h.{i}.ln_2.weight": (e,), f"h.{i}.ln_2.bias": (e,),
                       f"h.{i}.mlp.c_fc.weight": (e, 4 * e), f"h.{i}.mlp.c_fc.bias": (4 * e,),
                       f"h.{i}.mlp.c_proj.weight": (4 * e, e), f"h.{i}.mlp.c_proj.bias": (e,)})
    tensors = {}
    for name, shape in shapes.items():
        base = 1.0 if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")) else 0.0
        tensors[prefix + name] = (base + rng.normal(0.0, 0.2, shape)).astype(np.float32)
    return tensors


def write_model_dir(path: Path, tensors: dict[str, np.ndarray], config: gpt.GPTConfig | None = None,
                    vocab_names: tuple[str, str] = ("vocab.json", "merges.txt")) -> Path:
    """config.json + model.safetensors + the tiny vocabulary, as HF transformers lays them out."""
    config = config or registry.gpt_size("debug")
    write_vocab(path, vocab_names)
    eos = vocabulary()[0][EOS]
    (path / "config.json").write_text(json.dumps({**config.to_hf(), "bos_token_id": eos, "eos_token_id": eos}))
    safetensors.numpy.save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path
