"""Gradient compression in data parallelism (`finetune --grad-compression fp16`): the gradients
every rank applies are the mean of the ranks' gradients rounded to fp16 (under mpirun; at size 1
nothing is sent, so nothing is rounded)."""
import numpy as np
import pytest
import tensorflow as tf

from hvdinfer.parallel import data_parallel
from hvdinfer.runtime import JobError


def averaged_step(compression: str, rank: int) -> np.ndarray:
    """One SGD step (rate 1) from zeros: minus the gradient the optimizer applied."""
    var = tf.Variable([0.0, 0.0])
    optimizer, _ = data_parallel.apply_data_parallel(tf.keras.optimizers.SGD(1.0), compression=compression)
    # d(loss)/d(var) = g: a part below fp16's precision (1 + k 2**-13 rounds to 1 for k <= 3) and
    # one it keeps (small integers, whose sums fp16 holds exactly).
    g = tf.constant([1.0 + 2.0**-13 * (rank + 1), 3.0 + rank])
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(var * g)
    optimizer.minimize(loss, [var], tape=tape)
    return -var.numpy()


def test_fp16_compression_averages_gradients_rounded_to_fp16(rt):
    assert rt.size <= 3, "the rounding below holds for up to 3 ranks"
    sent = [[1.0 + 2.0**-13 * (r + 1), 3.0 + r] for r in range(rt.size)]
    np.testing.assert_allclose(averaged_step("none", rt.rank), np.mean(sent, axis=0), rtol=1e-7)
    # One rank sends nothing (Horovod skips the allreduce), so nothing is rounded there.
    rounded = [1.0, 3.0 + (rt.size - 1) / 2] if rt.size > 1 else sent[0]
    np.testing.assert_allclose(averaged_step("fp16", rt.rank), rounded, rtol=1e-7)


def test_an_unknown_compression_is_refused(rt):
    with pytest.raises(JobError, match="gradient compression must be one of none, fp16, not 'int8'"):
        data_parallel.apply_data_parallel(tf.keras.optimizers.SGD(1.0), compression="int8")


def test_autograph_leaves_horovod_alone_and_the_mean_still_holds_in_a_tf_function(rt):
    import horovod.tensorflow as hvd
    from tensorflow.python.autograph.impl import conversion

    data_parallel.apply_data_parallel(tf.keras.optimizers.SGD(1.0))
    data_parallel.apply_data_parallel(tf.keras.optimizers.SGD(1.0))  # a second call adds no second rule
    assert conversion.is_allowlisted(hvd.allreduce)  # AutoGraph calls it as it is
    from tensorflow.python.autograph.core import config
    assert sum(getattr(r, "_prefix", None) == "horovod" for r in config.CONVERSION_RULES) == 1
    var = tf.Variable([0.0, 0.0])
    optimizer, _ = data_parallel.apply_data_parallel(tf.keras.optimizers.SGD(1.0))

    @tf.function
    def step(g):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(var * g)
        optimizer.minimize(loss, [var], tape=tape)

    step(tf.constant([1.0 + rt.rank, 2.0 * rt.rank]))  # traced: the allreduce inside a graph
    np.testing.assert_allclose(-var.numpy(), [1.0 + (rt.size - 1) / 2, rt.size - 1.0], rtol=1e-7)
