"""`hvdinfer bench peer`: `hvdinfer infer` against what users pick instead, end to end on the same
cores: the sentence-transformers recipe (HF transformers + PyTorch, one process, every core) with
the same minilm-l6 files.

    make peer-env                                           # .venv-peer: torch, transformers, sentence-transformers
    .venv/bin/hvdinfer bench peer --np 2 --out bench-out    # (part of make bench)

Two workloads, each run by both sides `--repeats` times, interleaved, each side keeping its
fastest run (on a shared machine others' load only ever adds time):

  long   --peer-long-records texts of 128 tokens (as bench infer), --max-length 128 on both sides
  short  --peer-short-records short texts (5-25 words from a small vocabulary)

hvdinfer: `hvdinfer infer` on --np ranks under mpirun, output .npy, launched through bench/probe.py
so its wall time can be broken down by phase. The peer: bench/peer_st.py under .venv-peer's
Python, output .npy. End to end is the launcher's wall time, process start to output written and
process gone; records/s is each side's compute phase (hvdinfer's chunks, the peer's `encode`).
Both outputs are compared row by row (cosine), so both sides provably computed the same thing.
Without .venv-peer (or when torch does not import there) the bench says so in one line and skips.
"""
from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import numpy as np

from hvdinfer.bench import infer as infer_bench
from hvdinfer.bench import probe
from hvdinfer.bench import report as report_mod

PEER_VENV = Path(__file__).resolve().parents[2] / ".venv-peer"
PEER_SCRIPT = Path(__file__).with_name("peer_st.py")
BATCH = 64
LONG_SEQ = 128
GOAL = 1.3  # hvdinfer end to end vs the peer, both workloads


def peer_python() -> tuple[Path | None, str]:
    """.venv-peer's Python when torch and sentence-transformers import there, else None and why."""
    python = PEER_VENV / "bin" / "python"
    if not python.is_file():
        return None, f"{PEER_VENV} does not exist: run `make peer-env`"
    proc = subprocess.run([str(python), "-c", "import torch, sentence_transformers"], capture_output=True,
                          text=True, timeout=300)
    if proc.returncode:
        last = (proc.stderr.strip().splitlines() or ["(no message)"])[-1]
        return None, f"torch or sentence-transformers does not import in {PEER_VENV}: {last}"
    return python, ""


def run_peer(python: Path, model_dir: Path, source: Path, output: Path, max_length: int) -> dict:
    """The peer process to the end: the launcher's wall seconds and the peer's own phase marks."""
    cmd = [str(python), str(PEER_SCRIPT), str(model_dir), str(source), str(output), "--batch-size", str(BATCH)]
    if max_length:
        cmd += ["--max-length", str(max_length)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    launched = time.time()
    result = report_mod.run_json("peer (sentence-transformers)", cmd, env, 1800)
    ended = time.time()
    phases = {"launch + interpreter start": result["started"] - launched,
              "imports (torch, transformers, sentence-transformers)": result["imported"] - result["started"],
              "model load": result["loaded"] - result["imported"], "reading the input": result["read"] - result["loaded"],
              "encode (tokenise + forward + pool)": result["encoded"] - result["read"],
              "output writing": result["written"] - result["encoded"], "exit": ended - result["written"]}
    return {"wall_seconds": ended - launched, "records_per_s": result["records_per_s"],
            "compute_seconds": result["encoded"] - result["read"], "records": result["records"],
            "phases": phases, "torch_threads": result["torch_threads"], "versions": result["versions"]}


def run_hvdinfer(np_: int, source: Path, output: Path, max_length: int, precision: str, work: Path) -> dict:
    argv = ["infer", "--model", "minilm-l6", "--input", str(source), "--output", str(output),
            "--batch-size", str(BATCH), "--precision", precision]
    if max_length:
        argv += ["--max-length", str(max_length)]
    run = probe.launch(np_, argv, work / "probe")
    m = run["metrics"]
    return {"wall_seconds": run["wall_seconds"], "records_per_s": m["records_per_s"],
            "compute_seconds": m["compute_seconds"], "records": m["records"], "precision": m["precision"],
            "ranks": np_, **probe.breakdown(run)}


# Phase groups both sides share, for the picture: (group, words that put a phase in it), first match wins.
GROUPS = (("start-up: launch, interpreter, imports, runtime", ("launch", "interpreter", "import", "runtime",
                                                               "precision")),
          ("model load + trace", ("model load", "trace")),
          ("input: index, check, read", ("indexing", "record check", "plan", "reading")),
          ("compute", ("chunks", "encode")),
          ("output + journal", ("output", "journal")),
          ("exit + other", ("exit", "other")))


def grouped(phases: dict[str, float]) -> dict[str, float]:
    totals = dict.fromkeys((group for group, _ in GROUPS), 0.0)
    for phase, seconds in phases.items():
        group = next(g for g, words in GROUPS if any(w in phase for w in words))
        totals[group] += seconds
    return totals


def min_cosine(a: Path, b: Path) -> float:
    x, y = np.load(a), np.load(b)
    if x.shape != y.shape:
        raise RuntimeError(f"hvdinfer and the peer disagree on the output shape: {x.shape} vs {y.shape}")
    dots = np.sum(x * y, axis=1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1))
    return float(dots.min())


