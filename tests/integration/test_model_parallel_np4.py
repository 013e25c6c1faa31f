"""The 4-rank rows of the model-parallel combination table (dp 2 x tp 2: infer, generate with --pp,
finetune):
tests/parallel/test_model_parallel.py under `mpirun -np 4`, which `make parallel` does not launch."""
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ENV = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", TF_CPP_MIN_LOG_LEVEL="2")


def test_four_rank_rows_equal_single_device():
    cmd = ["mpirun", "-np", "4", "--oversubscribe", "--bind-to", "none", sys.executable, "-m", "pytest", "-q",
           "-p", "no:cacheprovider", "--color=no", "tests/parallel/test_model_parallel.py"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=900)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"mpirun -np 4 still running after 900 s:\n{out[-4000:]}")
    assert proc.returncode == 0, out[-6000:]
    assert "5 passed" in out, out[-3000:]  # three table rows, the placement check, the error checks
