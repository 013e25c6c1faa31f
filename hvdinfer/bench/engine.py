"""`hvdinfer bench engine`: the job engine's goals, each measured side by side in one run and
written to OUT/engine.json and OUT/engine.png with the host's CPU model.

    .venv/bin/hvdinfer bench engine --np 2 --out bench-out          # (part of make bench)
    .venv/bin/hvdinfer bench engine --engine-records 2048 --rss-records 10000,100000   # quicker

Every job is the real `hvdinfer infer` on --np ranks, launched through bench/probe.py (timers
around its phases, each rank's peak RSS, nothing changed in the task):

  schedule  minilm-l6 on --engine-records short texts (5-25 words) in chunks of 64, static and
            dynamic: with rank 1 made 2x slower per chunk (HVDINFER_TEST_SLOW_RANK=1:2.0; on 2
            ranks the ideal speed-up is 1.5x), goal dynamic >= 1.4x static; balanced, goal
            dynamic >= 0.97x static. Ratios of the jobs' compute seconds (their own summary).
  journal   the balanced dynamic job with its journal (the default) and with --no-journal (results
            held in memory); goal: the journal and the assembly from it cost <= 3% of wall time.
            Judged on the journal's own time in the journaled job (opening it, every chunk write on
            the writer thread, every read while assembling the output, removing it: an upper bound,
            as if none of it overlapped compute), since on a shared machine identical runs differ
            by more than 3%; the side-by-side wall difference and that spread are reported with it.
  resume    the same job killed with kill -9 of rank 1 once about half its chunks are journaled,
            then run again with --resume (--repeats times, the least total compute kept); goal:
            the compute of both runs <= 1.1x that of one uninterrupted run, and every resumed
            output byte-identical to the uninterrupted one's.
  memory    a debug-size model (random weights, minilm-l6's tokenizer) on --rss-records short
            texts (10k, 100k, 1M) in chunks of 1024, output .npy, and .jsonl for --jsonl-records:
            each rank's peak RSS; goal: the coordinator's at the largest size within 1.2x of the
            smallest.

The schedule and journal jobs run --repeats times, interleaved, and each keeps its fastest run
(compute for the schedule and resume ratios, wall otherwise): on a shared machine others' load
only ever adds time.
"""
from __future__ import annotations

import dataclasses
import filecmp
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import psutil

from hvdinfer.bench import infer as infer_bench
from hvdinfer.bench import probe
from hvdinfer.bench import report as report_mod

CHUNK = 64
# One chunk size at every input size (the auto size grows with the input), so only the record count
# changes between the memory runs.
MEMORY_CHUNK = 1024
SLOW_RANK = "1:2.0"
GOALS = {
    # name: (what, comparison, bound)
    "dynamic/static, rank 1 2x slower": ("speed-up of compute", ">=", 1.4),
    "dynamic/static, balanced": ("speed ratio of compute", ">=", 0.97),
    "journal overhead": ("journal time / wall of the journaled job (upper bound)", "<=", 0.03),
    "killed at 50% + resume / uninterrupted": ("compute of both runs", "<=", 1.1),
    "coordinator peak RSS, largest/smallest": ("peak RSS ratio", "<=", 1.2),
}


def debug_model_dir(path: Path) -> Path:
    """A debug-size model (seeded random weights, minilm-l6's vocabulary) with minilm-l6's tokenizer:
    real tokenisation, next to no compute, so what the engine itself holds and does shows."""
    if (path / "model.safetensors").is_file():
        return path
    import tensorflow as tf

    from hvdinfer import assets
    from models import bert, registry, weights

    source = assets.resolve_model("minilm-l6")
    config = dataclasses.replace(registry.size("debug"), vocab_size=registry.size("minilm-l6").vocab_size)
    tf.keras.utils.set_random_seed(0)
    model = bert.build(bert.SentenceEmbedder(config))
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "1_Pooling").mkdir(parents=True)
    for name in ("modules.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        shutil.copy(source / name, tmp / name)
    pooling = json.loads((source / "1_Pooling" / "config.json").read_text())
    (tmp / "1_Pooling" / "config.json").write_text(json.dumps({**pooling,
                                                               "word_embedding_dimension": config.hidden_size}))
    (tmp / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": config.max_position,
                                                               "do_lower_case": False}))
    (tmp / "config.json").write_text(json.dumps(config.to_hf()))
    weights.save_weights(model, tmp / "model.safetensors")
    os.replace(tmp, path)
    return path


