"""Runtime pieces that need no Horovod: the thread plan and the failure line."""
import pytest

from hvdinfer import runtime
from hvdinfer.runtime import JobError, RuntimeConfig, thread_plan


@pytest.mark.parametrize("local_size, cores, want", [
    (1, 2, (2, 2)), (2, 2, (1, 1)), (3, 2, (1, 1)), (2, 16, (8, 1)), (4, 16, (4, 1)),
])
def test_thread_plan_splits_cores_across_local_ranks(local_size, cores, want):
    assert thread_plan(RuntimeConfig(), local_size, cores) == want


def test_thread_plan_overrides_and_untuned():
    assert thread_plan(RuntimeConfig(intra_op_threads=3, inter_op_threads=2), 2, 2) == (3, 2)
    assert thread_plan(RuntimeConfig(tuned=False), 2, 2) == (0, 0)


def test_failure_line_names_rank_type_and_message():
    line = runtime.failure_line(ValueError("bad\nthing"), 1, 2)
    assert line == "hvdinfer: rank 1 of 2 failed: ValueError: bad | thing"
    assert runtime.failure_line(JobError("no such file"), 0, 2) == "hvdinfer: error: no such file"


def test_launcher_rank_reads_the_launchers_env(monkeypatch):
    for var in ("HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert runtime.launcher_rank() == 0
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "3")
    assert runtime.launcher_rank() == 3
