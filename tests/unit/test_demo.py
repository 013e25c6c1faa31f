"""The demo's pure parts: corpus CSV -> reviews JSONL, the output checks, top-k and k-NN accuracy."""
import bz2
import csv
import io
import json

import numpy as np
import pytest

from hvdinfer import demo
from hvdinfer.data.readers import read_records

COLUMNS = ["category", "text", "movie_name", "has_plot_and_reviews"]


def write_corpus(path, rows, columns=COLUMNS):
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer)
    writer.writerow(columns)
    writer.writerows(rows)
    path.write_bytes(bz2.compress(buffer.getvalue().encode()))
    return path


def corpus_rows():
    """Like the real file: plot summaries first (one empty), then reviews sorted by movie."""
    return [
        ["plot", "A bank manager plots revenge.", "aankhen", "False"],
        ["plot", "", "abandon", "True"],
        ["fresh", "A three-hour cinema master class.", "a_grin", "False"],
        ["rotten", 'Dull, "clever" and\nfar too long.', "a_grin", "False"],
        ["fresh", "Warm and funny.", "b_movie", "True"],
        ["rotten", "   ", "b_movie", "True"],
        ["fresh", "A delight.", "c_movie", "True"],
        ["rotten", "Forgettable.", "c_movie", "True"],
        ["fresh", "Superb.", "d_movie", "False"],
        ["rotten", "A mess.", "d_movie", "False"],
    ]


def test_read_corpus_keeps_reviews_and_counts_what_it_leaves_out(tmp_path):
    corpus = demo.read_corpus(write_corpus(tmp_path / "rt.csv.bz2", corpus_rows()))
    assert corpus.columns == COLUMNS and corpus.rows == 10
    assert corpus.other_rows == {"plot": 2}
    assert corpus.empty_reviews == 1
    assert [r["id"] for r in corpus.reviews] == [2, 3, 4, 6, 7, 8, 9]  # the data-row index in the file
    assert corpus.reviews[1] == {"id": 3, "text": 'Dull, "clever" and\nfar too long.', "label": "rotten",
                                 "movie": "a_grin"}


def test_read_corpus_names_missing_columns(tmp_path):
    path = write_corpus(tmp_path / "rt.csv.bz2", [["fresh", "Fine."]], columns=["category", "review"])
    with pytest.raises(RuntimeError, match=r"no column\(s\) \['movie_name', 'text'\] in header"):
        demo.read_corpus(path)


