"""Atomic output writers: a job's output is published whole or not at all.

Every writer writes into a temp file beside its target, fsyncs it and renames it over the target,
so a reader never sees a half-written output; on error or abort the temp file is removed and a
file already at the target is left as it was. Only the coordinator calls these.

Whole values already in memory:
    write_json     a small JSON document (metrics, settings)
    write_jsonl    rows as JSON lines
    write_npy      one array
A job's output streamed block by block in input order, never held whole (memory: one block):
    JsonlWriter    one compact JSON object per line, the line format of write_jsonl
    NpyWriter      one (rows, width) array: its header up front, then each block appended in place
    ParquetWriter  typed columns (see `record_schema`), one row group per block
    open_output    the writer for an output's suffix; as a context manager it commits on a clean
                   exit and aborts on an exception:

        with output.open_output(cfg.output, output.embedding_schema(384), rows=n) as out:
            for block in chunks_in_input_order:
                out.write_block(block)

The row contract, shared by every layout (embeddings, classification, and what comes next): a
block maps column names to equal-length columns (a list with None for null, a 1-D array, or a 2-D
array for a fixed-size vector column); a row is a dict with the same names. `index` (the 0-based
record position), `id` and `error` name the record; every other column holds its values, which are
null for a row whose `error` is set (left out of a .jsonl line; NaN in a vector column, in .npy and
in Parquet alike), so a bad record keeps its place in the output without the task making up values.
"""
from __future__ import annotations

import contextlib
import itertools
import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Mapping, Self

import numpy as np
import orjson

if TYPE_CHECKING:
    import pyarrow as pa

SUFFIXES = (".jsonl", ".npy", ".parquet")
RECORD_COLUMNS = ("index", "id", "error")
LABELS_KEY = b"labels"
"""Schema metadata key of a classification output: its label names, as a JSON list."""
ROWS_PER_BLOCK = 4096
"""Rows that `write_rows` gathers into one block (one Parquet row group)."""

Block = Mapping[str, Any]


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# mkstemp creates files 0600; a published output gets the mode any new file of this process gets.
_FILE_MODE = 0o666 & ~_current_umask()


def _temp_beside(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    return Path(tmp)


def _publish(tmp: Path, path: Path) -> None:
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.chmod(tmp, _FILE_MODE)
    os.replace(tmp, path)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside `path`; on success it replaces `path`, on error it is removed."""
    path = Path(path)
    tmp = _temp_beside(path)
    try:
        yield tmp
        _publish(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class AtomicWriter:
    """One output file written in blocks into a temp file beside it, published whole by `commit`.

    Subclasses open their temp file in `_open`, write a block in `_write_block`, finish the file in
    `_finish` (commit only) and release it in `_close`.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.rows_written = 0
        self._state = "open"
        self._tmp = _temp_beside(self.path)
        try:
            self._open()
        except BaseException:
            self._tmp.unlink(missing_ok=True)
            raise

    def write_block(self, block: Block) -> None:
        """Append a block of rows (see the row contract in the module docstring)."""
        self._require_open()
        self._write_block(block)

    def write_rows(self, rows: Iterable[Mapping[str, Any]]) -> None:
        """Append dict rows in order, ROWS_PER_BLOCK at a time."""
        self._require_open()
        rows = iter(rows)
        while chunk := list(itertools.islice(rows, ROWS_PER_BLOCK)):
            names = dict.fromkeys(name for row in chunk for name in row)
            self._write_block({name: [row.get(name) for row in chunk] for name in names})

    def commit(self) -> Path:
        """Finish the file and rename it over `path`; on any error abort instead, and raise."""
        self._require_open()
        try:
            self._finish()
            self._close()
            _publish(self._tmp, self.path)
        except BaseException:
            self.abort()
            raise
        self._state = "committed"
        return self.path

    def abort(self) -> None:
        """Drop what was written; `path` is left as it was. Does nothing once committed or aborted."""
        if self._state != "open":
            return
        self._state = "aborted"
        # The file is thrown away: the error that led here, not one from closing it, is the news.
        with contextlib.suppress(Exception):
            self._close()
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()

    def _require_open(self) -> None:
        if self._state != "open":
            raise ValueError(f"{self.path}: the writer is already {self._state}")

    def _open(self) -> None:
        raise NotImplementedError

    def _write_block(self, block: Block) -> None:
        raise NotImplementedError

    def _finish(self) -> None:
        pass

    def _close(self) -> None:
        raise NotImplementedError


class JsonlWriter(AtomicWriter):
    """JSON lines: `write_rows` writes each dict as it is; `write_block` makes one row per record,
    leaving out null values, so a bad record's line holds only its index, id and error."""

    def _open(self) -> None:
        self._fh = open(self._tmp, "wb")

    def write_rows(self, rows: Iterable[Mapping[str, Any]]) -> None:
        self._require_open()
        for row in rows:
            self._fh.write(_json_line(row))
            self.rows_written += 1

    def _write_block(self, block: Block) -> None:
        self.write_rows(_rows_of(block))

    def _close(self) -> None:
        self._fh.close()


class NpyWriter(AtomicWriter):
    """A (rows, width) .npy array written in place, in order: the header first, then each block's
    rows appended. A block is a 2-D array, or a row-contract block whose `column` is taken (NaN
    rows where it is null or the row has an error; other columns are not stored). `commit` checks
    that exactly `rows` rows were written."""

    def __init__(self, path: str | Path, rows: int, width: int, dtype: Any = np.float32, *,
                 column: str = "embedding"):
        self.rows, self.width, self.dtype, self.column = rows, width, np.dtype(dtype), column
        super().__init__(path)

    def _open(self) -> None:
        self._fh = open(self._tmp, "wb")
        header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False,
                  "shape": (self.rows, self.width)}
        np.lib.format.write_array_header_1_0(self._fh, header)

    def _write_block(self, block: Block | np.ndarray) -> None:
        if not isinstance(block, Mapping):
            block = {self.column: np.asarray(block)}
        n = _block_length(block)
        vectors = _vectors(block.get(self.column), n, self.width, self.dtype, _error_rows(block, n),
                           f"{self.path}: {self.column}")
        if self.rows_written + n > self.rows:
            raise ValueError(f"{self.path}: a block of {n} rows after {self.rows_written} "
                             f"overruns the {self.rows} rows in the header")
        self._fh.write(np.ascontiguousarray(vectors).data)
        self.rows_written += n

    def _finish(self) -> None:
        if self.rows_written != self.rows:
            raise ValueError(f"{self.path}: {self.rows_written} rows written, the header says {self.rows}; "
                             f"nothing published")

    def _close(self) -> None:
        self._fh.close()


