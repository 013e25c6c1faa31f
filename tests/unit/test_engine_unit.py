"""The job engine's pure parts: schedules, the journal on disk, stall judgement, progress lines."""
import json

import numpy as np
import pytest

from hvdinfer.engine import progress, runner, watchdog
from hvdinfer.engine.journal import ChunkResult, DiskJournal, MemoryJournal, journal_dir
from hvdinfer.engine.schedule import Schedule
from hvdinfer.runtime import JobError


def _drain(schedule: Schedule, rank: int) -> list[int]:
    got = []
    while (c := schedule.next_for(rank, 0)) is not None:
        got.append(c)
    return got


def test_static_gives_rank_r_the_chunks_congruent_to_r():
    schedule = Schedule([5, 0, 1, 2, 3, 4, 6], size=3, kind="static")
    assert [_drain(schedule, r) for r in range(3)] == [[0, 3, 6], [1, 4], [2, 5]]
    assert all(schedule.exhausted_for(r) for r in range(3))


def test_dynamic_hands_out_in_input_order_to_whoever_asks():
    schedule = Schedule(range(6), size=2, kind="dynamic")
    assert [schedule.next_for(r, 0) for r in (1, 1, 0, 1, 0, 0)] == [0, 1, 2, 3, 4, 5]
    assert schedule.next_for(0, 0) is None and schedule.exhausted_for(1)


def test_prefetch_allows_one_chunk_beyond_the_one_computing():
    schedule = Schedule(range(20), size=2, kind="static", prefetch=1)
    assert schedule.next_for(0, 0) == 0 and schedule.next_for(0, 1) == 2
    assert schedule.next_for(0, 2) is None


def test_dynamic_keeps_the_tail_for_idle_ranks():
    schedule = Schedule(range(3), size=3, kind="dynamic")
    assert schedule.next_for(0, 0) == 0
    assert schedule.next_for(0, 1) is None  # 2 left < 3 ranks: no prefetch for a busy rank
    assert schedule.next_for(1, 0) == 1 and schedule.next_for(2, 0) == 2


def test_schedule_rejects_bad_arguments():
    with pytest.raises(ValueError, match="schedule must be one of"):
        Schedule([1], 2, "random")


def test_slow_rank_knob():
    assert runner.slow_factor(1, {"HVDINFER_TEST_SLOW_RANK": "1:2.5"}) == 2.5
    assert runner.slow_factor(0, {"HVDINFER_TEST_SLOW_RANK": "1:2.5"}) == 1.0
    assert runner.slow_factor(0, {}) == 1.0
    with pytest.raises(ValueError, match="RANK:FACTOR"):
        runner.slow_factor(0, {"HVDINFER_TEST_SLOW_RANK": "fast"})


def _result(chunk_id: int) -> ChunkResult:
    return ChunkResult(3, {"x": np.arange(3, dtype=np.float32) + chunk_id, "ok": np.array([True, False, True])},
                       {"ids": [f"a{chunk_id}", 2, None]})


def test_chunk_result_round_trips_through_bytes():
    back = ChunkResult.from_bytes(_result(4).to_bytes())
    assert back.records == 3 and back.meta == {"ids": ["a4", 2, None]}
    np.testing.assert_array_equal(back.arrays["x"], [4, 5, 6])
    assert back.arrays["ok"].dtype == bool


def test_journal_keeps_chunks_across_a_resume(tmp_path):
    directory = journal_dir(tmp_path / "out.jsonl")
    assert directory.name == "out.jsonl.parts"
    journal = DiskJournal(directory, {"model": "m", "input": "abc"}, resume=False)
    journal.put(0, _result(0))
    journal.put(2, _result(2))
    journal.close(finished=False)
    again = DiskJournal(directory, {"model": "m", "input": "abc"}, resume=True)
    assert again.done == {0, 2}
    np.testing.assert_array_equal(again.read(2).arrays["x"], [2, 3, 4])
    assert [c for c, _ in again.chunks_in_order()] == [0, 2]
    again.close(finished=True)
    assert not directory.exists()


