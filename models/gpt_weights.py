"""HF GPT-2 safetensors <-> the named Keras layers of models.gpt.

`hf_variables(model)` is the one table between the two: checkpoint name -> Keras variable, checked
both ways by models.weights.assign_table before anything is assigned. GPT-2's linear layers are
HF `Conv1D`s, stored (in, out) like a Keras Dense kernel, so nothing is transposed.

Checkpoints come with the `transformer.` prefix (what GPT2LMHeadModel.save_pretrained writes) or
without it (OpenAI's gpt2 on the Hub); both load. `lm_head.weight` is accepted only as the tied copy
of `wte.weight`, and the attention-mask buffers (`attn.bias`, `attn.masked_bias`) older versions
saved are ignored. Saving writes the `transformer.` layout without lm_head, which GPT2LMHeadModel
loads with its head tied.
"""
from __future__ import annotations

import os
from typing import Iterable

import numpy as np
import safetensors.numpy
import tensorflow as tf

from models import gpt, weights

PREFIX = "transformer."
LM_HEAD = "lm_head.weight"
# Checkpoint tensors that are not weights, as full-match patterns on the checkpoint key.
IGNORED = (r"(transformer\.)?h\.\d+\.attn\.(bias|masked_bias)",)


def _linear(hf: str, layer) -> dict[str, tuple[tf.Variable, bool]]:
    return {f"{hf}.weight": (layer.kernel, False), f"{hf}.bias": (layer.bias, False)}


def _norm(hf: str, layer) -> dict[str, tuple[tf.Variable, bool]]:
    return {f"{hf}.weight": (layer.gamma, False), f"{hf}.bias": (layer.beta, False)}


def hf_variables(model: gpt.GPT) -> dict[str, tuple[tf.Variable, bool]]:
    """{HF checkpoint name (no prefix): (Keras variable, stored transposed)} for a GPT."""
    if not isinstance(model, gpt.GPT):
        raise TypeError(f"expected a models.gpt.GPT, got {type(model).__name__}")
    if not model.built:
        gpt.build(model)
    table = {"wte.weight": (model.wte.embeddings, False), "wpe.weight": (model.wpe.embeddings, False)}
    for i, block in enumerate(model.blocks):
        table.update({
            **_norm(f"h.{i}.ln_1", block.ln_1),
            **_linear(f"h.{i}.attn.c_attn", block.attn.c_attn),
            **_linear(f"h.{i}.attn.c_proj", block.attn.c_proj),
            **_norm(f"h.{i}.ln_2", block.ln_2),
            **_linear(f"h.{i}.mlp.c_fc", block.mlp.c_fc),
            **_linear(f"h.{i}.mlp.c_proj", block.mlp.c_proj),
        })
    table.update(_norm("ln_f", model.ln_f))
    weights.check_covers(model, table)
    return table


def checkpoint_prefix(keys: Iterable[str]) -> str:
    """'transformer.' for GPT2LMHeadModel checkpoints, '' for bare GPT2Model ones."""
    keys = set(keys)
    for prefix in (PREFIX, ""):
        if f"{prefix}wte.weight" in keys:
            return prefix
    raise ValueError("not a GPT-2 checkpoint: no wte.weight (with or without 'transformer.' prefix)")


def _without_tied_head(tensors: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    """`tensors` less lm_head.weight, which must be an exact copy of wte.weight."""
    if LM_HEAD not in tensors:
        return tensors
    head, wte = tensors[LM_HEAD], tensors[f"{prefix}wte.weight"]
    if head.shape != wte.shape or not np.array_equal(head, wte):
        detail = f"shape {head.shape} vs {wte.shape}" if head.shape != wte.shape else "other values"
        raise ValueError(f"{LM_HEAD} differs from {prefix}wte.weight ({detail}): this GPT-2 ties its LM head "
                         f"to the token embeddings and cannot load a separate head")
    return {k: v for k, v in tensors.items() if k != LM_HEAD}


def assign(model: gpt.GPT, tensors: dict[str, np.ndarray], ignore: Iterable[str] = IGNORED) -> None:
    """Set every variable of `model` from HF-named `tensors`; all checks pass before anything is assigned."""
    prefix = checkpoint_prefix(tensors)
    weights.assign_table(hf_variables(model), _without_tied_head(tensors, prefix), prefix, ignore)


def load_weights(model: gpt.GPT, path: str | os.PathLike, ignore: Iterable[str] = IGNORED) -> None:
    """Load a HF GPT-2 `model.safetensors` into `model` (see `assign` for the checks)."""
    assign(model, safetensors.numpy.load_file(str(path)), ignore)


def hf_tensors(model: gpt.GPT) -> dict[str, np.ndarray]:
    """The model's variables under their GPT2LMHeadModel names (`transformer.` prefix, no lm_head)."""
    return weights.table_tensors(hf_variables(model), PREFIX)


def save_weights(model: gpt.GPT, path: str | os.PathLike) -> None:
    """Write the model as a GPT2LMHeadModel `model.safetensors`, atomically."""
    weights.write_safetensors(hf_tensors(model), path)
