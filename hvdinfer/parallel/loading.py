"""Weights into a parallelised model, one checkpoint tensor at a time, each rank reading only its slice.

The model's own name table (models/weights.py, models/gpt_weights.py: HF name -> Keras variable)
says where each tensor goes; for a tensor-parallel model the variables are this rank's shards and
`tensor_parallel.shard_spec` says which slice of the full tensor each one holds. The safetensors
file is opened lazily: shapes come from its header, and each variable's slice is read, assigned to
the variable (on its stage's device) and dropped before the next, so no rank materialises more
than one tensor it does not keep. Everything is checked before anything is assigned, with the
same rules as the single-device loaders: every variable has a tensor of the right full shape,
every tensor has a place (or is ignored like a pooler, or is GPT-2's tied lm_head).
"""
from __future__ import annotations

import dataclasses
import os
import re
from typing import Callable, Iterable

import numpy as np

from hvdinfer.parallel import tensor_parallel

FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")


@dataclasses.dataclass(frozen=True)
class Family:
    """How one model family's checkpoints map to its layers."""

    table: Callable
    """model -> {HF name: (variable, stored transposed)}."""
    prefix: Callable[[Iterable[str]], str]
    ignore: tuple[str, ...]
    shards: tuple
    tied: tuple[str, str] | None = None
    """(checkpoint key, name it must equal) of a tied copy that is accepted and skipped."""


def family(model) -> Family:
    from models import gpt, gpt_weights, weights

    if isinstance(model, gpt.GPT):
        return Family(gpt_weights.hf_variables, gpt_weights.checkpoint_prefix, gpt_weights.IGNORED,
                      tensor_parallel.GPT_SHARDS, (gpt_weights.LM_HEAD, "wte.weight"))
    return Family(weights.hf_variables, weights.checkpoint_prefix, weights.IGNORED, tensor_parallel.BERT_SHARDS)


def _index(shape: list[int], axis: int, start: int, stop: int) -> tuple:
    index = [slice(None)] * len(shape)
    index[axis % len(shape)] = slice(start, stop)
    return tuple(index)


def full_shape(local: list[int], spec: tuple[int, int] | None, tp: int) -> list[int]:
    """The whole tensor's shape, from a rank's slice of it (`spec`: tensor_parallel.shard_spec)."""
    full = list(local)
    if spec is not None:
        full[spec[0] % len(full)] *= tp
    return full


def read_slice(f, key: str, spec: tuple[int, int] | None, tp: int, tp_rank: int) -> np.ndarray:
    """Rank tp_rank's slice of tensor `key` of an open safetensors file `f` (all of it when `spec` is
    None), reading nothing else."""
    if spec is None or tp == 1:
        return f.get_tensor(key)
    axis, parts = spec
    view = f.get_slice(key)
    full = list(view.get_shape())
    pieces = [view[_index(full, axis, a, b)] for a, b in tensor_parallel.shard_ranges(full[axis], parts, tp, tp_rank)]
    return pieces[0] if len(pieces) == 1 else np.concatenate(pieces, axis=axis)


def load_weights(model, path: str | os.PathLike, tp: int = 1, tp_rank: int = 0, encoder_only: bool = True) -> int:
    """Assign every variable of `model`'s name table from `path`; returns the bytes read. With tp > 1 the
    sharded variables get rank tp_rank's slice. For a classifier only the encoder's table is loaded here
    (its head has a file of its own)."""
    from safetensors import safe_open

    fam = family(model)
    target = model.embedder if encoder_only and hasattr(model, "embedder") else model
    table = fam.table(target)
    with safe_open(str(path), framework="numpy") as f:
        keys = set(f.keys())
        prefix = fam.prefix(keys)
        plan = []
        for name, (var, transposed) in table.items():
            key = prefix + name
            if key not in keys:
                raise ValueError(f"checkpoint lacks {key} (for Keras variable {var.name})")
            view = f.get_slice(key)
            full = list(view.get_shape())
            local = list(reversed(var.shape)) if transposed else list(var.shape)
            spec = tensor_parallel.shard_spec(fam.shards, name) if tp > 1 else None
            want = full_shape(local, spec, tp)
            if full != want:
                raise ValueError(f"{key}: checkpoint shape {tuple(full)} does not fit Keras variable {var.name} "
                                 f"(expected {tuple(want)}" + (f", split over --tp {tp})" if spec else ")"))
            if view.get_dtype() not in FLOAT_DTYPES:
                raise ValueError(f"{key}: checkpoint dtype {view.get_dtype()} is not floating point")
            plan.append((key, var, transposed, spec))
        used = {prefix + name for name in table}
        ignored = [re.compile(p) for p in fam.ignore]
        tied = None
        if fam.tied and fam.tied[0] in keys:
            tied = fam.tied[0]
            head, source = f.get_tensor(tied), f.get_tensor(prefix + fam.tied[1])
            if head.shape != source.shape or not np.array_equal(head, source):
                raise ValueError(f"{tied} differs from {prefix}{fam.tied[1]}: this model ties its LM head to the "
                                 f"token embeddings and cannot load a separate head")
        unused = sorted(k for k in keys if k not in used and k != tied and not any(p.fullmatch(k) for p in ignored))
        if unused:
            raise ValueError(f"checkpoint tensors with no place in the model: {', '.join(unused[:10])}"
                             + (f" and {len(unused) - 10} more" if len(unused) > 10 else ""))
        read = 0
        for key, var, transposed, spec in plan:
            value = read_slice(f, key, spec, tp, tp_rank)
            read += value.nbytes
            var.assign((value.T if transposed else value).astype(var.dtype.as_numpy_dtype))
            del value
    return read
