"""Data parallelism for Keras fine-tuning, the Horovod way.

`apply_data_parallel` wraps the optimizer in `hvd.DistributedOptimizer` (gradients averaged with
allreduce every step) and returns the callbacks every data-parallel `fit` needs: rank 0's initial
variables broadcast to all ranks, and epoch metrics averaged over ranks. The learning rate is
scaled by the number of ranks (the effective batch is size x per-rank batch), with a linear
warm-up so the larger rate does not blow up the first steps (Goyal et al., 2017).
"""
from __future__ import annotations

import tensorflow as tf

from hvdinfer import runtime


@tf.keras.utils.register_keras_serializable("hvdinfer")
class LinearWarmup(tf.keras.optimizers.schedules.LearningRateSchedule):
    """0 -> peak over `warmup` steps, then constant. A pure function of the optimizer's step counter
    and independent of the planned number of epochs, so `--epochs 1` + `--resume --epochs 2` trains
    exactly as `--epochs 2` does."""

    def __init__(self, peak: float, warmup: int):
        self.peak, self.warmup = float(peak), int(warmup)

    def __call__(self, step):
        if not self.warmup:
            return tf.constant(self.peak, tf.float32)
        return self.peak * tf.minimum(1.0, (tf.cast(step, tf.float32) + 1.0) / self.warmup)

    def get_config(self):
        return {"peak": self.peak, "warmup": self.warmup}


def scaled_learning_rate(base_lr: float, size: int, scale: bool = True) -> float:
    """Horovod's rule: the learning rate grows with the number of ranks (documented, overridable)."""
    return base_lr * size if scale else base_lr


def apply_data_parallel(optimizer: tf.keras.optimizers.Optimizer) -> tuple[tf.keras.optimizers.Optimizer, list]:
    """(distributed optimizer, callbacks) for `model.compile` / `model.fit` on every rank."""
    import horovod.tensorflow.keras as hvd

    distributed = hvd.DistributedOptimizer(optimizer)
    callbacks = [
        # Horovod: start every rank from rank 0's variables (initial or restored from a checkpoint).
        hvd.callbacks.BroadcastGlobalVariablesCallback(0),
        # Horovod: logged epoch metrics are the mean over ranks, not rank 0's shard alone.
        hvd.callbacks.MetricAverageCallback(),
    ]
    runtime.LOG.info("applied data parallelism: DistributedOptimizer over %d ranks, broadcast from rank 0, "
                     "metric averaging", hvd.size())
    return distributed, callbacks
