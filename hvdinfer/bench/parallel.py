"""`hvdinfer bench parallel`: the model-parallel figures (issue 9's goals), each measured in its own process.

    .venv/bin/hvdinfer bench parallel --out bench-out           # part of `make bench`
    python -m hvdinfer.bench.parallel pipeline|tensor|decode    # one worker, as the bench runs it

- memory: parameter bytes per device under --pp 2 and each rank's block weights under --tp 2, for
  minilm-l6 and gpt2 from the plans `parallelize` follows (nothing allocated), and as placed on a
  real minilm-l6-size model (goals: <= 0.55 of the model per device; <= 0.52 of the block weights);
- pipeline: a minilm-l6-size encoder on 2 stages (one intra-op thread per stage, so two stages can
  use the two cores at once), batch B cut into M = 1, 4, 8 micro-batches. Each stage's busy time
  is M x its time alone on one micro-batch; its idle share is 1 - busy / the pipelined batch's wall
  time, set against GPipe's bubble (K-1)/(M+K-1);
- tensor: --tp 2 over 2 ranks: the share of a forward (encoder, batch B) and of a decode step (GPT-2
  small layout, random weights) spent in the row-parallel allreduces (the same graph with the sums
  left out, which computes the same shapes), and generated tokens/s with tp 2 against tp 1 (one
  process with both cores).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from hvdinfer.bench import report as report_mod

SEQ, BATCH, MICRO = 64, 32, (1, 4, 8)
DECODE_BATCH, DECODE_PROMPT, DECODE_TOKENS = 8, 16, 32


def _timed(fn, repeats: int) -> float:
    """Median seconds of `fn()` over `repeats` runs, after one untimed run."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# --- memory: from the plans, nothing allocated -----------------------------------------------------------
def memory_figures() -> dict:
    from hvdinfer.doctor import plan_model
    from hvdinfer.parallel import parallelize
    from hvdinfer.parallel.dims import ParallelConfig, ParallelDims

    figures = {}
    for name in ("minilm-l6", "gpt2"):
        model_fn, _ = plan_model(name)
        _, per_device, whole = parallelize.describe(model_fn, ParallelDims(1, 2, 1, 1), ParallelConfig(pp=2))
        total = sum(s.bytes for s in whole)
        rows, _, _ = parallelize.describe(model_fn, ParallelDims(1, 1, 2, 2), ParallelConfig(tp=2))
        blocks = sum(s.bytes for s in whole if s.name.startswith("block_"))
        figures[name] = {"total_bytes": total,
                         "pp2_device_shares": {d: b / total for d, b in per_device.items()},
                         "pp2_max_device_share": max(per_device.values()) / total,
                         "tp2_block_share": sum(r.bytes for r in rows if r.layer.startswith("block_")) / blocks}
    return figures


# --- workers ----------------------------------------------------------------------------------------------
def _encoder(size: str = "minilm-l6"):
    from models import bert, registry

    config = registry.size(size)
    return lambda: bert.SentenceEmbedder(config)


