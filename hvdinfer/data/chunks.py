r"""Streamed input for the job engine: one cheap index pass, then records read and parsed by chunk.

The coordinator never holds the whole input. `index_input` reads the file once, in large binary
blocks, and keeps only where every GRANULE-th record starts (byte offset and line), the record
count, and the file's size and sha256: O(records / GRANULE) memory. `InputIndex.chunks` cuts the
records into byte ranges, `read_chunk_bytes` reads one range and `parse_chunk` turns it into
`readers.Record`s through the same per-line and per-row code as `readers.read_records`. Parsing
every chunk in order gives exactly the records `read_records` gives for the whole file (same
index, line, id, text, error and label), for any chunk size:

    index = index_input("in.jsonl")
    for chunk in index.chunks(4096):
        records = parse_chunk(index, chunk, read_chunk_bytes(index, chunk))

How the pass finds records without parsing them:
- JSONL and text: a record is a non-blank physical line (split on \n only, so U+2028 inside a JSON
  string stays in its record; a leading UTF-8 BOM is skipped). numpy finds the newlines; a line is
  surely not blank when its first byte occurs in no whitespace character's UTF-8, and only the
  rare lines that start otherwise are decoded to decide.
- CSV/TSV: a row may span lines (quoted newlines). While the table keeps to RFC 4180 (every quote
  opens or closes a field, or doubles a quote) numpy finds the rows by quote parity: a line starts
  a row when an even number of quotes precede it. From the first piece that does not (the csv
  module reads a stray quote as text), or that holds a row longer than the csv field limit (csv
  drops the rest of such a line), the pass runs the csv module itself over the rest of the file,
  exactly as read_records does, and maps the line where each row starts to its byte offset.

Compressed input (.gz, .bz2) cannot be read by byte range: `index_input` decompresses it once,
streaming, into `spill_dir/input.<fmt>` (spill_dir is required then), indexes that file as it is
written, and `read_path` names it; `size` and `digest` stay those of the compressed file as given.
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import functools
import hashlib
import io
import itertools
import os
import sys
import zlib
from collections import deque
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

import numpy as np

from hvdinfer.data import readers

GRANULE = 64  # records between stored boundaries
BLOCK_BYTES = 8 << 20
_BOM = b"\xef\xbb\xbf"
_LF, _CR, _QUOTE = 10, 13, 34


@dataclasses.dataclass(frozen=True)
class Chunk:
    """Records [first_record, first_record + count), bytes [byte_start, byte_end) of read_path."""

    id: int
    first_record: int
    count: int
    byte_start: int
    byte_end: int
    first_line: int


@dataclasses.dataclass(frozen=True, eq=False)
class InputIndex:
    """Where the input's records lie: enough to cut it into chunks without reading it again."""

    path: str  # the input as the user named it (used in error messages)
    read_path: str  # the file chunks are read from: the input, or its decompressed spill
    format: str
    size: int  # bytes of the input file as given
    digest: str  # sha256 hex of the input file as given
    records: int
    blank_lines: int  # as ReadReport.blank_lines: blank JSONL/text lines (0 for CSV/TSV)
    header: list[str] | None  # CSV/TSV header columns
    offsets: np.ndarray  # byte offset in read_path of records 0, granule, 2*granule, ..., then the end
    lines: np.ndarray  # 1-based line of those records (one fewer entry than offsets)
    granule: int = GRANULE

    def chunks(self, chunk_records: int) -> list[Chunk]:
        """Consecutive chunks of `chunk_records` records (the last may hold fewer)."""
        if chunk_records <= 0 or chunk_records % self.granule:
            raise ValueError(f"chunk_records must be a positive multiple of {self.granule}, not {chunk_records}")
        chunks = []
        for chunk_id, first in enumerate(range(0, self.records, chunk_records)):
            count = min(chunk_records, self.records - first)
            # offsets has an entry per granule and one for the end, where a short last chunk ends
            start, end = first // self.granule, -(-(first + count) // self.granule)
            chunks.append(Chunk(chunk_id, first, count, int(self.offsets[start]), int(self.offsets[end]),
                                int(self.lines[start])))
        return chunks

    def identity(self) -> dict:
        """What names this input in a journal: a resumed job must see the same."""
        return {"path": self.path, "format": self.format, "size": self.size, "digest": self.digest,
                "records": self.records}


