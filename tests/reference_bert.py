"""An independent BERT sentence embedder in float64 numpy, straight from HF checkpoint tensors.

It shares nothing with models/ (no Keras, no weight mapping, its own GELU, LayerNorm, softmax and
masking) so that agreeing with it checks the Keras model and the weight loader together.
"""
from __future__ import annotations

import math

import numpy as np

_erf = np.frompyfunc(math.erf, 1, 1)


def gelu(x: np.ndarray) -> np.ndarray:
    """Exact GELU: x * Phi(x)."""
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)).astype(np.float64))


def layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float) -> np.ndarray:
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * weight + bias


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def linear(x: np.ndarray, t: dict, name: str) -> np.ndarray:
    """PyTorch Linear: x @ W.T + b with W stored (out, in)."""
    return x @ t[f"{name}.weight"].T + t[f"{name}.bias"]


def encode(t: dict, input_ids: np.ndarray, attention_mask: np.ndarray, num_heads: int,
           eps: float = 1e-12) -> np.ndarray:
    """Last hidden states (n, L, hidden) of a HF BertModel with checkpoint tensors `t`."""
    t = {k.removeprefix("bert."): np.asarray(v, np.float64) for k, v in t.items() if v.dtype.kind == "f"}
    n, length = input_ids.shape
    x = (t["embeddings.word_embeddings.weight"][input_ids]
         + t["embeddings.position_embeddings.weight"][np.arange(length)][None]
         + t["embeddings.token_type_embeddings.weight"][np.zeros_like(input_ids)])
    x = layer_norm(x, t["embeddings.LayerNorm.weight"], t["embeddings.LayerNorm.bias"], eps)
    hidden = x.shape[-1]
    head = hidden // num_heads
    keep = attention_mask.astype(bool)[:, None, None, :]  # (n, 1, 1, L): which keys each query may see
    layers = sorted({int(k.split(".")[2]) for k in t if k.startswith("encoder.layer.")})
    for i in layers:
        p = f"encoder.layer.{i}"

        def heads(y):
            return y.reshape(n, length, num_heads, head).transpose(0, 2, 1, 3)

        q, k, v = (heads(linear(x, t, f"{p}.attention.self.{name}")) for name in ("query", "key", "value"))
        scores = np.where(keep, q @ k.transpose(0, 1, 3, 2) / math.sqrt(head), -np.inf)
        context = (softmax(scores) @ v).transpose(0, 2, 1, 3).reshape(n, length, hidden)
        x = layer_norm(x + linear(context, t, f"{p}.attention.output.dense"),
                       t[f"{p}.attention.output.LayerNorm.weight"], t[f"{p}.attention.output.LayerNorm.bias"], eps)
        ffn = linear(gelu(linear(x, t, f"{p}.intermediate.dense")), t, f"{p}.output.dense")
        x = layer_norm(x + ffn, t[f"{p}.output.LayerNorm.weight"], t[f"{p}.output.LayerNorm.bias"], eps)
    return x


def sentence_embeddings(t: dict, input_ids: np.ndarray, attention_mask: np.ndarray, num_heads: int,
                        normalize: bool = True, eps: float = 1e-12) -> np.ndarray:
    """sentence-transformers mean pooling over real tokens, then optional L2 normalisation."""
    x = encode(t, input_ids, attention_mask, num_heads, eps)
    mask = attention_mask[:, :, None].astype(np.float64)
    pooled = (x * mask).sum(1) / mask.sum(1)
    return pooled / np.linalg.norm(pooled, axis=-1, keepdims=True) if normalize else pooled
