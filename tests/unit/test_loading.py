"""A generated sentence-transformers directory at the debug size -> model, tokenizer, info;
and the refusals for what the Keras model does not implement."""
import json

import numpy as np
import pytest

from models import bert, loading, registry
from tests import tiny


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    model = tiny.random_model(seed=4)
    return model, tiny.write_model_dir(tmp_path_factory.mktemp("st") / "model", model, max_seq_length=6)


def test_loads_model_tokenizer_and_info(model_dir):
    original, path = model_dir
    model, tokenizer, info = loading.load_sentence_embedder(path)
    assert info.config == registry.size("debug") and info.max_seq_length == 6 and info.normalize
    assert tokenizer.max_length == 6
    batch = tokenizer.encode_batch(["the cat sat on the mat", "a dog"])
    inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
    np.testing.assert_array_equal(model(inputs).numpy(), original(inputs).numpy())


def test_config_round_trips_through_hf_json():
    cfg = registry.size("minilm-l6")
    assert bert.BertConfig.from_hf(json.loads(json.dumps(cfg.to_hf()))) == cfg


def _edited(path, name, content):
    (path / name).write_text(json.dumps(content))


def test_without_normalize_module(model_dir):
    _, path = model_dir
    _edited(path, "modules.json", tiny.MODULES[:2])
    try:
        assert loading.read_info(path).normalize is False
    finally:
        _edited(path, "modules.json", tiny.MODULES)


@pytest.mark.parametrize("name, content, message", [
    ("1_Pooling/config.json", {"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False},
     r"only mean pooling is supported, this model asks for \['pooling_mode_cls_token'\]"),
    ("1_Pooling/config.json", {"pooling_mode_mean_tokens": True, "word_embedding_dimension": 768},
     "word_embedding_dimension 768 != hidden_size 32"),
    ("modules.json", tiny.MODULES + [{"idx": 3, "name": "3", "path": "3_Dense",
                                      "type": "sentence_transformers.models.Dense"}],
     "unsupported module list"),
    ("sentence_bert_config.json", {"max_seq_length": 65}, r"max_seq_length 65 outside 2\.\.64"),
    ("sentence_bert_config.json", {"max_seq_length": 8, "do_lower_case": True}, "do_lower_case is not supported"),
    ("config.json", {**registry.size("debug").to_hf(), "hidden_act": "relu"}, "unsupported hidden_act 'relu'"),
])
def test_refuses_what_the_model_does_not_implement(tmp_path, name, content, message):
    path = tiny.write_model_dir(tmp_path / "model", tiny.random_model(seed=5))
    _edited(path, name, content)
    with pytest.raises(ValueError, match=message):
        loading.read_info(path)


def test_missing_file_is_named(tmp_path):
    path = tiny.write_model_dir(tmp_path / "model", tiny.random_model(seed=5))
    (path / "modules.json").unlink()
    with pytest.raises(ValueError, match="missing modules.json"):
        loading.read_info(path)
