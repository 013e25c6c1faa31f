"""The three user scripts in examples/ under `mpirun -np 2`, as a user runs them."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
ENV = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", TF_CPP_MIN_LOG_LEVEL="2")


def run_example(script, *args, np_=2):
    cmd = ["mpirun", "-np", str(np_), "--oversubscribe", "--bind-to", "none", sys.executable,
           str(ROOT / "examples" / script), *map(str, args)]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_predict_with_your_own_keras_model_over_csv(tmp_path):
    rows = np.random.default_rng(3).normal(size=(1500, 5)).astype(np.float32)
    csv = tmp_path / "rows.csv"
    np.savetxt(csv, rows, delimiter=",", header=",".join(f"f{i}" for i in range(5)), comments="")
    out = run_example("predict_keras.py", "--csv", csv, "--output", tmp_path / "p.npy")
    assert "predict_keras: 1500 rows x 3 on 2 ranks; max |hvdinfer - keras| = 0.00e+00" in out
    assert np.load(tmp_path / "p.npy").shape == (1500, 3)


def test_embed_a_text_file_with_minilm(tmp_path):
    from hvdinfer.data.corpora import read_corpus, rotten_tomatoes_path

    reviews = read_corpus(rotten_tomatoes_path()).reviews[:120]
    texts = tmp_path / "reviews.txt"
    texts.write_text("\n".join(r["text"].replace("\n", " ") for r in reviews) + "\n", encoding="utf-8")
    out = run_example("embed_texts.py", "--input", texts, "--output", tmp_path / "e.npy")
    assert "embed_texts: 120 texts -> (120, 384) on 2 ranks; norms 1.0000..1.0000" in out
    emb = np.load(tmp_path / "e.npy")
    assert emb.shape == (120, 384) and np.isfinite(emb).all()


def test_finetune_your_own_model_data_parallel():
    out = run_example("finetune_keras.py", "--epochs", 2)
    line = next(line for line in out.splitlines() if line.startswith("finetune_keras:"))
    assert "2 ranks" in line
    accuracy = float(line.split("held-out accuracy ")[1].split(";")[0])
    assert accuracy > 0.9
