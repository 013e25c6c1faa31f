"""GPT-2 model directories at the debug size: one written in HF layout loads, save -> load is exact,
and what cannot be loaded is refused with the reason."""
import json

import numpy as np
import pytest

from models import gpt, gpt_loading, registry
from models.decoding import SamplingParams, generate_batch
from tests import reference_gpt2, tiny_gpt

CONFIG = registry.gpt_size("debug")
IDS = np.array([[0, 0, 11, 260, 262, 5], [7, 8, 9, 10, 11, 12]], np.int32)
MASK = (np.arange(6)[None] >= np.array([[2], [0]])).astype(np.int32)


@pytest.fixture(scope="module")
def checkpoint():
    return tiny_gpt.random_checkpoint(CONFIG, seed=6, prefix="")


@pytest.fixture(scope="module")
def loaded(checkpoint, tmp_path_factory):
    path = tiny_gpt.write_model_dir(tmp_path_factory.mktemp("hf") / "model", checkpoint,
                                    vocab_names=("encoder.json", "vocab.bpe"))
    return gpt_loading.load_gpt(path)


def test_loads_an_hf_layout_directory(loaded, checkpoint):
    model, tokenizer, config = loaded
    assert config == CONFIG and tokenizer.eos_id == 289
    got = model({"input_ids": IDS, "attention_mask": MASK}).numpy()
    expected = reference_gpt2.logits(checkpoint, IDS, MASK, num_heads=CONFIG.n_head)
    assert np.max(np.abs(got - expected)[MASK.astype(bool)]) < 1e-4


def test_save_then_load_is_exact(loaded, tmp_path):
    model, tokenizer, config = loaded
    path = gpt_loading.save_gpt(model, tokenizer, config, tmp_path / "saved")
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "merges.txt", "model.safetensors",
                                                       "tokenizer.json", "vocab.json"]
    hf = json.loads((path / "config.json").read_text())
    assert hf["model_type"] == "gpt2" and hf["eos_token_id"] == hf["bos_token_id"] == 289
    again, tokenizer_again, config_again = gpt_loading.load_gpt(path)
    assert config_again == config
    inputs = {"input_ids": IDS, "attention_mask": MASK}
    np.testing.assert_array_equal(again(inputs).numpy(), model(inputs).numpy())
    assert tokenizer_again.encode_batch_ids(["Hello world", "ünï"]) == tokenizer.encode_batch_ids(["Hello world", "ünï"])
    params = SamplingParams(max_new_tokens=5, temperature=0.8, seed=1)
    assert generate_batch(again, tokenizer_again, [[5, 6]], [0], params) == \
        generate_batch(model, tokenizer, [[5, 6]], [0], params)


def test_fresh_model_to_train_from_scratch(loaded, tmp_path):
    _, tokenizer, _ = loaded
    model = gpt.random_init(gpt.GPT(CONFIG), seed=0)
    gpt_loading.save_gpt(model, tokenizer, CONFIG, tmp_path / "fresh")
    again, _, _ = gpt_loading.load_gpt(tmp_path / "fresh")
    np.testing.assert_array_equal(again.wte.embeddings.numpy(), model.wte.embeddings.numpy())
    assert abs(float(np.std(model.blocks[0].mlp.c_fc.kernel.numpy())) - 0.02) < 0.002


def test_save_refuses_a_non_empty_directory_and_a_mismatched_config(loaded, tmp_path):
    model, tokenizer, config = loaded
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("")
    with pytest.raises(FileExistsError, match="exists and is not empty"):
        gpt_loading.save_gpt(model, tokenizer, config, tmp_path / "busy")
    with pytest.raises(ValueError, match="the model was built for"):
        gpt_loading.save_gpt(model, tokenizer, registry.gpt_size("gpt2"), tmp_path / "other")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy"]


@pytest.mark.parametrize("edit, message", [
    (lambda p: (p / "config.json").unlink(), "missing config.json"),
    (lambda p: (p / "model.safetensors").unlink(), "missing model.safetensors"),
    (lambda p: (p / "merges.txt").unlink(), "no GPT-2 vocabulary"),
    (lambda p: (p / "config.json").write_text(json.dumps({**CONFIG.to_hf(), "activation_function": "gelu"})),
     r"config.json: unsupported activation_function 'gelu'"),
    (lambda p: (p / "config.json").write_text(json.dumps({**CONFIG.to_hf(), "model_type": "llama"})),
     "config.json: model_type 'llama' is not 'gpt2'"),
    (lambda p: (p / "config.json").write_text(json.dumps({**CONFIG.to_hf(), "vocab_size": 100})),
     "the tokenizer has 290 ids but the model only vocab_size 100"),
])
def test_refusals_name_the_reason(tmp_path, edit, message):
    path = tiny_gpt.write_model_dir(tmp_path / "model", tiny_gpt.random_checkpoint(CONFIG, seed=7))
    edit(path)
    with pytest.raises(ValueError, match=message):
        gpt_loading.load_gpt(path)
