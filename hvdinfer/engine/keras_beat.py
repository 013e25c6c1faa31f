"""Keras callbacks that put `fit` on the job engine's footing.

WatchdogBeat tells the watchdog about every training step, so `fit` is watched like any other job
phase (a step is progress; a step that never ends is a stall). The first step of a `fit` traces the
training function, which can take long and has no beat of its own, so until it ends only liveness
is judged.

TrainingProgress is the coordinator's one progress line for a training run (steps done of the
run's total, rate, ETA), the same line `infer` and `generate` print: a tqdm bar on a terminal, a
log line every `interval` seconds otherwise. Keras' own epoch line says nothing until an epoch ends.
"""
from __future__ import annotations

import tensorflow as tf

from hvdinfer.engine import watchdog
from hvdinfer.engine.progress import Progress


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


class TrainingProgress(tf.keras.callbacks.Callback):
    """Counts optimizer steps across every `fit` of one run (a resumed run starts at `done_before`);
    the caller closes it when the run ends, which prints the final line."""

    def __init__(self, total_steps: int, done_before: int = 0, enabled: bool = True, interval: float = 30.0):
        super().__init__()
        self.progress = Progress(total_steps, done_before, enabled, interval, desc="training", unit="steps")
        self.traced = False

    def on_train_batch_end(self, batch, logs=None):
        if self.traced:
            self.progress.update(1)
        else:  # the run's first step traced the training function: the rate starts after it
            self.progress.untimed(1)
            self.traced = True

    def close(self) -> None:
        self.progress.close()
