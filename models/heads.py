"""Task heads on top of the sentence embedder, in plain Keras.

`TextClassifier`: pooled sentence embedding -> dropout -> dense logits over named labels. In a model
directory the encoder stays in `model.safetensors` (so the directory still loads as an embedder)
and the head lives beside it: `classifier.json` (labels, dropout) and `classifier.safetensors`
(`classifier.weight` (labels, hidden), `classifier.bias`, HF Linear layout).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import safetensors.numpy
import tensorflow as tf

from models import bert

keras = tf.keras
HEAD_CONFIG = "classifier.json"
HEAD_WEIGHTS = "classifier.safetensors"


@keras.utils.register_keras_serializable("hvdinfer")
class StatelessDropout(keras.layers.Layer):
    """Dropout whose mask is a pure function of (seed, call counter): a resumed run draws exactly the
    masks an uninterrupted one would, because the counter is a weight saved with the checkpoint."""

    def __init__(self, rate: float, seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.rate = rate
        self.seed = seed

    def build(self, input_shape):
        self.counter = self.add_weight("counter", shape=(), dtype=tf.int64, trainable=False,
                                       initializer="zeros")

    def call(self, x, training=False):
        if not training or self.rate == 0:
            return x
        self.counter.assign_add(1)
        keep = tf.random.stateless_uniform(tf.shape(x), seed=tf.stack([tf.cast(self.seed, tf.int64), self.counter]))
        return tf.where(keep >= self.rate, x / (1.0 - self.rate), tf.zeros_like(x))

    def get_config(self):
        return {**super().get_config(), "rate": self.rate, "seed": self.seed}


class TextClassifier(keras.Model):
    """input_ids, attention_mask -> (batch, labels) logits in float32."""

    def __init__(self, embedder: bert.SentenceEmbedder, labels: list[str], dropout: float = 0.1, seed: int = 0,
                 **kwargs):
        super().__init__(**kwargs)
        if len(labels) < 2 or len(set(labels)) != len(labels):
            raise ValueError(f"a classifier needs at least two distinct labels, got {labels}")
        self.labels = list(labels)
        self.dropout_rate = dropout
        self.embedder = embedder
        self.config = embedder.config
        self.dropout = StatelessDropout(dropout, seed, name="dropout", dtype="float32")
        self.classifier = keras.layers.Dense(len(labels), name="classifier", dtype="float32")

    def named_layers(self) -> list[tuple[str, keras.layers.Layer]]:
        return [*self.embedder.named_layers(), ("dropout", self.dropout), ("classifier", self.classifier)]

    def call(self, inputs, training=False):
        return self.classifier(self.dropout(self.embedder(inputs), training=training))


def save_head(model: TextClassifier, model_dir: str | os.PathLike) -> None:
    model_dir = Path(model_dir)
    tensors = {"classifier.weight": np.ascontiguousarray(model.classifier.kernel.numpy().T),
               "classifier.bias": model.classifier.bias.numpy()}
    partial = model_dir / f".{HEAD_WEIGHTS}.partial"
    safetensors.numpy.save_file(tensors, str(partial))
    os.replace(partial, model_dir / HEAD_WEIGHTS)
    partial = model_dir / f".{HEAD_CONFIG}.partial"
    partial.write_text(json.dumps({"labels": model.labels, "dropout": model.dropout_rate}, indent=2))
    os.replace(partial, model_dir / HEAD_CONFIG)


def has_head(model_dir: str | os.PathLike) -> bool:
    return (Path(model_dir) / HEAD_CONFIG).is_file()


def read_head(model_dir: str | os.PathLike) -> tuple[list[str], float]:
    """(labels, dropout) of the head stored in `model_dir`."""
    model_dir = Path(model_dir)
    try:
        spec = json.loads((model_dir / HEAD_CONFIG).read_text())
        return [str(label) for label in spec["labels"]], float(spec.get("dropout", 0.1))
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ValueError(f"{model_dir / HEAD_CONFIG}: unreadable classifier head ({exc})") from None


def load_head(embedder: bert.SentenceEmbedder, model_dir: str | os.PathLike) -> TextClassifier:
    """A TextClassifier over `embedder` with the head stored in `model_dir`."""
    labels, dropout = read_head(model_dir)
    model = TextClassifier(embedder, labels, dropout)
    bert.build(model)
    assign_head(model, model_dir)
    return model


def assign_head(model: TextClassifier, model_dir: str | os.PathLike) -> None:
    """Set the (built) classifier's head from `model_dir`."""
    model_dir, labels, embedder = Path(model_dir), model.labels, model.embedder
    tensors = safetensors.numpy.load_file(str(model_dir / HEAD_WEIGHTS))
    weight, bias = tensors.get("classifier.weight"), tensors.get("classifier.bias")
    want = (len(labels), embedder.config.hidden_size)
    if weight is None or bias is None or weight.shape != want or bias.shape != (len(labels),):
        raise ValueError(f"{model_dir / HEAD_WEIGHTS}: expected classifier.weight {want} and classifier.bias "
                         f"({len(labels)},)")
    model.classifier.kernel.assign(weight.T)
    model.classifier.bias.assign(bias)
