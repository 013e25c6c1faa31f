"""The pure-Keras BERT at its debug size: names, shapes, masking, pooling."""
import numpy as np
import tensorflow as tf

from models import bert, registry


def _model():
    tf.keras.utils.set_random_seed(0)
    return bert.build(bert.SentenceEmbedder(registry.size("debug")))


def test_layer_names_are_stable():
    model = _model()
    names = [layer.name for layer in model.encoder.layers]
    assert names == ["embeddings", "block_0", "block_1"]
    weights = {w.name for w in model.weights}
    assert any("/encoder/block_1/ffn_in/kernel" in name for name in weights)


def test_embeddings_are_unit_length_and_ignore_padding():
    model = _model()
    ids = np.array([[5, 6, 7, 0, 0], [5, 6, 7, 9, 9]], np.int32)
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 0, 0]], np.int32)
    out = model({"input_ids": ids, "attention_mask": mask}).numpy()
    assert out.shape == (2, 32)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)
    # Different tokens under the mask must not change the result.
    np.testing.assert_allclose(out[0], out[1], atol=1e-5)
    # And the unpadded sequence alone gives the same embedding.
    alone = model({"input_ids": ids[:1, :3], "attention_mask": mask[:1, :3]}).numpy()
    np.testing.assert_allclose(out[0], alone[0], atol=1e-5)


def test_config_rejects_indivisible_heads():
    import pytest

    with pytest.raises(ValueError, match="not divisible"):
        bert.BertConfig(hidden_size=30, num_heads=4)