def short_input(work: Path, records: int) -> Path:
    path = work / f"short-{records}.jsonl"
    if not path.is_file():
        infer_bench.short_text_input(path, records)
    return path


def job_figures(run: dict) -> dict:
    """What a report keeps of one probed run."""
    m = run["metrics"]
    return {"wall_seconds": run["wall_seconds"], "compute_seconds": m["compute_seconds"],
            "records_per_s": m["records_per_s"], "records": m["records"], "chunks": m["chunks"],
            "chunk_size": m["chunk_size"], "peak_rss_mb": {rank: r["peak_rss_mb"] for rank, r in sorted(run["ranks"].items())}}


def minilm_job(source: Path, output: Path, *extra: str) -> list[str]:
    return ["infer", "--model", "minilm-l6", "--input", str(source), "--output", str(output),
            "--chunk-size", str(CHUNK), *extra]


def best_of(runs: list[dict]) -> dict:
    """One variant's runs: the fastest wall and the fastest compute (others' load only adds time),
    records/s of the fastest compute, and every run's figures."""
    figures = [job_figures(run) for run in runs]
    compute = min(figures, key=lambda f: f["compute_seconds"])
    return {"wall_seconds": min(f["wall_seconds"] for f in figures), "compute_seconds": compute["compute_seconds"],
            "records_per_s": compute["records_per_s"], "records": compute["records"], "chunks": compute["chunks"],
            "chunk_size": compute["chunk_size"], "runs": figures}


def bench_schedule_and_journal(np_: int, source: Path, work: Path, repeats: int) -> dict:
    """Static and dynamic with rank 1 2x slower, then balanced static, dynamic and dynamic
    --no-journal, all interleaved `repeats` times. The balanced dynamic job's output is the
    reference the resume check compares with."""
    variants = {
        "rank 1 2x slower, static": ("slow.npy", {"HVDINFER_TEST_SLOW_RANK": SLOW_RANK}, "--schedule", "static"),
        "rank 1 2x slower, dynamic": ("slow.npy", {"HVDINFER_TEST_SLOW_RANK": SLOW_RANK}, "--schedule", "dynamic"),
        "balanced static": ("static.npy", {}, "--schedule", "static"),
        "balanced dynamic": ("uninterrupted.npy", {}, "--schedule", "dynamic"),
        "balanced dynamic --no-journal": ("no-journal.npy", {}, "--schedule", "dynamic", "--no-journal"),
    }
    runs: dict[str, list[dict]] = {name: [] for name in variants}
    for round_ in range(repeats):
        for name, (output, env, *flags) in variants.items():
            print(f"running {name} ({round_ + 1} of {repeats}) ...", flush=True)
            run = probe.launch(np_, minilm_job(source, report_mod.fresh_output(work / output), *flags), work / "probe",
                               **env)
            runs[name].append(run)
            print(f"  {run['wall_seconds']:.1f} s wall, {run['metrics']['compute_seconds']:.1f} s compute", flush=True)
    figures = {name: best_of(r) for name, r in runs.items()}
    journaled = min(runs["balanced dynamic"], key=lambda r: r["wall_seconds"])["ranks"][0]["calls"]
    figures["balanced dynamic"]["journal_busy_seconds"] = sum(
        journaled.get(name, {}).get("seconds", 0.0)
        for name in ("open_journal", "DiskJournal.put", "DiskJournal.read", "DiskJournal.close"))
    return figures


def rank_pid(launcher: psutil.Process, rank: int) -> int | None:
    """The pid of `rank` among the launcher's descendants (Open MPI exports its rank to each)."""
    for child in launcher.children(recursive=True):
        try:
            if child.environ().get("OMPI_COMM_WORLD_RANK") == str(rank):
                return child.pid
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return None