def test_write_reviews_writes_a_balanced_subset_the_infer_reader_accepts(tmp_path):
    corpus_path = write_corpus(tmp_path / "rt.csv.bz2", corpus_rows())
    corpus, reviews = demo.write_reviews(corpus_path, tmp_path / "reviews.jsonl", records=4)
    # Two per label, evenly spaced within each label (fresh ids 2,4,6,8; rotten 3,7,9), in file order.
    assert [(r["id"], r["label"]) for r in reviews] == [(2, "fresh"), (3, "rotten"), (6, "fresh"), (7, "rotten")]
    lines = (tmp_path / "reviews.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == reviews
    report = read_records(tmp_path / "reviews.jsonl", label_field="label")
    assert not report.errors
    assert [(r.id, r.text, r.label) for r in report.records] == [(r["id"], r["text"], r["label"]) for r in reviews]


def test_balanced_subset_is_deterministic_and_refuses_more_than_the_corpus_has():
    reviews = [{"id": i, "label": "fresh" if i % 3 else "rotten"} for i in range(30)]
    subset = demo.balanced_subset(reviews, 10)
    assert subset == demo.balanced_subset(reviews, 10)
    assert [r["id"] for r in subset] == sorted(r["id"] for r in subset)
    assert sum(r["label"] == "fresh" for r in subset) == sum(r["label"] == "rotten" for r in subset) == 5
    assert [r["id"] for r in subset if r["label"] == "rotten"] == [0, 6, 12, 18, 24]
    with pytest.raises(ValueError, match="11 rotten reviews wanted, the corpus has 10"):
        demo.balanced_subset(reviews, 22)


def write_output(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def unit(*values):
    v = np.asarray(values, dtype=np.float64)
    return (v / np.linalg.norm(v)).tolist()


def test_read_embeddings_returns_the_checked_matrix(tmp_path):
    path = write_output(tmp_path / "o.jsonl", [{"id": 5, "embedding": unit(1, 2)}, {"id": 1, "embedding": unit(3, 4)}])
    embeddings = demo.read_embeddings(path, [5, 1])
    assert embeddings.dtype == np.float32 and embeddings.shape == (2, 2)
    np.testing.assert_allclose(embeddings[1], [0.6, 0.8], rtol=1e-6)


@pytest.mark.parametrize("rows, message", [
    ([{"id": 0, "embedding": [1.0, 0.0]}], r"o.jsonl: 1 lines for 2 inputs"),
    ([{"id": 1, "embedding": [1.0, 0.0]}, {"id": 0, "embedding": [1.0, 0.0]}],
     r"o.jsonl:1: id 1, expected 0 \(order lost\?\)"),
    ([{"id": 0, "embedding": [1.0, 0.0]}, {"id": 1, "error": "in.jsonl:2: field 'text': empty text"}],
     r"o.jsonl:2: no embedding: in.jsonl:2: field 'text': empty text"),
    ([{"id": 0, "embedding": [1.0, 0.0]}, {"id": 1, "embedding": [0.5, 0.5]}],
     r"o.jsonl:2: embedding norm 0.7071, expected unit length"),
])
def test_read_embeddings_rejects_a_wrong_output(tmp_path, rows, message):
    path = write_output(tmp_path / "o.jsonl", rows)
    with pytest.raises(RuntimeError, match=message):
        demo.read_embeddings(path, [0, 1])


def test_top_k_returns_the_most_similar_rows_best_first():
    corpus = np.asarray([unit(1, 0), unit(0, 1), unit(1, 1), unit(-1, 0), unit(1, 0.2)], dtype=np.float32)
    queries = np.asarray([unit(1, 0), unit(-1, 0.5)], dtype=np.float32)
    indices, scores = demo.top_k(queries, corpus, 3)
    assert indices.tolist() == [[0, 4, 2], [3, 1, 2]]
    np.testing.assert_allclose(scores[0], [1.0, corpus[4, 0], corpus[2, 0]], rtol=1e-6)
    assert demo.top_k(queries, corpus[:2], 3)[0].shape == (2, 2)  # k capped at the corpus size


def clustered(rng, per_cluster, centres, noise):
    points = np.concatenate([centre + noise * rng.standard_normal((per_cluster, len(centre))) for centre in centres])
    return (points / np.linalg.norm(points, axis=1, keepdims=True)).astype(np.float32)


def test_knn_accuracy_separates_clusters_and_is_chance_on_noise():
    rng = np.random.default_rng(0)
    centres = np.eye(16)[:2] * 3
    labels = ["fresh"] * 200 + ["rotten"] * 200
    assert demo.knn_accuracy(clustered(rng, 200, centres, noise=0.3), labels, k=11, chunk=64) == 1.0
    overlapping = demo.knn_accuracy(clustered(rng, 200, centres, noise=3.0), labels, k=11, chunk=64)
    assert 0.6 < overlapping < 1.0
    noise = clustered(rng, 400, [np.zeros(16)], noise=1.0)
    assert abs(demo.knn_accuracy(noise, labels, k=11) - 0.5) < 0.1


def test_knn_accuracy_leaves_each_row_out_and_breaks_ties_by_the_nearest():
    # Angles 0, 5.7, 26.6 and 90 degrees: nearest other rows are 0->1, 1->0, 2->1, 3->2.
    embeddings = np.asarray([unit(1, 0), unit(1, 0.1), unit(1, 0.5), unit(0, 1)], dtype=np.float32)
    # Counting itself, every row would be right; left out, only row 2 is (its nearest, row 1, is b).
    assert demo.knn_accuracy(embeddings, ["a", "b", "b", "a"], k=1) == 0.25
    # k=2 with labels a b a b: rows 0, 2 and 3 see one a and one b, and the nearer one wins:
    # 0 -> 1 (b), 2 -> 1 (b), 3 -> 2 (a), all wrong; row 1 sees 0 and 2 (a a), wrong.
    # Ties to the first label would score 0.5, ties to the last 0.25.
    assert demo.knn_accuracy(embeddings, ["a", "b", "a", "b"], k=2) == 0.0
    with pytest.raises(ValueError, match=r"k must be in 1..3, got 4"):
        demo.knn_accuracy(embeddings, ["a", "b", "a", "b"], k=4)


def test_training_sample_is_seeded_ordered_and_zero_means_all():
    train = [{"id": i} for i in range(100)]
    sample = demo.training_sample(train, 30)
    assert len(sample) == 30 and sample == demo.training_sample(train, 30)
    ids = [r["id"] for r in sample]
    assert ids == sorted(ids) and len(set(ids)) == 30
    assert ids != list(range(30))  # drawn over the whole set, not its head
    assert demo.training_sample(train, 0) is train and demo.training_sample(train, 500) is train
    with pytest.raises(ValueError, match="--train-records must be >= 0"):
        demo.training_sample(train, -1)
