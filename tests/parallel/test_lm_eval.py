"""pretrain's held-out evaluation under size 1, `mpirun -np 2` and `-np 3`: the windows split across
ranks (uneven shards, padded batches) and the allreduced NLL give the single-process figure."""
import math

import numpy as np
import pytest
import tensorflow as tf

from hvdinfer.data import lm
from hvdinfer.tasks import pretrain

NP3 = True  # Makefile: also run this file under mpirun -np 3
VOCAB = 7


class Uniform:
    def __call__(self, inputs):
        ids = inputs["input_ids"]
        return tf.zeros(tf.concat([tf.shape(ids), [VOCAB]], 0))


class NextGuess:
    """Logits that favour (input + 1) % VOCAB, scaled by the position: NLL differs per token."""

    def __call__(self, inputs):
        ids = inputs["input_ids"]
        scale = tf.cast(tf.range(tf.shape(ids)[1]) + 1, tf.float32)[tf.newaxis, :, tf.newaxis]
        return tf.one_hot((ids + 1) % VOCAB, VOCAB) * scale


def heldout():
    rng = np.random.default_rng(0)
    ids = [list(rng.integers(1, VOCAB, n)) for n in (23, 5, 40)]
    texts = ["x" * (2 * len(i) + 1) for i in ids]
    return lm.heldout_set(ids, texts, eos_id=0, context=6, stride=4)


def reference_nll(held: lm.HeldoutSet) -> float:
    logits = NextGuess()({"input_ids": held.input_ids}).numpy().astype(np.float64)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    picked = np.take_along_axis(logp, held.targets[..., None], -1)[..., 0]
    return float(-(picked * held.weights).sum())


@pytest.mark.parametrize("batch_size", [1, 4, 64])
def test_uniform_model_scores_ln_vocab_per_token(rt, batch_size):
    held = heldout()
    got = pretrain.evaluate(pretrain.make_scorer(Uniform()), held, rt, batch_size)
    assert got["heldout_tokens"] == held.scored_tokens == 23 + 5 + 40
    assert got["heldout_nats_per_char"] == pytest.approx(68 * math.log(VOCAB) / held.characters, rel=1e-6)
    assert got["heldout_nats_per_token"] == pytest.approx(math.log(VOCAB), rel=1e-6)


@pytest.mark.parametrize("batch_size", [3, 64])
def test_split_across_ranks_gives_the_single_process_total(rt, batch_size):
    held = heldout()
    got = pretrain.evaluate(pretrain.make_scorer(NextGuess()), held, rt, batch_size)
    assert got["heldout_nats_per_char"] == pytest.approx(reference_nll(held) / held.characters, rel=1e-6)
