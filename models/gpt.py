"""GPT-2 in plain single-device Keras, with stable layer names and a preallocated KV cache.

Layer names follow the HF checkpoint's module names so that weights map one to one: `wte`, `wpe`,
`block_0` .. `block_{n-1}` (each with `ln_1`, `attn` (`c_attn`: fused q, k, v; `c_proj`), `ln_2`,
`mlp` (`c_fc`, `c_proj`)), `ln_f`. The LM head is tied: logits = ln_f(h) @ wte^T.

The model exposes the math of decoding and nothing of its policy (sampling, stop rules and
batching live in models/decoding.py):

    model({"input_ids", "attention_mask"})        -> logits (batch, length, vocab)
    model.last_logits(input_ids, attention_mask)   -> logits of each row's last real token (batch, vocab)
    model.prefill(input_ids, attention_mask, cache) -> (last logits, cache with the prompt's keys/values)
    model.decode_step(token_ids, positions, step_index, cache, cache_mask) -> (logits (batch, vocab), cache)

Positions are counted per row from the attention mask (cumsum - 1), so left-padded rows give their
real tokens positions 0, 1, .. as if they were alone. The cache is one preallocated variable
(n_layer, 2 (keys, values), batch, n_head, max_len, head_dim) from `new_cache`: prefill writes
columns 0..length-1, each decode step writes column `step_index` in place and reads columns
0..step_index back (sparse scatter/gather: no copy of the whole cache, and a step costs what the
sequence so far costs, not max_len). `decode_step` is one compiled graph per cache shape, for a
whole generation and for every batch of that shape. Nothing here knows about Horovod or ranks.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import numpy as np
import tensorflow as tf

keras = tf.keras

# (layer index, new keys, new values) -> (keys, values) the new queries attend over.
Memory = Callable[[int, tf.Tensor, tf.Tensor], tuple[tf.Tensor, tf.Tensor]]

GELU_TANH = ("gelu_new", "gelu_pytorch_tanh")


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    """Shape of a GPT-2 decoder (the fields of a HF `config.json` that matter for generation)."""

    vocab_size: int = 50257
    """Rows of the token-embedding table, which is also the tied LM head."""
    n_positions: int = 1024
    """Rows of the position-embedding table: the longest sequence, prompt and continuation together."""
    n_embd: int = 768
    """Width of every token vector."""
    n_layer: int = 12
    """Number of transformer blocks."""
    n_head: int = 12
    """Attention heads per block; must divide n_embd."""
    layer_norm_epsilon: float = 1e-5
    """Epsilon of every LayerNorm."""

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd {self.n_embd} is not divisible by n_head {self.n_head}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def from_hf(cls, cfg: dict) -> "GPTConfig":
        """From a HF GPT-2 `config.json` dict; refuses variants this model does not implement."""
        if cfg.get("model_type") != "gpt2":
            raise ValueError(f"model_type {cfg.get('model_type')!r} is not 'gpt2'")
        activation = cfg.get("activation_function", "gelu_new")
        if activation not in GELU_TANH:
            raise ValueError(f"unsupported activation_function {activation!r} (only the tanh GELU: "
                             f"{', '.join(GELU_TANH)})")
        if cfg.get("n_inner") not in (None, 4 * cfg["n_embd"]):
            raise ValueError(f"unsupported n_inner {cfg['n_inner']} (only 4 * n_embd = {4 * cfg['n_embd']})")
        for key, supported in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                               ("add_cross_attention", False), ("tie_word_embeddings", True)):
            if cfg.get(key, supported) != supported:
                raise ValueError(f"unsupported {key}={cfg[key]!r} (only {supported})")
        return cls(vocab_size=cfg["vocab_size"], n_positions=cfg["n_positions"], n_embd=cfg["n_embd"],
                   n_layer=cfg["n_layer"], n_head=cfg["n_head"],
                   layer_norm_epsilon=cfg.get("layer_norm_epsilon", 1e-5))

    def to_hf(self) -> dict:
        """The HF GPT-2 `config.json` dict that `from_hf` reads back to this config."""
        return {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "activation_function": "gelu_new",
                "vocab_size": self.vocab_size, "n_positions": self.n_positions, "n_ctx": self.n_positions,
                "n_embd": self.n_embd, "n_layer": self.n_layer, "n_head": self.n_head, "n_inner": None,
                "layer_norm_epsilon": self.layer_norm_epsilon, "scale_attn_weights": True,
                "scale_attn_by_inverse_layer_idx": False, "tie_word_embeddings": True}


def cache_shape(config: GPTConfig, batch: int, max_len: int) -> tuple[int, ...]:
    """(n_layer, 2, batch, n_head, max_len, head_dim): keys at [layer, 0], values at [layer, 1]."""
    return (config.n_layer, 2, batch, config.n_head, max_len, config.head_dim)


def cache_bytes_per_token(config: GPTConfig, dtype: tf.DType | str = tf.float32) -> int:
    """Bytes of KV cache one token holds: a key and a value of n_embd in every layer."""
    return 2 * config.n_layer * config.n_embd * tf.as_dtype(dtype).size


def positions_from_mask(attention_mask: tf.Tensor) -> tf.Tensor:
    """Position of every token counted over the row's real tokens: 0, 1, .. after any left padding."""
    return tf.maximum(tf.cumsum(attention_mask, axis=1) - 1, 0)


