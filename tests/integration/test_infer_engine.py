"""`hvdinfer infer` on the job engine, under mpirun, on a generated debug-size model: the same bytes
for any schedule and number of ranks and for compressed input, resume after kill -9 and after a stuck
rank, a corrupt chunk recomputed, a different job refused, .npy and Parquet, progress lines."""
import gzip
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from tests.integration.test_infer import ENV, WORDS, infer, infer_cmd, model_dir  # noqa: F401 - a fixture

RECORDS = 700  # 11 chunks of 64: the last one short
CHUNK = 64


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    rng = np.random.default_rng(1)
    path = tmp_path_factory.mktemp("in") / "in.jsonl"
    lines = [json.dumps({"id": i if i % 3 else f"s{i}", "text": " ".join(rng.choice(WORDS, rng.integers(1, 30)))})
             for i in range(RECORDS)]
    lines[5] = '{"id": 5, "text": ""}'  # a bad record: with --on-error skip it keeps its place
    path.write_text("\n".join(lines) + "\n")
    return path


def common(model_dir, source, out):
    return ["--model", model_dir, "--input", source, "--output", out, "--chunk-size", CHUNK, "--batch-size", 16,
            "--on-error", "skip"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, model_dir, source):
    """One rank, static: every other run must produce these exact bytes."""
    out = tmp_path_factory.mktemp("ref") / "ref.jsonl"
    proc = infer(1, *common(model_dir, source, out), "--schedule", "static")
    assert proc.returncode == 0, proc.all
    assert not Path(str(out) + ".parts").exists()  # the journal goes once the output is whole
    return out.read_bytes()


def embeddings(reference: bytes) -> np.ndarray:
    """The reference's embeddings as .npy and Parquet hold them: NaN for a skipped record."""
    rows = [json.loads(line) for line in reference.decode().splitlines()]
    return np.array([r.get("embedding", [np.nan] * 32) for r in rows], np.float32)


def check_parquet(path: Path, reference: bytes) -> None:
    table = pq.read_table(path)
    assert table.column("index").to_pylist() == list(range(RECORDS))
    assert table.column("id").to_pylist()[:3] == ["s0", "1", "2"]
    np.testing.assert_array_equal(np.stack(table.column("embedding").to_numpy(zero_copy_only=False)),
                                  embeddings(reference))
    assert table.column("error").to_pylist()[5].endswith("empty text")


def test_any_schedule_ranks_and_compression_write_the_same_bytes(tmp_path, model_dir, source, reference):
    rows = [json.loads(line) for line in reference.decode().splitlines()]
    assert len(rows) == RECORDS and rows[5]["error"].endswith("field 'text': empty text")
    assert [r["id"] for r in rows[:4]] == ["s0", 1, 2, "s3"]
    packed = tmp_path / "in.jsonl.gz"
    packed.write_bytes(gzip.compress(source.read_bytes()))
    for np_, schedule, src in ((2, "dynamic", packed), (2, "static", source), (3, "dynamic", source)):
        out = tmp_path / f"{np_}-{schedule}-{src.name}.jsonl"
        proc = infer(np_, *common(model_dir, src, out), "--schedule", schedule)
        assert proc.returncode == 0, proc.all
        # Error rows name the input as given.
        want = reference.replace(str(source).encode(), str(src).encode())
        assert out.read_bytes() == want, f"np {np_} {schedule} {src.name} differs from 1 rank"


def test_npy_holds_the_same_embeddings(tmp_path, model_dir, source, reference):
    # Parquet: the resume after a stopped rank writes it.
    out = tmp_path / "e.npy"
    proc = infer(2, *common(model_dir, source, out))
    assert proc.returncode == 0, proc.all
    np.testing.assert_array_equal(np.load(out), embeddings(reference))


