"""Input readers: JSONL, CSV/TSV with a header, or plain text (one record per line).

Every physical record becomes exactly one `Record`, in file order, whether it is good or bad: a bad
record carries `error` (naming file, line and field) instead of text, so nothing is ever silently
dropped. Callers decide: `--on-error fail` raises on the first bad record, `skip` keeps it as an
error line in the output. Blank lines in JSONL and text files are not records (and are reported
in `ReadReport.blank_lines`).

The per-line and per-row parsing (`line_records`, `table_records`) is shared with
`hvdinfer.data.chunks`, which parses the same records a byte range at a time.
"""
from __future__ import annotations

import bz2
import csv
import dataclasses
import gzip
import io
import json
import re
from pathlib import Path
from typing import Any, Iterator

FORMATS = ("jsonl", "csv", "tsv", "text")
LINE_FORMATS = ("jsonl", "text")
DECOMPRESSORS = {".bz2": bz2, ".gz": gzip}
_SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".csv": "csv", ".tsv": "tsv",
             ".txt": "text", ".text": "text"}


class InputError(Exception):
    """Bad input that every rank sees identically: the message names file, line and field."""


@dataclasses.dataclass(frozen=True)
class Record:
    """One input record: its 0-based position, 1-based line, id, and text or error."""

    index: int
    line: int
    id: Any
    text: str | None = None
    error: str | None = None
    label: Any = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclasses.dataclass
class ReadReport:
    path: str
    format: str
    records: list[Record]
    blank_lines: int = 0

    @property
    def errors(self) -> list[Record]:
        return [r for r in self.records if not r.ok]


@dataclasses.dataclass(frozen=True)
class Fields:
    """Which JSON keys or CSV columns hold the text, the id and the label (None: not read)."""

    text: str = "text"
    id: str | None = "id"
    label: str | None = None


def detect_format(path: Path, explicit: str | None = None) -> str:
    if explicit:
        if explicit not in FORMATS:
            raise InputError(f"--input-format must be one of {', '.join(FORMATS)}, not {explicit!r}")
        return explicit
    suffixes = [s for s in path.suffixes if s != ".bz2" and s != ".gz"]
    fmt = _SUFFIXES.get(suffixes[-1].lower() if suffixes else "")
    if fmt is None:
        raise InputError(f"{path}: cannot tell the format from the extension; pass --input-format "
                         f"({', '.join(FORMATS)})")
    return fmt


def check_input_file(path: Path) -> None:
    if not path.exists():
        raise InputError(f"{path}: no such input file")
    if path.is_dir():
        raise InputError(f"{path}: is a directory, not an input file")


def decode_utf8(raw: bytes) -> str:
    """Invalid UTF-8 bytes survive as surrogates so the bad line can be named."""
    return raw.decode("utf-8", errors="surrogateescape")


def delimiter(fmt: str) -> str:
    return "\t" if fmt == "tsv" else ","


def _open_text(path: Path) -> str:
    """The whole file as text, decompressed, without a leading BOM."""
    check_input_file(path)
    raw = path.read_bytes()
    if path.suffix in DECOMPRESSORS:
        raw = DECOMPRESSORS[path.suffix].decompress(raw)
    text = decode_utf8(raw)
    return text[1:] if text.startswith("\ufeff") else text


def _lines(content: str) -> list[str]:
    """Split on \n (and \r\n) only: str.splitlines() would also split inside a record at U+2028,
    U+0085 or \x1c, which JSON strings may carry unescaped."""
    lines = content.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]


# What decode_utf8's surrogateescape makes of bytes that are not UTF-8.
_ESCAPED_BYTE = re.compile("[\udc80-\udcff]")


def _bad_utf8(value: str) -> bool:
    # isascii() and the regex run in C: a per-character Python test was 70% of parsing a record.
    return not value.isascii() and _ESCAPED_BYTE.search(value) is not None


def _check_text(path: Path, line: int, field: str, value: Any) -> str | None:
    """None when `value` is usable text, else the error message."""
    where = f"{path}:{line}: field '{field}'"
    if value is None:
        return f"{where}: missing"
    if not isinstance(value, str):
        return f"{where}: expected a string, got {type(value).__name__}"
    if _bad_utf8(value):
        return f"{where}: invalid UTF-8"
    if not value.strip():
        return f"{where}: empty text"
    return None


def read_records(path: str | Path, fmt: str | None = None, text_field: str = "text",
                 id_field: str | None = "id", label_field: str | None = None) -> ReadReport:
    """Read every record of `path`. Raises InputError only for whole-file problems."""
    path = Path(path)
    fmt = detect_format(path, fmt)
    content = _open_text(path)
    fields = Fields(text_field, id_field, label_field)
    blank = 0
    if fmt in LINE_FORMATS:
        lines, blank = numbered_lines(content)
        records = line_records(fmt, path, lines, 0, fields)
    else:
        reader = csv.reader(io.StringIO(content, newline=""), delimiter=delimiter(fmt))
        header = read_header(path, reader, fields)
        records = table_records(path, reader, header, 0, 0, fields)
    if not records:
        raise InputError(f"{path}: no records")
    return ReadReport(str(path), fmt, records, blank)