def bench_peer(np_: int, out: Path, long_records: int, short_records: int, repeats: int = 2,
               precision: str = "auto") -> dict | None:
    python, why = peer_python()
    if python is None:
        print(f"bench peer skipped: {why}", flush=True)
        return None
    from hvdinfer import assets

    model_dir = assets.resolve_model("minilm-l6")
    work = out / "peer-work"
    work.mkdir(parents=True, exist_ok=True)
    workloads = {"long (128 tokens)": (work / "long.jsonl", LONG_SEQ, long_records),
                 "short (5-25 words)": (work / "short.jsonl", 0, short_records)}
    infer_bench.fixed_length_input(workloads["long (128 tokens)"][0], long_records, LONG_SEQ)
    infer_bench.short_text_input(workloads["short (5-25 words)"][0], short_records)
    results: dict[str, dict] = {}
    for name, (source, max_length, records) in workloads.items():
        runs: dict[str, list[dict]] = {"hvdinfer": [], "peer": []}
        for round_ in range(repeats):
            print(f"running {name}, {records} records ({round_ + 1} of {repeats}): hvdinfer on {np_} ranks ...",
                  flush=True)
            output = report_mod.fresh_output(work / "hvdinfer.npy")
            runs["hvdinfer"].append(run_hvdinfer(np_, source, output, max_length, precision, work))
            print(f"  {runs['hvdinfer'][-1]['wall_seconds']:.1f} s end to end; peer ...", flush=True)
            runs["peer"].append(run_peer(python, model_dir, source, work / "peer.npy", max_length))
            print(f"  {runs['peer'][-1]['wall_seconds']:.1f} s end to end", flush=True)
        best = {side: min(r, key=lambda x: x["wall_seconds"]) for side, r in runs.items()}
        results[name] = {**best, "records": records, "min_cosine": min_cosine(work / "hvdinfer.npy", work / "peer.npy"),
                         "runs_wall_seconds": {side: [x["wall_seconds"] for x in r] for side, r in runs.items()}}
    ratios = {}
    for name, r in results.items():
        ratios[f"{name}: end to end, hvdinfer/peer"] = r["peer"]["wall_seconds"] / r["hvdinfer"]["wall_seconds"]
        ratios[f"{name}: compute records/s, hvdinfer/peer"] = r["hvdinfer"]["records_per_s"] / r["peer"]["records_per_s"]
    goals = {name: {"value": ratios[f"{name}: end to end, hvdinfer/peer"], "goal": f">= {GOAL:g}",
                    "met": ratios[f"{name}: end to end, hvdinfer/peer"] >= GOAL} for name in results}
    for name, r in results.items():
        print(f"  {name:20s} hvdinfer {r['hvdinfer']['wall_seconds']:6.1f} s ({r['hvdinfer']['records_per_s']:.1f} "
              f"records/s compute), peer {r['peer']['wall_seconds']:6.1f} s ({r['peer']['records_per_s']:.1f} "
              f"records/s), min cosine {r['min_cosine']:.6f}")
    report_mod.print_ratios(ratios, 48)
    short = results["short (5-25 words)"]["hvdinfer"]
    print("where hvdinfer's wall time goes, short texts (rank 0; s):")
    for phase, seconds in short["phases"].items():
        print(f"  {phase:66s} {seconds:7.2f}")
    for phase, seconds in short["overlapped"].items():
        print(f"  ({phase}, overlapped) {'':{max(0, 52 - len(phase))}s} {seconds:7.2f}")
    peer_versions = results["short (5-25 words)"]["peer"]["versions"]
    report = {"bench": "peer", "np": np_, "batch": BATCH, "long_seq": LONG_SEQ, "repeats": repeats,
              "model_size": "minilm-l6", "cores": os.cpu_count(), **report_mod.machine(precision),
              "peer": f"sentence-transformers {peer_versions['sentence-transformers']}, transformers "
                      f"{peer_versions['transformers']}, torch {peer_versions['torch']}, one process",
              "goals": goals, "ratios": ratios, "results": results}
    report_mod.write_report(report, out, "peer", plot=plot_peer)
    return report


def plot_peer(report: dict, path: Path) -> None:
    plt = report_mod.pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [1, 2]})
    names = list(report["results"])
    x = np.arange(len(names))
    for offset, side, color in ((-0.2, "hvdinfer", "#dd8452"), (0.2, "peer", "#4c72b0")):
        bars = left.bar(x + offset, [report["results"][n][side]["wall_seconds"] for n in names], 0.4, color=color,
                        label=f"hvdinfer, {report['np']} ranks" if side == "hvdinfer" else "sentence-transformers")
        left.bar_label(bars, fmt="%.1f")
    left.set_xticks(x, names)
    left.set_ylabel("end-to-end wall seconds")
    left.legend(fontsize=8)
    left.set_title("end to end (lower is better)")

    short = report["results"]["short (5-25 words)"]
    rows = [(f"hvdinfer, {report['np']} ranks", grouped(short["hvdinfer"]["phases"])),
            ("sentence-transformers", grouped(short["peer"]["phases"]))]
    colors = plt.get_cmap("tab10").colors
    for y, (_, groups) in enumerate(rows):
        left_edge = 0.0
        for i, (group, seconds) in enumerate(groups.items()):
            right.barh(y, max(seconds, 0.0), left=left_edge, color=colors[i], label=group if y == 0 else None)
            left_edge += max(seconds, 0.0)
    right.set_yticks([0, 1], [r[0] for r in rows])
    right.set_xlabel("seconds, launch to exit")
    right.set_title("short texts: where the wall time goes")
    right.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=3)
    fig.suptitle(f"peer bench: minilm-l6, {report['cores']} cores, {report['cpu_model']}, {report['precision']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
