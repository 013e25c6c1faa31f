"""Atomic writers: all or nothing, in order, streamed a block at a time."""
import json
import os
import tracemalloc

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hvdinfer.output import (LABELS_KEY, JsonlWriter, NpyWriter, ParquetWriter, classification_schema,
                             embedding_schema, open_output, record_schema, write_jsonl, write_npy)


def embedding_block(start: int, stop: int, width: int = 3, bad: tuple[int, ...] = ()) -> dict:
    """Rows start..stop-1: ids alternate int and str, row r's vector is r + column/10, `bad` rows fail."""
    index = np.arange(start, stop)
    return {"index": index,
            "id": [int(i) if i % 2 else f"doc-{i}" for i in index],
            "embedding": (index[:, None] + np.arange(width) / 10).astype(np.float32),
            "error": [f"line {i + 1}: no text" if i in bad else None for i in index]}


def expected_vectors(n: int, width: int = 3, bad: tuple[int, ...] = ()) -> np.ndarray:
    vectors = (np.arange(n)[:, None] + np.arange(width) / 10).astype(np.float32)
    vectors[list(bad)] = np.nan
    return vectors


def temp_files(folder):
    return [p for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_jsonl_written_whole(tmp_path):
    path = tmp_path / "sub" / "out.jsonl"
    assert write_jsonl(path, [{"id": 1, "t": "é"}, {"id": 2}]) == 2
    assert [json.loads(l) for l in path.read_text().splitlines()] == [{"id": 1, "t": "é"}, {"id": 2}]
    assert list(path.parent.iterdir()) == [path]  # no temp file left


def test_jsonl_line_format_is_compact_and_keeps_non_ascii(tmp_path):
    path = tmp_path / "out.jsonl"
    write_jsonl(path, [{"id": "ü", "v": [1, None]}])
    assert path.read_text(encoding="utf-8") == '{"id":"ü","v":[1,null]}\n'


def test_failure_mid_write_leaves_old_file_and_no_temp(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_text("old\n")

    def rows():
        yield {"id": 1}
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        write_jsonl(path, rows())
    assert path.read_text() == "old\n"
    assert list(tmp_path.iterdir()) == [path]


def test_npy_round_trip(tmp_path):
    write_npy(tmp_path / "e.npy", np.arange(6, dtype=np.float32).reshape(2, 3))
    np.testing.assert_array_equal(np.load(tmp_path / "e.npy"), np.arange(6).reshape(2, 3))


def test_jsonl_writer_rows_as_given_and_blocks_without_nulls(tmp_path):
    path = tmp_path / "out.jsonl"
    with JsonlWriter(path) as out:
        out.write_rows([{"id": np.int64(7), "embedding": np.array([0.5, 1.5], np.float32), "error": None}])
        out.write_block(embedding_block(1, 4, width=2, bad=(2,)))
    assert out.rows_written == 4
    assert [json.loads(line) for line in path.read_text().splitlines()] == [
        {"id": 7, "embedding": [0.5, 1.5], "error": None},
        {"index": 1, "id": 1, "embedding": [1.0, pytest.approx(1.1)]},
        {"index": 2, "id": "doc-2", "error": "line 3: no text"},
        {"index": 3, "id": 3, "embedding": [3.0, pytest.approx(3.1)]},
    ]


def test_npy_writer_appends_blocks_in_order_with_nan_for_bad_rows(tmp_path):
    path = tmp_path / "e.npy"
    with NpyWriter(path, rows=7, width=3) as out:
        out.write_block(expected_vectors(7)[:2])  # a bare array
        out.write_block(embedding_block(2, 5, bad=(3,)))  # a row-contract block: its embedding column
        out.write_rows([{"embedding": [5, 5.1, 5.2]}, {"error": "bad", "embedding": [9, 9, 9]}])
    want = expected_vectors(7, bad=(3, 6))
    np.testing.assert_array_equal(np.load(path), want)
    mapped = np.load(path, mmap_mode="r")
    assert mapped.dtype == np.float32 and mapped.shape == (7, 3)
    np.testing.assert_array_equal(mapped, want)


def test_npy_writer_row_count_mismatch_publishes_nothing(tmp_path):
    path = tmp_path / "e.npy"
    path.write_bytes(b"previous")
    out = NpyWriter(path, rows=5, width=3)
    out.write_block(expected_vectors(4))
    with pytest.raises(ValueError, match=r"e.npy: 4 rows written, the header says 5; nothing published"):
        out.commit()
    assert path.read_bytes() == b"previous"
    assert temp_files(tmp_path) == []
    with pytest.raises(ValueError, match="already aborted"):
        out.write_block(expected_vectors(1))


def test_npy_writer_refuses_more_rows_or_another_width(tmp_path):
    with pytest.raises(ValueError, match="a block of 3 rows after 2 overruns the 4 rows in the header"):
        with NpyWriter(tmp_path / "e.npy", rows=4, width=3) as out:
            out.write_block(expected_vectors(2))
            out.write_block(expected_vectors(3))
    with pytest.raises(ValueError, match=r"a block of shape \(2, 4\), \(2, 3\) expected"):
        with NpyWriter(tmp_path / "e.npy", rows=4, width=3) as out:
            out.write_block(np.zeros((2, 4)))
    assert list(tmp_path.iterdir()) == []


def test_parquet_embeddings_round_trip(tmp_path):
    path = tmp_path / "e.parquet"
    with ParquetWriter(path, embedding_schema(3)) as out:
        out.write_block(embedding_block(0, 4, bad=(1,)))
        out.write_block(embedding_block(4, 6))
        out.write_rows([{"index": 6, "id": 6.5, "error": "line 7: not JSON"}])
    table = pq.read_table(path)
    assert table.schema == embedding_schema(3)
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), 3)
    assert table.column("index").to_pylist() == list(range(7))
    assert table.column("id").to_pylist() == ["doc-0", "1", "doc-2", "3", "doc-4", "5", "6.5"]
    assert table.column("error").to_pylist() == [None, "line 2: no text", None, None, None, None,
                                                 "line 7: not JSON"]
    vectors = table.column("embedding").combine_chunks().values.to_numpy().reshape(-1, 3)
    np.testing.assert_array_equal(vectors, expected_vectors(7, bad=(1, 6)))
    assert pq.ParquetFile(path).metadata.num_row_groups == 3  # one per block