def numbered_lines(content: str, lines_before: int = 0) -> tuple[list[tuple[int, str]], int]:
    """(1-based line number, line) of every non-blank line, and the number of blank lines;
    `content` starts after `lines_before` lines of the file."""
    numbered = [(n, line) for n, line in enumerate(_lines(content), start=lines_before + 1)]
    kept = [(n, line) for n, line in numbered if line.strip()]
    return kept, len(numbered) - len(kept)


def line_records(fmt: str, path: Path | str, lines: list[tuple[int, str]], first_index: int,
                 fields: Fields) -> list[Record]:
    """One Record per numbered non-blank JSONL or text line, indexed from `first_index`."""
    parse = _jsonl_record if fmt == "jsonl" else _text_record
    return [parse(path, index, line_no, line, fields)
            for index, (line_no, line) in enumerate(lines, start=first_index)]


def _jsonl_record(path, index: int, line_no: int, line: str, fields: Fields) -> Record:
    if _bad_utf8(line):
        return Record(index, line_no, index, error=f"{path}:{line_no}: invalid UTF-8")
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        return Record(index, line_no, index,
                      error=f"{path}:{line_no}: malformed JSON ({exc.msg} at column {exc.colno})")
    if not isinstance(obj, dict):
        return Record(index, line_no, index,
                      error=f"{path}:{line_no}: expected a JSON object, got {type(obj).__name__}")
    rid = obj.get(fields.id, index) if fields.id else index
    error = _check_text(path, line_no, fields.text, obj.get(fields.text))
    label = obj.get(fields.label) if fields.label else None
    if error is None and fields.label and label is None:
        error = f"{path}:{line_no}: field '{fields.label}': missing"
    return Record(index, line_no, rid, None if error else obj[fields.text], error, label)


def _text_record(path, index: int, line_no: int, line: str, fields: Fields) -> Record:
    error = f"{path}:{line_no}: invalid UTF-8" if _bad_utf8(line) else None
    return Record(index, line_no, index, None if error else line, error)


def read_header(path: Path, reader, fields: Fields) -> list[str]:
    """The first row of a CSV/TSV `reader`, checked to hold the text (and label) column."""
    try:
        header = next(reader)
    except StopIteration:
        raise InputError(f"{path}: empty file (a header line is required)") from None
    except csv.Error as exc:
        raise InputError(f"{path}:1: malformed header ({exc})") from None
    check_header(path, header, fields)
    return header


def check_header(path: Path | str, header: list[str], fields: Fields) -> None:
    if fields.text not in header:
        raise InputError(f"{path}:1: no column '{fields.text}' in header {header} (use --text-field)")
    if fields.label and fields.label not in header:
        raise InputError(f"{path}:1: no column '{fields.label}' in header {header} (use --label-field)")


def table_rows(reader, lines_before: int = 0) -> Iterator[tuple[int, list[str] | csv.Error]]:
    """(line where it starts, row or the csv.Error it raised) of every non-blank row left in
    `reader`, whose input starts after `lines_before` lines of the file."""
    while True:
        line_no = lines_before + reader.line_num + 1
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            yield line_no, exc
            continue
        if row:
            yield line_no, row


def table_records(path: Path | str, reader, header: list[str], first_index: int, lines_before: int,
                  fields: Fields) -> list[Record]:
    """One Record per non-blank row left in `reader`, indexed from `first_index`."""
    col = {name: i for i, name in enumerate(header)}
    return [_table_record(path, index, line_no, row, header, col, fields)
            for index, (line_no, row) in enumerate(table_rows(reader, lines_before), start=first_index)]


def _table_record(path, index: int, line_no: int, row: list[str] | csv.Error, header: list[str],
                  col: dict[str, int], fields: Fields) -> Record:
    if isinstance(row, csv.Error):
        return Record(index, line_no, index, error=f"{path}:{line_no}: malformed row ({row})")
    if len(row) != len(header):
        return Record(index, line_no, index,
                      error=f"{path}:{line_no}: expected {len(header)} fields, got {len(row)}")
    rid = row[col[fields.id]] if fields.id and fields.id in col else index
    error = _check_text(path, line_no, fields.text, row[col[fields.text]])
    label = row[col[fields.label]] if fields.label else None
    if error is None and fields.label and not label.strip():
        error = f"{path}:{line_no}: field '{fields.label}': missing"
    return Record(index, line_no, rid, None if error else row[col[fields.text]], error, label)