def bench_resume(np_: int, source: Path, work: Path, chunks: int, repeats: int) -> dict:
    """`repeats` times: kill at 50%, then --resume. The attempt with the least compute in all, every
    attempt's figures, and whether every resumed output was byte-identical."""
    attempts = [kill_and_resume(np_, source, work, chunks) for _ in range(repeats)]
    best = min(attempts, key=lambda a: a["killed_compute_seconds"] + a["resumed"]["compute_seconds"])
    return {**best, "byte_identical": all(a["byte_identical"] for a in attempts), "attempts": attempts}


def kill_and_resume(np_: int, source: Path, work: Path, chunks: int) -> dict:
    """Kill -9 rank 1 of the balanced dynamic job once half its chunks are journaled, then --resume."""
    output = report_mod.fresh_output(work / "resumed.npy")
    parts = output.with_name(output.name + ".parts")
    argv = minilm_job(source, output, "--quiet")
    print("running the job to kill at 50% ...", flush=True)
    launched = time.time()
    with open(work / "killed.log", "w") as log:
        proc = subprocess.Popen(probe.command(np_, work / "probe-killed", argv), env=report_mod.bench_env(),
                                stdout=log, stderr=subprocess.STDOUT)
        killed_at = journaled = None
        while proc.poll() is None:
            journaled = len(list(parts.glob("chunk-*.npz"))) if parts.is_dir() else 0
            if journaled * 2 >= chunks and (pid := rank_pid(psutil.Process(proc.pid), 1)) is not None:
                os.kill(pid, signal.SIGKILL)
                killed_at = time.time()
                break
            time.sleep(0.02)
        proc.wait(timeout=120)
    if killed_at is None:
        raise RuntimeError(f"the job ended (exit {proc.returncode}) before half its chunks were journaled; "
                           f"see {work / 'killed.log'}")
    # The journal's job.json is written just before the first chunk is handed out.
    killed_compute = killed_at - (parts / "job.json").stat().st_mtime
    print(f"  killed rank 1 with {journaled} of {chunks} chunks journaled, {killed_compute:.1f} s into compute; "
          "resuming ...", flush=True)
    resumed = probe.launch(np_, [*argv, "--resume"], work / "probe")
    same = filecmp.cmp(output, work / "uninterrupted.npy", shallow=False)
    print(f"  resumed: {resumed['metrics']['chunks_computed']} chunks in {resumed['metrics']['compute_seconds']:.1f} s; "
          f"output {'byte-identical to' if same else 'DIFFERS from'} the uninterrupted run's", flush=True)
    return {"chunks": chunks, "journaled_at_kill": journaled, "killed_wall_seconds": killed_at - launched,
            "killed_compute_seconds": killed_compute, "resumed": job_figures(resumed),
            "resumed_chunks_computed": resumed["metrics"]["chunks_computed"], "byte_identical": same}


def bench_memory(np_: int, work: Path, sizes: list[int], jsonl_sizes: list[int]) -> dict:
    """The debug-size model on each size of short-text input: peak RSS of every rank, per output format."""
    model = debug_model_dir(work / "debug-model")
    results = {}
    for suffix, counts in ((".npy", sizes), (".jsonl", jsonl_sizes)):
        for records in counts:
            name = f"{records} records {suffix}"
            print(f"running debug model, {name} ...", flush=True)
            output = report_mod.fresh_output(work / f"memory{suffix}")
            run = probe.launch(np_, ["infer", "--model", str(model), "--input", str(short_input(work, records)),
                                     "--output", str(output), "--chunk-size", str(MEMORY_CHUNK)], work / "probe")
            output.unlink()
            results[name] = {**job_figures(run), "format": suffix, "breakdown": probe.breakdown(run)}
            rss = ", ".join(f"rank {r} {mb:.0f} MB" for r, mb in results[name]["peak_rss_mb"].items())
            print(f"  peak RSS {rss}; {run['wall_seconds']:.1f} s wall", flush=True)
    return results


