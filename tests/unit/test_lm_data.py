"""Language-model data on generated texts: the held-out split, training windows dealt to ranks
(pure functions of the step, so a resume draws the same batches), held-out windows that score
every token once, the nats/char arithmetic, and the tokenizer's training."""
import json
import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from hvdinfer.data import corpora, lm
from hvdinfer.parallel.data_parallel import WarmupCosine
from models.bpe import EOS, BPETokenizer

WORDS = "to be or not that is the question whether tis nobler in mind suffer slings arrows".split()


def text(seed: int, words: int = 300) -> str:
    rng = np.random.default_rng(seed)
    lines = [" ".join(rng.choice(WORDS, size=rng.integers(3, 9))).capitalize() + "." for _ in range(words // 6)]
    return "\n".join(lines) + "\n"


def write_folder(path, names):
    path.mkdir()
    for i, name in enumerate(names):
        (path / f"{name}_gut.txt").write_text(text(i))
    (path / "other_gut_f.txt").write_text("a folio text")
    (path / "metadata.txt").write_text("[alpha_gut]\ntitle = The Alpha\ncreator = Someone\n")
    return path


def test_held_out_works_are_whole_and_never_in_training(tmp_path):
    works = corpora.read_works(write_folder(tmp_path / "t", ["alpha", "beta", "gamma", "delta"]))
    assert [w.name for w in works] == ["alpha", "beta", "delta", "gamma"]  # *_gut_f.txt left out
    assert works[0].title == "The Alpha" and works[1].title == "beta"
    train, heldout = corpora.split_works(works, ("gamma", "beta"))
    assert [w.name for w in train] == ["alpha", "delta"] and [w.name for w in heldout] == ["beta", "gamma"]
    assert not {w.text for w in train} & {w.text for w in heldout}
    with pytest.raises(ValueError, match="held-out work.s. nope not in the corpus .4 works: alpha, beta"):
        corpora.split_works(works, ("nope",))


def test_the_default_held_out_works_are_named_in_the_docstring():
    for name in corpora.HELDOUT_WORKS:
        assert name.replace("_", " ").split()[0].lower() in corpora.__doc__.lower()


def windows(n=1000, context=8, batch=3, size=2, rank=0, seed=5):
    stream = np.arange(n, dtype=np.int32)  # token i is i: a window's tokens tell where it starts
    return lm.TrainWindows(stream, context, batch, size, rank, seed)


def test_training_windows_are_stream_slices_dealt_evenly_to_ranks():
    per_rank = [list(windows(rank=r).batches(0, 2 * windows().steps_per_epoch)) for r in range(2)]
    w = windows()
    assert w.per_epoch == (1000 - 8) // 8 and w.steps_per_epoch == w.per_epoch // 6
    assert len(per_rank[0]) == len(per_rank[1]) == 2 * w.steps_per_epoch
    for inputs, targets in per_rank[0] + per_rank[1]:
        assert inputs.shape == targets.shape == (3, 8)
        np.testing.assert_array_equal(targets, inputs + 1)
        np.testing.assert_array_equal(inputs, inputs[:, :1] + np.arange(8))
    for epoch in range(2):
        steps = slice(epoch * w.steps_per_epoch, (epoch + 1) * w.steps_per_epoch)
        starts = [int(x[i, 0]) for r in range(2) for x, _ in per_rank[r][steps] for i in range(3)]
        assert len(set(starts)) == len(starts)  # no window twice in a data epoch, across ranks
        assert len({s % 8 for s in starts}) == 1  # one cut offset per epoch
    offsets = {int(per_rank[0][e * w.steps_per_epoch][0][0, 0]) % 8 for e in range(2)}
    assert offsets == {lm.TrainWindows.starts(w, 0)[0] % 8, lm.TrainWindows.starts(w, 1)[0] % 8}


def test_batches_are_a_pure_function_of_the_step():
    whole = list(windows().batches(0, 60))
    for first in (0, 1, 13, 41, 59):
        for (a, b), (c, d) in zip(windows().batches(first, 60 - first), whole[first:]):
            np.testing.assert_array_equal(a, c)
            np.testing.assert_array_equal(b, d)
    other_seed = list(windows(seed=6).batches(0, 3))
    assert not all(np.array_equal(a, c) for (a, _), (c, _) in zip(other_seed, whole))


def test_a_tiny_stream_wraps_so_every_rank_still_steps():
    w = windows(n=30, context=8, batch=4, size=3, rank=2)
    assert w.per_epoch == 2 and w.steps_per_epoch == 1
    (inputs, _), = list(w.batches(0, 1))
    assert inputs.shape == (4, 8)
    with pytest.raises(ValueError, match="need at least 2 x context"):
        windows(n=16, context=8)


@settings(max_examples=200, deadline=None)
@given(length=st.integers(0, 300), context=st.integers(1, 40), data=st.data())
def test_heldout_windows_score_every_target_exactly_once(length, context, data):
    stride = data.draw(st.integers(1, context))
    scored = []
    for start, first in lm.heldout_windows(length, context, stride):
        n = min(context, length - 1 - start)
        assert 0 <= start and 1 <= n <= context and 0 <= first < n
        targets = list(range(start + 1, start + 1 + n))
        scored += targets[first:]
        # past the first window, a scored target sees at least context - stride tokens before it
        if start:
            assert all(t - start >= min(context - stride, t) for t in targets[first:])
    assert scored == list(range(1, length))


def test_heldout_set_pads_and_weights():
    texts, ids = ["abcdefghij", "xyz"], [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10], [11, 12]]
    held = lm.heldout_set(ids, texts, eos_id=0, context=4, stride=2)
    assert held.characters == 13 and held.scored_tokens == 12
    np.testing.assert_array_equal(held.input_ids[0], [0, 1, 2, 3])
    np.testing.assert_array_equal(held.targets[0], [1, 2, 3, 4])
    np.testing.assert_array_equal(held.weights[0], [1, 1, 1, 1])
    np.testing.assert_array_equal(held.weights[1], [0, 0, 1, 1])  # window 2: only the new targets
    last = held.input_ids.shape[0] - 1  # "xyz": EOS 11 -> predicts 11, 12, then padding
    np.testing.assert_array_equal(held.input_ids[last], [0, 11, 0, 0])
    np.testing.assert_array_equal(held.attention_mask[last], [1, 1, 0, 0])
    np.testing.assert_array_equal(held.weights[last], [1, 1, 0, 0])


def test_nats_per_char_of_a_uniform_model():
    # A model that gives every one of V ids the same probability loses ln V on each scored token,
    # so over T tokens of C characters it scores T ln V / C nats/char, whatever the windows.
    vocab, texts = 50, ["to be or not to be", "that is the question"]
    ids = [[3, 7, 9, 11, 2], [4, 4, 8]]
    held = lm.heldout_set(ids, texts, eos_id=0, context=3, stride=1)
    total = float((held.weights * math.log(vocab)).sum())
    nats = lm.nats_per_char(total, held.characters)
    assert nats == pytest.approx(8 * math.log(vocab) / 38)
    assert lm.bits_per_char(nats) == pytest.approx(8 * math.log2(vocab) / 38)
    with pytest.raises(ValueError):
        lm.nats_per_char(1.0, 0)


def test_tokenizer_training_is_deterministic_and_gpt2_shaped(tmp_path):
    texts = [text(i, 2000) for i in range(3)]
    first, second = lm.train_tokenizer(texts, 300), lm.train_tokenizer(texts, 300)
    assert first.to_str() == second.to_str()
    assert first.get_vocab_size() == 300 and first.token_to_id(EOS) == 0
    config = json.loads(first.to_str())
    assert config["pre_tokenizer"]["type"] == "ByteLevel" and config["decoder"]["type"] == "ByteLevel"
    tok = BPETokenizer(first)
    unseen = "Whether 'tis nobler — in the mind, ÆON 2024!\n"  # bytes never seen in training still encode
    assert tok.decode(tok.encode(unseen)) == unseen
    assert len(tok.encode(texts[0])) < len(texts[0]) / 2  # merges learnt: fewer tokens than characters
    tok.save(tmp_path)
    assert BPETokenizer.from_dir(tmp_path).encode(texts[1]) == tok.encode(texts[1])
    with pytest.raises(ValueError, match="at least 258"):
        lm.train_tokenizer(texts, 257)


def lr(schedule, step):
    return float(schedule(step))


def test_warmup_cosine_schedule_and_its_replanned_total():
    schedule = WarmupCosine(1e-3, warmup=10, total=110, min_ratio=0.1)
    assert lr(schedule, 0) == pytest.approx(1e-4) and lr(schedule, 9) == pytest.approx(1e-3)
    assert lr(schedule, 10) == pytest.approx(1e-3)
    assert lr(schedule, 60) == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5))
    assert lr(schedule, 110) == pytest.approx(1e-4) and lr(schedule, 500) == pytest.approx(1e-4)
    schedule.total.assign(210.0)  # re-planned: the warm-up is unchanged, the decay stretched
    assert lr(schedule, 5) == pytest.approx(6e-4) and lr(schedule, 110) == pytest.approx(1e-3 * 0.55)
    assert WarmupCosine.from_config(schedule.get_config()).get_config() == schedule.get_config()
