"""Data parallelism for Keras fine-tuning, the Horovod way.

`apply_data_parallel` wraps the optimizer in `hvd.DistributedOptimizer` (gradients averaged with
allreduce every step) and returns the callbacks every data-parallel `fit` needs: rank 0's initial
variables broadcast to all ranks, and epoch metrics averaged over ranks. The learning rate is
scaled by the number of ranks (the effective batch is size x per-rank batch), with a linear
warm-up so the larger rate does not blow up the first steps (Goyal et al., 2017).

Under tensor parallelism a model replica is a group of tp ranks, each holding a different shard:
gradients are averaged, and the initial variables broadcast, only among the ranks that hold the
same shard (this tp rank of every group, `TPGroup.replica_set`), never across shards.
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


@tf.keras.utils.register_keras_serializable("hvdinfer")
class WarmupCosine(tf.keras.optimizers.schedules.LearningRateSchedule):
    """0 -> peak linearly over `warmup` steps, then a cosine decay to min_ratio x peak at step
    `total`, constant after. `total` is a variable (read at every step, inside the compiled train
    function), so a run planned by time can set it once it has measured its speed
    (`schedule.total.assign(n)`); the warm-up never depends on it."""

    def __init__(self, peak: float, warmup: int, total: int, min_ratio: float = 0.1):
        self.peak, self.warmup, self.min_ratio = float(peak), int(warmup), float(min_ratio)
        self.total = tf.Variable(float(total), trainable=False, dtype=tf.float32, name="schedule_total")

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        warm = self.peak * tf.minimum(1.0, (step + 1.0) / max(1, self.warmup))
        progress = tf.clip_by_value((step - self.warmup) / tf.maximum(1.0, self.total - self.warmup), 0.0, 1.0)
        cosine = self.peak * (self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + tf.cos(3.141592653589793 * progress)))
        return tf.where(step < self.warmup, warm, cosine)

    def get_config(self):
        return {"peak": self.peak, "warmup": self.warmup, "total": int(self.total.numpy()),
                "min_ratio": self.min_ratio}


def scaled_learning_rate(base_lr: float, size: int, scale: bool = True) -> float:
    """Horovod's rule: the learning rate grows with the number of ranks (documented, overridable)."""
    return base_lr * size if scale else base_lr


class BroadcastInProcessSet(tf.keras.callbacks.Callback):
    """Horovod's BroadcastGlobalVariablesCallback inside a process set: before the first step, every
    rank of `process_set` takes the model's and the optimizer's variables from `root` (a global rank)."""

    def __init__(self, process_set, root: int):
        super().__init__()
        self.process_set, self.root = process_set, root
        self.done = False

    def on_train_begin(self, logs=None):
        import horovod.tensorflow as hvd

        if self.done:
            return
        # Horovod: the optimizer is built before fit, so its slots exist and are broadcast too.
        hvd.broadcast_variables(self.model.variables, root_rank=self.root, process_set=self.process_set)
        hvd.broadcast_variables(list(self.model.optimizer.variables), root_rank=self.root,
                                process_set=self.process_set)
        self.done = True


GRADIENT_COMPRESSIONS = ("none", "fp16")


def _skip_autograph_for_horovod() -> None:
    """Keep AutoGraph from converting Horovod's Python, as TF already keeps it off Keras and TF itself.

    The distributed optimizer's gradient allreduce is a tf.function; AutoGraph rewrote Horovod's
    allreduce code for every gradient while tracing each training function: 4-5 s of a debug-size
    fine-tune's first step here. Horovod's code branches on Python values only (its graph branch is
    an explicit tf.cond), so the rewrite changes nothing in the graph. AutoGraph's rule list is TF's
    internal API: where it is missing, conversion simply stays as it was.
    """
    try:
        from tensorflow.python.autograph.core import config
    except ImportError:
        return
    rules = getattr(config, "CONVERSION_RULES", None)
    if isinstance(rules, tuple) and not any(getattr(r, "_prefix", None) == "horovod" for r in rules):
        config.CONVERSION_RULES = (config.DoNotConvert("horovod"),) + rules


def apply_data_parallel(optimizer: tf.keras.optimizers.Optimizer, sparse_as_dense: bool = False,
                        group=None, compression: str = "none") -> tuple[tf.keras.optimizers.Optimizer, list]:
    """(distributed optimizer, callbacks) for `model.compile` / `model.fit` on every rank.

    The distributed optimizer is rebuilt from `optimizer.get_config()` (Horovod's way): settings
    outside the config (a schedule's state, exclude_from_weight_decay) must be set on it after.
    `sparse_as_dense` allreduces sparse gradients (an embedding lookup's) as dense tensors instead
    of allgathering their rows: cheaper when a batch touches most rows of a small table.
    `group` (a tensor_parallel.TPGroup) confines both to the ranks holding this rank's shard; with a
    single dp group there is nothing to average and the optimizer is returned as it is.
    `compression` "fp16" sends the gradients as fp16 (half the bytes; cast back to fp32 after the
    allreduce, so the update is computed in fp32 from gradients rounded to fp16).
    """
    import horovod.tensorflow.keras as hvd

    _skip_autograph_for_horovod()
    if compression not in GRADIENT_COMPRESSIONS:
        raise runtime.JobError(f"gradient compression must be one of {', '.join(GRADIENT_COMPRESSIONS)}, "
                               f"not {compression!r}")
    # Horovod: what the gradients are cast to on the wire.
    codec = hvd.Compression.fp16 if compression == "fp16" else hvd.Compression.none
    if group is None:
        # Horovod: gradients averaged over ranks with allreduce before every update.
        distributed = hvd.DistributedOptimizer(optimizer, sparse_as_dense=sparse_as_dense, compression=codec)
        # Horovod: start every rank from rank 0's variables (initial or restored from a checkpoint).
        broadcast = [hvd.callbacks.BroadcastGlobalVariablesCallback(0)]
        what = f"over {hvd.size()} ranks, broadcast from rank 0"
    elif (replicas := group.replica_set()) is None:
        distributed, broadcast = optimizer, []
        what = "not needed (one dp group; the tp ranks' shards are never averaged)"
    else:
        # Horovod: only the ranks holding the same shard average their gradients and share variables.
        distributed = hvd.DistributedOptimizer(optimizer, sparse_as_dense=sparse_as_dense, process_set=replicas,
                                               compression=codec)
        broadcast = [BroadcastInProcessSet(replicas, group.replica_root)]
        what = (f"over the {group.dims.dp} ranks holding this shard ({group.dims.dp_groups()[group.tp_rank]}), "
                f"broadcast from rank {group.replica_root}")
    # Horovod: logged epoch metrics are the mean over ranks, not rank 0's shard alone (the tp ranks of
    # a group log the same values, so the mean is the mean over dp groups).
    callbacks = broadcast + [hvd.callbacks.MetricAverageCallback()]
    runtime.LOG.info("applied data parallelism: DistributedOptimizer %s, metric averaging%s", what,
                     ", gradients sent as fp16" if compression == "fp16" and distributed is not optimizer else "")
    return distributed, callbacks
