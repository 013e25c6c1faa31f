"""The tokenizer wrapper on a tiny generated WordPiece tokenizer.json: padding to the batch's
longest text, truncation that keeps [SEP], lengths, and the file's own settings switched off."""
import numpy as np
import pytest

from models.tokenizer import Tokenizer
from tests import tiny

CLS, SEP, PAD, UNK = 2, 3, 0, 1


@pytest.fixture
def tokenizer(tmp_path):
    return Tokenizer.from_file(tiny.write_tokenizer(tmp_path / "tokenizer.json"), max_length=6)


def test_pads_to_longest_in_batch(tokenizer):
    ids, mask, truncated = tokenizer.encode_batch(["The cat sat", "a DOGS", "zebra"])
    np.testing.assert_array_equal(ids, [[CLS, 5, 6, 7, SEP], [CLS, 10, 11, 12, SEP], [CLS, UNK, SEP, PAD, PAD]])
    np.testing.assert_array_equal(mask, [[1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    assert ids.dtype == np.int32 and mask.dtype == np.int32
    assert truncated.tolist() == [False, False, False]


def test_truncates_to_max_length_keeping_sep(tokenizer):
    long = "the cat sat on the mat"  # 6 words + 2 special tokens
    ids, mask, truncated = tokenizer.encode_batch([long, "a cat"])
    np.testing.assert_array_equal(ids, [[CLS, 5, 6, 7, 8, SEP], [CLS, 10, 6, SEP, PAD, PAD]])
    assert truncated.tolist() == [True, False]
    ids, _, truncated = tokenizer.encode_batch([long], max_length=3)
    np.testing.assert_array_equal(ids, [[CLS, 5, SEP]])
    ids, _, truncated = tokenizer.encode_batch([long], max_length=8)
    assert ids.shape == (1, 8) and truncated.tolist() == [False]


def test_lengths_count_special_tokens_after_truncation(tokenizer):
    texts = ["", "cat", "the cat sat on the mat"]
    assert tokenizer.lengths(texts).tolist() == [2, 3, 6]
    assert tokenizer.lengths(texts, max_length=100).tolist() == [2, 3, 8]
    assert tokenizer.lengths(texts).tolist() == tokenizer.encode_batch(texts).attention_mask.sum(1).tolist()


def test_empty_batch(tokenizer):
    ids, mask, truncated = tokenizer.encode_batch([])
    assert ids.shape == mask.shape == (0, 0) and truncated.shape == (0,)


def test_bad_input(tokenizer, tmp_path):
    with pytest.raises(TypeError, match="text 1 is NoneType, not str"):
        tokenizer.encode_batch(["cat", None])
    with pytest.raises(ValueError, match="max_length must leave room"):
        Tokenizer.from_file(tmp_path / "tokenizer.json", max_length=1)