def goal_table(schedule: dict, resume: dict, memory: dict, sizes: list[int]) -> dict:
    """Each goal's measured value, bound and verdict."""
    slow_s, slow_d = schedule["rank 1 2x slower, static"], schedule["rank 1 2x slower, dynamic"]
    bal_s, bal_d = schedule["balanced static"], schedule["balanced dynamic"]

    def coordinator_rss(records: int) -> float:
        return memory[f"{records} records .npy"]["peak_rss_mb"][0]

    values = {
        "dynamic/static, rank 1 2x slower": slow_s["compute_seconds"] / slow_d["compute_seconds"],
        "dynamic/static, balanced": bal_s["compute_seconds"] / bal_d["compute_seconds"],
        "journal overhead": bal_d["journal_busy_seconds"] / bal_d["wall_seconds"],
        "killed at 50% + resume / uninterrupted":
            (resume["killed_compute_seconds"] + resume["resumed"]["compute_seconds"]) / bal_d["compute_seconds"],
        "coordinator peak RSS, largest/smallest": coordinator_rss(max(sizes)) / coordinator_rss(min(sizes)),
    }
    table = {}
    for name, value in values.items():
        what, comparison, bound = GOALS[name]
        table[name] = report_mod.goal(value, comparison, bound, what=what)
    table["resumed output byte-identical"] = report_mod.goal(resume["byte_identical"], "==", True,
                                                             what="resumed .npy vs the uninterrupted run's")
    return table


def print_goals(goals: dict) -> None:
    print("goals:")
    for name, g in goals.items():
        value = str(g["value"]) if isinstance(g["value"], bool) else f"{g['value']:.3f}"
        print(f"  {name:40s} {value:>7s}  (goal {g['goal']}: {'met' if g['met'] else 'NOT MET'})")


