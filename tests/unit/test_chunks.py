"""Chunked input: parsing every chunk in order gives exactly read_records' records, for any chunk size."""
import bz2
import contextlib
import csv
import gzip
import hashlib
import io
import json
import os
import re
import tracemalloc
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hvdinfer.data import chunks
from hvdinfer.data.chunks import index_input, parse_chunk, read_chunk_bytes
from hvdinfer.data.readers import InputError, read_records


def write(directory, name, data: bytes | str):
    path = directory / name
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def chunked_records(index, chunk_records, **fields):
    return [record for chunk in index.chunks(chunk_records)
            for record in parse_chunk(index, chunk, read_chunk_bytes(index, chunk), **fields)]


def assert_ranges_cover_records_once(index, chunk_list):
    assert [c.id for c in chunk_list] == list(range(len(chunk_list)))
    assert chunk_list[0].first_record == 0 and chunk_list[0].byte_start == index.offsets[0]
    for before, after in zip(chunk_list, chunk_list[1:]):
        assert after.first_record == before.first_record + before.count
        assert after.byte_start == before.byte_end > before.byte_start
    assert sum(c.count for c in chunk_list) == index.records
    assert chunk_list[-1].byte_end == os.path.getsize(index.read_path)


def assert_chunks_match_whole_file(path, granule=chunks.GRANULE, multiple=1, spill_dir=None, fmt=None,
                                   text_field="text", id_field="id", label_field=None):
    """index_input + parse_chunk agree with read_records: the same records, or the same InputError."""
    try:
        report = read_records(path, fmt, text_field, id_field, label_field)
    except InputError as exc:
        with pytest.raises(InputError) as raised:
            index_input(path, fmt, text_field, label_field, spill_dir, granule=granule)
        assert str(raised.value) == str(exc)
        return None
    index = index_input(path, fmt, text_field, label_field, spill_dir, granule=granule)
    assert index.records == len(report.records)
    assert (index.blank_lines, index.format) == (report.blank_lines, report.format)
    assert len(index.offsets) == -(-index.records // granule) + 1 == len(index.lines) + 1
    chunk_list = index.chunks(granule * multiple)
    assert_ranges_cover_records_once(index, chunk_list)
    assert chunked_records(index, granule * multiple, text_field=text_field, id_field=id_field,
                           label_field=label_field) == report.records
    return index


# --- generated files ------------------------------------------------------------------------

# Bytes that stress line splitting and blank detection: whitespace outside ASCII (U+2028, U+0085,
# U+3000), \x1c, a lone \r, invalid and truncated UTF-8, and JSON punctuation.
LINE_BITS = [b"a", b" ", b"\t", b"\r", b"\xe2\x80\xa8", b"\xc2\x85", b"\x1c", b"\xe3\x80\x80", b"\xff",
             b"\xe4\xb8", b"\xe4\xb8\xad", b"\xef\xbb\xbf", b'"', b"{", b"}", b":", b"[1]"]
TEXT = st.text(alphabet=st.sampled_from("ab \t\u2028\x85\x1c\u3000\"\\,\r中"), max_size=6)
JSON_OBJECT = st.fixed_dictionaries({}, optional={
    "text": st.one_of(TEXT, st.none(), st.integers()), "id": st.one_of(TEXT, st.integers()),
    "label": st.one_of(TEXT, st.none())}).map(lambda obj: json.dumps(obj, ensure_ascii=False).encode())
LINE = st.one_of(JSON_OBJECT, st.lists(st.sampled_from(LINE_BITS), max_size=5).map(b"".join))
LINE_FILE = st.builds(
    lambda bom, lines, last_newline: (b"\xef\xbb\xbf" if bom else b"") + b"".join(
        line + ending for line, ending in lines)[:None if last_newline else -1],
    st.booleans(), st.lists(st.tuples(LINE, st.sampled_from([b"\n", b"\r\n"])), max_size=40), st.booleans())

# Table bodies: well-formed rows written by csv.writer (quoted newlines, "" escapes) mixed with raw
# bits that break the rules (stray quotes, lone \r, wrong field counts, bad UTF-8).
TABLE_BITS = [b"a", b",", b"\t", b'"', b'""', b"\n", b"\r", b"\r\n", b" ", b"\xe2\x80\xa8", b"\xff", b"\x00"]
FIELD = st.text(alphabet=st.sampled_from('ab ,\t"\n\r\u2028'), max_size=5)


def table_file(delimiter: str, junk: bool):
    def written_rows(rows):
        out = io.StringIO(newline="")
        csv.writer(out, delimiter=delimiter).writerows(rows)
        return out.getvalue().encode()

    rows = st.lists(st.lists(FIELD, min_size=1, max_size=4), max_size=6).map(written_rows)
    raw = st.lists(st.sampled_from(TABLE_BITS), max_size=12).map(b"".join)
    header = st.sampled_from([f"id{delimiter}text{delimiter}label\n", f"text{delimiter}label\r\n",
                              f'"text"{delimiter}label{delimiter}"i\nd"\n'])
    return st.builds(lambda bom, head, body: (b"\xef\xbb\xbf" if bom else b"") + head.encode() + b"".join(body),
                     st.booleans(), header, st.lists(st.one_of(rows, raw) if junk else rows, max_size=8))


LAYOUT = {"granule": st.integers(1, 4), "multiple": st.integers(1, 3), "block": st.integers(1, 9)}


@contextlib.contextmanager
def small_blocks(block_bytes: int):
    """Read in tiny blocks so that lines, rows, \r\n pairs and the BOM straddle block ends."""
    with mock.patch.object(chunks, "BLOCK_BYTES", block_bytes):
        yield


@settings(max_examples=150, deadline=None)
@given(data=LINE_FILE, fmt=st.sampled_from(["jsonl", "text"]), label=st.sampled_from([None, "label"]), **LAYOUT)
def test_line_formats_chunked_equal_whole_file(tmp_path_factory, data, fmt, label, granule, multiple, block):
    path = write(tmp_path_factory.mktemp("in"), f"in.{fmt}", data)
    with small_blocks(block):
        assert_chunks_match_whole_file(path, granule, multiple, label_field=label)


@settings(max_examples=150, deadline=None)
@given(data=st.data(), fmt=st.sampled_from(["csv", "tsv"]), junk=st.booleans(),
       label=st.sampled_from([None, "label"]), **LAYOUT)
def test_tables_chunked_equal_whole_file(tmp_path_factory, data, fmt, junk, label, granule, multiple, block):
    content = data.draw(table_file("\t" if fmt == "tsv" else ",", junk))
    path = write(tmp_path_factory.mktemp("in"), f"in.{fmt}", content)
    with small_blocks(block):
        assert_chunks_match_whole_file(path, granule, multiple, label_field=label)


@settings(max_examples=40, deadline=None)
@given(data=LINE_FILE, compression=st.sampled_from([".gz", ".bz2"]), **LAYOUT)
def test_compressed_input_chunked_equal_whole_file(tmp_path_factory, data, compression, granule, multiple, block):
    directory = tmp_path_factory.mktemp("in")
    packed = (gzip if compression == ".gz" else bz2).compress(data)
    path = write(directory, "in.jsonl" + compression, packed)
    with small_blocks(block):
        index = assert_chunks_match_whole_file(path, granule, multiple, spill_dir=directory / "spill")
    if index is not None:
        assert index.read_path == str(directory / "spill" / "input.jsonl")
        assert (index.size, index.digest) == (len(packed), hashlib.sha256(packed).hexdigest())


# --- the default granule on files with many records ------------------------------------------


def test_jsonl_with_every_kind_of_record_at_the_default_granule(tmp_path):
    kinds = [json.dumps({"id": "a", "text": "hello"}), "{not json",
             json.dumps({"text": "x\u2028y"}, ensure_ascii=False),
             "", json.dumps({"text": 5}), "[1, 2]", " \u3000 ", json.dumps({"id": 7, "text": "  "})]
    lines = [kinds[i % len(kinds)].encode() for i in range(700)] + [b'{"text": "\xc3("}']
    path = write(tmp_path, "in.jsonl", b"\xef\xbb\xbf" + b"\r\n".join(lines) + b"\n\n")
    for multiple in (1, 2, 3, 10, 100):
        index = assert_chunks_match_whole_file(path, multiple=multiple)
    assert index.records == 700 - 2 * 700 // 8 + 1 and index.blank_lines == 2 * 700 // 8 + 1
    assert index.offsets[0] == 3  # after the BOM
    last = read_records(path).records[-1]
    assert last.error == f"{path}:701: invalid UTF-8" and last.index == index.records - 1


def test_csv_with_quoted_newlines_and_bad_rows_at_the_default_granule(tmp_path):
    rows = ['{i},"multi\nline {i}",pos', "{i},,neg", "{i},plain,", "{i},short", "", '{i},"say ""hi""\r\n",neg']
    body = "\n".join(rows[i % len(rows)].format(i=i) for i in range(500))
    path = write(tmp_path, "in.csv", "id,text,label\n" + body + "\n")
    for multiple in (1, 2, 5):
        index = assert_chunks_match_whole_file(path, multiple=multiple, label_field="label")
    assert index.header == ["id", "text", "label"] and index.records == 500 - 500 // 6
    records = chunked_records(index, 128, label_field="label")
    assert records[0].text == "multi\nline 0" and records[0].id == "0" and records[0].line == 2
    assert records[3].error == f"{path}:6: expected 3 fields, got 2"


def test_rfc_tables_are_read_by_quote_parity_until_a_stray_quote(tmp_path):
    rfc = "".join(f'{i},"row ""{i}""\r\nnext line",x\n' for i in range(300))
    stray = "".join(f'{i},a"b,x\n' for i in range(100))  # csv takes these quotes as text
    for name, body, parity_rows in [("rfc.csv", rfc + rfc, None), ("stray.csv", rfc + stray + rfc, 300)]:
        path = write(tmp_path, name, "id,text,label\n" + body)
        spy = mock.patch.object(chunks, "_scan_csv_rows", wraps=chunks._scan_csv_rows)
        with small_blocks(1000), spy as by_csv:
            assert_chunks_match_whole_file(path, multiple=2)
        if parity_rows is None:
            assert not by_csv.called
        else:  # the csv module takes over at most a piece before the first stray quote
            (_, lines_before, *_), = [call.args for call in by_csv.call_args_list]
            assert 1 < lines_before <= 1 + 2 * parity_rows


def test_fields_over_the_csv_limit_are_named_and_the_next_row_starts_where_csv_restarts(tmp_path):
    # csv drops the rest of the line at the limit, even inside a quoted field, and reads on from the next line
    rows = "".join(f'{i},"{"x" * (i % 30 + 1)}\n{i}",y\n' for i in range(200))
    path = write(tmp_path, "in.csv", "id,text,label\n" + rows)
    old_limit = csv.field_size_limit(20)
    try:
        index = assert_chunks_match_whole_file(path, granule=4, multiple=3)
        records = chunked_records(index, 12)
    finally:
        csv.field_size_limit(old_limit)
    by_line = {r.line: r.error for r in records}
    too_long = "malformed row (field larger than field limit (20))"
    # row 18 (lines 38-39) passes the limit on its second line; row 19 on its first, so its second
    # line is read as a row of its own
    assert [by_line[line] for line in (34, 38, 40, 41)] == [
        None, f"{path}:38: {too_long}", f"{path}:40: {too_long}", f"{path}:41: expected 3 fields, got 2"]
    assert 39 not in by_line


def test_lone_carriage_returns_end_table_lines_as_csv_reads_them(tmp_path):
    path = write(tmp_path, "in.csv", 'id,text\r1,a\r2,"b\rc"\r\r3,d\r\n4,e')
    index = assert_chunks_match_whole_file(path, granule=1)
    assert [(r.line, r.text) for r in chunked_records(index, 1)] == [(2, "a"), (3, "b\rc"), (6, "d"), (7, "e")]


def test_a_quote_left_open_runs_to_the_end_of_the_file(tmp_path):
    path = write(tmp_path, "in.csv", 'id,text\n1,ok\n2,"open\n3,still the same field\n')
    index = assert_chunks_match_whole_file(path, granule=1)
    assert [r.text for r in chunked_records(index, 1)] == ["ok", "open\n3,still the same field\n"]


# --- whole-file problems and refusals ----------------------------------------------------------


@pytest.mark.parametrize("name, content, kwargs, message", [
    ("missing.jsonl", None, {}, "no such input file"),
    ("blank.jsonl", "\n \r\n\u2028\n", {}, "no records"),
    ("data.parquet", "x", {}, "cannot tell the format"),
    ("data.txt", "x", {"fmt": "xml"}, "--input-format must be one of"),
    ("empty.csv", "", {}, "empty file (a header line is required)"),
    ("header_only.csv", "id,text\n\n", {}, "no records"),
    ("a.csv", "id,text\n1,x\n", {"text_field": "body"}, "no column 'body' in header"),
    ("a.tsv", "id\ttext\n1\tx\n", {"label_field": "label"}, "no column 'label' in header"),
])
def test_whole_file_problems_raise_as_read_records_does(tmp_path, name, content, kwargs, message):
    path = tmp_path / name if content is None else write(tmp_path, name, content)
    with pytest.raises(InputError, match=re.escape(message)):
        index_input(path, **kwargs)
    assert_chunks_match_whole_file(path, **kwargs)


def test_a_directory_is_not_an_input(tmp_path):
    (tmp_path / "dir.jsonl").mkdir()
    with pytest.raises(InputError, match="is a directory"):
        index_input(tmp_path / "dir.jsonl")


def test_compressed_input_needs_a_spill_dir_and_sound_data(tmp_path):
    path = write(tmp_path, "in.jsonl.gz", gzip.compress(b'{"text": "x"}\n'))
    with pytest.raises(ValueError, match="needs a spill_dir"):
        index_input(path)
    broken = write(tmp_path, "broken.jsonl.bz2", bz2.compress(b'{"text": "x"}\n' * 100)[:-20])
    with pytest.raises(InputError, match=f"{broken}: cannot decompress"):
        index_input(broken, spill_dir=tmp_path / "spill")


def test_chunk_sizes_must_be_whole_granules(tmp_path):
    index = index_input(write(tmp_path, "in.txt", "a\nb\n"))
    for bad in (0, -64, 65):
        with pytest.raises(ValueError, match="positive multiple of 64"):
            index.chunks(bad)
    assert [(c.count, c.byte_start, c.byte_end) for c in index.chunks(64)] == [(2, 0, 4)]


def test_bytes_that_are_not_the_chunk_are_refused(tmp_path):
    path = write(tmp_path, "in.txt", "".join(f"line {i}\n" + "\n" * (i % 3) for i in range(10)))
    index = index_input(path, granule=2)
    first, second, *_ = index.chunks(4)
    data = read_chunk_bytes(index, first)
    assert [r.text for r in parse_chunk(index, first, data)] == [f"line {i}" for i in range(4)]
    with pytest.raises(ValueError, match=f"chunk 0 is {len(data)} bytes, got {len(data) - 1}"):
        parse_chunk(index, first, data[:-1])
    shifted = "chunk 0 should hold 4 records from line 1, its bytes hold 4 records from line 2"
    with pytest.raises(ValueError, match=shifted):
        parse_chunk(index, first, b"\n" + data[:-1])  # shifted by one line
    path.write_text("x\n" * 40)  # the file changed under the index
    with pytest.raises(ValueError, match=r"chunk 1 should hold 4 records from line 8, its bytes hold \d+ records"):
        parse_chunk(index, second, read_chunk_bytes(index, second))


def test_the_pass_holds_memory_for_a_block_not_for_every_record(tmp_path):
    path = write(tmp_path, "in.txt", "x\n" * 400_000)
    chunks._ink_bytes()  # computed once per process
    with small_blocks(1 << 14):
        tracemalloc.start()
        try:
            index = index_input(path)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert index.records == 400_000 and len(index.offsets) == 400_000 // 64 + 1
    assert peak < 2 << 20  # every record's offset and line would take 6.4 MB


def test_identity_names_the_input_as_given(tmp_path):
    content = b'{"text": "a"}\n\n{"text": "b"}\n'
    path = write(tmp_path, "in.jsonl", content)
    identity = index_input(path).identity()
    assert identity == {"path": str(path), "format": "jsonl", "size": len(content),
                        "digest": hashlib.sha256(content).hexdigest(), "records": 2}
    assert json.loads(json.dumps(identity)) == identity
