"""GPT-2 safetensors <-> Keras at the debug size: the round trip, HF names and the Conv1D layout,
and errors that name the tensor."""
import numpy as np
import pytest
import safetensors.numpy

from models import gpt, gpt_weights, registry
from tests import tiny_gpt

CONFIG = registry.gpt_size("debug")
IDS = np.array([[0, 0, 11, 260, 262, 5], [7, 8, 9, 10, 11, 12]], np.int32)
MASK = (np.arange(6)[None] >= np.array([[2], [0]])).astype(np.int32)


def _run(model):
    return model({"input_ids": IDS, "attention_mask": MASK}).numpy()


def _model(tensors=None):
    model = gpt.build(gpt.GPT(CONFIG))
    if tensors is not None:
        gpt_weights.assign(model, tensors)
    return model


@pytest.fixture(scope="module")
def checkpoint():
    return tiny_gpt.random_checkpoint(CONFIG, seed=2)


@pytest.fixture(scope="module")
def saved(checkpoint, tmp_path_factory):
    model = _model(checkpoint)
    path = tmp_path_factory.mktemp("gpt-weights") / "model.safetensors"
    gpt_weights.save_weights(model, path)
    return model, path


def test_round_trip_gives_identical_logits(saved):
    model, path = saved
    fresh = gpt.random_init(gpt.GPT(CONFIG), seed=3)
    assert not np.allclose(_run(fresh), _run(model))
    gpt_weights.load_weights(fresh, path)
    np.testing.assert_array_equal(_run(fresh), _run(model))


def test_saved_file_is_the_checkpoint_it_came_from(saved, checkpoint):
    _, path = saved
    tensors = safetensors.numpy.load_file(str(path))
    # GPT2LMHeadModel names, Conv1D (in, out) weights, no lm_head (tied) and no mask buffers.
    assert sorted(tensors) == sorted(checkpoint) and len(tensors) == 4 + 12 * CONFIG.n_layer
    for name, value in checkpoint.items():
        np.testing.assert_array_equal(tensors[name], value)
    assert tensors["transformer.h.1.mlp.c_fc.weight"].shape == (64, 256)


def test_every_variable_is_mapped_once():
    model = _model()
    table = gpt_weights.hf_variables(model)
    assert sorted(id(var) for var, _ in table.values()) == sorted(id(w) for w in model.weights)
    assert not any(transposed for _, transposed in table.values())


def test_missing_tensor_is_named(checkpoint):
    tensors = dict(checkpoint)
    del tensors["transformer.h.1.attn.c_proj.bias"]
    with pytest.raises(ValueError, match=r"checkpoint lacks transformer\.h\.1\.attn\.c_proj\.bias \(for Keras "
                                         r"variable .*block_1/attn/c_proj/bias.*shape \(64,\)\)"):
        _model(tensors)


def test_shape_mismatch_names_tensor_and_both_shapes(checkpoint):
    tensors = dict(checkpoint)
    tensors["h.0.mlp.c_fc.weight"] = tensors.pop("transformer.h.0.mlp.c_fc.weight").T  # a Linear's (out, in)
    tensors = {k.removeprefix("transformer."): v for k, v in tensors.items()}
    with pytest.raises(ValueError, match=r"h\.0\.mlp\.c_fc\.weight: checkpoint shape \(256, 64\) does not fit "
                                         r"Keras variable .*c_fc/kernel.* shape \(64, 256\)"):
        _model(tensors)


def test_unexpected_tensor_is_named_and_nothing_is_assigned(checkpoint):
    tensors = {**checkpoint, "transformer.h.2.ln_1.weight": np.ones(64, np.float32)}
    target = gpt.random_init(gpt.GPT(CONFIG), seed=4)
    before = [w.numpy() for w in target.weights]
    with pytest.raises(ValueError, match=r"no place in the model: transformer\.h\.2\.ln_1\.weight"):
        gpt_weights.assign(target, tensors)
    for b, w in zip(before, target.weights):
        np.testing.assert_array_equal(b, w.numpy())


def test_untied_lm_head_is_refused(checkpoint):
    tensors = {**checkpoint, "lm_head.weight": checkpoint["transformer.wte.weight"] + 1}
    with pytest.raises(ValueError, match=r"lm_head\.weight differs from transformer\.wte\.weight \(other values\)"):
        _model(tensors)


def test_not_a_gpt2_checkpoint():
    with pytest.raises(ValueError, match="not a GPT-2 checkpoint: no wte.weight"):
        _model({"embeddings.word_embeddings.weight": np.zeros((4, 4), np.float32)})