def _negative(dtype: tf.DType) -> tf.Tensor:
    return tf.constant(-1e4 if dtype == tf.float16 else -1e9, dtype)


def causal_bias(attention_mask: tf.Tensor, dtype: tf.DType) -> tf.Tensor:
    """(batch, length) 1/0 mask -> additive (batch, 1, length, length) bias: a query sees the real
    tokens at or before it."""
    length = tf.shape(attention_mask)[1]
    causal = tf.linalg.band_part(tf.ones([length, length], tf.bool), -1, 0)
    keep = tf.logical_and(causal[tf.newaxis], tf.cast(attention_mask, tf.bool)[:, tf.newaxis, :])
    return tf.where(keep, tf.constant(0, dtype), _negative(dtype))[:, tf.newaxis]


def cache_bias(cache_mask: tf.Tensor, dtype: tf.DType) -> tf.Tensor:
    """(batch, max_len) 1/0 mask over cache columns -> additive (batch, 1, 1, max_len) bias."""
    keep = tf.cast(cache_mask, tf.bool)[:, tf.newaxis, tf.newaxis, :]
    return tf.where(keep, tf.constant(0, dtype), _negative(dtype))


class _ConfigLayer(keras.layers.Layer):
    """A layer built from a GPTConfig and serialised with it."""

    def __init__(self, config: GPTConfig, **kwargs):
        super().__init__(**kwargs)
        self.config = config

    def get_config(self):
        return {**super().get_config(), "config": dataclasses.asdict(self.config)}

    @classmethod
    def from_config(cls, cfg):
        return cls(GPTConfig(**cfg.pop("config")), **cfg)


@keras.utils.register_keras_serializable("hvdinfer")
class Attention(_ConfigLayer):
    """Multi-head self-attention with fused q, k, v projection (`c_attn`) and output projection (`c_proj`)."""

    def __init__(self, config: GPTConfig, **kwargs):
        super().__init__(config, **kwargs)
        self.c_attn = keras.layers.Dense(3 * config.n_embd, name="c_attn")
        self.c_proj = keras.layers.Dense(config.n_embd, name="c_proj")

    def _heads(self, x, batch, length):
        x = tf.reshape(x, [batch, length, self.config.n_head, self.config.head_dim])
        return tf.transpose(x, [0, 2, 1, 3])

    def call(self, x, bias, memory: Memory | None = None, layer: int = 0):
        """x: (batch, length, n_embd); bias: additive, broadcastable to (batch, heads, length, keys).

        `memory` (optional) stores this call's keys and values and returns those to attend over.
        """
        batch, length = tf.shape(x)[0], tf.shape(x)[1]
        q, k, v = tf.split(self.c_attn(x), 3, axis=-1)
        q, k, v = (self._heads(t, batch, length) for t in (q, k, v))
        if memory is not None:
            k, v = memory(layer, k, v)
        scores = tf.matmul(q, k, transpose_b=True) * tf.cast(1.0 / math.sqrt(self.config.head_dim), q.dtype)
        context = tf.matmul(tf.nn.softmax(scores + bias, axis=-1), v)
        context = tf.reshape(tf.transpose(context, [0, 2, 1, 3]), [batch, length, self.config.n_embd])
        return self.c_proj(context)