def _random_weights(model, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for var in model.weights:
        if var.dtype.is_floating:
            base = 1.0 if "gamma" in var.name else 0.0
            var.assign(base + rng.normal(0.0, 0.05, var.shape).astype(var.dtype.as_numpy_dtype))


def schedule_standin(micro: int, step_s: float = 0.02, ops: int = 3) -> dict:
    """The executor's schedule for K = 2 stand-in stages wired like the runner's graphs (M chains, each
    stage under its own device), each stage a serial device: its ops run one at a time in issue order
    (as a GPU's stream runs kernels) and take `step_s` without using a core (a sleep: the device
    works while the host waits). Idle share per stage = 1 - busy / wall."""
    import tensorflow as tf

    def op(x):
        time.sleep(step_s)
        return x

    @tf.function
    def pipeline(x):
        outs, last = [], [x, x]

        def stage(s, h):
            for _ in range(ops):
                with tf.control_dependencies([last[s]]):
                    h = tf.numpy_function(op, [h], tf.float32, stateful=False)
                last[s] = h
            return h

        for m in range(micro):
            with tf.device("/CPU:0"):
                h = stage(0, x[m:m + 1])
            with tf.device("/CPU:1"):
                outs.append(stage(1, h))
        return tf.concat(outs, axis=0)

    x = tf.ones([micro])
    wall = _timed(lambda: pipeline(x).numpy(), 2)
    busy = micro * ops * step_s
    return {"wall_s": wall, "idle_share": [1 - busy / wall] * 2, "gpipe_bubble": 1 / (micro + 1),
            "gpipe_wall_s": (micro + 1) * ops * step_s}


def worker_pipeline(repeats: int) -> dict:
    """One rank, 2 stages on 2 logical CPU devices, each with its own one-thread intra-op pool
    (TF_OVERRIDE_GLOBAL_THREADPOOL, set by the bench), and 2 inter-op threads."""
    import tensorflow as tf

    from hvdinfer import runtime
    from hvdinfer.parallel import parallelize, placement, runners
    from hvdinfer.parallel.dims import ParallelConfig, ParallelDims

    runtime.init_runtime(runtime.RuntimeConfig(intra_op_threads=1, inter_op_threads=2, pipeline_stages=2))
    # Memory: the default plan, balanced by parameters (the embeddings alone weigh about as much as
    # the six blocks), as placed.
    balanced = parallelize.parallelize(_encoder(), ParallelDims(1, 2, 1, 1), ParallelConfig(pp=2))
    held = placement.parameter_bytes(balanced.model)
    total = sum(held.values())
    del balanced
    # Time: a plan balanced by compute (three blocks a stage), given as a --plan file.
    plan = Path(os.environ.get("TMPDIR", "/tmp")) / f"hvdinfer-bench-plan-{os.getpid()}.json"
    plan.write_text(json.dumps({"stages": [["embeddings", "block_{0..2}"], ["block_{3..5}", "pool"]]}))
    base = parallelize.parallelize(_encoder(), ParallelDims(1, 2, 1, 1), ParallelConfig(pp=2, plan=plan))
    plan.unlink()
    _random_weights(base.model)
    where = base.placement
    rng = np.random.default_rng(1)
    ids = rng.integers(1000, 20000, (BATCH, SEQ)).astype(np.int32)
    mask = np.ones_like(ids)
    encoder = base.model.encoder

    def stage_fn(stage: int):
        """Stage `stage` alone on one micro-batch: its layers under its device."""
        layers = where.stage_layers(stage)
        blocks = [int(n.split("_")[1]) for n in layers if n.startswith("block_")]

        @tf.function
        def run(x_ids, x_mask, hidden):
            from models import bert

            x = hidden
            with tf.device(where.devices[stage]):
                if "embeddings" in layers:
                    x = encoder.embeddings(x_ids)
                bias = bert.mask_bias(x_mask, x.dtype)
                if blocks:
                    x = encoder.run_blocks(x, bias, blocks[0], blocks[-1] + 1)
                if "pool" in layers:
                    x = base.model.pool(x, x_mask)
            return x
        return run

    stages = [stage_fn(s) for s in range(2)]
    results = {}
    for micro in MICRO:
        runner = runners.EncoderRunner(base.model, where, micro, None)
        wall = _timed(lambda: runner.forward(ids, mask).numpy(), repeats)
        rows = BATCH // micro
        hidden = tf.zeros([rows, SEQ, base.config.hidden_size])
        alone = [_timed(lambda run=run: run(ids[:rows], mask[:rows], hidden).numpy(), repeats) for run in stages]
        busy = [micro * t for t in alone]
        results[str(micro)] = {"wall_s": wall, "stage_alone_s": alone, "sequential_s": sum(busy),
                               "idle_share": [max(0.0, 1 - b / wall) for b in busy],
                               "gpipe_bubble": (2 - 1) / (micro + 2 - 1),
                               "speedup_vs_sequential": sum(busy) / wall}
    standin = {str(micro): schedule_standin(micro) for micro in MICRO}
    return {"worker": "pipeline", "plan": where.describe(), "bytes_per_device": held,
            "max_device_share": max(held.values()) / total, "micro": results, "standin": standin}


def _gpt_config():
    from models import registry

    return registry.gpt_size("gpt2")


def _decode_tokens_per_s(runner_or_model, repeats: int, follower=None) -> float:
    """Prefill DECODE_BATCH prompts, then DECODE_TOKENS greedy steps: new tokens per second."""
    rng = np.random.default_rng(2)
    ids = rng.integers(0, 50000, (DECODE_BATCH, DECODE_PROMPT)).astype(np.int32)
    mask = np.ones_like(ids)
    max_len = DECODE_PROMPT + DECODE_TOKENS

    def generate():
        cache = runner_or_model.new_cache(DECODE_BATCH, max_len)
        logits, cache = runner_or_model.prefill(ids, mask, cache)
        cache_mask = np.zeros((DECODE_BATCH, max_len), np.int32)
        cache_mask[:, :DECODE_PROMPT] = 1
        for step in range(DECODE_TOKENS):
            column = DECODE_PROMPT + step
            cache_mask[:, column] = 1
            tokens = np.argmax(logits.numpy(), axis=1).astype(np.int32)
            logits, cache = runner_or_model.decode_step(tokens, np.full(DECODE_BATCH, column, np.int32), column,
                                                        cache, cache_mask)
        logits.numpy()

    return DECODE_BATCH * DECODE_TOKENS / _timed(generate, repeats)


def worker_decode(repeats: int) -> dict:
    """tp 1: one process with every core, the plain model."""
    from hvdinfer import runtime
    from models import gpt

    runtime.init_runtime(runtime.RuntimeConfig())
    model = gpt.random_init(gpt.GPT(_gpt_config()))
    return {"worker": "decode", "tokens_per_s": _decode_tokens_per_s(model, repeats)}


def worker_tensor(repeats: int) -> dict:
    """--tp 2 over 2 ranks: the allreduce's share of a forward and of a decode step, tokens/s, weights held."""
    from hvdinfer import runtime
    from hvdinfer.parallel import parallelize, runners, tensor_parallel
    from hvdinfer.parallel.dims import ParallelConfig, ParallelDims
    from models import gpt

    rt = runtime.init_runtime(runtime.RuntimeConfig())
    dims = ParallelDims(1, 1, 2, 2)
    config = ParallelConfig(tp=2)

    def without_sums(model, on: bool) -> None:
        for layer in model._flatten_layers():
            if isinstance(layer, tensor_parallel.RowParallelDense):
                if not hasattr(layer, "group_set"):
                    layer.group_set = layer.process_set
                layer.process_set = layer.group_set if on else None

    encoder = parallelize.parallelize(_encoder(), dims, config, rt)
    _random_weights(encoder.model)
    rng = np.random.default_rng(1)
    ids = rng.integers(1000, 20000, (BATCH, SEQ)).astype(np.int32)
    mask = np.ones_like(ids)
    with_sums = _timed(lambda: encoder.forward(ids, mask).numpy(), repeats)
    without_sums(encoder.model, False)
    local = runners.EncoderRunner(encoder.model, None, 1, encoder.group)
    alone = _timed(lambda: local.forward(ids, mask).numpy(), repeats)
    without_sums(encoder.model, True)

    decoder = parallelize.parallelize(lambda: gpt.GPT(_gpt_config()), dims, config, rt)
    gpt.random_init(decoder.model)
    tokens_per_s = _decode_tokens_per_s(decoder, repeats)
    without_sums(decoder.model, False)
    local_decoder = runners.DecoderRunner(decoder.model, None, 1, decoder.group)
    tokens_alone = _decode_tokens_per_s(local_decoder, repeats)
    whole_block = parallelize.layer_sizes(lambda: gpt.GPT(_gpt_config()), ParallelDims(1, 1, 1, 1))[2]
    block_share = (sum(int(np.prod(w.shape)) for b in decoder.model.blocks for w in b.weights)
                   / whole_block.parameters / len(decoder.model.blocks))
    return {"worker": "tensor", "rank": rt.rank, "forward_s": with_sums, "forward_without_sums_s": alone,
            "forward_allreduce_share": max(0.0, 1 - alone / with_sums), "tokens_per_s": tokens_per_s,
            "tokens_per_s_without_sums": tokens_alone,
            "decode_allreduce_share": max(0.0, 1 - tokens_per_s / tokens_alone),
            "gpt2_block_share_held": block_share}


WORKERS = {"pipeline": worker_pipeline, "tensor": worker_tensor, "decode": worker_decode}


# --- the bench ---------------------------------------------------------------------------------------------
def _run(name: str, np_: int, repeats: int, **env: str) -> dict:
    cmd = [sys.executable, "-m", "hvdinfer.bench.parallel", name, "--repeats", str(repeats)]
    if np_ > 1:
        cmd = report_mod.mpirun_prefix(np_) + cmd
    print(f"running {name} on {np_} rank(s) ...", flush=True)
    return report_mod.run_json(name, cmd, report_mod.bench_env(**env), 1800)


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def bench_parallel(out: Path, repeats: int = 3) -> dict:
    load_before = load()
    memory = memory_figures()
    # TF: each logical CPU device its own intra-op pool, so two stages can compute at once.
    pipeline = _run("pipeline", 1, repeats, TF_OVERRIDE_GLOBAL_THREADPOOL="1")
    tensor = _run("tensor", 2, repeats)
    decode = _run("decode", 1, repeats)
    goals = {
        "pp2_bytes_per_device_le_0.55": {m: f["pp2_max_device_share"] for m, f in memory.items()}
        | {"minilm-l6 (placed)": pipeline["max_device_share"]},
        "tp2_block_weights_le_0.52": {m: f["tp2_block_share"] for m, f in memory.items()}
        | {"gpt2 (held by a rank)": tensor["gpt2_block_share_held"]},
        "pipeline_idle_vs_gpipe_bubble": {m: {"idle_share": r["idle_share"], "gpipe_bubble": r["gpipe_bubble"],
                                              "standin_idle_share": pipeline["standin"][m]["idle_share"]}
                                          for m, r in pipeline["micro"].items()},
        "tp2_allreduce_share": {"forward": tensor["forward_allreduce_share"],
                                "decode": tensor["decode_allreduce_share"]},
        "generate_tokens_per_s": {"tp1": decode["tokens_per_s"], "tp2": tensor["tokens_per_s"],
                                  "tp2/tp1": tensor["tokens_per_s"] / decode["tokens_per_s"]},
    }
    report = {"bench": "parallel", **report_mod.machine(), "cores": os.cpu_count(), "load_before": load_before,
              "load_after": load(), "memory": memory, "pipeline": pipeline, "tensor": tensor, "decode": decode,
              "goals": goals, "shapes": {"encoder": "minilm-l6", "batch": BATCH, "seq": SEQ, "decoder": "gpt2",
                                         "decode_batch": DECODE_BATCH, "prompt": DECODE_PROMPT,
                                         "new_tokens": DECODE_TOKENS}}
    print_goals(goals)
    report_mod.write_report(report, out, "parallel", plot_parallel)
    return report


def print_goals(goals: dict) -> None:
    print("pp 2, parameter bytes on the fullest device (goal <= 0.55 of the model):")
    for name, share in goals["pp2_bytes_per_device_le_0.55"].items():
        print(f"  {name:24s} {share:.3f}")
    print("tp 2, block weights per rank (goal <= 0.52):")
    for name, share in goals["tp2_block_weights_le_0.52"].items():
        print(f"  {name:24s} {share:.3f}")
    print("pipeline, 2 stages: idle share per stage vs GPipe's bubble (K-1)/(M+K-1):")
    for micro, row in goals["pipeline_idle_vs_gpipe_bubble"].items():
        print(f"  M={micro:2s} encoder stages idle {', '.join(f'{x:.2f}' for x in row['idle_share'])}; "
              f"stand-in stages idle {row['standin_idle_share'][0]:.2f}; GPipe bubble {row['gpipe_bubble']:.2f}")
    share = goals["tp2_allreduce_share"]
    print(f"tp 2, share of time in the allreduce: forward {share['forward']:.2f}, decode step {share['decode']:.2f}")
    tokens = goals["generate_tokens_per_s"]
    print(f"generate tokens/s: tp 1 {tokens['tp1']:.1f}, tp 2 {tokens['tp2']:.1f} ({tokens['tp2/tp1']:.2f}x)")


def plot_parallel(report: dict, path: Path) -> None:
    plt = report_mod.pyplot()
    micro = list(report["pipeline"]["micro"])
    rows = report["pipeline"]["micro"]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    x = np.arange(len(micro))
    for stage in range(2):
        ax.bar(x + (stage - 0.5) * 0.3, [rows[m]["idle_share"][stage] for m in micro], 0.3, label=f"stage {stage} idle")
    ax.plot(x, [rows[m]["gpipe_bubble"] for m in micro], "k--o", label="GPipe bubble (K-1)/(M+K-1)")
    ax.set_xticks(x, [f"M={m}" for m in micro])
    ax.set_ylabel("share of the batch's wall time")
    ax.set_title("pipeline, 2 stages (minilm-l6 size)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hvdinfer.bench.parallel")
    parser.add_argument("worker", choices=sorted(WORKERS))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    result = WORKERS[args.worker](args.repeats)
    from hvdinfer import runtime

    if runtime.init_runtime().is_coordinator:
        print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