def test_parquet_classification_round_trip_keeps_label_names(tmp_path):
    labels = ["négatif", "positive", "neutral"]
    path = tmp_path / "c.parquet"
    with open_output(path, classification_schema(labels)) as out:
        out.write_block({"index": np.arange(3), "id": ["a", "b", "c"], "label": ["positive", "x", "neutral"],
                         "scores": np.array([[0.1, 0.7, 0.2], [0.3, 0.3, 0.4], [0.0, 0.0, 1.0]], np.float32),
                         "error": [None, "too long", None]})
    table = pq.read_table(path)
    assert json.loads(table.schema.metadata[LABELS_KEY]) == labels
    assert table.column("label").to_pylist() == ["positive", None, "neutral"]
    scores = table.column("scores").to_pylist()
    assert scores[0] == pytest.approx([0.1, 0.7, 0.2]) and scores[2] == [0.0, 0.0, 1.0]
    assert np.isnan(scores[1]).all()
    assert table.column("error").to_pylist() == [None, "too long", None]


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_generation_rows_through_the_same_contract(tmp_path, suffix):
    schema = record_schema(("text", pa.string()), ("tokens", pa.int32()), ("finish_reason", pa.string()))
    rows = [{"index": 0, "id": "q1", "text": "Bonjour", "tokens": 3, "finish_reason": "stop"},
            {"index": 1, "id": "q2", "error": "prompt too long"}]
    path = tmp_path / f"gen{suffix}"
    with open_output(path, schema) as out:
        out.write_rows(rows)
    if suffix == ".jsonl":
        assert [json.loads(line) for line in path.read_text().splitlines()] == rows
    else:
        assert pq.read_table(path).to_pylist() == [
            rows[0] | {"error": None},
            {"index": 1, "id": "q2", "text": None, "tokens": None, "finish_reason": None, "error": "prompt too long"}]


@pytest.mark.parametrize("suffix", [".jsonl", ".npy", ".parquet"])
@pytest.mark.parametrize("previous", [b"previous output", None])
def test_exception_mid_write_publishes_nothing_and_leaves_no_temp(tmp_path, suffix, previous):
    path = tmp_path / f"out{suffix}"
    if previous:
        path.write_bytes(previous)
    with pytest.raises(RuntimeError, match="boom"):
        with open_output(path, embedding_schema(3), rows=8) as out:
            out.write_block(embedding_block(0, 4))
            assert len(temp_files(tmp_path)) == 1
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == ([path] if previous else [])
    if previous:
        assert path.read_bytes() == previous


