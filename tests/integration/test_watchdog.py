"""The watchdog across real processes: ranks that finish early say goodbye and are not 'stuck'."""
import os
import subprocess
import sys
import textwrap

ENV = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", TF_CPP_MIN_LOG_LEVEL="2")

EARLY_EXIT = textwrap.dedent("""
    import sys
    import time
    from hvdinfer.engine import job, watchdog
    engine = job.start(stall_timeout=2)
    if engine.rt.is_coordinator:  # keeps working long after the other ranks have left
        for step in range(14):
            watchdog.beat(f"step {step}")
            time.sleep(0.5)
    # One write a line: unbuffered (PYTHONUNBUFFERED, as make test runs), print writes each piece on its own.
    sys.stdout.write(f"rank {engine.rt.rank} done\\n")
""")


def test_ranks_that_leave_early_are_not_reported_stuck():
    cmd = ["mpirun", "-np", "3", "--oversubscribe", "--bind-to", "none", sys.executable, "-c", EARLY_EXIT]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "is stuck" not in proc.stderr
    assert sorted(line for line in proc.stdout.splitlines() if line.endswith("done")) == \
        ["rank 0 done", "rank 1 done", "rank 2 done"]