def bench_engine(np_: int, out: Path, records: int = 4096, rss_records: tuple[int, ...] = (10_000, 100_000, 1_000_000),
                 jsonl_records: tuple[int, ...] = (10_000, 100_000), repeats: int = 2) -> dict:
    if np_ < 2:
        raise ValueError("bench engine needs --np >= 2 (rank 1 is the slow rank)")
    if records < 4 * CHUNK:
        raise ValueError(f"bench engine needs --engine-records >= {4 * CHUNK}")
    from hvdinfer import assets

    assets.resolve_model("minilm-l6")  # fetch outside the timed runs
    work = out / "engine-work"
    work.mkdir(parents=True, exist_ok=True)
    source = short_input(work, records)
    schedule = bench_schedule_and_journal(np_, source, work, repeats)
    resume = bench_resume(np_, source, work, -(-records // CHUNK), repeats)
    memory = bench_memory(np_, work, sorted(rss_records), sorted(jsonl_records))
    goals = goal_table(schedule, resume, memory, list(rss_records))
    bal_d = schedule["balanced dynamic"]
    ratios = {
        "dynamic/static wall, rank 1 2x slower": schedule["rank 1 2x slower, static"]["wall_seconds"]
        / schedule["rank 1 2x slower, dynamic"]["wall_seconds"],
        "dynamic/static wall, balanced": schedule["balanced static"]["wall_seconds"] / bal_d["wall_seconds"],
        "journal overhead, side by side (fastest wall each)": bal_d["wall_seconds"]
        / schedule["balanced dynamic --no-journal"]["wall_seconds"] - 1,
        "wall spread of identical runs (largest, balanced jobs)": max(
            max(w) / min(w) - 1 for w in ([f["wall_seconds"] for f in schedule[name]["runs"]]
                                          for name in ("balanced static", "balanced dynamic",
                                                       "balanced dynamic --no-journal"))),
        "killed + resumed / uninterrupted, wall": (resume["killed_wall_seconds"] + resume["resumed"]["wall_seconds"])
        / bal_d["wall_seconds"],
    }
    for rank in range(np_):
        ratios[f"rank {rank} peak RSS, {max(rss_records)}/{min(rss_records)} .npy"] = (
            memory[f"{max(rss_records)} records .npy"]["peak_rss_mb"][rank]
            / memory[f"{min(rss_records)} records .npy"]["peak_rss_mb"][rank])
    if len(jsonl_records) > 1:
        ratios[f"rank 0 peak RSS, {max(jsonl_records)}/{min(jsonl_records)} .jsonl"] = (
            memory[f"{max(jsonl_records)} records .jsonl"]["peak_rss_mb"][0]
            / memory[f"{min(jsonl_records)} records .jsonl"]["peak_rss_mb"][0])
    print_goals(goals)
    report_mod.print_ratios(ratios, 58)
    report = {"bench": "engine", "np": np_, "records": records, "chunk_size": CHUNK, "repeats": repeats,
              "slow_rank": SLOW_RANK, "model_size": "minilm-l6 (memory: debug)", "cores": os.cpu_count(),
              **report_mod.machine(), "goals": goals, "ratios": ratios, "schedule": schedule, "resume": resume,
              "memory": memory}
    report_mod.write_report(report, out, "engine", plot=plot_engine)
    return report


def plot_engine(report: dict, path: Path) -> None:
    plt = report_mod.pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    schedule = report["schedule"]

    names = ["balanced static", "balanced dynamic", "rank 1 2x slower, static", "rank 1 2x slower, dynamic"]
    ax = axes[0][0]
    bars = ax.bar(["balanced\nstatic", "balanced\ndynamic", "rank 1 slow\nstatic", "rank 1 slow\ndynamic"],
                  [schedule[n]["records_per_s"] for n in names],
                  color=["#4c72b0" if "static" in n else "#dd8452" for n in names])
    ax.bar_label(bars, fmt="%.0f")
    ax.set_ylabel("records / s (compute)")
    ax.set_title("schedule: static vs dynamic")

    ax = axes[0][1]
    names = ["balanced dynamic", "balanced dynamic --no-journal"]
    bars = ax.bar(["journal (default)", "--no-journal"], [schedule[n]["wall_seconds"] for n in names],
                  color=["#dd8452", "#4c72b0"])
    ax.bar_label(bars, fmt="%.1f s")
    ax.set_ylabel("wall seconds")
    ax.set_title(f"journal: {report['goals']['journal overhead']['value'] * 100:.1f}% of wall (its own time); "
                 f"side by side {report['ratios']['journal overhead, side by side (fastest wall each)'] * 100:+.1f}%",
                 fontsize=10)

    ax = axes[1][0]
    resume = report["resume"]
    ax.bar(["uninterrupted"], [schedule["balanced dynamic"]["compute_seconds"]], color="#4c72b0")
    ax.bar(["killed at 50%\n+ --resume"], [resume["killed_compute_seconds"]], color="#c44e52", label="killed run")
    ax.bar(["killed at 50%\n+ --resume"], [resume["resumed"]["compute_seconds"]],
           bottom=[resume["killed_compute_seconds"]], color="#dd8452", label="resumed run")
    ax.legend()
    ax.set_ylabel("compute seconds")
    ax.set_title(f"resume: {report['goals']['killed at 50% + resume / uninterrupted']['value']:.2f}x, "
                 f"byte-identical: {resume['byte_identical']}")

    ax = axes[1][1]
    for suffix, style in ((".npy", "o-"), (".jsonl", "s--")):
        rows = sorted((v["records"], v["peak_rss_mb"]) for v in report["memory"].values() if v["format"] == suffix)
        for rank in range(report["np"]):
            ax.plot([r for r, _ in rows], [rss[rank] for _, rss in rows], style, label=f"rank {rank} {suffix}")
    ax.set_xscale("log")
    ax.set_ylim(bottom=0)
    ax.set_xlabel("records (debug-size model, short texts)")
    ax.set_ylabel("peak RSS, MB")
    ax.set_title("memory")
    ax.legend(fontsize=8)
    fig.suptitle(f"engine bench: {report['np']} ranks, {report['cores']} cores, {report['cpu_model']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