@pytest.mark.parametrize("suffix", [".jsonl", ".npy", ".parquet"])
def test_clean_exit_replaces_previous_file(tmp_path, suffix):
    path = tmp_path / f"out{suffix}"
    path.write_bytes(b"previous output")
    with open_output(path, embedding_schema(3), rows=2) as out:
        out.write_block(embedding_block(0, 2))
    assert list(tmp_path.iterdir()) == [path]
    assert path.stat().st_size > len(b"previous output")
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600


def test_bad_blocks_and_misuse_say_what_is_wrong(tmp_path):
    with pytest.raises(ValueError, match=r"no column score in the schema \(index, id, embedding, error\)"):
        with ParquetWriter(tmp_path / "e.parquet", embedding_schema(3)) as out:
            out.write_block({"index": [0], "score": [1.0]})
    with pytest.raises(ValueError, match="block columns differ in length"):
        with ParquetWriter(tmp_path / "e.parquet", embedding_schema(3)) as out:
            out.write_block({"index": [0, 1], "id": ["a"]})
    with pytest.raises(ValueError, match="column index is required"):
        with ParquetWriter(tmp_path / "e.parquet", embedding_schema(3)) as out:
            out.write_block({"id": ["a"]})
    with pytest.raises(ValueError, match=r"no writer for '\.csv'; use one of \.jsonl, \.npy, \.parquet"):
        open_output(tmp_path / "e.csv", embedding_schema(3))
    with pytest.raises(ValueError, match="needs the number of rows up front"):
        open_output(tmp_path / "e.npy", embedding_schema(3))
    out = JsonlWriter(tmp_path / "e.jsonl")
    out.commit()
    with pytest.raises(ValueError, match="already committed"):
        out.write_rows([{"id": 1}])
    out.abort()  # after commit: nothing to undo
    assert (tmp_path / "e.jsonl").read_text() == ""
    assert list(tmp_path.iterdir()) == [tmp_path / "e.jsonl"]


def test_npy_streams_200k_rows_block_by_block(tmp_path):
    rows, width, block_rows = 200_000, 384, 10_000
    path = tmp_path / "big.npy"
    block_bytes = block_rows * width * 4
    sizes = []
    tracemalloc.start()
    try:
        with NpyWriter(path, rows, width) as out:
            (tmp,) = temp_files(tmp_path)
            for start in range(0, rows, block_rows):
                block = np.empty((block_rows, width), np.float32)
                block[:] = np.arange(start, start + block_rows, dtype=np.float32)[:, None]
                out.write_block(block)
                del block
                sizes.append(tmp.stat().st_size)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    header = path.stat().st_size - rows * width * 4
    # Written through: after each block the file holds every row so far, so the writer keeps none.
    assert sizes == [header + (i + 1) * block_bytes for i in range(rows // block_rows)]
    assert peak < 2 * block_bytes  # 20 blocks written; never more in memory than the one being made
    mapped = np.load(path, mmap_mode="r")
    assert mapped.shape == (rows, width)
    np.testing.assert_array_equal(mapped[:, 0], np.arange(rows))
    np.testing.assert_array_equal(mapped[:, -1], np.arange(rows))
    np.testing.assert_array_equal(mapped[123_457], np.full(width, 123_457))


def test_parquet_writes_each_block_as_it_comes(tmp_path):
    width, block_rows, blocks = 384, 4_000, 5
    vectors = np.random.default_rng(0).standard_normal((blocks * block_rows, width), dtype=np.float32)
    path = tmp_path / "big.parquet"
    with ParquetWriter(path, embedding_schema(width)) as out:
        (tmp,) = temp_files(tmp_path)
        sizes = [tmp.stat().st_size]
        for start in range(0, blocks * block_rows, block_rows):
            block = embedding_block(start, start + block_rows, width)
            out.write_block(block | {"embedding": vectors[start:start + block_rows]})
            sizes.append(tmp.stat().st_size)
    # Random floats barely compress: each block's bytes are in the file before the next one comes.
    assert all(after - before > block_rows * width * 4 * 0.8 for before, after in zip(sizes, sizes[1:]))
    meta = pq.ParquetFile(path).metadata
    assert [meta.row_group(i).num_rows for i in range(meta.num_row_groups)] == [block_rows] * blocks
    read = pq.read_table(path, columns=["embedding"]).column(0).combine_chunks().values.to_numpy()
    np.testing.assert_array_equal(read.reshape(-1, width), vectors)
