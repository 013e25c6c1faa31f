"""`hvdinfer bench`: side-by-side throughput ratios, measured in one run, written as JSON + PNG.

    .venv/bin/hvdinfer bench runtime --np 2 --out bench-out     # (make bench)

`runtime` runs the same embedding workload (a MiniLM-L6-shaped BERT, fixed 128-token inputs,
random weights: the arithmetic is what counts) in separate processes, one after another:

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

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from hvdinfer import runtime

VARIANTS = {
    # name: (ranks (None = --np), worker flags, extra env)
    "keras": (1, ["--mode", "keras"], {}),
    "naive": (None, ["--mode", "naive"], {}),
    "naive+threads": (None, ["--mode", "naive", "--split-threads"], {}),
    "naive+cycle20": (None, ["--mode", "naive"], {"HOROVOD_CYCLE_TIME": "20"}),
    "naive+yield": (None, ["--mode", "naive"], {"OMPI_MCA_mpi_yield_when_idle": "1"}),
    "hvdinfer": (None, ["--mode", "hvdinfer"], {}),
}
# Knobs a variant must not inherit from the caller's environment.
_CLEAR_ENV = ("HOROVOD_CYCLE_TIME", "OMPI_MCA_mpi_yield_when_idle")


def mpirun_prefix(np_: int) -> list[str]:
    """Root-safe, oversubscribe-safe mpirun; binding off as horovodrun does."""
    exe = shutil.which("mpirun")
    if exe is None:
        raise RuntimeError("mpirun not found: run `make install`")
    forward = [arg for var in ("PYTHONPATH", "TF_CPP_MIN_LOG_LEVEL", "HVDINFER_CACHE") if var in os.environ
               for arg in ("-x", var)]
    return [exe, "-np", str(np_), "--oversubscribe", "--bind-to", "none", *forward]


def run_variant(name: str, np_: int, records: int, batch: int, seq: int, model_size: str,
                timeout: float = 600) -> dict:
    if name not in VARIANTS:
        raise ValueError(f"unknown bench variant {name!r}; known: {', '.join(VARIANTS)}")
    ranks, flags, extra_env = VARIANTS[name]
    ranks = ranks or np_
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", OMPI_ALLOW_RUN_AS_ROOT="1",
               OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    for key in _CLEAR_ENV:
        env.pop(key, None)
    env.update(extra_env)
    cmd = [sys.executable, "-m", "hvdinfer.bench", "worker", *flags, "--records", str(records),
           "--batch", str(batch), "--seq", str(seq), "--model-size", model_size]
    if name != "keras":
        cmd = mpirun_prefix(ranks) + cmd
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
    if proc.returncode or not lines:
        raise RuntimeError(f"bench variant {name} failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    result = json.loads(lines[-1])
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
              "model_size": model_size, "cores": os.cpu_count(), **machine(), "results": results, "ratios": ratios}
    print("ratios:")
    for key, value in ratios.items():
        print(f"  {key:18s} {value:.2f}x")
    write_report(report, out, "runtime")
    return report


def flops_per_record(config, seq: int) -> float:
    """Forward FLOPs of one `seq`-token record through a BERT encoder (2 per multiply-add)."""
    h, i, layers = config.hidden_size, config.intermediate_size, config.num_layers
    projections = 2 * seq * (4 * h * h + 2 * h * i)
    attention = 2 * 2 * seq * seq * h
    return float(layers * (projections + attention))


def gemm_peak(n: int = 2048, repeats: int = 10) -> float:
    """fp32 GEMM FLOP/s of one process on every core: the roofline for the fp32 model."""
    code = ("import time, tensorflow as tf\n"
            f"n={n}; a=tf.random.normal([n,n]); b=tf.random.normal([n,n])\n"
            "mm=tf.function(lambda: tf.matmul(a,b)); mm().numpy(); best=0\n"
            f"for _ in range({repeats}):\n"
            "    t=time.perf_counter(); mm().numpy(); best=max(best, 2*n**3/(time.perf_counter()-t))\n"
            "print(best)\n")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode:
        raise RuntimeError(f"GEMM peak measurement failed:\n{proc.stderr[-2000:]}")
    return float(proc.stdout.strip().splitlines()[-1])


def fixed_length_input(path: Path, records: int, seq: int) -> None:
    """Texts that all tokenize past `seq` tokens, so `--max-length seq` makes every record exactly seq."""
    words = "distributed inference shards records across ranks and gathers every result in input order".split()
    lines = []
    for r in range(records):
        text = " ".join(words[(r + k) % len(words)] for k in range(seq + 8))
        lines.append(json.dumps({"id": r, "text": text}))
    path.write_text("\n".join(lines) + "\n")


def run_infer_job(np_: int, source: Path, seq: int, precision: str, batch: int, workdir: Path) -> dict:
    """The real `hvdinfer infer` CLI on `np_` ranks; its own summary gives records/s."""
    metrics = workdir / f"metrics-{precision}.json"
    hvdinfer = str(Path(sys.executable).with_name("hvdinfer"))
    cmd = mpirun_prefix(np_) + [hvdinfer, "infer", "--model", "minilm-l6", "--input", str(source),
                                "--output", str(workdir / "out.npy"), "--max-length", str(seq), "--quiet",
                                "--batch-size", str(batch), "--precision", precision, "--metrics-json", str(metrics)]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    for key in _CLEAR_ENV:
        env.pop(key, None)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode:
        raise RuntimeError(f"hvdinfer infer ({precision}) failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    summary = json.loads(metrics.read_text())
    return {"records_per_s": summary["records_per_s"], "seconds": summary["compute_seconds"],
            "records": summary["ok"], "ranks": np_, "variant": f"hvdinfer-{precision}"}


def machine(precision: str = "auto") -> dict:
    """The host's CPU model and what `--precision` resolves to on it (bench JSON fields)."""
    cpuinfo = runtime.read_cpuinfo()
    chosen, why = runtime.choose_precision(precision, runtime.cpuinfo_flags(cpuinfo),
                                           runtime.visible_gpu_capabilities())
    return {"cpu_model": runtime.cpuinfo_model(cpuinfo), "precision": chosen, "precision_reason": why}