def index_input(path: str | Path, fmt: str | None = None, text_field: str = "text",
                label_field: str | None = None, spill_dir: str | Path | None = None,
                granule: int = GRANULE) -> InputIndex:
    """One pass over `path`. Raises readers.InputError for whole-file problems, as read_records does."""
    path = Path(path)
    fmt = readers.detect_format(path, fmt)
    readers.check_input_file(path)
    with open(path, "rb") as raw_file:
        raw = _HashedFile(raw_file)
        blocks, read_path = _input_blocks(raw, path, fmt, spill_dir)
        with contextlib.closing(blocks):
            start, blocks = _without_bom(blocks)
            fields = readers.Fields(text_field, None, label_field)
            if fmt in readers.LINE_FORMATS:
                scan = _scan_lines(_pieces(start, blocks, _after_last_lf), granule)
            else:
                scan = _scan_table(_pieces(start, blocks, _after_last_line_end), path, fmt, fields, granule)
        raw.drain()
    if not scan.records:
        raise readers.InputError(f"{path}: no records")
    end = os.path.getsize(read_path)
    return InputIndex(str(path), read_path, fmt, raw.size, raw.sha256.hexdigest(), scan.records,
                      scan.blank_lines, scan.header, np.append(scan.offsets, end), scan.lines, granule)


def read_chunk_bytes(index: InputIndex, chunk: Chunk) -> bytes:
    with open(index.read_path, "rb") as f:
        f.seek(chunk.byte_start)
        data = f.read(chunk.byte_end - chunk.byte_start)
    _check_length(index, chunk, data)
    return data


def parse_chunk(index: InputIndex, chunk: Chunk, data: bytes, text_field: str = "text",
                id_field: str | None = "id", label_field: str | None = None) -> list[readers.Record]:
    """The chunk's records, exactly as read_records numbers and checks them in the whole file.
    Raises ValueError when `data` does not hold exactly the chunk's records."""
    _check_length(index, chunk, data)
    fields = readers.Fields(text_field, id_field, label_field)
    text = readers.decode_utf8(data)
    if index.format in readers.LINE_FORMATS:
        lines, _ = readers.numbered_lines(text, chunk.first_line - 1)
        records = readers.line_records(index.format, index.path, lines, chunk.first_record, fields)
    else:
        readers.check_header(index.path, index.header, fields)
        reader = csv.reader(io.StringIO(text, newline=""), delimiter=readers.delimiter(index.format))
        records = readers.table_records(index.path, reader, index.header, chunk.first_record,
                                        chunk.first_line - 1, fields)
    if len(records) != chunk.count or records[0].line != chunk.first_line:
        found = f"{len(records)} records from line {records[0].line}" if records else "no records"
        raise ValueError(f"{index.read_path}: chunk {chunk.id} should hold {chunk.count} records from line "
                         f"{chunk.first_line}, its bytes hold {found} (the file changed since it was indexed?)")
    return records


def _check_length(index: InputIndex, chunk: Chunk, data: bytes) -> None:
    if len(data) != chunk.byte_end - chunk.byte_start:
        raise ValueError(f"{index.read_path}: chunk {chunk.id} is {chunk.byte_end - chunk.byte_start} bytes, "
                         f"got {len(data)} (the file changed since it was indexed?)")


# --- reading the input once -------------------------------------------------------------------


class _HashedFile:
    """A binary file read through sha256, counting its bytes."""

    def __init__(self, f: BinaryIO):
        self._f = f
        self.sha256 = hashlib.sha256()
        self.size = 0

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        self.sha256.update(data)
        self.size += len(data)
        return data

    def drain(self) -> None:
        """Read (and hash) what a decompressor left unread."""
        while self.read(BLOCK_BYTES):
            pass