def _wait_for_chunks(parts: Path, count: int, proc, deadline_s: float = 90) -> None:
    deadline = time.monotonic() + deadline_s
    while len(list(parts.glob("chunk-*.npz"))) < count:
        assert proc.poll() is None, "the job ended before it could be interrupted"
        assert time.monotonic() < deadline, "the job made no progress"
        time.sleep(0.1)


def _rank_pid(launcher_pid: int, rank: int) -> int:
    import psutil

    for child in psutil.Process(launcher_pid).children(recursive=True):
        if child.environ().get("OMPI_COMM_WORLD_RANK") == str(rank):
            return child.pid
    raise AssertionError(f"no rank {rank} under pid {launcher_pid}")


def test_kill_9_of_a_rank_then_a_resume_recomputes_corrupt_chunks_and_gives_the_same_bytes(tmp_path, model_dir,
                                                                                          source, reference):
    out = tmp_path / "k.jsonl"
    parts = Path(str(out) + ".parts")
    slow = dict(ENV, HVDINFER_TEST_CHUNK_SECONDS="0.7")
    proc = subprocess.Popen(infer_cmd(2, *common(model_dir, source, out)), env=slow, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    _wait_for_chunks(parts, 3, proc)
    os.kill(_rank_pid(proc.pid, 1), signal.SIGKILL)
    assert proc.wait(timeout=30) != 0
    assert not out.exists()
    finished = len(list(parts.glob("chunk-*.npz")))
    assert 3 <= finished < RECORDS // CHUNK + 1

    refused = infer(2, *common(model_dir, source, out))
    assert refused.returncode != 0 and "--resume" in refused.all and f"{finished} finished chunk" in refused.all

    chunk_files = sorted(parts.glob("chunk-*.npz"))
    chunk_files[0].write_bytes(chunk_files[0].read_bytes()[:-10])  # truncated
    data = bytearray(chunk_files[1].read_bytes())
    data[100] ^= 0x55
    chunk_files[1].write_bytes(bytes(data))  # corrupted
    other = infer(2, *common(model_dir, source, out), "--batch-size", 8, "--resume")
    assert other.returncode != 0
    assert "belongs to a different job" in other.all and "batch_size: journal has 16, this run has 8" in other.all

    resumed = infer(2, *common(model_dir, source, out), "--resume", "--metrics-json", tmp_path / "m.json")
    assert resumed.returncode == 0, resumed.all
    assert "2 corrupt or duplicate chunk file(s) deleted" in resumed.all
    assert out.read_bytes() == reference
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["chunks_computed"] == metrics["chunks"] - finished + 2  # the 2 damaged ones again


def test_a_stopped_rank_ends_the_job_in_time_naming_it_and_resume_finishes(tmp_path, model_dir, source, reference):
    out = tmp_path / "s.parquet"
    parts = Path(str(out) + ".parts")
    timeout = 6
    proc = subprocess.Popen(infer_cmd(2, *common(model_dir, source, out), "--stall-timeout", timeout,
                                   "--progress-interval", 1),
                            env=dict(ENV, HVDINFER_TEST_CHUNK_SECONDS="0.7"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    _wait_for_chunks(parts, 3, proc)
    stopped = _rank_pid(proc.pid, 1)
    os.kill(stopped, signal.SIGSTOP)
    start = time.monotonic()
    try:
        text, _ = proc.communicate(timeout=timeout + 15 + 30)
    finally:
        try:
            os.kill(stopped, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert time.monotonic() - start <= timeout + 15, text
    assert proc.returncode != 0
    stall_lines = [line for line in text.splitlines() if "is stuck" in line]
    assert len(stall_lines) == 1 and "rank 1 of 2" in stall_lines[0] and f"pid {stopped}" in stall_lines[0], text
    assert "progress: " in text and "records/s" in text  # one line a second without a terminal

    resumed = infer(2, *common(model_dir, source, out), "--resume")
    assert resumed.returncode == 0, resumed.all
    check_parquet(out, reference)
