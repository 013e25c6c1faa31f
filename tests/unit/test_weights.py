"""safetensors <-> Keras at the debug size: the round trip, the HF names and layout, the checks,
and agreement with the independent numpy BERT."""
import numpy as np
import pytest
import safetensors.numpy

from models import bert, registry, weights
from tests import reference_bert, tiny

IDS = np.array([[2, 5, 6, 7, 3, 0, 0], [2, 10, 11, 12, 8, 9, 3]], np.int32)
MASK = (np.arange(7)[None] < np.array([[5], [7]])).astype(np.int32)


def _run(model):
    return model({"input_ids": IDS, "attention_mask": MASK}).numpy()


def _checkpoint(path):
    return safetensors.numpy.load_file(str(path))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = tiny.random_model(seed=1)
    path = tmp_path_factory.mktemp("weights") / "model.safetensors"
    weights.save_weights(model, path)
    return model, path


def test_round_trip_gives_identical_outputs(saved):
    model, path = saved
    fresh = tiny.random_model(seed=2)
    assert not np.allclose(_run(fresh), _run(model))
    weights.load_weights(fresh, path)
    np.testing.assert_array_equal(_run(fresh), _run(model))
    for a, b in zip(model.weights, fresh.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_saved_file_uses_hf_names_and_layout(saved):
    model, path = saved
    tensors = safetensors.numpy.load_file(str(path))
    cfg = registry.size("debug")
    assert len(tensors) == 5 + cfg.num_layers * 16 == len(model.weights)
    assert tensors["embeddings.word_embeddings.weight"].shape == (cfg.vocab_size, cfg.hidden_size)
    # Linear weights are (out, in) as in PyTorch.
    assert tensors["encoder.layer.1.intermediate.dense.weight"].shape == (cfg.intermediate_size, cfg.hidden_size)
    np.testing.assert_array_equal(tensors["encoder.layer.0.attention.self.query.weight"],
                                  model.encoder.blocks[0].query.kernel.numpy().T)
    np.testing.assert_array_equal(tensors["encoder.layer.1.output.LayerNorm.weight"],
                                  model.encoder.blocks[1].ffn_norm.gamma.numpy())


def test_bert_prefix_pooler_and_position_ids_are_accepted(saved):
    model, path = saved
    tensors = {f"bert.{k}": v for k, v in safetensors.numpy.load_file(str(path)).items()}
    tensors["bert.pooler.dense.weight"] = np.zeros((32, 32), np.float32)
    tensors["bert.embeddings.position_ids"] = np.arange(64, dtype=np.int64)[None]
    encoder = bert.build(bert.BertEncoder(registry.size("debug")))
    weights.assign(encoder, tensors)
    np.testing.assert_array_equal(encoder.embeddings.word.embeddings.numpy(),
                                  model.encoder.embeddings.word.embeddings.numpy())


def test_every_variable_is_mapped_once():
    model = bert.build(bert.SentenceEmbedder(registry.size("debug")))
    table = weights.hf_variables(model)
    assert sorted(id(var) for var, _ in table.values()) == sorted(id(w) for w in model.weights)


def test_missing_key_is_named(saved):
    _, path = saved
    tensors = _checkpoint(path)
    del tensors["encoder.layer.1.attention.self.value.bias"]
    with pytest.raises(ValueError, match=r"checkpoint lacks encoder\.layer\.1\.attention\.self\.value\.bias"):
        weights.assign(tiny.random_model(seed=3), tensors)


def test_shape_mismatch_names_key_and_both_shapes(saved):
    _, path = saved
    tensors = _checkpoint(path)
    tensors["encoder.layer.0.intermediate.dense.weight"] = np.zeros((32, 64), np.float32)  # (in, out): wrong way round
    with pytest.raises(ValueError, match=r"encoder\.layer\.0\.intermediate\.dense\.weight: checkpoint shape \(32, 64\) "
                                         r"does not fit Keras variable .*ffn_in/kernel.* shape \(32, 64\) "
                                         r"\(expected \(64, 32\) in the checkpoint\)"):
        weights.assign(tiny.random_model(seed=3), tensors)


def test_unused_tensor_is_an_error_and_nothing_is_assigned(saved):
    _, path = saved
    tensors = _checkpoint(path)
    tensors["cls.predictions.bias"] = np.zeros(128, np.float32)
    target = tiny.random_model(seed=3)
    before = [w.numpy() for w in target.weights]
    with pytest.raises(ValueError, match=r"no place in the model: cls\.predictions\.bias"):
        weights.assign(target, tensors)
    for b, w in zip(before, target.weights):
        np.testing.assert_array_equal(b, w.numpy())


def test_keras_matches_numpy_reference_on_random_weights(saved):
    model, path = saved
    expected = reference_bert.sentence_embeddings(_checkpoint(path), IDS, MASK,
                                                  num_heads=registry.size("debug").num_heads)
    np.testing.assert_allclose(_run(model), expected, atol=1e-5)