class ParquetWriter(AtomicWriter):
    """A Parquet file of `schema` (see `record_schema`), each block written as its own row group as
    it comes, so a block's size is the row group's: pass chunks of thousands of rows. A column the
    schema does not name is an error; a column a block leaves out is null. zstd throughout,
    dictionary encoding for strings only, byte-stream-split for floats: embeddings about 15%
    smaller than with pyarrow's defaults."""

    def __init__(self, path: str | Path, schema: pa.Schema):
        self.schema = schema
        super().__init__(path)

    def _open(self) -> None:
        import pyarrow.parquet as pq

        self._writer = pq.ParquetWriter(str(self._tmp), self.schema, compression="zstd",
                                        use_dictionary=_string_columns(self.schema),
                                        use_byte_stream_split=_float_leaves(self.schema))

    def _write_block(self, block: Block) -> None:
        import pyarrow as pa

        unknown = set(block) - set(self.schema.names)
        if unknown:
            raise ValueError(f"{self.path}: no column {', '.join(sorted(unknown))} in the schema "
                             f"({', '.join(self.schema.names)})")
        n = _block_length(block)
        if n == 0:
            return
        bad = _error_rows(block, n)
        columns = [_arrow_column(block.get(field.name), field, n, None if field.name in RECORD_COLUMNS else bad)
                   for field in self.schema]
        self._writer.write_batch(pa.RecordBatch.from_arrays(columns, schema=self.schema))
        self.rows_written += n

    def _close(self) -> None:
        self._writer.close()


def open_output(path: str | Path, schema: pa.Schema, *, rows: int | None = None) -> AtomicWriter:
    """The writer for `path`'s suffix. .npy stores the schema's one fixed-size vector column and
    needs the total `rows` up front; .jsonl and .parquet need no count."""
    path = Path(path)
    if path.suffix == ".jsonl":
        return JsonlWriter(path)
    if path.suffix == ".parquet":
        return ParquetWriter(path, schema)
    if path.suffix == ".npy":
        import pyarrow as pa

        vectors = [field for field in schema if pa.types.is_fixed_size_list(field.type)]
        if len(vectors) != 1:
            raise ValueError(f"{path}: .npy holds one vector column; the schema has "
                             f"{[field.name for field in vectors]}")
        if rows is None:
            raise ValueError(f"{path}: .npy needs the number of rows up front")
        vector = vectors[0]
        return NpyWriter(path, rows, vector.type.list_size, _numpy_dtype(vector.type.value_type),
                         column=vector.name)
    raise ValueError(f"{path}: no writer for {path.suffix!r}; use one of {', '.join(SUFFIXES)}")


def record_schema(*values: pa.Field | tuple[str, pa.DataType], metadata: dict | None = None) -> pa.Schema:
    """A layout: the record columns `index`, `id` around the `values` columns, then `error`.

    `id` is a string column: an id is whatever the input held (a JSONL number or string, a CSV
    cell, or the record's index when there is none), so ints and strings can meet in one file while
    a Parquet column has one type. A non-string id is stored as its JSON text (7 -> "7").
    """
    import pyarrow as pa

    return pa.schema([pa.field("index", pa.int64(), nullable=False), ("id", pa.string()), *values,
                      ("error", pa.string())], metadata=metadata)


def embedding_schema(width: int) -> pa.Schema:
    """`embedding`: fixed_size_list<float32>[width]; NaN for a bad record, whose `error` says why."""
    import pyarrow as pa

    return record_schema(("embedding", pa.list_(pa.float32(), width)))