@keras.utils.register_keras_serializable("hvdinfer")
class MLP(_ConfigLayer):
    """n_embd -> 4 n_embd (`c_fc`), tanh GELU, -> n_embd (`c_proj`)."""

    def __init__(self, config: GPTConfig, **kwargs):
        super().__init__(config, **kwargs)
        self.c_fc = keras.layers.Dense(4 * config.n_embd, name="c_fc")
        self.c_proj = keras.layers.Dense(config.n_embd, name="c_proj")

    def call(self, x):
        return self.c_proj(tf.nn.gelu(self.c_fc(x), approximate=True))


@keras.utils.register_keras_serializable("hvdinfer")
class Block(_ConfigLayer):
    """Pre-LayerNorm block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, config: GPTConfig, **kwargs):
        super().__init__(config, **kwargs)
        self.ln_1 = keras.layers.LayerNormalization(epsilon=config.layer_norm_epsilon, name="ln_1")
        self.attn = Attention(config, name="attn")
        self.ln_2 = keras.layers.LayerNormalization(epsilon=config.layer_norm_epsilon, name="ln_2")
        self.mlp = MLP(config, name="mlp")

    def call(self, x, bias, memory: Memory | None = None, layer: int = 0):
        x = x + self.attn(self.ln_1(x), bias, memory=memory, layer=layer)
        return x + self.mlp(self.ln_2(x))


@keras.utils.register_keras_serializable("hvdinfer")
class TiedEmbedding(keras.layers.Layer):
    """The token table (vocab, n_embd), used twice: ids -> vectors, and the LM head h @ table^T.

    Both read the table whole. Keras' Embedding looks ids up with a sparse read, which switches the
    variable to copy-on-read for good: every head matmul after it would first copy the whole table.
    """

    def __init__(self, vocab_size: int, n_embd: int, **kwargs):
        super().__init__(**kwargs)
        self.vocab_size, self.n_embd = vocab_size, n_embd

    def build(self, input_shape):
        self.embeddings = self.add_weight("embeddings", shape=(self.vocab_size, self.n_embd),
                                          initializer=keras.initializers.RandomNormal(stddev=0.02))
        super().build(input_shape)

    def call(self, input_ids):
        return tf.cast(tf.gather(tf.convert_to_tensor(self.embeddings), input_ids), self.compute_dtype)

    def logits(self, hidden):
        """hidden (..., n_embd) -> float32 logits (..., vocab)."""
        table = tf.cast(tf.convert_to_tensor(self.embeddings), hidden.dtype)
        tokens = tf.reshape(hidden, [-1, self.n_embd])
        # table @ tokens^T, then transposed: TF's CPU matmul with the big table as the transposed
        # operand is about 10x slower (it repacks the whole table every call).
        logits = tf.transpose(tf.matmul(table, tokens, transpose_b=True))
        return tf.cast(tf.reshape(logits, tf.concat([tf.shape(hidden)[:-1], [self.vocab_size]], 0)), tf.float32)

    def get_config(self):
        return {**super().get_config(), "vocab_size": self.vocab_size, "n_embd": self.n_embd}


class GPT(keras.Model):
    """GPT-2 language model: input_ids, attention_mask -> next-token logits (float32)."""

    def __init__(self, config: GPTConfig, **kwargs):
        super().__init__(**kwargs)
        self.config = config
        self.wte = TiedEmbedding(config.vocab_size, config.n_embd, name="wte")
        self.wpe = keras.layers.Embedding(config.n_positions, config.n_embd, name="wpe")
        self.blocks = [Block(config, name=f"block_{i}") for i in range(config.n_layer)]
        self.ln_f = keras.layers.LayerNormalization(epsilon=config.layer_norm_epsilon, name="ln_f")

    def _hidden(self, input_ids, positions, bias, memory: Memory | None = None):
        x = self.wte(input_ids) + self.wpe(positions)
        for i, block in enumerate(self.blocks):
            x = block(x, bias, memory=memory, layer=i)
        return self.ln_f(x)

    def named_layers(self) -> list[tuple[str, keras.layers.Layer]]:
        """The layers that hold weights, by name, in the order a token meets them (plans name these)."""
        return [("wte", self.wte), ("wpe", self.wpe), *((block.name, block) for block in self.blocks),
                ("ln_f", self.ln_f)]

    def run_blocks(self, x, bias, start: int = 0, stop: int | None = None, memory: Memory | None = None):
        """Blocks start .. stop-1 only (a pipeline stage's share); `memory` gets each block's model-wide index."""
        for i in range(start, len(self.blocks) if stop is None else stop):
            x = self.blocks[i](x, bias, memory=memory, layer=i)
        return x

    def call(self, inputs):
        """{"input_ids", "attention_mask"} (batch, length) -> logits (batch, length, vocab)."""
        input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
        hidden = self._hidden(input_ids, positions_from_mask(attention_mask),
                              causal_bias(attention_mask, self.compute_dtype))
        return self.wte.logits(hidden)

    def new_cache(self, batch: int, max_len: int) -> tf.Variable:
        """A zeroed KV cache for `batch` rows of up to `max_len` tokens (padding included), in the
        model's compute dtype; reuse it for every batch of that geometry."""
        return tf.Variable(tf.zeros(cache_shape(self.config, batch, max_len), self.compute_dtype),
                           trainable=False, name="kv_cache")

    def last_logits(self, input_ids, attention_mask) -> tf.Tensor:
        """Logits (batch, vocab) after each row's last real token, no cache: the full recompute."""
        return self._last_logits_graph(_ids(input_ids), _ids(attention_mask))

    def prefill(self, input_ids, attention_mask, cache: tf.Variable) -> tuple[tf.Tensor, tf.Variable]:
        """Run the prompts (batch, length) and store their keys and values in cache columns
        0 .. length-1; returns the logits after each row's last real token and the cache."""
        input_ids, attention_mask = _ids(input_ids), _ids(attention_mask)
        _check_cache(cache, self.config, input_ids.shape[0], input_ids.shape[1])
        return self._prefill_graph(input_ids, attention_mask, cache, tuple(cache.shape)), cache

    def decode_step(self, token_ids, positions, step_index, cache: tf.Variable,
                    cache_mask) -> tuple[tf.Tensor, tf.Variable]:
        """Feed one token per row: token_ids and positions (batch,), its keys and values written
        at cache column `step_index`; cache_mask (batch, max_len) marks the columns to attend to,
        this one included. Returns the next-token logits (batch, vocab) and the cache."""
        token_ids, positions, cache_mask = _ids(token_ids), _ids(positions), _ids(cache_mask)
        _check_cache(cache, self.config, token_ids.shape[0], 1)
        max_len = cache.shape[4]
        if tuple(cache_mask.shape) != (token_ids.shape[0], max_len):
            raise ValueError(f"cache_mask shape {tuple(cache_mask.shape)} is not (batch, max_len) = "
                             f"{(token_ids.shape[0], max_len)}")
        if isinstance(step_index, (int, np.integer)) and not 0 <= step_index < max_len:
            raise ValueError(f"step_index {step_index} outside the cache's columns 0..{max_len - 1}")
        logits = self._decode_step_graph(token_ids, positions, _ids(step_index), cache, cache_mask,
                                         tuple(cache.shape))
        return logits, cache

    # The graphs are traced without AutoGraph: they hold no Python control flow on tensors, and converting
    # every Keras layer's call was about a third of each trace (0.8 s CPU per graph at the gpt2 size).
    @tf.function(reduce_retracing=True, autograph=False)
    def _last_logits_graph(self, input_ids, attention_mask):
        hidden = self._hidden(input_ids, positions_from_mask(attention_mask),
                              causal_bias(attention_mask, self.compute_dtype))
        return self.wte.logits(_last_real(hidden, attention_mask))

    # The cache's shape is passed as a Python tuple (`geometry`) to key the traces: a trace relaxed to
    # another variable shape would keep the first shape's tf.shape(cache) folded in (TF 2.15).
    @tf.function(reduce_retracing=True, autograph=False)
    def _prefill_graph(self, input_ids, attention_mask, cache, geometry):
        columns = _cache_indices(cache, tf.range(tf.shape(input_ids)[1]))

        def memory(layer, k, v):
            cache.scatter_nd_update(columns + [layer, 0, 0, 0, 0], tf.stack([k, v]))
            return k, v

        hidden = self._hidden(input_ids, positions_from_mask(attention_mask),
                              causal_bias(attention_mask, self.compute_dtype), memory)
        return self.wte.logits(_last_real(hidden, attention_mask))

    @tf.function(reduce_retracing=True, autograph=False)
    def _decode_step_graph(self, token_ids, positions, step_index, cache, cache_mask, geometry):
        new_column = _cache_indices(cache, step_index[tf.newaxis])
        past_columns = _cache_indices(cache, tf.range(step_index + 1))

        def memory(layer, k, v):
            # Sparse writes and reads touch only these columns; a strided-slice assign or a plain read
            # of the variable would copy the whole cache every time.
            cache.scatter_nd_update(new_column + [layer, 0, 0, 0, 0], tf.stack([k, v]))
            past = tf.gather_nd(cache, past_columns + [layer, 0, 0, 0, 0])
            return past[0], past[1]

        hidden = self._hidden(token_ids[:, tf.newaxis], positions[:, tf.newaxis],
                              cache_bias(cache_mask[:, :step_index + 1], self.compute_dtype), memory)
        return self.wte.logits(hidden[:, 0])


def _cache_indices(cache: tf.Variable, columns: tf.Tensor) -> tf.Tensor:
    """Indices [0, kv, row, head, column] of `columns` in layer 0 of the cache, shaped (2, batch, heads,
    len(columns), 5) like the keys and values stacked; add [layer, 0, 0, 0, 0] for another layer."""
    _, _, batch, heads, _, _ = cache.shape
    kv, row, head, column = tf.meshgrid(tf.range(2), tf.range(batch), tf.range(heads), columns, indexing="ij")
    return tf.stack([tf.zeros_like(kv), kv, row, head, column], axis=-1)


def _ids(x) -> tf.Tensor:
    """int32 tensor of ids, positions or a mask (Python ints and any numpy integer array accepted)."""
    return tf.cast(x, tf.int32) if isinstance(x, tf.Tensor) else tf.convert_to_tensor(np.asarray(x, np.int32))


def _last_real(hidden, attention_mask):
    """hidden (batch, length, n) at each row's last real token, wherever the padding is."""
    length = tf.shape(attention_mask)[1]
    last = length - 1 - tf.argmax(tf.reverse(attention_mask, [1]), axis=1, output_type=tf.int32)
    return tf.gather(hidden, last, batch_dims=1)


def _check_cache(cache: tf.Variable, config: GPTConfig, batch: int, length: int) -> None:
    expected = cache_shape(config, batch, cache.shape[4])
    if tuple(cache.shape) != expected:
        raise ValueError(f"cache shape {tuple(cache.shape)} does not fit this model and batch: want {expected}")
    if length > cache.shape[4]:
        raise ValueError(f"prompts of {length} tokens do not fit a cache of {cache.shape[4]} columns")


def build(model: GPT, length: int = 4) -> GPT:
    """Create the variables of `model` by running it once on a tiny dummy batch."""
    ones = tf.ones([1, length], tf.int32)
    model({"input_ids": ones, "attention_mask": ones})
    return model


def random_init(model: GPT, seed: int = 0, std: float = 0.02) -> GPT:
    """GPT-2's initialisation (normal(0, std) matrices, zero biases, unit LayerNorms), seeded:
    a starting point for training from scratch."""
    build(model)
    rng = tf.random.Generator.from_seed(seed)
    for var in model.weights:
        name = var.name.split("/")[-1]
        if name.startswith("gamma"):
            var.assign(tf.ones(var.shape, var.dtype))
        elif name.startswith(("beta", "bias")):
            var.assign(tf.zeros(var.shape, var.dtype))
        else:
            var.assign(rng.normal(var.shape, stddev=std, dtype=var.dtype))
    return model