def bench_infer(np_: int, records: int, batch: int, seq: int, out: Path, precision: str = "auto") -> dict:
    """hvdinfer infer (fp32, and bf16 where `precision` resolves to it) vs one Keras predict process vs
    the naive Horovod loop, + GEMM peak. With `auto`, bf16 runs only on hardware that computes it natively."""
    from hvdinfer import assets
    from models import registry

    assets.resolve_model("minilm-l6")  # fetch outside the timed runs
    out.mkdir(parents=True, exist_ok=True)
    source = out / "fixed128.jsonl"
    fixed_length_input(source, records, seq)
    results = {}
    for name in ("keras", "naive"):
        print(f"running {name} ...", flush=True)
        results[name] = run_variant(name, np_, records, batch, seq, "minilm-l6", timeout=900)
    host = machine(precision)
    precisions = ("fp32", "bf16") if host["precision"] == "bf16" else ("fp32",)
    print(f"precision {precision}: {'fp32 and bf16' if len(precisions) == 2 else 'fp32 only'} "
          f"({host['precision_reason']}; {host['cpu_model']})", flush=True)
    for name in precisions:
        print(f"running hvdinfer-{name} ...", flush=True)
        results[f"hvdinfer-{name}"] = run_infer_job(np_, source, seq, name, batch, out)
    print("measuring the fp32 GEMM peak ...", flush=True)
    peak = gemm_peak()
    flops = flops_per_record(registry.size("minilm-l6"), seq)
    for name, r in results.items():
        r["gflops"] = r["records_per_s"] * flops / 1e9
        print(f"  {name:15s} {r['records_per_s']:8.2f} records/s  {r['gflops']:7.1f} GFLOP/s  ({r['ranks']} rank(s))")
    ratios = {f"hvdinfer-{name}/{base}": results[f"hvdinfer-{name}"]["records_per_s"] / results[base]["records_per_s"]
              for name in precisions for base in ("keras", "naive")}
    ratios["hvdinfer-fp32/gemm-peak"] = results["hvdinfer-fp32"]["gflops"] * 1e9 / peak
    print(f"  fp32 GEMM peak  {peak / 1e9:8.1f} GFLOP/s (2048^3, one process, all cores)")
    print("ratios:")
    for key, value in ratios.items():
        print(f"  {key:24s} {value:.2f}x")
    report = {"bench": "infer", "np": np_, "records": records, "batch": batch, "seq": seq, "model_size": "minilm-l6",
              "cores": os.cpu_count(), **host, "flops_per_record": flops, "gemm_peak_flops": peak,
              "results": results, "ratios": ratios}
    write_report(report, out, "infer")
    return report


TRAIN_VARIANTS = {
    # name: (ranks, worker flags): one thread per rank for the scaling pair, all cores for Keras.
    "keras-fit": (1, ["--mode", "keras-fit"]),
    "hvdinfer-1rank": (1, ["--mode", "train", "--threads", "1"]),
    "hvdinfer-2rank": (2, ["--mode", "train", "--threads", "1"]),
}