def test_a_corrupt_or_truncated_chunk_is_deleted_not_trusted(tmp_path):
    directory = tmp_path / "o.parts"
    journal = DiskJournal(directory, {"k": 1}, resume=False)
    for c in range(3):
        journal.put(c, _result(c))
    journal.close(finished=False)
    files = sorted(directory.glob("chunk-*.npz"))
    data = bytearray(files[0].read_bytes())
    data[len(data) // 2] ^= 0xFF
    files[0].write_bytes(bytes(data))
    files[1].write_bytes(files[1].read_bytes()[:100])
    (directory / ".chunk-00000009.x.npz.1.tmp").write_bytes(b"half")
    again = DiskJournal(directory, {"k": 1}, resume=True)
    assert again.done == {2}
    assert not files[0].exists() and not files[1].exists()
    assert not list(directory.glob("*.tmp"))


def test_a_different_job_is_refused_naming_what_changed(tmp_path):
    directory = tmp_path / "o.parts"
    DiskJournal(directory, {"model": "a", "batch_size": 8}, resume=False).close(finished=False)
    with pytest.raises(JobError, match=r"batch_size: journal has 8, this run has 16"):
        DiskJournal(directory, {"model": "a", "batch_size": 16}, resume=True)


def test_a_leftover_journal_needs_resume(tmp_path):
    directory = tmp_path / "o.parts"
    journal = DiskJournal(directory, {"m": 1}, resume=False)
    journal.put(0, _result(0))
    journal.close(finished=False)
    with pytest.raises(JobError, match="holds 1 finished chunk.*--resume"):
        DiskJournal(directory, {"m": 1}, resume=False)


def test_two_jobs_never_share_a_journal(tmp_path):
    directory = tmp_path / "o.parts"
    first = DiskJournal(directory, {"m": 1}, resume=False)
    with pytest.raises(JobError, match="in use by another running job"):
        DiskJournal(directory, {"m": 1}, resume=True)
    first.close(finished=False)
    assert json.loads((directory / "job.json").read_text()) == {"m": 1}


def test_memory_journal():
    journal = MemoryJournal()
    journal.put(1, _result(1))
    assert journal.done == {1} and journal.read(1).records == 3


def test_stall_judgement():
    alive = watchdog.PeerView(heard_at=100.0, activity="computing chunk 3", idle_s=2.0, host="h", pid=7)
    assert watchdog.stall_line(1, 2, alive, now=105.0, timeout=10) is None
    silent = watchdog.stall_line(1, 2, alive, now=111.0, timeout=10)
    assert "rank 1 of 2 (host h, pid 7) is stuck: no heartbeat for 11 s" in silent
    assert "computing chunk 3" in silent
    busy = watchdog.PeerView(heard_at=100.0, activity="reading", idle_s=12.0)
    assert "alive but no progress for 12 s" in watchdog.stall_line(0, 2, busy, now=100.0, timeout=10)
    # A live rank waiting on a frozen peer gets a grace, so the frozen one is named first.
    assert watchdog.stall_line(0, 2, busy, now=100.0, timeout=10, progress_grace=2.5) is None
    assert watchdog.stall_line(0, 2, busy, now=100.0, timeout=10, silent_only=True) is None
    quiet = watchdog.PeerView(heard_at=100.0, activity="loading model", idle_s=500.0, armed=False)
    assert watchdog.stall_line(0, 2, quiet, now=100.0, timeout=10) is None


def test_watchdog_ends_a_single_stuck_rank():
    exits = []
    dog = watchdog.Watchdog(None, 0, 1, timeout=0.3, interval=0.05, exit_fn=exits.append)
    flushed = []
    dog.on_stall(lambda: flushed.append(True))
    dog.beat("working")
    dog.start()
    import time

    deadline = time.monotonic() + 5
    while not exits and time.monotonic() < deadline:
        time.sleep(0.05)
    dog.stop()
    assert exits and exits[0] == watchdog.EXIT_STALLED and flushed


def test_quiet_phases_are_not_judged():
    exits = []
    dog = watchdog.Watchdog(None, 0, 1, timeout=0.2, interval=0.05, exit_fn=exits.append).start()
    import time

    with dog.quiet("fetching the model"):
        time.sleep(0.6)
    dog.stop()
    assert not exits


def test_progress_line():
    assert progress.progress_line(500, 1000, 400, 4.0) == \
        "progress: 500/1,000 records (50.0%), 100.0 records/s, ETA 0m05s"
    assert progress.eta_text(3725) == "1h02m05s"
    assert "ETA --" in progress.progress_line(0, 10, 0, 0.0)
    assert "0.35 steps/s" in progress.progress_line(7, 94, 7, 20.0, "steps")


def test_a_heartbeat_exchange_blocked_in_mpi_is_reported_not_silent():
    import threading
    import time

    class Done:
        def test(self):
            return True, None

    class BlockedLink:
        release = threading.Event()
        comm = type("Comm", (), {"isend": lambda self, *a, **k: Done()})()

        def poll(self, tag, source=-1):
            self.release.wait()  # an MPI call that never returns (until the test ends)

    exits, lines = [], []
    dog = watchdog.Watchdog(BlockedLink(), 1, 2, timeout=0.3, interval=0.05, exit_fn=exits.append)
    dog._end_job = lambda line: (lines.append(line), exits.append(watchdog.EXIT_STALLED))
    dog.start()
    deadline = time.monotonic() + 5
    while not exits and time.monotonic() < deadline:
        time.sleep(0.05)
    BlockedLink.release.set()
    dog.stop()
    assert exits and "heartbeat exchange has been blocked in MPI" in lines[0]


def test_training_progress_counts_steps_across_fits_and_logs_the_run(monkeypatch, caplog):
    import tensorflow as tf

    from hvdinfer import runtime
    from hvdinfer.engine.keras_beat import TrainingProgress

    model = tf.keras.Sequential([tf.keras.layers.Dense(1, input_shape=(2,))])
    model.compile(optimizer="sgd", loss="mse")
    x, y = np.zeros((6, 2), np.float32), np.zeros((6, 1), np.float32)
    monkeypatch.setattr(runtime.LOG, "propagate", True)
    with caplog.at_level("INFO", logger="hvdinfer"):
        steps = TrainingProgress(total_steps=12, done_before=3, interval=0.0)
        model.fit(x, y, batch_size=2, epochs=1, callbacks=[steps], verbose=0)  # 3 steps
        model.fit(x, y, batch_size=3, epochs=1, callbacks=[steps], verbose=0)  # 2 more, a second fit
        steps.close()
    assert steps.progress.done == 8 and steps.progress.fresh == 4  # the first step (the trace) is not timed
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("progress:")]
    assert len(lines) == 5 and lines[-1].startswith("progress: 8/12 steps (66.7%)")


def test_records_checked_only_for_exactly_the_input_that_was_checked(tmp_path):
    from hvdinfer.engine import journal

    parts = tmp_path / "out.npy.parts"
    checked = {"input": {"path": "in.jsonl", "format": "jsonl", "size": 10, "digest": "ab", "records": 2},
               "text_field": "text", "id_field": "id"}
    assert not journal.records_checked(parts, checked)  # no journal yet
    journal.note_records_checked(parts, checked)
    assert journal.records_checked(parts, checked)
    for changed in ({**checked, "input": {**checked["input"], "digest": "cd"}}, {**checked, "text_field": "body"}):
        assert not journal.records_checked(parts, changed)
    (parts / journal.CHECKED_FILE).write_text('{"input": ')  # cut short: never trusted
    assert not journal.records_checked(parts, checked)
