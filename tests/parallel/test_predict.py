"""hvdinfer.predict under size 1, `mpirun -np 2` and `-np 3`: every row back in input order on
every rank, for arrays, dicts and several outputs, in memory and streamed to .npy with resume."""
import numpy as np
import pytest
import tensorflow as tf

import hvdinfer

NP3 = True


def _model():
    tf.keras.utils.set_random_seed(5)  # the same weights on every rank
    inputs = {"a": tf.keras.Input((3,), name="a"), "b": tf.keras.Input((2,), name="b")}
    joined = tf.keras.layers.Concatenate()([inputs["a"], inputs["b"]])
    return tf.keras.Model(inputs, {"score": tf.keras.layers.Dense(4)(joined), "sum": tf.reduce_sum(joined, 1)})


def test_array_rows_come_back_in_order_on_every_rank(rt):
    hvdinfer.init()
    x = np.arange(1003 * 2, dtype=np.float32).reshape(1003, 2)
    got = hvdinfer.predict(lambda batch: batch * 2, x, batch_size=37, chunk_size=100, progress=False)
    np.testing.assert_array_equal(got, x * 2)


@pytest.mark.parametrize("schedule", ["static", "dynamic"])
def test_dict_inputs_and_several_outputs_match_keras(rt, schedule):
    model = _model()
    rng = np.random.default_rng(0)
    x = {"a": rng.normal(size=(257, 3)).astype(np.float32), "b": rng.normal(size=(257, 2)).astype(np.float32)}
    got = hvdinfer.predict(model, x, batch_size=16, chunk_size=32, schedule=schedule, progress=False)
    want = model(x)
    np.testing.assert_allclose(got["score"], want["score"].numpy(), atol=1e-6)
    np.testing.assert_allclose(got["sum"], want["sum"].numpy(), atol=1e-6)


def test_streamed_output_and_resume(rt, tmp_path_factory):
    # Every rank must name the same file: the coordinator's temp dir, shared by a first collective.
    from hvdinfer.collect import allgather_json

    path = allgather_json(str(tmp_path_factory.mktemp("p") / "preds.npy"))[0]
    x = np.arange(500, dtype=np.float32)[:, None] * np.ones((1, 3), np.float32)
    returned = hvdinfer.predict(lambda b: b + 1, x, batch_size=50, chunk_size=64, output=path, progress=False)
    assert str(returned) == path
    if rt.is_coordinator:
        np.testing.assert_array_equal(np.load(path), x + 1)
    again = hvdinfer.predict(lambda b: b + 1, x, batch_size=50, chunk_size=64, output=path + ".2.npy",
                             resume=True, progress=False)  # resume with no journal: starts fresh
    if rt.is_coordinator:
        np.testing.assert_array_equal(np.load(again), x + 1)


def test_bad_inputs_are_clear_errors(rt):
    with pytest.raises(hvdinfer.JobError, match="different numbers of rows"):
        hvdinfer.predict(lambda b: b, {"a": np.zeros((3, 1)), "b": np.zeros((4, 1))})
    with pytest.raises(hvdinfer.JobError, match="resume=True needs output"):
        hvdinfer.predict(lambda b: b, np.zeros((3, 1)), resume=True)


def test_shard_gives_every_rank_the_same_number_of_rows(rt):
    from hvdinfer.collect import allgather_json

    mine = hvdinfer.shard(10, seed=3).tolist()
    everyone = allgather_json(mine)
    assert len({len(rows) for rows in everyone}) == 1
    assert set().union(*map(set, everyone)) == set(range(10))
