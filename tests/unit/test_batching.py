"""Length-bucketed batching: nothing lost, little padding, indices travel with rows."""
import numpy as np
import pytest
from hypothesis import given, strategies as st

from hvdinfer.data.batching import make_batches, padded_length, padding_fraction


@given(lengths=st.lists(st.integers(1, 70), max_size=60), batch_size=st.integers(1, 9))
def test_every_record_appears_once_with_its_own_tokens(lengths, batch_size):
    indices = np.arange(100, 100 + len(lengths))
    tokens = [[int(i) % 50 + 1] * n for i, n in zip(indices, lengths)]
    batches = make_batches(indices, tokens, batch_size)
    seen = np.concatenate([b.indices for b in batches]) if batches else np.array([], int)
    assert sorted(seen.tolist()) == indices.tolist()
    for b in batches:
        assert len(b.indices) <= batch_size
        assert b.input_ids.shape[1] % 8 == 0
        for row, idx in enumerate(b.indices):
            n = lengths[idx - 100]
            assert b.attention_mask[row].sum() == n
            assert (b.input_ids[row, :n] == int(idx) % 50 + 1).all()
            assert (b.input_ids[row, n:] == 0).all()


def test_sorting_by_length_cuts_padding():
    rng = np.random.default_rng(0)
    lengths = rng.integers(4, 200, size=256)
    tokens = [[1] * n for n in lengths]
    sorted_pad = padding_fraction(make_batches(np.arange(256), tokens, 32))
    unsorted_pad = padding_fraction(make_batches(np.arange(256), tokens, 32, sort_by_length=False))
    assert sorted_pad < 0.2 and unsorted_pad > 2 * sorted_pad


def test_padded_length_and_bad_batch_size():
    assert [padded_length(n, 8) for n in (1, 8, 9, 16)] == [8, 8, 16, 16]
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        make_batches([0], [[1]], 0)


def test_widths_are_rounded_to_8_for_bf16_only():
    from hvdinfer.data import batching

    assert batching.pad_multiple("bf16") == 8 and batching.pad_multiple("fp32") == 1
    lengths = [3, 9, 5]
    unrounded = make_batches(range(3), [[1] * n for n in lengths], 2, multiple=batching.pad_multiple("fp32"))
    assert [b.input_ids.shape[1] for b in unrounded] == [9, 3]  # each batch exactly its longest
    rounded = make_batches(range(3), [[1] * n for n in lengths], 2, multiple=batching.pad_multiple("bf16"))
    assert [b.input_ids.shape[1] for b in rounded] == [16, 8]