def bench_finetune(steps: int, batch: int, seq: int, out: Path) -> dict:
    """Fine-tuning samples/s: 2 ranks vs 1 rank (one thread each) and vs Keras fit on all cores."""
    results = {}
    for name, (ranks, flags) in TRAIN_VARIANTS.items():
        print(f"running {name} ...", flush=True)
        cmd = [sys.executable, "-m", "hvdinfer.bench", "worker", *flags, "--records", str(steps),
               "--batch", str(batch), "--seq", str(seq), "--model-size", "minilm-l6"]
        if name != "keras-fit":
            cmd = mpirun_prefix(ranks) + cmd
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", OMPI_ALLOW_RUN_AS_ROOT="1",
                   OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
        if proc.returncode or not lines:
            raise RuntimeError(f"bench variant {name} failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
        results[name] = {**json.loads(lines[-1]), "ranks": ranks, "variant": name}
        print(f"  {name:15s} {results[name]['records_per_s']:8.2f} samples/s", flush=True)
    ratios = {"2rank/1rank": results["hvdinfer-2rank"]["records_per_s"] / results["hvdinfer-1rank"]["records_per_s"],
              "2rank/keras-fit": results["hvdinfer-2rank"]["records_per_s"] / results["keras-fit"]["records_per_s"]}
    print("ratios:")
    for key, value in ratios.items():
        print(f"  {key:18s} {value:.2f}x")
    report = {"bench": "finetune", "np": 2, "records": steps, "batch": batch, "seq": seq, "model_size": "minilm-l6",
              "cores": os.cpu_count(), **machine(), "results": results, "ratios": ratios}
    write_report(report, out, "finetune")
    return report


def write_report(report: dict, out: Path, name: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2))
    os.replace(tmp, path)
    plot_report(report, out / f"{name}.png")
    print(f"wrote {path} and {out / f'{name}.png'}")


def plot_report(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["results"])
    values = [report["results"][n]["records_per_s"] for n in names]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    bars = ax.bar(names, values, color=["#dd8452" if n.startswith("hvdinfer") else "#4c72b0" for n in names])
    ax.bar_label(bars, fmt="%.1f")
    ax.set_ylabel("records / s")
    ax.set_title(f"{report['bench']}: {report['model_size']}, seq {report['seq']}, "
                 f"{report['np']} ranks, {report['cores']} cores")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------- worker (one variant, one process tree)

def _workload(records: int, seq: int, vocab: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"input_ids": rng.integers(1000 if vocab > 2000 else 1, vocab, size=(records, seq), dtype=np.int32),
            "attention_mask": np.ones((records, seq), np.int32)}


def worker(args: argparse.Namespace) -> int:
    if args.mode in ("train", "keras-fit"):
        return _worker_train(args)
    if args.mode == "keras":
        return _worker_keras(args)
    if args.mode == "naive":
        return _worker_naive(args)
    return _worker_hvdinfer(args)


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
    data = _workload(args.records, args.seq, model.config.vocab_size)
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
    data = _workload(args.records, args.seq, model.config.vocab_size)
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
    data = _workload(args.records, args.seq, model.config.vocab_size)
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


def _worker_train(args) -> int:
    """`args.records` optimizer steps of `args.batch` fixed-length records per rank (after 2 warm-up steps)."""
    import tensorflow as tf

    from models import bert, heads, registry

    distributed = args.mode == "train"
    if distributed:
        from hvdinfer import runtime
        from hvdinfer.parallel import data_parallel

        rt = runtime.init_runtime(runtime.RuntimeConfig(intra_op_threads=args.threads, inter_op_threads=1))
        size, rank = rt.size, rt.rank
    else:
        size, rank = 1, 0
    tf.keras.utils.set_random_seed(0)
    model = bert.build(heads.TextClassifier(bert.SentenceEmbedder(registry.size(args.model_size)), ["a", "b"]))
    optimizer = tf.keras.optimizers.AdamW(1e-5)
    callbacks = []
    if distributed:
        optimizer, callbacks = data_parallel.apply_data_parallel(optimizer)
    model.compile(optimizer=optimizer, loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    data = _workload(args.batch, args.seq, model.config.vocab_size)
    labels = np.arange(args.batch) % 2

    # Fixed data, no Python generator: tearing down fit's iterator over a generator can block for
    # seconds (the prefetch thread sits in the generator), which is not training time.
    batches = tf.data.Dataset.from_tensors((data, labels)).repeat()

    class Clock(tf.keras.callbacks.Callback):
        """Steady-state training: from the end of the second step to the end of the last."""

        def on_train_batch_end(self, batch, logs=None):
            if batch == 1:
                self.start = time.perf_counter()
            self.end = time.perf_counter()

    clock = Clock()
    model.fit(batches, steps_per_epoch=args.records + 2, epochs=1, verbose=0, callbacks=callbacks + [clock])
    seconds = clock.end - clock.start
    if rank == 0:
        print(json.dumps({"seconds": seconds, "records_per_s": args.records * args.batch * size / seconds,
                          "steps": args.records, "batch_per_rank": args.batch}), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hvdinfer.bench")
    sub = parser.add_subparsers(dest="command", required=True)
    w = sub.add_parser("worker")
    w.add_argument("--mode", choices=["keras", "naive", "hvdinfer", "train", "keras-fit"], required=True)
    w.add_argument("--threads", type=int, default=0, help="train: TF intra-op threads per rank")
    w.add_argument("--split-threads", action="store_true")
    w.add_argument("--intra", type=int, default=0, help="with --split-threads: override intra-op threads")
    w.add_argument("--inter", type=int, default=0, help="with --split-threads: override inter-op threads")
    w.add_argument("--records", type=int, default=256)
    w.add_argument("--batch", type=int, default=32)
    w.add_argument("--seq", type=int, default=128)
    w.add_argument("--model-size", default="minilm-l6")
    args = parser.parse_args(argv)
    return worker(args)


if __name__ == "__main__":
    sys.exit(main())
