"""`hvdinfer bench infer`: the real `hvdinfer infer` job on real minilm-l6 weights vs one Keras
`predict` process and the naive Horovod loop, on fixed 128-token texts, plus the fp32 GEMM peak.
Also the generated inputs the engine and peer benches share (fixed-length and short texts).

    .venv/bin/hvdinfer bench infer --np 2 --out bench-out     # (part of make bench)
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from hvdinfer.bench import report as report_mod
from hvdinfer.bench import runtime as runtime_bench


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
    cmd = report_mod.mpirun_prefix(np_) + [
        hvdinfer, "infer", "--model", "minilm-l6", "--input", str(source), "--output", str(workdir / "out.npy"),
        "--max-length", str(seq), "--quiet", "--batch-size", str(batch), "--precision", precision,
        "--metrics-json", str(metrics)]
    proc = subprocess.run(cmd, env=report_mod.bench_env(), capture_output=True, text=True, timeout=900)
    if proc.returncode:
        raise RuntimeError(f"hvdinfer infer ({precision}) failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    summary = json.loads(metrics.read_text())
    return {"records_per_s": summary["records_per_s"], "seconds": summary["compute_seconds"],
            "records": summary["ok"], "ranks": np_, "variant": f"hvdinfer-{precision}"}


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
        results[name] = runtime_bench.run_variant(name, np_, records, batch, seq, "minilm-l6", timeout=900)
    host = report_mod.machine(precision)
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
    report_mod.print_ratios(ratios, 24)
    report = {"bench": "infer", "np": np_, "records": records, "batch": batch, "seq": seq, "model_size": "minilm-l6",
              "cores": os.cpu_count(), **host, "flops_per_record": flops, "gemm_peak_flops": peak,
              "results": results, "ratios": ratios}
    report_mod.write_report(report, out, "infer")
    return report


SHORT_WORDS = ("the a cat dog sat ran on mat rug house garden river city quick slow small large red blue green "
               "happy sad old new bright dark cold warm morning night music film story book review movie plot "
               "actor scene great terrible boring funny").split()


def short_text_input(path: Path, records: int, seed: int = 0) -> None:
    """JSONL of `records` short texts, 5 to 25 words each from a small vocabulary (seeded)."""
    rng = np.random.default_rng(seed)
    counts = rng.integers(5, 26, size=records)
    words = rng.integers(0, len(SHORT_WORDS), size=int(counts.sum()))
    with open(path, "w", encoding="utf-8") as fh:
        at = 0
        for r, n in enumerate(counts):
            fh.write(json.dumps({"id": r, "text": " ".join(SHORT_WORDS[w] for w in words[at:at + n])}) + "\n")
            at += n
