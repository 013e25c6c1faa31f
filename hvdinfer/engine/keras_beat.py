"""A Keras callback that tells the watchdog about every training step, so `fit` is watched like
any other job phase (a step is progress; a step that never ends is a stall). The first step of a
`fit` traces the training function, which can take long and has no beat of its own, so until it
ends only liveness is judged."""
from __future__ import annotations

import tensorflow as tf

from hvdinfer.engine import watchdog


class WatchdogBeat(tf.keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self._epoch = 0

    def on_train_begin(self, logs=None):
        watchdog.beat("training: tracing and running the first step", armed=False)

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch
        watchdog.beat(f"training: starting epoch {epoch + 1}")

    def on_train_batch_end(self, batch, logs=None):
        watchdog.beat(f"training: finished step {batch + 1} of epoch {self._epoch + 1}", armed=True)

    def on_train_end(self, logs=None):
        watchdog.beat("training: done", armed=True)

    def on_test_batch_end(self, batch, logs=None):
        watchdog.beat(f"evaluating: finished batch {batch + 1}")

    def on_predict_batch_end(self, batch, logs=None):
        watchdog.beat(f"predicting: finished batch {batch + 1}")