def _input_blocks(raw: _HashedFile, path: Path, fmt: str, spill_dir) -> tuple[Iterator[bytes], str]:
    """The bytes chunks will be read from, in blocks, and the file that holds them."""
    decompressor = readers.DECOMPRESSORS.get(path.suffix)
    if decompressor is None:
        return _file_blocks(raw), str(path)
    if spill_dir is None:
        raise ValueError(f"{path}: compressed input needs a spill_dir to decompress into "
                         "(chunks are read by byte range)")
    spill = Path(spill_dir) / f"input.{fmt}"
    return _spilled_blocks(decompressor.open(raw), spill, path), str(spill)


def _file_blocks(raw: _HashedFile) -> Iterator[bytes]:
    while block := raw.read(BLOCK_BYTES):
        yield block


def _spilled_blocks(stream, spill: Path, path: Path) -> Iterator[bytes]:
    spill.parent.mkdir(parents=True, exist_ok=True)
    with stream, open(spill, "wb") as out:
        while True:
            try:
                block = stream.read(BLOCK_BYTES)
            except (OSError, EOFError, zlib.error) as exc:
                raise readers.InputError(f"{path}: cannot decompress ({exc})") from None
            if not block:
                return
            out.write(block)
            yield block


def _without_bom(blocks: Iterator[bytes]) -> tuple[int, Iterator[bytes]]:
    """Where the text starts (after a UTF-8 BOM, as read_records drops it) and the blocks from there."""
    head = b""
    for block in blocks:
        head += block
        if len(head) >= len(_BOM):
            break
    start = len(_BOM) if head.startswith(_BOM) else 0
    return start, itertools.chain([head[start:]], blocks)


def _pieces(start: int, blocks: Iterator[bytes], cut: Callable[[bytes], int]) -> Iterator[tuple[int, bytes]]:
    """(offset, bytes) pieces of the stream from `start`, each ending where a line ends (or at the
    end). `cut(block)` says where the block's last line ends, 0 if none does."""
    offset, tail = start, []  # tail: the bytes since the last line end
    for block in blocks:
        if not block:
            continue
        end = cut(block)
        if not end:
            tail.append(block)
            continue
        piece = b"".join(tail + [memoryview(block)[:end]]) if tail or end < len(block) else block
        yield offset, piece
        offset += len(piece)
        tail = [block[end:]] if end < len(block) else []
    if tail:
        yield offset, b"".join(tail)


def _after_last_lf(block: bytes) -> int:
    return block.rfind(b"\n") + 1


def _after_last_line_end(block: bytes) -> int:
    r"""After the last \n, \r\n or lone \r (io.StringIO(newline="") line ends, as csv reads them);
    a \r last in the block is not taken: the next block may start with \n."""
    return max(block.rfind(b"\n") + 1, block.rfind(b"\r", 0, len(block) - 1) + 1)


@dataclasses.dataclass
class _Scan:
    """What one pass found: the record count and the granule boundaries."""

    records: int
    offsets: np.ndarray
    lines: np.ndarray
    blank_lines: int = 0
    header: list[str] | None = None


class _Boundaries:
    """Where every granule-th record starts (byte offset, 1-based line), from record starts in order."""

    def __init__(self, granule: int):
        self.granule = granule
        self.records = 0
        self._offsets: list[np.ndarray] = []
        self._lines: list[np.ndarray] = []

    def add(self, offsets: np.ndarray, lines: np.ndarray) -> None:
        """The next len(offsets) records."""
        first = -self.records % self.granule
        # copies: a strided view would keep every record's offset alive
        self._offsets.append(offsets[first::self.granule].copy())
        self._lines.append(lines[first::self.granule].copy())
        self.records += len(offsets)

    def add_one(self, offset: Callable[[], int], line: int) -> None:
        """The next record; its offset is looked up only when it is a boundary."""
        if self.records % self.granule == 0:
            self._offsets.append(np.array([offset()]))
            self._lines.append(np.array([line]))
        self.records += 1

    def scan(self, blank_lines: int = 0, header: list[str] | None = None) -> _Scan:
        def joined(parts):
            return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)

        return _Scan(self.records, joined(self._offsets), joined(self._lines), blank_lines, header)


