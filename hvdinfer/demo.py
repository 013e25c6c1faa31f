"""`hvdinfer demo` (make demo): the foundation end to end on --np ranks, from a fresh install.

1. `hvdinfer doctor --selftest` on every rank: versions, build flags, verified collectives.
2. Fail-fast: rank 1 raises; the whole job must end quickly with that rank's message.
3. The runtime benchmark at a small size: hvdinfer vs one Keras process vs the naive Horovod loop.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from hvdinfer import bench


def _launch(np_: int, *args: str) -> subprocess.CompletedProcess:
    hvdinfer = str(Path(sys.executable).with_name("hvdinfer"))
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.run(bench.mpirun_prefix(np_) + [hvdinfer, *args], env=env, capture_output=True, text=True,
                          timeout=300)


def run(np_: int, out: Path) -> int:
    print(f"== 1. doctor --selftest on {np_} ranks", flush=True)
    proc = _launch(np_, "doctor", "--selftest")
    print(proc.stdout, end="")
    if proc.returncode:
        raise RuntimeError(f"doctor failed:\n{proc.stderr[-2000:]}")

    fail_rank = min(1, np_ - 1)
    print(f"== 2. fail-fast: rank {fail_rank} raises while the others wait in a collective", flush=True)
    start = time.monotonic()
    proc = _launch(np_, "doctor", "--selftest-fail-rank", str(fail_rank))
    seconds = time.monotonic() - start
    lines = [l for l in (proc.stdout + proc.stderr).splitlines() if l.startswith("hvdinfer:")]
    print("\n".join(lines))
    print(f"job ended with exit {proc.returncode} after {seconds:.1f} s")
    if proc.returncode == 0 or not lines:
        raise RuntimeError("fail-fast did not end the job with the failing rank's message")

    print(f"== 3. runtime benchmark on {np_} ranks (small size; `make bench` runs the full one)", flush=True)
    bench.bench_runtime(np_, records=96, batch=32, seq=128, model_size="minilm-l6", out=out,
                        variants=["keras", "naive", "hvdinfer"])
    return 0
