"""The job engine under size 1, `mpirun -np 2` and `-np 3`: every chunk computed once, static
placement as planned, results journaled on the coordinator, ranks ending together."""
import numpy as np
import pytest

from hvdinfer.engine import job, runner
from hvdinfer.engine.journal import ChunkResult, DiskJournal, MemoryJournal

NP3 = True  # Makefile: also run this file under mpirun -np 3
CHUNK = 10


class Squares:
    """Chunk c holds the integers c*CHUNK .. c*CHUNK+CHUNK-1 (the last one shorter)."""

    def __init__(self, n: int, rank: int, width: int = 0):
        self.n, self.rank, self.width = n, rank, width
        self.payloads = 0

    def chunks(self) -> int:
        return -(-self.n // CHUNK)

    def payload(self, chunk_id):
        self.payloads += 1
        rows = list(range(chunk_id * CHUNK, min(self.n, (chunk_id + 1) * CHUNK)))
        return (rows, b"p" * self.width * 8) if self.width else rows

    def prepare(self, chunk_id, payload):
        if self.width:
            payload, padding = payload
            assert len(padding) == self.width * 8
        return chunk_id, np.asarray(payload, np.int64)

    def compute(self, prepared):
        chunk_id, x = prepared
        arrays = {"square": x * x, "rank": np.full(len(x), self.rank)}
        if self.width:  # large results: several arrays, each far beyond MPI's eager limit
            arrays.update(wide=np.outer(x, np.ones(self.width, np.float32)), wide2=np.ones((len(x), self.width)))
        return ChunkResult(len(x), arrays, {"chunk": chunk_id})


def _run(rt, n, schedule, journal_factory, todo=None, width=0):
    engine = job.start()
    task = Squares(n, rt.rank, width)
    journal = journal_factory() if rt.is_coordinator else None
    todo = list(range(task.chunks())) if todo is None else todo
    runner.run_chunks(task, engine.link, rt.rank, rt.size, schedule, todo if rt.is_coordinator else None, journal)
    summary = runner.finish(engine.link, rt.rank, rt.size, {"chunks": len(todo)} if rt.is_coordinator else None)
    assert summary == {"chunks": len(todo)}  # every rank gets the coordinator's summary
    return task, journal


@pytest.mark.parametrize("schedule", ["static", "dynamic"])
@pytest.mark.parametrize("n", [0, 7, 95])
def test_every_chunk_is_computed_once_and_journaled(rt, schedule, n):
    task, journal = _run(rt, n, schedule, MemoryJournal)
    if not rt.is_coordinator:
        assert task.payloads == 0  # only the coordinator reads input
        return
    assert journal.done == set(range(task.chunks()))
    squares = np.concatenate([journal.read(c).arrays["square"] for c in sorted(journal.done)] or [np.zeros(0)])
    np.testing.assert_array_equal(squares, np.arange(n) ** 2)
    assert all(journal.read(c).meta["chunk"] == c for c in journal.done)
    if schedule == "static":
        for c in journal.done:
            assert set(journal.read(c).arrays["rank"]) == {c % rt.size}


def test_only_the_chunks_still_to_do_are_computed(rt, tmp_path_factory):
    directory = tmp_path_factory.mktemp("journal") / "out.parts" if rt.is_coordinator else None
    factory = lambda: DiskJournal(directory, {"job": "squares"}, resume=True)  # noqa: E731
    task, journal = _run(rt, 55, "dynamic", factory, todo=[1, 4, 5])
    if rt.is_coordinator:
        assert journal.done == {1, 4, 5}
        assert task.payloads <= 3
        np.testing.assert_array_equal(journal.read(4).arrays["square"], np.arange(40, 50) ** 2)
        journal.close(finished=True)
        assert not directory.exists()


@pytest.mark.parametrize("schedule", ["static", "dynamic"])
def test_large_payloads_and_results_travel_whole(rt, schedule):
    # 10 rows x 30,000 float32 + float64: 1.2 and 2.4 MB a chunk, payloads of 240 KB: rendezvous
    # messages both ways, while heartbeats flow on other threads.
    task, journal = _run(rt, 120, schedule, MemoryJournal, width=30_000)
    if rt.is_coordinator:
        assert journal.done == set(range(12))
        for c in journal.done:
            result = journal.read(c)
            rows = np.arange(c * CHUNK, (c + 1) * CHUNK)
            np.testing.assert_array_equal(result.arrays["wide"][:, -1], rows.astype(np.float32))
            assert result.arrays["wide2"].shape == (CHUNK, 30_000)
