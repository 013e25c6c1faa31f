"""`hvdinfer bench finetune`: data-parallel fine-tuning samples/s, 2 ranks vs 1 rank (one thread
each) and vs Keras `fit` in one process on all cores, over steady-state steps.

    .venv/bin/hvdinfer bench finetune --out bench-out     # (part of make bench)
"""
from __future__ import annotations

import json
import os
import resource
import time
from pathlib import Path

import numpy as np

from hvdinfer.bench import report as report_mod
from hvdinfer.bench import runtime as runtime_bench


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
        cmd = report_mod.worker_command([*flags, "--records", str(steps), "--batch", str(batch), "--seq", str(seq),
                                         "--model-size", "minilm-l6"])
        if name != "keras-fit":
            cmd = report_mod.mpirun_prefix(ranks) + cmd
        results[name] = {**report_mod.run_json(name, cmd, report_mod.bench_env(), 900), "ranks": ranks, "variant": name}
        print(f"  {name:15s} {results[name]['records_per_s']:8.2f} samples/s", flush=True)
    ratios = {"2rank/1rank": results["hvdinfer-2rank"]["records_per_s"] / results["hvdinfer-1rank"]["records_per_s"],
              "2rank/keras-fit": results["hvdinfer-2rank"]["records_per_s"] / results["keras-fit"]["records_per_s"]}
    report_mod.print_ratios(ratios)
    report = {"bench": "finetune", "np": 2, "records": steps, "batch": batch, "seq": seq, "model_size": "minilm-l6",
              "cores": os.cpu_count(), **report_mod.machine(), "results": results, "ratios": ratios}
    report_mod.write_report(report, out, "finetune")
    return report


# ---------------------------------------------------------------- worker (one variant, one process tree)

def worker(args) -> int:
    """`args.records` optimizer steps of `args.batch` fixed-length records per rank (after 2 warm-up steps)."""
    import tensorflow as tf

    from hvdinfer import runtime
    from models import bert, heads, registry

    distributed = args.mode == "train"
    if distributed:
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
        optimizer, callbacks = data_parallel.apply_data_parallel(optimizer, compression=args.compression)
    model.compile(optimizer=optimizer, loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    data = runtime_bench.workload(args.batch, args.seq, model.config.vocab_size)
    labels = np.arange(args.batch) % 2

    # Fixed data, no Python generator: tearing down fit's iterator over a generator can block for
    # seconds (the prefetch thread sits in the generator), which is not training time.
    batches = tf.data.Dataset.from_tensors((data, labels)).repeat()

    class Clock(tf.keras.callbacks.Callback):
        """Steady-state training: from the end of the second step to the end of the last."""

        def on_train_begin(self, logs=None):
            self.ends = []

        def on_train_batch_end(self, batch, logs=None):
            if batch == 1:
                self.start = time.perf_counter()
            self.end = time.perf_counter()
            if batch >= 1:
                self.ends.append(self.end)

    clock = Clock()
    model.fit(batches, steps_per_epoch=args.records + 2, epochs=1, verbose=0, callbacks=callbacks + [clock])
    seconds = clock.end - clock.start
    if rank == 0:
        print(json.dumps({"seconds": seconds, "records_per_s": args.records * args.batch * size / seconds,
                          "steps": args.records, "batch_per_rank": args.batch,
                          "step_seconds": np.diff(clock.ends).tolist(), "compression": args.compression,
                          "cores_per_rank": runtime.host_cores(), "thread_cpu_s": thread_cpu_seconds(),
                          "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}),
              flush=True)
    return 0


def thread_cpu_seconds(top: int = 6) -> list[float]:
    """CPU seconds used so far by this process's `top` busiest threads (/proc/self/task), busiest first."""
    tick = os.sysconf("SC_CLK_TCK")
    used = []
    for task in Path("/proc/self/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the thread ended
        used.append((int(fields[11]) + int(fields[12])) / tick)
    return sorted(used, reverse=True)[:top]
