"""GPT-2 at the debug size: agreement with the independent numpy GPT-2 on a checkpoint written in
HF layout, left padding, prefill + decode steps against the full forward, one trace for a whole
generation, the config, the registry and the cache's size."""
import numpy as np
import pytest
import tensorflow as tf

from models import gpt, gpt_weights, registry
from tests import reference_gpt2, tiny_gpt

CONFIG = registry.gpt_size("debug")
# Two rows left-padded to the third's length, one of them heavily.
IDS = np.array([[0, 0, 11, 260, 262, 5], [0, 0, 0, 0, 0, 270], [7, 8, 9, 10, 11, 12]], np.int32)
MASK = (IDS != 0).astype(np.int32)
MASK[2] = 1


@pytest.fixture(scope="module")
def checkpoint():
    return tiny_gpt.random_checkpoint(CONFIG, seed=1)


@pytest.fixture(scope="module")
def model(checkpoint):
    model = gpt.build(gpt.GPT(CONFIG))
    gpt_weights.assign(model, checkpoint)
    return model


@pytest.mark.parametrize("prefix", ["transformer.", ""])
def test_keras_matches_numpy_reference(checkpoint, prefix):
    tensors = {k.replace("transformer.", prefix, 1): v for k, v in checkpoint.items()}
    if prefix:  # what older HF versions saved beside the weights: a tied head and mask buffers
        tensors["lm_head.weight"] = tensors["transformer.wte.weight"].copy()
        tensors["transformer.h.0.attn.bias"] = np.tril(np.ones((1, 1, 128, 128), np.float32))
        tensors["transformer.h.1.attn.masked_bias"] = np.array(-1e4, np.float32)
    model = gpt.build(gpt.GPT(CONFIG))
    gpt_weights.assign(model, tensors)
    got = model({"input_ids": IDS, "attention_mask": MASK}).numpy()
    expected = reference_gpt2.logits(checkpoint, IDS, MASK, num_heads=CONFIG.n_head)
    assert got.shape == (3, 6, CONFIG.vocab_size) and got.dtype == np.float32
    real = MASK.astype(bool)
    assert np.max(np.abs(got[real] - expected[real])) < 1e-4
    assert np.std(expected[real]) > 1.0  # the comparison is not between near-zero numbers


def test_left_padding_gives_a_row_what_it_gets_alone(model):
    batch = model({"input_ids": IDS, "attention_mask": MASK}).numpy()
    alone = model({"input_ids": IDS[:1, 2:], "attention_mask": MASK[:1, 2:]}).numpy()
    np.testing.assert_allclose(batch[0, 2:], alone[0], atol=1e-5)
    np.testing.assert_allclose(model.last_logits(IDS, MASK).numpy(), batch[:, -1], atol=1e-5)


def test_prefill_and_decode_steps_match_the_full_forward(model):
    follow = np.array([[100, 101, 102], [110, 111, 112], [120, 121, 122]], np.int32)
    length, steps = IDS.shape[1], follow.shape[1]
    cache = model.new_cache(3, length + steps)
    logits, cache = model.prefill(IDS, MASK, cache)
    np.testing.assert_allclose(logits.numpy(), model.last_logits(IDS, MASK).numpy(), atol=1e-5)
    cache_mask = np.zeros((3, length + steps), np.int32)
    cache_mask[:, :length] = MASK
    for step in range(steps):
        cache_mask[:, length + step] = 1
        logits, cache = model.decode_step(follow[:, step], MASK.sum(1) + step, length + step, cache, cache_mask)
        ids = np.concatenate([IDS, follow[:, :step + 1]], 1)
        full = model({"input_ids": ids, "attention_mask": np.concatenate([MASK, np.ones((3, step + 1), np.int32)], 1)})
        np.testing.assert_allclose(logits.numpy(), full.numpy()[:, -1], atol=1e-4)


