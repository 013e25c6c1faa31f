"""Readers: one Record per input record, bad ones named by file, line and field."""
import json

import pytest

from hvdinfer.data.readers import InputError, detect_format, read_records


def write(tmp_path, name, data: bytes | str):
    path = tmp_path / name
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def test_jsonl_good_and_bad_records_keep_their_place(tmp_path):
    lines = [json.dumps({"id": "a", "text": "hello"}), "{not json", json.dumps({"id": "c"}),
             json.dumps({"id": "d", "text": "   "}), "", json.dumps({"text": 5}), "[1, 2]"]
    path = write(tmp_path, "in.jsonl", "\n".join(lines) + "\n")
    report = read_records(path)
    assert [r.index for r in report.records] == [0, 1, 2, 3, 4, 5]
    assert report.blank_lines == 1
    ok, bad_json, missing, empty, not_str, not_obj = report.records
    assert ok.ok and ok.text == "hello" and ok.id == "a" and ok.line == 1
    assert bad_json.error.startswith(f"{path}:2: malformed JSON")
    assert missing.error == f"{path}:3: field 'text': missing" and missing.id == "c"
    assert empty.error == f"{path}:4: field 'text': empty text"
    assert not_str.error == f"{path}:6: field 'text': expected a string, got int"
    assert not_str.id == 4  # no id field: the record index
    assert not_obj.error == f"{path}:7: expected a JSON object, got list"


def test_invalid_utf8_is_named_by_line(tmp_path):
    path = write(tmp_path, "in.txt", b"fine\n\xff\xfe broken\nalso fine\n")
    report = read_records(path)
    assert [r.ok for r in report.records] == [True, False, True]
    assert report.records[1].error == f"{path}:2: invalid UTF-8"
    jsonl = write(tmp_path, "in.jsonl", b'{"text": "ok"}\n{"text": "\xc3("}\n')
    assert read_records(jsonl).records[1].error == f"{jsonl}:2: invalid UTF-8"


def test_csv_and_tsv_with_header_and_quoted_newlines(tmp_path):
    path = write(tmp_path, "in.csv", 'id,text,label\n1,"multi\nline",pos\n2,,neg\n3,plain,\n4,short\n')
    report = read_records(path, label_field="label")
    r1, r2, r3, r4 = report.records
    assert r1.text == "multi\nline" and r1.id == "1" and r1.label == "pos"
    assert r2.error == f"{path}:4: field 'text': empty text"
    assert r3.error == f"{path}:5: field 'label': missing"
    assert r4.error == f"{path}:6: expected 3 fields, got 2"
    tsv = write(tmp_path, "in.tsv", "text\tid\nhello\tx\n")
    assert read_records(tsv).records[0].id == "x"


def test_whole_file_problems_raise(tmp_path):
    with pytest.raises(InputError, match="no such input file"):
        read_records(tmp_path / "missing.jsonl")
    with pytest.raises(InputError, match="no column 'body' in header"):
        read_records(write(tmp_path, "a.csv", "id,text\n1,x\n"), text_field="body")
    with pytest.raises(InputError, match="no records"):
        read_records(write(tmp_path, "empty.jsonl", "\n\n"))
    with pytest.raises(InputError, match="cannot tell the format"):
        detect_format(tmp_path / "data.parquet")
    assert detect_format(tmp_path / "x.csv.bz2") == "csv"
    assert detect_format(tmp_path / "x.dat", "text") == "text"


def test_unicode_line_separators_inside_a_record_do_not_split_it(tmp_path):
    # U+2028, U+0085 and \x1c are line breaks to str.splitlines() but legal inside JSON strings.
    texts = ["before\u2028after", "next\x85line", "group\x1csep"]
    path = write(tmp_path, "in.jsonl", "".join(json.dumps({"text": t}, ensure_ascii=False) + "\r\n" for t in texts))
    report = read_records(path)
    assert [r.text for r in report.records] == texts and all(r.ok for r in report.records)
    plain = write(tmp_path, "in.txt", "one\u2028still one\ntwo\n")
    assert [r.text for r in read_records(plain).records] == ["one\u2028still one", "two"]
