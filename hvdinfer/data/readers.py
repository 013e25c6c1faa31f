"""Input readers: JSONL, CSV/TSV with a header, or plain text (one record per line).

Every physical record becomes exactly one `Record`, in file order, whether it is good or bad: a bad
record carries `error` (naming file, line and field) instead of text, so nothing is ever silently
dropped. Callers decide: `--on-error fail` raises on the first bad record, `skip` keeps it as an
error line in the output. Blank lines in JSONL and text files are not records (and are reported
in `ReadReport.blank_lines`).
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
from pathlib import Path
from typing import Any

FORMATS = ("jsonl", "csv", "tsv", "text")
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


def _open_text(path: Path) -> str:
    """The file as text; invalid UTF-8 bytes survive as surrogates so the bad line can be named."""
    if not path.exists():
        raise InputError(f"{path}: no such input file")
    if path.is_dir():
        raise InputError(f"{path}: is a directory, not an input file")
    raw = path.read_bytes()
    if path.suffix == ".bz2":
        import bz2

        raw = bz2.decompress(raw)
    elif path.suffix == ".gz":
        import gzip

        raw = gzip.decompress(raw)
    text = raw.decode("utf-8", errors="surrogateescape")
    return text[1:] if text.startswith("\ufeff") else text


def _lines(content: str) -> list[str]:
    """Split on \n (and \r\n) only: str.splitlines() would also split inside a record at U+2028,
    U+0085 or \x1c, which JSON strings may carry unescaped."""
    lines = content.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def _bad_utf8(value: str) -> bool:
    return any("\udc80" <= ch <= "\udcff" for ch in value)


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
    if fmt == "jsonl":
        report = _read_jsonl(path, content, text_field, id_field, label_field)
    elif fmt == "text":
        report = _read_text(path, content)
    else:
        report = _read_table(path, content, "\t" if fmt == "tsv" else ",", text_field, id_field, label_field)
    report.format = fmt
    if not report.records:
        raise InputError(f"{path}: no records")
    return report


def _numbered_lines(content: str) -> tuple[list[tuple[int, str]], int]:
    """(1-based line number, line) of every non-blank line, and the number of blank lines."""
    numbered = [(n, line) for n, line in enumerate(_lines(content), start=1)]
    kept = [(n, line) for n, line in numbered if line.strip()]
    return kept, len(numbered) - len(kept)


def _read_jsonl(path, content, text_field, id_field, label_field) -> ReadReport:
    records = []
    lines, blank = _numbered_lines(content)
    for line_no, line in lines:
        index = len(records)
        if _bad_utf8(line):
            records.append(Record(index, line_no, index, error=f"{path}:{line_no}: invalid UTF-8"))
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            records.append(Record(index, line_no, index,
                                  error=f"{path}:{line_no}: malformed JSON ({exc.msg} at column {exc.colno})"))
            continue
        if not isinstance(obj, dict):
            records.append(Record(index, line_no, index,
                                  error=f"{path}:{line_no}: expected a JSON object, got {type(obj).__name__}"))
            continue
        rid = obj.get(id_field, index) if id_field else index
        error = _check_text(path, line_no, text_field, obj.get(text_field))
        label = obj.get(label_field) if label_field else None
        if error is None and label_field and label is None:
            error = f"{path}:{line_no}: field '{label_field}': missing"
        records.append(Record(index, line_no, rid, None if error else obj[text_field], error, label))
    return ReadReport(str(path), "jsonl", records, blank)


def _read_text(path, content) -> ReadReport:
    records = []
    lines, blank = _numbered_lines(content)
    for line_no, line in lines:
        index = len(records)
        error = f"{path}:{line_no}: invalid UTF-8" if _bad_utf8(line) else None
        records.append(Record(index, line_no, index, None if error else line, error))
    return ReadReport(str(path), "text", records, blank)


def _read_table(path, content, delimiter, text_field, id_field, label_field) -> ReadReport:
    reader = csv.reader(io.StringIO(content, newline=""), delimiter=delimiter)
    try:
        header = next(reader)
    except StopIteration:
        raise InputError(f"{path}: empty file (a header line is required)") from None
    except csv.Error as exc:
        raise InputError(f"{path}:1: malformed header ({exc})") from None
    if text_field not in header:
        raise InputError(f"{path}:1: no column '{text_field}' in header {header} (use --text-field)")
    if label_field and label_field not in header:
        raise InputError(f"{path}:1: no column '{label_field}' in header {header} (use --label-field)")
    col = {name: i for i, name in enumerate(header)}
    records = []
    while True:
        line_no = reader.line_num + 1
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            index = len(records)
            records.append(Record(index, line_no, index, error=f"{path}:{line_no}: malformed row ({exc})"))
            continue
        if not row:
            continue
        index = len(records)
        if len(row) != len(header):
            records.append(Record(index, line_no, index, error=(
                f"{path}:{line_no}: expected {len(header)} fields, got {len(row)}")))
            continue
        rid = row[col[id_field]] if id_field and id_field in col else index
        error = _check_text(path, line_no, text_field, row[col[text_field]])
        label = row[col[label_field]] if label_field else None
        if error is None and label_field and not label.strip():
            error = f"{path}:{line_no}: field '{label_field}': missing"
        records.append(Record(index, line_no, rid, None if error else row[col[text_field]], error, label))
    return ReadReport(str(path), delimiter == "\t" and "tsv" or "csv", records)