def classification_schema(labels: list[str]) -> pa.Schema:
    """`label` (the most likely) and `scores` (fixed_size_list<float32>: one probability per label,
    in the order of the label names stored under LABELS_KEY in the schema metadata)."""
    import pyarrow as pa

    return record_schema(("label", pa.string()), ("scores", pa.list_(pa.float32(), len(labels))),
                         metadata={LABELS_KEY: json.dumps(list(labels), ensure_ascii=False).encode("utf-8")})


def _block_length(block: Block) -> int:
    lengths = {name: len(column) for name, column in block.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"block columns differ in length: {lengths}")
    return next(iter(lengths.values()), 0)


def _error_rows(block: Block, n: int) -> np.ndarray:
    """True where the row's `error` is set."""
    errors = block.get("error")
    if errors is None:
        return np.zeros(n, bool)
    return np.fromiter((error is not None for error in errors), bool, n)


def _json_line(row: Mapping[str, Any]) -> bytes:
    """One compact JSON line. orjson writes float32 values (NumPy rows stay NumPy) in their shortest
    float32 form, which reads back to the same float32, 18x faster than json and 44% shorter than
    the float64 digits json would print; json takes over for what orjson refuses (lone surrogates
    in an id cut from invalid UTF-8)."""
    try:
        return orjson.dumps(row, default=_json_value, option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_APPEND_NEWLINE)
    except TypeError:
        text = json.dumps(row, ensure_ascii=False, separators=(",", ":"), default=_json_value)
        return text.encode("utf-8", "surrogateescape") + b"\n"


def _rows_of(block: Block) -> Iterator[dict[str, Any]]:
    """One dict per row, null values and a bad record's values left out."""
    bad = _error_rows(block, _block_length(block))
    columns = {name: column if isinstance(column, np.ndarray) else list(column) for name, column in block.items()}
    for i, is_bad in enumerate(bad):
        yield {name: column[i] for name, column in columns.items()
               if column[i] is not None and not (is_bad and name not in RECORD_COLUMNS)}


def _json_value(value: Any) -> Any:
    if isinstance(value, (np.generic, np.ndarray)):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _id_text(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, default=_json_value)


def _vectors(values: Any, n: int, width: int, dtype: np.dtype, null_rows: np.ndarray, name: str) -> np.ndarray:
    """`values` as an (n, width) array of `dtype`, NaN in rows that are null or in `null_rows`."""
    if isinstance(values, np.ndarray):
        vectors = values.astype(dtype, copy=bool(null_rows.any()))
    else:
        vectors = np.full((n, width), np.nan, dtype)
        for i, value in enumerate(values if values is not None else ()):
            if value is not None:
                vectors[i] = value
    if vectors.shape != (n, width):
        raise ValueError(f"{name}: a block of shape {vectors.shape}, ({n}, {width}) expected")
    vectors[null_rows] = np.nan
    return vectors


def _arrow_column(values: Any, field: pa.Field, n: int, null_rows: np.ndarray | None) -> pa.Array:
    """One block column as an Arrow array of `field`'s type; null (NaN in a vector) where `null_rows`."""
    import pyarrow as pa

    if null_rows is None:
        null_rows = np.zeros(n, bool)
    if pa.types.is_fixed_size_list(field.type):
        # apache/arrow#35692: pyarrow < 26 writes a null fixed-size list to Parquet but cannot read
        # the column back, so a row without values holds NaN, as in .npy, and its `error` says why.
        vectors = _vectors(values, n, field.type.list_size, _numpy_dtype(field.type.value_type), null_rows,
                           f"column {field.name}")
        return pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), type=field.type)
    if values is None:
        if not field.nullable:
            raise ValueError(f"column {field.name} is required")
        return pa.nulls(n, field.type)
    if field.name == "id":
        values = [_id_text(value) for value in values]
    return pa.array(values, type=field.type, mask=null_rows if null_rows.any() else None)


def _numpy_dtype(arrow_type: pa.DataType) -> np.dtype:
    import pyarrow as pa

    # DataType.to_pandas_dtype would import pandas; an empty array knows its NumPy dtype too.
    return pa.array([], type=arrow_type).to_numpy().dtype


def _string_columns(schema: pa.Schema) -> list[str]:
    import pyarrow as pa

    return [field.name for field in schema if pa.types.is_string(field.type)]


def _float_leaves(schema: pa.Schema) -> list[str]:
    """Parquet column paths of the float columns and float vector columns."""
    import pyarrow as pa

    leaves = []
    for field in schema:
        if pa.types.is_floating(field.type):
            leaves.append(field.name)
        elif pa.types.is_fixed_size_list(field.type) and pa.types.is_floating(field.type.value_type):
            leaves.append(f"{field.name}.list.element")
    return leaves


def write_jsonl(path: str | Path, rows: Iterable[dict[str, Any]]) -> int:
    """Write one JSON object per line, atomically; returns the number of lines."""
    with JsonlWriter(path) as writer:
        writer.write_rows(rows)
    return writer.rows_written


def write_npy(path: str | Path, array) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, array)


def write_json(path: str | Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False), encoding="utf-8")
