"""`hvdinfer doctor`: what this installation is and whether its collectives work.

    .venv/bin/hvdinfer doctor                          # versions and build flags, one process
    mpirun -np 2 .venv/bin/hvdinfer doctor --selftest  # + every rank, verified collectives, timings
    mpirun -np 2 .venv/bin/hvdinfer doctor --selftest-fail-rank 1   # proves fail-fast

Exit status is non-zero, with one line saying why, when anything is missing or wrong.
"""
from __future__ import annotations

import platform
import statistics
import subprocess
import time

import numpy as np

from hvdinfer import collect, runtime
from hvdinfer.runtime import JobError

LOG = runtime.LOG


def versions() -> dict[str, str]:
    import horovod
    import tensorflow as tf

    return {
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras_version(),
        "numpy": np.__version__,
        "horovod": horovod.__version__,
        "mpi": mpi_version(),
    }


def keras_version() -> str:
    import keras  # Keras 2.15: the package behind tf.keras

    return keras.__version__


def mpi_version() -> str:
    try:
        out = subprocess.run(["mpirun", "--version"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "not found"
    first = out.strip().splitlines()[:1]
    return first[0] if first else "unknown"


def build_flags() -> dict[str, list[str]]:
    """What Horovod was compiled with, as `horovodrun --check-build` reports it."""
    from pathlib import Path

    import horovod
    import horovod.tensorflow as hvd

    # Look for the compiled extensions rather than importing them (a missing one prints warnings).
    root = Path(horovod.__file__).parent
    frameworks = [name for name, sub, lib in (("TensorFlow", "tensorflow", "mpi_lib"), ("PyTorch", "torch", "mpi_lib_v2"),
                                              ("MXNet", "mxnet", "mpi_lib"))
                  if any((root / sub).glob(f"{lib}.*.so"))]
    controllers = [n for n, built in (("MPI", hvd.mpi_built()), ("Gloo", hvd.gloo_built())) if built]
    ops = [n for n, built in (("NCCL", hvd.nccl_built()), ("DDL", hvd.ddl_built()),
                              ("CCL", hvd.ccl_built()), ("MPI", hvd.mpi_built()),
                              ("Gloo", hvd.gloo_built())) if built]
    return {"frameworks": frameworks, "controllers": controllers, "tensor_operations": ops}


def rank_info(rt: runtime.Runtime) -> dict:
    import os

    return {"rank": rt.rank, "local_rank": rt.local_rank, "host": runtime.hostname(), "pid": os.getpid(),
            "device": rt.device, "threads": f"{rt.intra_op_threads}+{rt.inter_op_threads}"}


def check_install(flags: dict[str, list[str]]) -> None:
    if "TensorFlow" not in flags["frameworks"]:
        raise JobError("Horovod was built without TensorFlow support; run `make clean install`")
    missing = {"MPI", "Gloo"} - set(flags["controllers"])
    if missing:
        raise JobError(f"Horovod was built without {', '.join(sorted(missing))}; run `make clean install`")


def selftest(rt: runtime.Runtime, repeats: int = 20, megabytes: int = 16) -> dict:
    """Verified allreduce, allgather and broadcast across all ranks, with latency and bandwidth."""
    import horovod.tensorflow as hvd
    import tensorflow as tf

    r, n = rt.rank, rt.size
    got = hvd.allreduce(tf.fill([4], float(r + 1)), op=hvd.Sum).numpy()
    _expect("allreduce", got, np.full(4, n * (n + 1) / 2))
    got = hvd.allgather(tf.fill([r, 2], r)).numpy()  # rank r sends r rows: rank 0 sends none
    _expect("allgather", got, np.concatenate([np.full((k, 2), k) for k in range(n)]).reshape(-1, 2))
    got = hvd.broadcast(tf.constant([r, 7 * r + 3]), root_rank=n - 1).numpy()
    _expect("broadcast", got, np.array([n - 1, 7 * (n - 1) + 3]))
    records = collect.collect_ordered(np.arange(r, 2 * n + 1, n), {"x": [{"i": int(i)} for i in range(r, 2 * n + 1, n)]})
    _expect("collect_ordered", np.array([x["i"] for x in records["x"]]), np.arange(2 * n + 1))

    small = tf.ones([1])
    latencies = []
    for _ in range(repeats):
        start = time.perf_counter()
        hvd.allreduce(small, op=hvd.Sum).numpy()
        latencies.append(time.perf_counter() - start)
    big = tf.ones([megabytes * 2**20 // 4])
    hvd.allreduce(big, op=hvd.Sum).numpy()  # warm the buffers
    start = time.perf_counter()
    for _ in range(3):
        hvd.allreduce(big, op=hvd.Sum).numpy()
    seconds = (time.perf_counter() - start) / 3
    # Bus bandwidth as nccl-tests defines it for allreduce: bytes * 2(n-1)/n per second.
    bus = megabytes * 2**20 * 2 * (n - 1) / max(n, 1) / seconds / 1e9
    return {"allreduce_latency_ms": 1e3 * statistics.median(latencies),
            "allreduce_MiB": megabytes, "allreduce_seconds": seconds, "bus_bandwidth_GBps": bus}


def _expect(what: str, got: np.ndarray, want: np.ndarray) -> None:
    if got.shape != want.shape or not np.allclose(got, want):
        raise RuntimeError(f"selftest {what} returned {got.tolist()}, expected {want.tolist()}")


def run(selftest_enabled: bool, fail_rank: int | None, config: runtime.RuntimeConfig) -> int:
    flags = build_flags()
    check_install(flags)
    rt = runtime.init_runtime(config)
    if fail_rank is not None:
        if not 0 <= fail_rank < rt.size:
            raise JobError(f"--selftest-fail-rank {fail_rank} is outside 0..{rt.size - 1}")
        if rt.rank == fail_rank:
            raise RuntimeError(f"selftest failure injected on rank {fail_rank}")
        selftest_enabled = True  # the other ranks block in a collective, as a real job would
    ranks = collect.allgather_json(rank_info(rt))
    if rt.is_coordinator:
        for key, value in versions().items():
            print(f"{key:18s} {value}")
        for key, value in flags.items():
            print(f"{key:18s} {', '.join(value) or '-'}")
        print(f"{'controller':18s} {rt.controller}  (size {rt.size}, hosts {rt.cross_size})")
        for info in ranks:
            print(f"rank {info['rank']:<3d} local {info['local_rank']:<3d} host {info['host']} pid {info['pid']} "
                  f"device {info['device']} threads {info['threads']}")
    if selftest_enabled:
        report = selftest(rt)
        if rt.is_coordinator:
            print(f"selftest           ok: allreduce, allgather, broadcast, collect_ordered on {rt.size} ranks")
            print(f"allreduce latency  {report['allreduce_latency_ms']:.3f} ms (median, 4 bytes)")
            print(f"allreduce {report['allreduce_MiB']} MiB   {report['allreduce_seconds'] * 1e3:.1f} ms, "
                  f"bus bandwidth {report['bus_bandwidth_GBps']:.2f} GB/s")
    return 0
