"""`hvdinfer doctor`: what this installation is and whether its collectives work.

    .venv/bin/hvdinfer doctor                          # versions and build flags, one process
    mpirun -np 2 .venv/bin/hvdinfer doctor --selftest  # + every rank, verified collectives, timings
    mpirun -np 2 .venv/bin/hvdinfer doctor --selftest-fail-rank 1   # proves fail-fast
    .venv/bin/hvdinfer doctor --model gpt2 --pp 2 --tp 2            # a model-parallel plan, bytes per device

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


def bus_bandwidth(nbytes: int, seconds: float, ranks: int) -> float:
    """Allreduce bus bandwidth in bytes/s as nccl-tests defines it: bytes x 2(n-1)/n per second."""
    return nbytes * 2 * (ranks - 1) / ranks / seconds


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
    hvd.allreduce(big, op=hvd.Sum)  # warm the buffers
    start = time.perf_counter()
    for _ in range(3):
        # Eager ops return when done. No .numpy(): a 16 MiB copy into a fresh array is not the
        # collective's time (it cost about a third of it on one host; `hvdinfer bench comm`).
        hvd.allreduce(big, op=hvd.Sum)
    seconds = (time.perf_counter() - start) / 3
    bus = bus_bandwidth(megabytes * 2**20, seconds, max(n, 1)) / 1e9
    return {"allreduce_latency_ms": 1e3 * statistics.median(latencies),
            "allreduce_MiB": megabytes, "allreduce_seconds": seconds, "bus_bandwidth_GBps": bus}


def _expect(what: str, got: np.ndarray, want: np.ndarray) -> None:
    if got.shape != want.shape or not np.allclose(got, want):
        raise RuntimeError(f"selftest {what} returned {got.tolist()}, expected {want.tolist()}")


def plan_model(name: str):
    """(a function making the unbuilt model, what it is) for `doctor --model`: a model directory, a size
    (gpt2, minilm-l6, ...), or bert:SIZE / gpt:SIZE where a size name is in both families."""
    import json
    from pathlib import Path

    from models import bert, gpt, heads, loading, registry

    path = Path(name)
    if path.is_dir():
        try:
            hf = json.loads((path / "config.json").read_text())
            if hf.get("model_type") == "gpt2":
                config = gpt.GPTConfig.from_hf(hf)
                return (lambda: gpt.GPT(config)), f"{path} (GPT-2, {config.n_layer} blocks)"
            info = loading.read_info(path)
            if heads.has_head(path):
                labels, dropout = heads.read_head(path)
                return (lambda: heads.TextClassifier(bert.SentenceEmbedder(info.config), labels, dropout),
                        f"{path} (BERT classifier, {info.config.num_layers} blocks)")
            return (lambda: bert.SentenceEmbedder(info.config)), f"{path} (BERT, {info.config.num_layers} blocks)"
        except (OSError, ValueError, KeyError) as exc:
            raise JobError(f"--model {name}: cannot read the model directory: {exc}") from None
    family, _, size = name.rpartition(":")
    in_bert, in_gpt = size in registry.SIZES, size in registry.GPT_SIZES
    if family == "gpt" or (not family and in_gpt and not in_bert):
        if not in_gpt:
            raise JobError(f"--model {name}: unknown GPT size; known: {', '.join(registry.GPT_SIZES)}")
        config = registry.gpt_size(size)
        return (lambda: gpt.GPT(config)), f"{size} (GPT-2, {config.n_layer} blocks)"
    if family == "bert" or (not family and in_bert and not in_gpt):
        if not in_bert:
            raise JobError(f"--model {name}: unknown BERT size; known: {', '.join(registry.SIZES)}")
        config = registry.size(size)
        return (lambda: bert.SentenceEmbedder(config)), f"{size} (BERT, {config.num_layers} blocks)"
    if in_bert and in_gpt:
        raise JobError(f"--model {name}: both a BERT and a GPT size; say bert:{name} or gpt:{name}")
    raise JobError(f"--model {name}: not a model directory nor a size (BERT: {', '.join(registry.SIZES)}; "
                   f"GPT: {', '.join(registry.GPT_SIZES)})")


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB" if n >= 100_000 else f"{n / 1e3:,.1f} kB"


def print_plan(model: str, config) -> int:
    """Print the plan `parallelize` would follow for `model` under --pp/--tp (one group of tp ranks),
    without allocating the model: each layer's stage, device and shard, and the bytes per device."""
    import json

    import tensorflow as tf

    from hvdinfer.parallel import parallelize
    from hvdinfer.parallel.dims import ParallelDims

    model_fn, what = plan_model(model)
    dims = ParallelDims(dp=1, pp=config.pp, tp=config.tp, world_size=config.tp)
    gpus = len(tf.config.list_physical_devices("GPU"))
    devices = [f"/GPU:{s}" if gpus else f"/CPU:{s}" for s in range(dims.pp)]
    rows, per_device, whole = parallelize.describe(model_fn, dims, config, devices)
    total = sum(s.bytes for s in whole)
    print(f"{'model':18s} {what}, {sum(s.parameters for s in whole):,d} parameters, {_mb(total)}")
    print(f"{'parallel':18s} pp {dims.pp} (stages per rank) x tp {dims.tp} (ranks per group), "
          f"micro-batches {config.micro_batches}; ranks = dp x {dims.tp}")
    print(f"{'devices':18s} " + ("stage s of local rank r on GPU r*pp+s" if gpus else
                                 "stage s on logical CPU device s of each rank (no GPU here)"))
    print(f"{'layer':12s} {'stage':>5s}  {'device':8s} {'parameters':>13s} {'bytes':>12s}  shard")
    for row in rows:
        print(f"{row.layer:12s} {row.stage:5d}  {row.device:8s} {row.parameters:13,d} {_mb(row.bytes):>12s}  {row.shard}")
    for device, size in per_device.items():
        print(f"{'bytes on ' + device:18s} {_mb(size)} of {_mb(total)} ({size / total:.3f} of the model) per rank")
    blocks = [r for r in rows if r.layer.startswith("block_")]
    if dims.tp_enabled and blocks:
        full = sum(s.bytes for s in whole if s.name.startswith("block_"))
        print(f"{'block weights':18s} {_mb(sum(r.bytes for r in blocks))} of {_mb(full)} per rank "
              f"({sum(r.bytes for r in blocks) / full:.3f})")
    if dims.pp_enabled:
        print(f"{'plan (--plan)':18s} " + json.dumps(
            {"stages": [[r.layer for r in rows if r.stage == s] for s in range(dims.pp)]}))
    return 0


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
