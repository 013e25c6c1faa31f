"""Data-parallel fine-tuning of your own Keras model with hvdinfer's runtime.

    horovodrun -np 2 python examples/finetune_keras.py
    mpirun -np 2 --oversubscribe --bind-to none .venv/bin/python examples/finetune_keras.py

Every rank builds the model, takes an equal share of the training rows, and trains with
hvd.DistributedOptimizer (gradients averaged over ranks at every step); rank 0's initial weights
are broadcast, the learning rate is scaled by the number of ranks, and every step is reported to
the watchdog, so a stuck rank ends the job instead of hanging it. At the end every rank holds the
same weights, and the coordinator reports held-out accuracy.
"""
import argparse

import numpy as np
import horovod.tensorflow as hvd
import tensorflow as tf

import hvdinfer


def make_data(rows: int, features: int, seed: int):
    """Three Gaussian blobs: a task a small MLP learns in a few epochs."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=3.0, size=(3, features))
    y = rng.integers(0, 3, rows)
    x = (centres[y] + rng.normal(size=(rows, features))).astype(np.float32)
    return x, y


def build_model(features: int) -> tf.keras.Model:
    return tf.keras.Sequential([tf.keras.Input((features,)), tf.keras.layers.Dense(32, activation="relu"),
                                tf.keras.layers.Dense(3)], name="user_classifier")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32, help="per rank")
    args = parser.parse_args()

    hvdinfer.init(seed=7)
    x, y = make_data(6000, 8, seed=0)
    x_eval, y_eval = x[5000:], y[5000:]
    model = build_model(x.shape[1])
    optimizer, callbacks = hvdinfer.data_parallel(tf.keras.optimizers.Adam(hvdinfer.scaled_lr(1e-3)))
    model.compile(optimizer=optimizer, loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    rows = hvdinfer.shard(5000, seed=1)  # Horovod: an equal share per rank, so steps match
    model.fit(x[rows], y[rows], batch_size=args.batch_size, epochs=args.epochs, callbacks=callbacks,
              verbose=2 if hvdinfer.is_coordinator() else 0)

    predictions = hvdinfer.predict(model, x_eval, batch_size=256, progress=False)
    accuracy = float(np.mean(np.argmax(predictions, axis=1) == y_eval))
    # Every rank must end with the same weights: compare a checksum across ranks.
    checksum = float(sum(np.sum(w, dtype=np.float64) for w in model.get_weights()))
    sums = np.array(hvd.allgather_object(checksum))
    if hvdinfer.is_coordinator():
        print(f"finetune_keras: {hvdinfer.size()} ranks, held-out accuracy {accuracy:.3f}; "
              f"weight checksums per rank {sums.tolist()}", flush=True)
        assert accuracy > 0.9, accuracy
        assert np.ptp(sums) == 0, sums


if __name__ == "__main__":
    main()
