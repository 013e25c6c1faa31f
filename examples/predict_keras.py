"""Batch prediction with your own Keras model over a NumPy array or a CSV file, on every rank.

    horovodrun -np 2 python examples/predict_keras.py                       # generated NumPy rows
    horovodrun -np 2 python examples/predict_keras.py --csv data.csv --output preds.npy
    mpirun -np 2 --oversubscribe --bind-to none .venv/bin/python examples/predict_keras.py

Every rank builds the same model (same seed) and loads the same rows; hvdinfer.predict hands out
chunks of rows on demand, and every rank gets all predictions back in input order. With --output
the predictions are streamed to a .npy file through a journal, and --resume finishes a run that
was interrupted.
"""
import argparse

import numpy as np
import tensorflow as tf

import hvdinfer


def build_model(features: int) -> tf.keras.Model:
    inputs = tf.keras.Input((features,), name="features")
    hidden = tf.keras.layers.Dense(64, activation="relu", name="hidden")(inputs)
    outputs = tf.keras.layers.Dense(3, activation="softmax", name="classes")(hidden)
    return tf.keras.Model(inputs, outputs, name="user_model")


def load_rows(csv_path: str | None, rows: int, features: int) -> np.ndarray:
    if csv_path:
        return np.loadtxt(csv_path, delimiter=",", skiprows=1, dtype=np.float32, ndmin=2)
    return np.random.default_rng(0).normal(size=(rows, features)).astype(np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--csv", help="CSV with a header row and numeric columns (default: generated rows)")
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--features", type=int, default=16)
    parser.add_argument("--output", help="stream predictions to this .npy file (journaled)")
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()

    hvdinfer.init(seed=42)  # Horovod: every rank builds identical initial weights
    x = load_rows(args.csv, args.rows, args.features)
    model = build_model(x.shape[1])
    preds = hvdinfer.predict(model, x, batch_size=512, output=args.output, resume=args.resume)
    if hvdinfer.is_coordinator():
        if args.output:
            preds = np.load(preds, mmap_mode="r")
        # The same model on one process, as a check: same rows, same order.
        expected = model.predict(x, batch_size=512, verbose=0)
        error = float(np.max(np.abs(preds - expected)))
        print(f"predict_keras: {len(preds)} rows x {preds.shape[1]} on {hvdinfer.size()} ranks; "
              f"max |hvdinfer - keras| = {error:.2e}", flush=True)
        assert error < 1e-5, error


if __name__ == "__main__":
    main()
