"""Whole jobs under real launchers: doctor on every rank, fail-fast, launch/run.sh, Makefile knobs."""
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HVDINFER = str(Path(sys.executable).with_name("hvdinfer"))
ENV = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", TF_CPP_MIN_LOG_LEVEL="2",
           PYTHONUNBUFFERED="1")
MPIRUN = ["mpirun", "--oversubscribe", "--bind-to", "none"]


def run(cmd, timeout=180, **kw):
    start = time.monotonic()
    proc = subprocess.run(cmd, env=kw.pop("env", ENV), capture_output=True, text=True, timeout=timeout, **kw)
    proc.seconds = time.monotonic() - start
    proc.all = proc.stdout + proc.stderr
    return proc


@pytest.mark.parametrize("np_, fail_rank", [(2, 1), (2, 0), (3, 2)])
def test_one_failing_rank_ends_the_whole_job_quickly(np_, fail_rank):
    proc = run(MPIRUN + ["-np", str(np_), HVDINFER, "doctor", "--selftest-fail-rank", str(fail_rank)], timeout=120)
    assert proc.returncode != 0
    assert proc.seconds < 30, f"took {proc.seconds:.1f}s:\n{proc.all}"
    line = f"hvdinfer: rank {fail_rank} of {np_} failed: RuntimeError: selftest failure injected on rank {fail_rank}"
    assert proc.all.count(line) == 1, proc.all
    assert "Traceback" not in proc.all
    assert "Stalled ranks" not in proc.all


def test_fail_fast_under_horovodrun_gloo():
    horovodrun = str(Path(sys.executable).with_name("horovodrun"))
    proc = run([horovodrun, "--gloo", "-np", "2", "-H", "localhost:2", HVDINFER, "doctor",
                "--selftest-fail-rank", "1"], timeout=120)
    assert proc.returncode != 0
    assert proc.seconds < 30, f"took {proc.seconds:.1f}s:\n{proc.all}"
    assert "rank 1 of 2 failed: RuntimeError: selftest failure injected on rank 1" in proc.all


def test_job_error_is_reported_once_by_the_coordinator():
    proc = run(MPIRUN + ["-np", "2", HVDINFER, "doctor", "--selftest-fail-rank", "5"])
    assert proc.returncode != 0
    assert proc.all.count("hvdinfer: error: --selftest-fail-rank 5 is outside 0..1") == 1, proc.all


def test_launch_script_runs_doctor_on_every_rank_under_mpirun():
    # Its horovodrun side: test_infer.py's launch-script test (an infer job on NP=2 ranks).
    proc = run([str(ROOT / "launch" / "run.sh"), "doctor", "--selftest"], env=dict(ENV, NP="2", LAUNCHER="mpirun"))
    assert proc.returncode == 0, proc.all
    assert re.search(r"^horovod\s+0\.28\.1$", proc.stdout, re.M)
    assert re.search(r"^controllers\s+MPI, Gloo$", proc.stdout, re.M)
    assert re.search(r"^rank 0 .*threads 1\+1$", proc.stdout, re.M)
    assert re.search(r"^rank 1 .*threads 1\+1$", proc.stdout, re.M)
    assert "selftest           ok" in proc.stdout
    assert proc.stdout.count("tensorflow") == 1  # only the coordinator prints


def test_launch_script_rejects_unknown_launcher():
    proc = run([str(ROOT / "launch" / "run.sh"), "doctor"], env=dict(ENV, LAUNCHER="srun"))
    assert proc.returncode == 2
    assert "LAUNCHER must be horovodrun or mpirun" in proc.stderr


def test_every_shipped_script_parses():
    scripts = list((ROOT / "launch").glob("*.sh")) + [ROOT / ".ci" / "run"]
    for script in scripts:
        assert run(["bash", "-n", str(script)]).returncode == 0, script
    assert run(["make", "-n", "test", "demo", "lm", "bench", "clean"], cwd=ROOT).returncode == 0


def test_second_install_is_a_quick_no_op():
    proc = run(["make", "install"], cwd=ROOT, timeout=60)
    assert proc.returncode == 0, proc.all
    assert proc.seconds < 10, proc.all
    assert "pip install" not in proc.stdout and "building horovod" not in proc.stdout
