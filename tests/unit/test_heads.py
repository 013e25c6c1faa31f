"""The classifier head: save -> load round trip, and what a broken head says."""
import numpy as np
import pytest

from models import bert, heads, loading
from tests import tiny


def test_head_round_trip_gives_identical_logits(tmp_path):
    model_dir = tiny.write_model_dir(tmp_path / "m", tiny.random_model(2))
    model = bert.build(heads.TextClassifier(tiny.random_model(2), ["a", "b"]))
    model.classifier.kernel.assign(np.random.default_rng(0).normal(size=model.classifier.kernel.shape))
    heads.save_head(model, model_dir)
    loaded, tokenizer, _ = loading.load_classifier(model_dir)
    assert loaded.labels == ["a", "b"]
    enc = tokenizer.encode_batch(["the cat sat", "a dog"])
    inputs = {"input_ids": enc.input_ids, "attention_mask": enc.attention_mask}
    np.testing.assert_allclose(loaded(inputs).numpy(), model(inputs).numpy(), atol=1e-6)


def test_bad_heads_are_refused(tmp_path):
    with pytest.raises(ValueError, match="at least two distinct labels"):
        heads.TextClassifier(tiny.random_model(0), ["only"])
    model_dir = tiny.write_model_dir(tmp_path / "m", tiny.random_model(2))
    with pytest.raises(ValueError, match="no classifier.json"):
        loading.load_classifier(model_dir)
    (model_dir / heads.HEAD_CONFIG).write_text("{broken")
    with pytest.raises(ValueError, match="unreadable classifier head"):
        loading.load_classifier(model_dir)
