"""A Keras callback that tells the watchdog about every training step, so `fit` is watched like
any other job phase (a step is progress; a step that never ends is a stall)."""
from __future__ import annotations

import tensorflow as tf

from hvdinfer.engine import watchdog


class WatchdogBeat(tf.keras.callbacks.Callback):
    def on_train_batch_end(self, batch, logs=None):
        watchdog.beat(f"training: finished step {batch + 1} of epoch {self._epoch + 1}")

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch
        watchdog.beat(f"training: starting epoch {epoch + 1}")

    def on_test_batch_end(self, batch, logs=None):
        watchdog.beat(f"evaluating: finished batch {batch + 1}")

    def on_predict_batch_end(self, batch, logs=None):
        watchdog.beat(f"predicting: finished batch {batch + 1}")

    _epoch = 0