# --- JSONL and text: one record per non-blank line ----------------------------------------------


@functools.cache
def _ink_bytes() -> np.ndarray:
    """True for the bytes that occur in no whitespace character's UTF-8."""
    ink = np.ones(256, bool)
    for ch in map(chr, range(sys.maxunicode + 1)):
        if ch.isspace():
            ink[list(ch.encode())] = False
    return ink


def _scan_lines(pieces: Iterator[tuple[int, bytes]], granule: int) -> _Scan:
    found = _Boundaries(granule)
    lines_before = blank = 0
    for offset, data in pieces:
        starts, is_record = _line_starts(data)
        found.add(offset + starts[is_record], lines_before + 1 + np.flatnonzero(is_record))
        blank += np.count_nonzero(~is_record)
        lines_before += len(starts)
    return found.scan(blank_lines=int(blank))


def _line_starts(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    r"""Where each \n-terminated line of `data` starts, and whether it is a record (not blank)."""
    byte = np.frombuffer(data, np.uint8)
    starts = np.concatenate(([0], np.flatnonzero(byte[:-1] == _LF) + 1))
    # A line whose first byte is in no whitespace character is a record; decode the few others.
    is_record = _ink_bytes()[byte[starts]]
    ends = np.append(starts[1:], len(data))
    for i in np.flatnonzero(~is_record):
        is_record[i] = bool(readers.decode_utf8(data[starts[i]:ends[i]]).strip())
    return starts, is_record


# --- CSV/TSV: one record per non-blank csv row ---------------------------------------------------


def _scan_table(pieces: Iterator[tuple[int, bytes]], path: Path, fmt: str, fields: readers.Fields,
                granule: int) -> _Scan:
    delimiter = readers.delimiter(fmt)
    lines = _TableLines(pieces)
    reader = csv.reader(lines, delimiter=delimiter)
    header = readers.read_header(path, reader, fields)
    found = _Boundaries(granule)
    _scan_rows(lines.rest(reader.line_num), reader.line_num, delimiter, found)
    return found.scan(header=header)


def _scan_rows(pieces: Iterator[tuple[int, bytes]], lines_before: int, delimiter: str,
               found: _Boundaries) -> None:
    """Rows found by quote parity while the table keeps to RFC 4180; from the first piece that does
    not, the csv module reads the rest as read_records does. Every piece handed on starts a row."""
    carry_start, carry = 0, b""  # the bytes from where the last open row starts
    for offset, data in itertools.chain(pieces, [(None, b"")]):  # (None, b"") marks the end
        at_end = offset is None
        if not carry:
            if at_end:
                return
            carry_start = offset
        buffer = carry + data
        rows = _rfc_rows(buffer, delimiter, at_end)
        if rows is None:
            _scan_csv_rows(itertools.chain([(carry_start, buffer)], pieces), lines_before, delimiter, found)
            return
        found.add(carry_start + rows.record_starts, lines_before + 1 + rows.record_lines)
        lines_before += rows.lines
        carry, carry_start = buffer[rows.end:], carry_start + rows.end


@dataclasses.dataclass
class _Rows:
    record_starts: np.ndarray  # offset of each non-blank row
    record_lines: np.ndarray  # 0-based line of each non-blank row
    end: int  # where the last complete row ends
    lines: int  # lines before `end`


def _rfc_rows(buffer: bytes, delimiter: str, at_end: bool) -> _Rows | None:
    """The rows of `buffer` (which starts a row) by quote parity: a line starts a row when an even
    number of quotes precede it. None where the csv module could read it otherwise: a quote where
    RFC 4180 allows none (csv then takes it as text), or a row longer than the csv field limit."""
    byte = np.frombuffer(buffer, np.uint8)
    quotes = np.flatnonzero(byte == _QUOTE)
    if not _quotes_well_placed(byte, quotes, ord(delimiter), at_end):
        return None
    line_starts = _table_line_starts(buffer)
    row_lines = np.flatnonzero(np.searchsorted(quotes, line_starts) % 2 == 0)
    row_starts = line_starts[row_lines]
    end = len(buffer)
    if len(quotes) % 2 and not at_end:  # the last row is still in a quoted field
        end, row_starts, row_lines = int(row_starts[-1]), row_starts[:-1], row_lines[:-1]
    longest_row = max(np.diff(row_starts, append=end).max(initial=0), len(buffer) - end)
    if longest_row > csv.field_size_limit():  # bytes >= characters: no field can reach the limit
        return None
    is_record = ~np.isin(byte[row_starts], (_LF, _CR))  # a row that is only a line end is blank
    lines_before_end = len(line_starts) if end == len(buffer) else int(np.searchsorted(line_starts, end))
    return _Rows(row_starts[is_record], row_lines[is_record], end, lines_before_end)


def _quotes_well_placed(byte: np.ndarray, quotes: np.ndarray, delimiter: int, at_end: bool) -> bool:
    """Every opening quote starts a field (or doubles a quote) and every closing quote ends one (or
    is doubled): then the csv module's quoted fields are exactly the quote-parity ones."""
    opening, closing = quotes[0::2], quotes[1::2]
    field_edges = (delimiter, _LF, _CR, _QUOTE)
    opens_field = (opening == 0) | np.isin(byte[np.maximum(opening - 1, 0)], field_edges)
    closes_field = np.isin(byte[np.minimum(closing + 1, len(byte) - 1)], field_edges) & (closing + 1 < len(byte))
    closes_at_end = at_end & (closing + 1 == len(byte))
    return bool(opens_field.all() and (closes_field | closes_at_end).all())


def _scan_csv_rows(pieces: Iterator[tuple[int, bytes]], lines_before: int, delimiter: str,
                   found: _Boundaries) -> None:
    lines = _TableLines(pieces, lines_before)
    reader = csv.reader(lines, delimiter=delimiter)
    for line_no, _ in readers.table_rows(reader, lines_before):
        found.add_one(lambda: lines.start_of(line_no - 1), line_no)


class _TableLines:
    """The decoded lines a csv.reader pulls, piece by piece, and the byte offset where each starts."""

    def __init__(self, pieces: Iterator[tuple[int, bytes]], first_line: int = 0):
        self._pieces = pieces
        # (first line, line starts) of each piece since the last start_of: a row may span pieces
        self._starts: deque[tuple[int, np.ndarray]] = deque()
        self._lines_seen = first_line
        self._latest = (0, b"")

    def __iter__(self) -> Iterator[str]:
        return itertools.chain.from_iterable(self._decoded_pieces())

    def _decoded_pieces(self) -> Iterator[io.StringIO]:
        for offset, data in self._pieces:
            starts = offset + _table_line_starts(data)
            self._starts.append((self._lines_seen, starts))
            self._lines_seen += len(starts)
            self._latest = (offset, data)
            yield io.StringIO(readers.decode_utf8(data), newline="")

    def start_of(self, line: int) -> int:
        """Byte offset of 0-based `line`; lines are asked for in order, so earlier pieces are forgotten."""
        while self._starts[0][0] + len(self._starts[0][1]) <= line:
            self._starts.popleft()
        first, starts = self._starts[0]
        return int(starts[line - first])

    def rest(self, line: int) -> Iterator[tuple[int, bytes]]:
        """The pieces from 0-based `line` on, which the csv.reader has not read."""
        offset, data = self._latest
        start = self.start_of(line) if line < self._lines_seen else offset + len(data)
        return itertools.chain([(start, data[start - offset:])], self._pieces)


def _table_line_starts(data: bytes) -> np.ndarray:
    r"""Where each line of `data` starts, lines ending at \n, \r\n or a lone \r."""
    if not data:
        return np.zeros(0, np.int64)
    byte = np.frombuffer(data, np.uint8)
    ends = np.flatnonzero(byte == _LF) + 1
    if b"\r" in data:
        cr = np.flatnonzero(byte == _CR)
        after_lone_cr = cr[byte[np.minimum(cr + 1, len(byte) - 1)] != _LF] + 1  # a \r last in data is lone
        ends = np.union1d(ends, after_lone_cr)
    return np.concatenate(([0], ends[ends < len(byte)])).astype(np.int64)
