"""HF BERT safetensors <-> the named Keras layers of models.bert.

`hf_variables(model)` is the one table between the two worlds: checkpoint name -> Keras variable.
Loading checks it both ways before assigning anything: every Keras variable gets exactly one
tensor, every checkpoint tensor is used (or explicitly ignored: the pooler, the position_ids
buffer), and every shape matches. Linear weights are stored (out, in) as in PyTorch and
transposed for Keras Dense kernels (in, out). Checkpoints with a `bert.` prefix (BertFor* heads)
load the same way.

The checks and the file handling are generic over such a table (`assign_table`, `table_tensors`,
`write_safetensors`); models/gpt_weights.py uses them with GPT-2's table.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterable

import numpy as np
import safetensors.numpy
import tensorflow as tf

from models import bert

# Checkpoint tensors that inference does not use, as full-match patterns on the checkpoint key.
IGNORED = (r"(bert\.)?pooler\..*", r"(bert\.)?embeddings\.position_ids")


def _encoder(model: tf.keras.Model) -> bert.BertEncoder:
    if isinstance(model, bert.SentenceEmbedder):
        return model.encoder
    if isinstance(model, bert.BertEncoder):
        return model
    raise TypeError(f"expected a SentenceEmbedder or BertEncoder, got {type(model).__name__}")


def _dense(hf: str, layer) -> dict[str, tuple[tf.Variable, bool]]:
    return {f"{hf}.weight": (layer.kernel, True), f"{hf}.bias": (layer.bias, False)}


def _norm(hf: str, layer) -> dict[str, tuple[tf.Variable, bool]]:
    return {f"{hf}.weight": (layer.gamma, False), f"{hf}.bias": (layer.beta, False)}


def hf_variables(model: tf.keras.Model) -> dict[str, tuple[tf.Variable, bool]]:
    """{HF checkpoint name (no prefix): (Keras variable, stored transposed)} for a built model."""
    encoder = _encoder(model)
    if not encoder.built:
        bert.build(model)
    emb = encoder.embeddings
    table = {
        "embeddings.word_embeddings.weight": (emb.word.embeddings, False),
        "embeddings.position_embeddings.weight": (emb.position.embeddings, False),
        "embeddings.token_type_embeddings.weight": (emb.token_type.embeddings, False),
        **_norm("embeddings.LayerNorm", emb.norm),
    }
    for i, block in enumerate(encoder.blocks):
        layer = f"encoder.layer.{i}"
        table.update({
            **_dense(f"{layer}.attention.self.query", block.query),
            **_dense(f"{layer}.attention.self.key", block.key),
            **_dense(f"{layer}.attention.self.value", block.value),
            **_dense(f"{layer}.attention.output.dense", block.attention_out),
            **_norm(f"{layer}.attention.output.LayerNorm", block.attention_norm),
            **_dense(f"{layer}.intermediate.dense", block.ffn_in),
            **_dense(f"{layer}.output.dense", block.ffn_out),
            **_norm(f"{layer}.output.LayerNorm", block.ffn_norm),
        })
    check_covers(model, table)
    return table


def check_covers(model: tf.keras.Model, table: dict[str, tuple[tf.Variable, bool]]) -> None:
    """Every model variable appears in the table exactly once."""
    covered = {id(var) for var, _ in table.values()}
    unmapped = [w.name for w in model.weights if id(w) not in covered]
    if unmapped or len(covered) != len(table) or len(table) != len(model.weights):
        raise AssertionError(f"hf_variables must map each of the model's {len(model.weights)} variables once; "
                             f"it maps {len(table)} names to {len(covered)} variables, missing {unmapped}")


def checkpoint_prefix(keys: Iterable[str]) -> str:
    """'' for a bare BertModel checkpoint, 'bert.' for BertFor* checkpoints."""
    keys = set(keys)
    for prefix in ("", "bert."):
        if f"{prefix}embeddings.word_embeddings.weight" in keys:
            return prefix
    raise ValueError("not a BERT checkpoint: no embeddings.word_embeddings.weight (with or without 'bert.' prefix)")


def assign(model: tf.keras.Model, tensors: dict[str, np.ndarray], ignore: Iterable[str] = IGNORED) -> None:
    """Set every variable of `model` from HF-named `tensors`; all checks pass before anything is assigned."""
    assign_table(hf_variables(model), tensors, checkpoint_prefix(tensors), ignore)


def assign_table(table: dict[str, tuple[tf.Variable, bool]], tensors: dict[str, np.ndarray], prefix: str = "",
                 ignore: Iterable[str] = ()) -> None:
    """Set every variable of `table` from `tensors[prefix + name]`: each present, of the right shape
    and floating point, and every tensor used or matched by an `ignore` pattern; all checks pass
    before anything is assigned."""
    ignored = [re.compile(pattern) for pattern in ignore]
    values = []
    for name, (var, transposed) in table.items():
        key = prefix + name
        if key not in tensors:
            raise ValueError(f"checkpoint lacks {key} (for Keras variable {var.name}, shape {tuple(var.shape)})")
        array = tensors[key]
        stored = tuple(reversed(var.shape)) if transposed else tuple(var.shape)
        if tuple(array.shape) != stored:
            raise ValueError(f"{key}: checkpoint shape {tuple(array.shape)} does not fit Keras variable {var.name} "
                             f"shape {tuple(var.shape)} (expected {stored} in the checkpoint)")
        if not np.issubdtype(array.dtype, np.floating):
            raise ValueError(f"{key}: checkpoint dtype {array.dtype} is not floating point")
        values.append((var, (array.T if transposed else array).astype(var.dtype.as_numpy_dtype)))
    used = {prefix + name for name in table}
    unused = sorted(k for k in tensors if k not in used and not any(p.fullmatch(k) for p in ignored))
    if unused:
        raise ValueError(f"checkpoint tensors with no place in the model: {', '.join(unused[:10])}"
                         + (f" and {len(unused) - 10} more" if len(unused) > 10 else ""))
    for var, value in values:
        var.assign(value)


def load_weights(model: tf.keras.Model, path: str | os.PathLike, ignore: Iterable[str] = IGNORED) -> None:
    """Load a HF BERT `model.safetensors` into `model` (see `assign` for the checks)."""
    assign(model, safetensors.numpy.load_file(str(path)), ignore)


def hf_tensors(model: tf.keras.Model) -> dict[str, np.ndarray]:
    """The model's variables under their HF names, in HF layout (Linear weights (out, in))."""
    return table_tensors(hf_variables(model))


def table_tensors(table: dict[str, tuple[tf.Variable, bool]], prefix: str = "") -> dict[str, np.ndarray]:
    """{prefix + name: value in checkpoint layout} for every variable of `table`."""
    return {prefix + name: np.ascontiguousarray(var.numpy().T if transposed else var.numpy())
            for name, (var, transposed) in table.items()}


def save_weights(model: tf.keras.Model, path: str | os.PathLike) -> None:
    """Write the model as a bare-BertModel `model.safetensors` (no pooler), atomically."""
    write_safetensors(hf_tensors(model), path)


def write_safetensors(tensors: dict[str, np.ndarray], path: str | os.PathLike) -> None:
    """Write `tensors` to `path` atomically, marked "pt" so HF transformers reads it as a checkpoint."""
    path = Path(path)
    partial = path.with_name(f".{path.name}.partial")
    safetensors.numpy.save_file(tensors, str(partial), metadata={"format": "pt"})
    os.replace(partial, path)