def test_decode_step_is_traced_once_for_a_whole_generation(model):
    max_len = 64
    cache = model.new_cache(2, max_len)
    before = model._decode_step_graph.experimental_get_tracing_count()
    model.prefill(IDS[:2], MASK[:2], cache)
    cache_mask = np.zeros((2, max_len), np.int32)
    cache_mask[:, :6] = MASK[:2]
    for column in range(6, max_len):
        cache_mask[:, column] = 1
        model.decode_step(np.array([3, 4]), MASK[:2].sum(1) + column - 6, column, cache, cache_mask)
    # Another batch of the same geometry, in a fresh cache: still the same graph.
    model.decode_step(np.array([3, 4]), np.array([6, 6]), 6, model.new_cache(2, max_len), cache_mask)
    assert model._decode_step_graph.experimental_get_tracing_count() - before == 1


def test_cache_errors(model):
    with pytest.raises(ValueError, match=r"cache shape .* does not fit this model and batch"):
        model.prefill(IDS, MASK, model.new_cache(2, 16))
    with pytest.raises(ValueError, match="prompts of 6 tokens do not fit a cache of 4 columns"):
        model.prefill(IDS, MASK, model.new_cache(3, 4))
    with pytest.raises(ValueError, match=r"step_index 8 outside the cache's columns 0\.\.7"):
        model.decode_step([1, 2, 3], [0, 0, 0], 8, model.new_cache(3, 8), np.ones((3, 8), np.int32))
    with pytest.raises(ValueError, match=r"cache_mask shape \(3, 7\) is not \(batch, max_len\) = \(3, 8\)"):
        model.decode_step([1, 2, 3], [0, 0, 0], 1, model.new_cache(3, 8), np.ones((3, 7), np.int32))


def test_layer_names_are_the_checkpoint_modules():
    model = gpt.build(gpt.GPT(CONFIG))
    assert [layer.name for layer in model.layers] == ["wte", "wpe", "block_0", "block_1", "ln_f"]
    block = model.blocks[1]
    assert [block.ln_1.name, block.attn.name, block.ln_2.name, block.mlp.name] == ["ln_1", "attn", "ln_2", "mlp"]
    assert [block.attn.c_attn.name, block.attn.c_proj.name, block.mlp.c_fc.name, block.mlp.c_proj.name] == \
        ["c_attn", "c_proj", "c_fc", "c_proj"]
    assert "block_1/attn/c_attn/kernel" in block.attn.c_attn.kernel.name


def test_gpt2_size_has_124m_parameters_and_its_cache_cost():
    config = registry.gpt_size("gpt2")
    e, layers = config.n_embd, config.n_layer
    params = config.vocab_size * e + config.n_positions * e + 2 * e + layers * (12 * e * e + 13 * e)
    assert params == 124_439_808
    assert gpt.cache_bytes_per_token(config) == 2 * 12 * 768 * 4 == 73_728
    assert gpt.cache_bytes_per_token(config, tf.bfloat16) == 36_864
    assert gpt.cache_shape(config, 8, 1024) == (12, 2, 8, 12, 1024, 64)


def test_config_round_trips_through_hf_json():
    for name in ("debug", "gpt2", "gpt2-xl"):
        assert gpt.GPTConfig.from_hf(registry.gpt_size(name).to_hf()) == registry.gpt_size(name)


@pytest.mark.parametrize("change, message", [
    ({"model_type": "bert"}, "model_type 'bert' is not 'gpt2'"),
    ({"activation_function": "relu"}, r"unsupported activation_function 'relu' \(only the tanh GELU"),
    ({"n_inner": 100}, r"unsupported n_inner 100 \(only 4 \* n_embd = 256\)"),
    ({"scale_attn_by_inverse_layer_idx": True}, "unsupported scale_attn_by_inverse_layer_idx=True"),
    ({"tie_word_embeddings": False}, "unsupported tie_word_embeddings=False"),
    ({"n_head": 5}, "n_embd 64 is not divisible by n_head 5"),
])
def test_config_refuses_what_the_model_does_not_implement(change, message):
    with pytest.raises(ValueError, match=message):
        gpt.GPTConfig.from_hf({**CONFIG.to_hf(), **change})


def test_unknown_size_lists_known_ones():
    with pytest.raises(KeyError, match="unknown GPT size 'gpt5'; known: debug, gpt2"):
        registry.gpt_size("gpt5")
