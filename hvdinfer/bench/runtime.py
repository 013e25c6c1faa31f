"""`hvdinfer bench runtime`: why naive Horovod inference is slow on one host, one variant at a time.

    .venv/bin/hvdinfer bench runtime --np 2 --out bench-out     # (part of make bench)

The same embedding workload (a MiniLM-L6-shaped BERT, fixed 128-token inputs, random weights: the
arithmetic is what counts) in separate processes, one after another:

    keras            one plain Keras process, `model.predict` on every input, all cores
    naive            mpirun -np N, hvd.init() with Horovod's and TF's defaults, shard + predict + allgather
    naive+threads    the naive loop with hvdinfer's per-rank thread split only
    naive+cycle20    the naive loop with HOROVOD_CYCLE_TIME=20 only (hides the MPI spin, adds latency)
    naive+yield      the naive loop with Open MPI yielding while it waits only (the runtime's fix)
    hvdinfer         mpirun -np N, hvdinfer.runtime + its compiled batch loop + collect_ordered

and prints records/s and the ratios hvdinfer/keras and hvdinfer/naive. Each variant is one process
tree so no variant warms another's caches. The timed region starts after a warm-up batch and a
barrier and ends when the coordinator holds every result in order.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

from hvdinfer.bench import report as report_mod

VARIANTS = {
    # name: (ranks (None = --np), worker flags, extra env)
    "keras": (1, ["--mode", "keras"], {}),
    "naive": (None, ["--mode", "naive"], {}),
    "naive+threads": (None, ["--mode", "naive", "--split-threads"], {}),
    "naive+cycle20": (None, ["--mode", "naive"], {"HOROVOD_CYCLE_TIME": "20"}),
    "naive+yield": (None, ["--mode", "naive"], {"OMPI_MCA_mpi_yield_when_idle": "1"}),
    "hvdinfer": (None, ["--mode", "hvdinfer"], {}),
}


def run_variant(name: str, np_: int, records: int, batch: int, seq: int, model_size: str,
                timeout: float = 600) -> dict:
    if name not in VARIANTS:
        raise ValueError(f"unknown bench variant {name!r}; known: {', '.join(VARIANTS)}")
    ranks, flags, extra_env = VARIANTS[name]
    ranks = ranks or np_
    cmd = report_mod.worker_command([*flags, "--records", str(records), "--batch", str(batch), "--seq", str(seq),
                                     "--model-size", model_size])
    if name != "keras":
        cmd = report_mod.mpirun_prefix(ranks) + cmd
    result = report_mod.run_json(name, cmd, report_mod.bench_env(**extra_env), timeout)
    result.update(variant=name, ranks=ranks)
    return result


def bench_runtime(np_: int, records: int, batch: int, seq: int, model_size: str, out: Path,
                  variants: list[str]) -> dict:
    results = {}
    for name in variants:
        print(f"running {name} ...", flush=True)
        results[name] = run_variant(name, np_, records, batch, seq, model_size)
        print(f"  {name:14s} {results[name]['records_per_s']:8.2f} records/s "
              f"({results[name]['seconds']:.2f} s, {results[name]['ranks']} rank(s))", flush=True)
    ratios = {}
    if "hvdinfer" in results:
        for base in ("keras", "naive"):
            if base in results:
                ratios[f"hvdinfer/{base}"] = results["hvdinfer"]["records_per_s"] / results[base]["records_per_s"]
    if "naive" in results and "keras" in results:
        ratios["naive/keras"] = results["naive"]["records_per_s"] / results["keras"]["records_per_s"]
    report = {"bench": "runtime", "np": np_, "records": records, "batch": batch, "seq": seq,
              "model_size": model_size, "cores": os.cpu_count(), **report_mod.machine(), "results": results,
              "ratios": ratios}
    report_mod.print_ratios(ratios)
    report_mod.write_report(report, out, "runtime")
    return report


# ---------------------------------------------------------------- workers (one variant, one process tree)

def worker(args) -> int:
    if args.mode == "keras":
        return _worker_keras(args)
    if args.mode == "naive":
        return _worker_naive(args)
    return _worker_hvdinfer(args)


def workload(records: int, seq: int, vocab: int) -> dict[str, np.ndarray]:
    """Fixed-length random token ids (seeded), all attended."""
    rng = np.random.default_rng(0)
    return {"input_ids": rng.integers(1000 if vocab > 2000 else 1, vocab, size=(records, seq), dtype=np.int32),
            "attention_mask": np.ones((records, seq), np.int32)}


def _model(model_size: str):
    from models import bert, registry

    import tensorflow as tf

    tf.keras.utils.set_random_seed(0)
    return bert.build(bert.SentenceEmbedder(registry.size(model_size)))


def _emit(seconds: float, records: int, out: np.ndarray, **extra) -> None:
    print(json.dumps({"seconds": seconds, "records_per_s": records / seconds, "records": records,
                      "checksum": float(np.abs(out).sum()), **extra}), flush=True)


def _worker_keras(args) -> int:
    model = _model(args.model_size)
    data = workload(args.records, args.seq, model.config.vocab_size)
    warm = {k: v[: args.batch] for k, v in data.items()}
    model.predict(warm, batch_size=args.batch, verbose=0)
    start = time.perf_counter()
    out = model.predict(data, batch_size=args.batch, verbose=0)
    _emit(time.perf_counter() - start, args.records, out)
    return 0


def _worker_naive(args) -> int:
    """What a user writes by hand: hvd.init, shard, model.predict, allgather."""
    import horovod.tensorflow.keras as hvd
    import tensorflow as tf

    from hvdinfer.runtime import RuntimeConfig, thread_plan, host_cores

    if args.split_threads:
        intra, inter = thread_plan(RuntimeConfig(), int(os.environ.get("OMPI_COMM_WORLD_LOCAL_SIZE", 1)), host_cores())
        tf.config.threading.set_intra_op_parallelism_threads(args.intra or intra)
        tf.config.threading.set_inter_op_parallelism_threads(args.inter or inter)
    hvd.init()
    model = _model(args.model_size)
    data = workload(args.records, args.seq, model.config.vocab_size)
    shard = np.array_split(np.arange(args.records), hvd.size())[hvd.rank()]
    local = {k: v[shard] for k, v in data.items()}
    model.predict({k: v[: args.batch] for k, v in local.items()}, batch_size=args.batch, verbose=0)
    hvd.allreduce(tf.zeros([1]), name="barrier")
    start = time.perf_counter()
    out = model.predict(local, batch_size=args.batch, verbose=0)
    gathered = hvd.allgather(tf.constant(out)).numpy()
    seconds = time.perf_counter() - start
    if hvd.rank() == 0:
        _emit(seconds, args.records, gathered)
    return 0


def _worker_hvdinfer(args) -> int:
    import tensorflow as tf

    from hvdinfer import collect, runtime
    from hvdinfer.data.shard import ShardPlan

    rt = runtime.init_runtime()
    model = _model(args.model_size)
    data = workload(args.records, args.seq, model.config.vocab_size)
    indices = ShardPlan(args.records, rt.size).indices(rt.rank)
    forward = tf.function(lambda batch: model(batch), reduce_retracing=True)

    def run_shard():
        outs = [forward({k: tf.constant(v[indices[i:i + args.batch]]) for k, v in data.items()}).numpy()
                for i in range(0, len(indices), args.batch)]
        return np.concatenate(outs) if outs else np.zeros((0, model.config.hidden_size), np.float32)

    forward({k: tf.constant(v[: args.batch]) for k, v in data.items()})  # trace + warm
    collect.allgather_json(0)  # barrier
    start = time.perf_counter()
    gathered = collect.collect_ordered(indices, {"embedding": run_shard()}, expected_total=args.records)
    seconds = time.perf_counter() - start
    if rt.is_coordinator:
        _emit(seconds, args.records, gathered["embedding"], threads=f"{rt.intra_op_threads}+{rt.inter_op_threads}")
    return 0
