"""A BERT encoder in plain single-device Keras, with stable layer names.

Layer names follow the checkpoint's module names so that weights map one to one:
`embeddings`, `block_0` .. `block_{n-1}` (each with `attention`, `attention_norm`, `ffn_in`,
`ffn_out`, `ffn_norm`), then a head (`pool` for sentence embeddings). Nothing here knows about
Horovod or ranks; parallelism is applied from outside by placing these named layers.
"""
from __future__ import annotations

import dataclasses
import math

import tensorflow as tf

keras = tf.keras


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """Shape of a BERT encoder (the fields of a HF `config.json` that matter for inference)."""

    vocab_size: int = 30522
    """Rows of the word-embedding table."""
    hidden_size: int = 384
    """Width of every token vector."""
    num_layers: int = 6
    """Number of transformer blocks."""
    num_heads: int = 12
    """Attention heads per block; must divide hidden_size."""
    intermediate_size: int = 1536
    """Width of the feed-forward layer inside each block."""
    max_position: int = 512
    """Rows of the position-embedding table."""
    type_vocab_size: int = 2
    """Rows of the token-type table."""
    layer_norm_eps: float = 1e-12
    """Epsilon of every LayerNorm."""

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")

    @classmethod
    def from_hf(cls, cfg: dict) -> "BertConfig":
        """From a HF BERT `config.json` dict."""
        if cfg.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"unsupported hidden_act {cfg['hidden_act']!r} (only exact gelu)")
        if cfg.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"unsupported position_embedding_type {cfg['position_embedding_type']!r} (only absolute)")
        return cls(vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
                   num_layers=cfg["num_hidden_layers"], num_heads=cfg["num_attention_heads"],
                   intermediate_size=cfg["intermediate_size"], max_position=cfg["max_position_embeddings"],
                   type_vocab_size=cfg.get("type_vocab_size", 2), layer_norm_eps=cfg.get("layer_norm_eps", 1e-12))

    def to_hf(self) -> dict:
        """The HF BERT `config.json` dict that `from_hf` reads back to this config."""
        return {"model_type": "bert", "architectures": ["BertModel"], "hidden_act": "gelu",
                "position_embedding_type": "absolute", "vocab_size": self.vocab_size,
                "hidden_size": self.hidden_size, "num_hidden_layers": self.num_layers,
                "num_attention_heads": self.num_heads, "intermediate_size": self.intermediate_size,
                "max_position_embeddings": self.max_position, "type_vocab_size": self.type_vocab_size,
                "layer_norm_eps": self.layer_norm_eps}


class _ConfigLayer(keras.layers.Layer):
    """A layer built from a BertConfig and serialised with it."""

    def __init__(self, config: BertConfig, **kwargs):
        super().__init__(**kwargs)
        self.config = config

    def get_config(self):
        return {**super().get_config(), "config": dataclasses.asdict(self.config)}

    @classmethod
    def from_config(cls, cfg):
        return cls(BertConfig(**cfg.pop("config")), **cfg)


@keras.utils.register_keras_serializable("hvdinfer")
class Embeddings(_ConfigLayer):
    """Word + position + token-type embeddings, then LayerNorm."""

    def __init__(self, config: BertConfig, **kwargs):
        super().__init__(config, **kwargs)
        self.word = keras.layers.Embedding(config.vocab_size, config.hidden_size, name="word_embeddings")
        self.position = keras.layers.Embedding(config.max_position, config.hidden_size, name="position_embeddings")
        self.token_type = keras.layers.Embedding(config.type_vocab_size, config.hidden_size,
                                                 name="token_type_embeddings")
        self.norm = keras.layers.LayerNormalization(epsilon=config.layer_norm_eps, name="LayerNorm")

    def call(self, input_ids, token_type_ids=None):
        length = tf.shape(input_ids)[1]
        if token_type_ids is None:
            token_type_ids = tf.zeros_like(input_ids)
        x = self.word(input_ids) + self.position(tf.range(length))[tf.newaxis] + self.token_type(token_type_ids)
        return self.norm(x)


