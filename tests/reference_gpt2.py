"""An independent GPT-2 language model in float64 numpy, straight from HF checkpoint tensors.

It shares nothing with models/ (no Keras, no weight mapping; its own GELU, LayerNorm, softmax,
masking and positions) so that agreeing with it checks the Keras model and the weight loader
together. Rows may be left-padded: positions count real tokens only.
"""
from __future__ import annotations

import math

import numpy as np


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    """GPT-2's GELU ("gelu_new")."""
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def layer_norm(x: np.ndarray, t: dict, name: str, eps: float) -> np.ndarray:
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * t[f"{name}.weight"] + t[f"{name}.bias"]


def conv1d(x: np.ndarray, t: dict, name: str) -> np.ndarray:
    """HF Conv1D: x @ W + b with W stored (in, out)."""
    return x @ t[f"{name}.weight"] + t[f"{name}.bias"]


def logits(t: dict, input_ids: np.ndarray, attention_mask: np.ndarray, num_heads: int,
           eps: float = 1e-5) -> np.ndarray:
    """Next-token logits (n, L, vocab) of a HF GPT2LMHeadModel with checkpoint tensors `t`, head
    tied to wte. Rows of padding only attend to themselves, so every position has a finite value."""
    t = {k.removeprefix("transformer."): np.asarray(v, np.float64) for k, v in t.items()}
    n, length = input_ids.shape
    width = t["wte.weight"].shape[1]
    head_dim = width // num_heads
    positions = np.zeros_like(input_ids)
    for row in range(n):
        real = np.flatnonzero(attention_mask[row])
        positions[row, real] = np.arange(len(real))
    x = t["wte.weight"][input_ids] + t["wpe.weight"][positions]
    layers = sorted({int(k.split(".")[1]) for k in t if k.startswith("h.")})
    for i in layers:
        h = layer_norm(x, t, f"h.{i}.ln_1", eps)
        q, k, v = np.split(conv1d(h, t, f"h.{i}.attn.c_attn"), 3, axis=-1)
        out = np.zeros_like(x)
        for row in range(n):
            for head in range(num_heads):
                cols = slice(head * head_dim, (head + 1) * head_dim)
                scores = q[row, :, cols] @ k[row, :, cols].T / math.sqrt(head_dim)
                allowed = np.tril(np.ones((length, length), bool)) & attention_mask[row][None].astype(bool)
                allowed |= np.eye(length, dtype=bool)
                scores = np.where(allowed, scores, -np.inf)
                weights = np.exp(scores - scores.max(-1, keepdims=True))
                weights /= weights.sum(-1, keepdims=True)
                out[row, :, cols] = weights @ v[row, :, cols]
        x = x + conv1d(out, t, f"h.{i}.attn.c_proj")
        h = layer_norm(x, t, f"h.{i}.ln_2", eps)
        x = x + conv1d(gelu_tanh(conv1d(h, t, f"h.{i}.mlp.c_fc")), t, f"h.{i}.mlp.c_proj")
    return layer_norm(x, t, "ln_f", eps) @ t["wte.weight"].T
