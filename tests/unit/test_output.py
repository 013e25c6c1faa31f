"""Atomic writers: all or nothing."""
import json

import numpy as np
import pytest

from hvdinfer.output import write_jsonl, write_npy


def test_jsonl_written_whole(tmp_path):
    path = tmp_path / "sub" / "out.jsonl"
    assert write_jsonl(path, [{"id": 1, "t": "é"}, {"id": 2}]) == 2
    assert [json.loads(l) for l in path.read_text().splitlines()] == [{"id": 1, "t": "é"}, {"id": 2}]
    assert list(path.parent.iterdir()) == [path]  # no temp file left


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