@keras.utils.register_keras_serializable("hvdinfer")
class TransformerBlock(_ConfigLayer):
    """Post-LayerNorm BERT block: self-attention and a GELU feed-forward, each with a residual."""

    def __init__(self, config: BertConfig, **kwargs):
        super().__init__(config, **kwargs)
        h = config.hidden_size
        self.heads = config.num_heads
        self.head_dim = h // config.num_heads
        self.query = keras.layers.Dense(h, name="query")
        self.key = keras.layers.Dense(h, name="key")
        self.value = keras.layers.Dense(h, name="value")
        self.attention_out = keras.layers.Dense(h, name="attention_out")
        self.attention_norm = keras.layers.LayerNormalization(epsilon=config.layer_norm_eps, name="attention_norm")
        self.ffn_in = keras.layers.Dense(config.intermediate_size, name="ffn_in")
        self.ffn_out = keras.layers.Dense(h, name="ffn_out")
        self.ffn_norm = keras.layers.LayerNormalization(epsilon=config.layer_norm_eps, name="ffn_norm")

    def _split(self, x, batch, length):
        x = tf.reshape(x, [batch, length, self.heads, self.head_dim])
        return tf.transpose(x, [0, 2, 1, 3])

    def call(self, x, mask_bias):
        """x: (batch, length, hidden); mask_bias: (batch, 1, 1, length), 0 to keep, large negative to drop."""
        batch, length = tf.shape(x)[0], tf.shape(x)[1]
        q = self._split(self.query(x), batch, length)
        k = self._split(self.key(x), batch, length)
        v = self._split(self.value(x), batch, length)
        scores = tf.matmul(q, k, transpose_b=True) * (1.0 / math.sqrt(self.head_dim)) + mask_bias
        context = tf.matmul(tf.nn.softmax(scores, axis=-1), v)
        context = tf.reshape(tf.transpose(context, [0, 2, 1, 3]), [batch, length, self.config.hidden_size])
        x = self.attention_norm(x + self.attention_out(context))
        hidden = tf.nn.gelu(self.ffn_in(x), approximate=False)
        return self.ffn_norm(x + self.ffn_out(hidden))


@keras.utils.register_keras_serializable("hvdinfer")
class MeanPool(keras.layers.Layer):
    """Mean over the tokens the attention mask keeps, optionally L2-normalised (sentence-transformers)."""

    def __init__(self, normalize: bool = True, **kwargs):
        super().__init__(**kwargs)
        self.normalize = normalize

    def call(self, hidden, attention_mask):
        mask = tf.cast(attention_mask, hidden.dtype)[:, :, tf.newaxis]
        pooled = tf.reduce_sum(hidden * mask, axis=1) / tf.maximum(tf.reduce_sum(mask, axis=1), 1e-9)
        return tf.math.l2_normalize(pooled, axis=-1, epsilon=1e-24) if self.normalize else pooled

    def get_config(self):
        return {**super().get_config(), "normalize": self.normalize}


def mask_bias(attention_mask, dtype=tf.float32):
    """(batch, length) 1/0 mask -> additive (batch, 1, 1, length) bias for attention scores."""
    mask = tf.cast(attention_mask, dtype)[:, tf.newaxis, tf.newaxis, :]
    return (1.0 - mask) * tf.cast(-1e9 if dtype == tf.float32 else -1e4, dtype)


class BertEncoder(keras.Model):
    """input_ids, attention_mask -> last hidden states (batch, length, hidden)."""

    def __init__(self, config: BertConfig, **kwargs):
        super().__init__(**kwargs)
        self.config = config
        self.embeddings = Embeddings(config, name="embeddings")
        self.blocks = [TransformerBlock(config, name=f"block_{i}") for i in range(config.num_layers)]

    def named_layers(self) -> list[tuple[str, keras.layers.Layer]]:
        """The layers that hold weights, by name, in the order a token meets them (plans name these)."""
        return [("embeddings", self.embeddings), *((block.name, block) for block in self.blocks)]

    def run_blocks(self, x, bias, start: int = 0, stop: int | None = None):
        """Blocks start .. stop-1 only: a pipeline stage's share."""
        for block in self.blocks[start:stop]:
            x = block(x, bias)
        return x

    def call(self, inputs):
        input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
        x = self.embeddings(input_ids, inputs.get("token_type_ids"))
        bias = mask_bias(attention_mask, x.dtype)
        for block in self.blocks:
            x = block(x, bias)
        return x


class SentenceEmbedder(keras.Model):
    """BERT encoder + mean pooling + L2 normalisation: input_ids, attention_mask -> (batch, hidden)."""

    def __init__(self, config: BertConfig, normalize: bool = True, **kwargs):
        super().__init__(**kwargs)
        self.config = config
        self.encoder = BertEncoder(config, name="encoder")
        # Pooling and normalisation always in float32, whatever the compute precision of the encoder.
        self.pool = MeanPool(normalize, name="pool", dtype="float32")

    def named_layers(self) -> list[tuple[str, keras.layers.Layer]]:
        return [*self.encoder.named_layers(), ("pool", self.pool)]

    def call(self, inputs):
        return self.pool(self.encoder(inputs), inputs["attention_mask"])


def build(model: keras.Model, length: int = 8) -> keras.Model:
    """Create the variables of `model` by running it once on a tiny dummy batch."""
    ones = tf.ones([1, length], tf.int32)
    model({"input_ids": ones, "attention_mask": ones})
    return model
