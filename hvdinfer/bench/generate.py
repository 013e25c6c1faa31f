"""`hvdinfer bench generate`: the generation goals of issue 8, each measured side by side in one run
and written to OUT/generate.json and OUT/generate.png with the host's CPU model and load.

    make peer-env                                               # .venv-peer: torch, transformers
    .venv/bin/hvdinfer bench generate --np 2 --out bench-out    # (part of make bench)

The model is GPT-2 small's layout and size (124M parameters: 12 blocks of width 768, 1024 positions,
the real GPT-2 vocabulary of 50,257), seeded random weights (`gpt.random_init`), written once by
`models.gpt_loading.save_gpt` to OUT/generate-work/gpt2-random. It is the size people run on CPUs,
and its step is memory- and GEMM-bound like any real checkpoint's (weights do not change the cost
of a fixed-length run); the larger GPT-2 sizes would take hours here. First the layout is proved:
HF `GPT2LMHeadModel.from_pretrained` loads the directory, and on a few prompts its logits (over
prompt + continuation) and greedy tokens are compared with hvdinfer's.

Prompts are exactly --prompt-tokens (16) GPT-2 tokens (words that are one token each, seeded), so
batches hold no padding and every side computes the same thing. All decoding is greedy with
fixed lengths (hvdinfer `--ignore-eos`, HF `min_new_tokens = max_new_tokens`).

  decoder  models.decoding.generate_batch, what `hvdinfer generate` runs for each batch, in one
           process on every core (python -m hvdinfer.bench worker --mode generate), after a warm-up
           of the same geometry (graph traces are reported apart): the KV cache vs full recompute
           (`--no-kv-cache`'s path) at batch --recompute-batch with --long-tokens (256) new tokens;
           batch 32 vs batch 1 with --batch-tokens (64) new tokens; each split into prefill, decode
           steps and host sampling.
  job      the real `hvdinfer generate` (probed, bench/probe.py) on --generate-prompts prompts,
           --job-tokens new tokens, batch 16, chunks of 64, on 1 and on --np ranks; and HF
           transformers `generate` (bench/peer_hf.py in .venv-peer, one process, every core, its KV
           cache on) over the same directory, prompts, batch and lengths. End to end = new tokens /
           the launcher's wall seconds (process start to exit); compute = the job's own tokens/s.
  mixed    the same job on --np ranks with stop strings that end every prompt of every other chunk
           within its first tokens (found from the job's greedy output), static vs dynamic.

Every variant runs --repeats times, interleaved, keeping its fastest run (on a shared machine
others' load only ever adds time); the 1-minute load average is recorded around every run.
Without .venv-peer the HF side is skipped with one line saying why.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

import numpy as np

from hvdinfer.bench import peer as peer_bench
from hvdinfer.bench import probe
from hvdinfer.bench import report as report_mod

SIZE = "gpt2"
PEER_SCRIPT = Path(__file__).with_name("peer_hf.py")
BATCH = 16
CHUNK = 64
# Each a single GPT-2 token (with its leading space; the first word without), checked at run time.
FIRST_WORDS = ("The", "A", "In", "On", "When", "After", "This", "One")
WORDS = ("the", "cat", "sat", "on", "mat", "and", "dog", "house", "river", "city", "day", "man", "old", "small",
         "red", "blue", "green", "water", "light", "night", "road", "tree", "time", "world", "long", "new", "first",
         "last", "great", "little", "people", "work", "school", "home", "music", "book", "game", "money", "story")
GOALS = {
    # name: (what is compared, bound)
    "KV cache / full recompute": ("decoder tokens/s", 10.0),
    "batch 32 / batch 1": ("decoder tokens/s", 8.0),
    "hvdinfer 1 rank / HF generate": ("end-to-end tokens/s", 1.0),
    "hvdinfer N ranks / HF generate": ("end-to-end tokens/s", 1.5),
    "N ranks / 1 rank": ("job compute tokens/s", 1.8),
}


def model_config(size: str, vocab_size: int):
    """The registry size, its embedding table widened to the GPT-2 vocabulary where smaller (debug)."""
    from models import registry

    config = registry.gpt_size(size)
    return dataclasses.replace(config, vocab_size=max(config.vocab_size, vocab_size))


# --- inputs ---------------------------------------------------------------------------------------
def prompt_texts(tokenizer, count: int, tokens: int, seed: int = 0) -> list[str]:
    """`count` seeded prompts of exactly `tokens` GPT-2 tokens each."""
    for word in FIRST_WORDS + tuple(" " + w for w in WORDS):
        if len(tokenizer.encode(word)) != 1:
            raise RuntimeError(f"{word!r} is not one token in this vocabulary: fix bench/generate.py's word list")
    rng = np.random.default_rng(seed)
    texts = [FIRST_WORDS[rng.integers(len(FIRST_WORDS))] + "".join(" " + WORDS[w] for w in
                                                                   rng.integers(0, len(WORDS), tokens - 1))
             for _ in range(count)]
    lengths = {len(ids) for ids in tokenizer.encode_batch_ids(texts)}
    if lengths != {tokens}:
        raise RuntimeError(f"prompts of {sorted(lengths)} tokens, not {tokens}")
    return texts


def write_prompts(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"id": i, "prompt": t}) + "\n" for i, t in enumerate(texts)))
    return path


def read_tokens(path: Path) -> list[list[int]]:
    """The continuations of an output .jsonl (hvdinfer's or the peer's), in input order."""
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [r["tokens"] for r in sorted(rows, key=lambda r: r["index"])]


def early_stops(tokens: list[list[int]], decode, early: set[int], stop_at: int) -> list[str]:
    """Stop strings that end every prompt in `early` early and no other prompt: for each early prompt
    the text of one of its tokens (from `stop_at` down, then up), else of two, three, .. six in a
    row, that appears in no other prompt's continuation."""
    others = [decode(t) for i, t in enumerate(tokens) if i not in early]
    stops: list[str] = []
    for i in sorted(early):
        for span in range(1, 7):
            piece = next((p for k in [*range(min(stop_at, len(tokens[i]) - span), -1, -1),
                                      *range(stop_at + 1, len(tokens[i]) - span + 1)]
                          if usable_stop(p := decode(tokens[i][k:k + span]), others)), None)
            if piece is not None:
                if piece not in stops:
                    stops.append(piece)
                break
    return stops


def usable_stop(piece: str, others: list[str]) -> bool:
    # Not "-..." either: the command line would read it as a flag.
    return (bool(piece.strip()) and "\ufffd" not in piece and not piece.startswith("-")
            and not any(piece in text for text in others))


# --- the launched sides ---------------------------------------------------------------------------
def worker_run(spec: dict, timeout: float = 3600) -> dict:
    """`python -m hvdinfer.bench worker --mode generate --spec JSON` (bench/generate.py's worker)."""
    cmd = report_mod.worker_command(["--mode", "generate", "--spec", json.dumps(spec)])
    return report_mod.run_json(f"generate worker ({spec['task']})", cmd, report_mod.bench_env(), timeout)


def peer_python() -> tuple[Path | None, str]:
    """.venv-peer's Python when torch and transformers import there, else None and why."""
    import subprocess

    python = peer_bench.PEER_VENV / "bin" / "python"
    if not python.is_file():
        return None, f"{peer_bench.PEER_VENV} does not exist: run `make peer-env`"
    proc = subprocess.run([str(python), "-c", "import torch, transformers"], capture_output=True, text=True,
                          timeout=300)
    if proc.returncode:
        last = (proc.stderr.strip().splitlines() or ["(no message)"])[-1]
        return None, f"torch or transformers does not import in {peer_bench.PEER_VENV}: {last}"
    return python, ""


def peer_env() -> dict:
    return report_mod.bench_env(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")


def run_peer(python: Path, model_dir: Path, prompts: Path, output: Path, new_tokens: int) -> dict:
    """HF `generate` over the prompts to the end: wall seconds and the peer's own phase marks."""
    cmd = [str(python), str(PEER_SCRIPT), "generate", str(model_dir), str(prompts), str(output),
           "--batch-size", str(BATCH), "--max-new-tokens", str(new_tokens)]
    load = os.getloadavg()[0]
    launched = time.time()
    r = report_mod.run_json("peer (HF transformers generate)", cmd, peer_env(), 3600)
    ended = time.time()
    phases = {"launch + interpreter start": r["started"] - launched,
              "imports (torch, transformers)": r["imported"] - r["started"], "model load": r["loaded"] - r["imported"],
              "reading the input": r["read"] - r["loaded"], "generate (tokenise + prefill + steps + sampling)":
              r["generated"] - r["read"], "output writing": r["written"] - r["generated"], "exit": ended - r["written"]}
    return {"wall_seconds": ended - launched, "new_tokens": r["new_tokens"],
            "end_to_end_tokens_per_s": r["new_tokens"] / (ended - launched), "compute_tokens_per_s": r["tokens_per_s"],
            "compute_seconds": r["generated"] - r["read"], "phases": phases, "torch_threads": r["torch_threads"],
            "versions": r["versions"], "load_before": load, "load_after": os.getloadavg()[0]}


def job_argv(model_dir: Path, prompts: Path, output: Path, new_tokens: int, precision: str, *extra: str) -> list[str]:
    return ["generate", "--model", str(model_dir), "--input", str(prompts), "--output", str(output),
            "--max-new-tokens", str(new_tokens), "--temperature", "0", "--ignore-eos", "--batch-size", str(BATCH),
            "--chunk-size", str(CHUNK), "--precision", precision, *extra]


def run_job(np_: int, argv: list[str], work: Path) -> dict:
    """A probed `hvdinfer generate` on np_ ranks: its figures and where rank 0's wall time went."""
    load = os.getloadavg()[0]
    run = probe.launch(np_, argv, work / "probe", timeout=3600)
    m = run["metrics"]
    return {"ranks": np_, "wall_seconds": run["wall_seconds"], "new_tokens": m["tokens_computed"],
            "end_to_end_tokens_per_s": m["tokens_computed"] / run["wall_seconds"],
            "compute_tokens_per_s": m["tokens_per_s"], "compute_seconds": m["compute_seconds"],
            "finish": {r: m[f"finish_{r}"] for r in ("length", "stop", "eos")}, "precision": m["precision"],
            "load_before": load, "load_after": os.getloadavg()[0], **job_breakdown(run)}


def job_breakdown(run: dict) -> dict:
    """Where rank 0's wall time went, launch to exit, in order (the phases add up to the wall time;
    `other` is what falls between probed calls); `overlapped` ran on helper threads meanwhile."""
    r0 = run["ranks"][0]

    def s(name: str) -> float:
        return probe.seconds(r0, name)

    prefill, steps, choose = s("_CachedSteps.first"), s("_CachedSteps.next"), s("choose_tokens")
    phases = {
        **probe.startup_phases(run),
        **probe.planning_phases(run),
        "chunks: prefill": prefill,
        "chunks: decode steps": steps,
        "chunks: host sampling + stop rules": choose,
        "chunks: rest of each batch (padding, rows, results)": s("generate_batch") - prefill - steps - choose,
        "chunks: rest of each chunk": s("PromptChunks.compute") - s("generate_batch"),
        "chunks: rank 0 other (waiting for workers, hand-offs)": s("run_chunks") - s("PromptChunks.compute"),
        **probe.ending_phases(run),
    }
    phases["other"] = run["wall_seconds"] - sum(phases.values())
    calls = r0["calls"].get("_CachedSteps.next", {})
    trace = 0.0
    if calls.get("calls", 0) > 1:
        rest = (calls["seconds"] - calls["first_call_seconds"]) / (calls["calls"] - 1)
        trace = calls["first_call_seconds"] - rest
    overlapped = {"tokenise (rank 0 helper thread)": s("PromptChunks.prepare"),
                  "journal writes (rank 0 writer thread)": s("DiskJournal.put"),
                  "decode graph trace (inside the first decode step)": trace}
    return {"phases": phases, "overlapped": overlapped, "steps": calls.get("calls", 0),
            "peak_rss_mb": {rank: r["peak_rss_mb"] for rank, r in sorted(run["ranks"].items())}}


# --- verdicts and report --------------------------------------------------------------------------
def goal_table(decoder: dict, jobs: dict, peer: dict | None, np_: int) -> dict:
    """Each goal's measured ratio, bound and verdict; the HF goals are absent without the peer."""
    values = {
        "KV cache / full recompute": decoder["cache, long"]["tokens_per_s"] / decoder["recompute, long"]["tokens_per_s"],
        "batch 32 / batch 1": decoder["batch 32"]["tokens_per_s"] / decoder["batch 1"]["tokens_per_s"],
        "N ranks / 1 rank": jobs[f"{np_} ranks"]["compute_tokens_per_s"] / jobs["1 rank"]["compute_tokens_per_s"],
    }
    if peer is not None:
        values["hvdinfer 1 rank / HF generate"] = (jobs["1 rank"]["end_to_end_tokens_per_s"]
                                                   / peer["end_to_end_tokens_per_s"])
        values["hvdinfer N ranks / HF generate"] = (jobs[f"{np_} ranks"]["end_to_end_tokens_per_s"]
                                                    / peer["end_to_end_tokens_per_s"])
    table = {}
    for name, (what, bound) in GOALS.items():
        if name in values:
            label = name.replace("N ranks", f"{np_} ranks")
            table[label] = report_mod.goal(values[name], ">=", bound, what=what)
    return table


def best_run(runs: list[dict], key: str) -> dict:
    """The fastest of a variant's runs by `key` (seconds), with every run's seconds and load."""
    best = dict(min(runs, key=lambda r: r[key]))
    best["runs"] = [{key: r[key], "load_before": r.get("load_before"), "load_after": r.get("load_after")}
                    for r in runs]
    return best


def print_table(report: dict) -> None:
    print(f"generate bench: {report['model']['size']} ({report['model']['parameters'] / 1e6:.0f}M parameters, "
          f"random weights), {report['cores']} cores, {report['cpu_model']}, {report['precision']}")
    print(f"  {'variant':46s} {'tokens/s':>10s} {'seconds':>9s} {'load':>11s}")
    for name, r in report["decoder"].items():
        print(f"  decoder {name:38s} {r['tokens_per_s']:10.1f} {r['seconds']:9.2f} "
              f"{r['load_before']:5.2f}-{r['load_after']:<5.2f}")
    for name, r in report["jobs"].items():
        print(f"  job {name:42s} {r['end_to_end_tokens_per_s']:10.1f} {r['wall_seconds']:9.2f} "
              f"{r['load_before']:5.2f}-{r['load_after']:<5.2f}  (compute {r['compute_tokens_per_s']:.1f} tok/s)")
    for name, r in report["mixed"].items():
        print(f"  mixed {name:40s} {r['compute_tokens_per_s']:10.1f} {r['compute_seconds']:9.2f} "
              f"{r['load_before']:5.2f}-{r['load_after']:<5.2f}  (compute)")
    print("goals:")
    for name, g in report["goals"].items():
        print(f"  {name:36s} {g['value']:7.2f}x  ({g['what']}; goal {g['goal']}: {'met' if g['met'] else 'NOT MET'})")
    report_mod.print_ratios(report["ratios"], 44)


def bench_generate(np_: int, out: Path, prompts: int = 256, job_tokens: int = 32, long_tokens: int = 256,
                   batch_tokens: int = 64, recompute_batch: int = 4, prompt_tokens: int = 16, repeats: int = 2,
                   precision: str = "auto", size: str = SIZE) -> dict:
    if np_ < 2:
        raise ValueError("bench generate needs --np >= 2 (it compares N ranks with 1)")
    if prompts < 4 * CHUNK or prompts % (2 * CHUNK):
        raise ValueError(f"bench generate needs --generate-prompts a multiple of {2 * CHUNK}, at least {4 * CHUNK}")
    from models.bpe import BPETokenizer

    work = out / "generate-work"
    work.mkdir(parents=True, exist_ok=True)
    model_dir = work / f"{size}-random"
    print(f"model: {size}, random weights, in {model_dir} ...", flush=True)
    setup = worker_run({"task": "setup", "model_dir": str(model_dir), "size": size})
    tokenizer = BPETokenizer.from_dir(model_dir)
    source = write_prompts(work / "prompts.jsonl", prompt_texts(tokenizer, prompts, prompt_tokens))
    python, why = peer_python()
    if python is None:
        print(f"bench generate: the HF peer is skipped: {why}", flush=True)
    layout = None
    if python is not None:
        print("layout check: HF GPT2LMHeadModel.from_pretrained on the directory vs hvdinfer ...", flush=True)
        hf = work / "hf-check.npz"
        report_mod.run_json("peer (HF check)", [str(python), str(PEER_SCRIPT), "check", str(model_dir), str(source),
                                                str(hf), "--prompts", "4", "--max-new-tokens", "16"], peer_env(), 1800)
        layout = worker_run({"task": "check", "model_dir": str(model_dir), "hf": str(hf), "prompts": 4,
                             "new_tokens": 16})
        print(f"  max |logit difference| {layout['max_logit_difference']:.2e}; greedy tokens identical for "
              f"{layout['identical_continuations']} of {layout['prompts']} prompts", flush=True)

    decoder_spec = {"task": "decoder", "model_dir": str(model_dir), "prompts": str(source),
                    "variants": {"recompute, long": [recompute_batch, long_tokens, False],
                                 "cache, long": [recompute_batch, long_tokens, True],
                                 "batch 1": [1, batch_tokens, True], "batch 32": [32, batch_tokens, True]}}
    decoder_runs: dict[str, list[dict]] = {}
    job_runs: dict[str, list[dict]] = {"1 rank": [], f"{np_} ranks": []}
    peer_runs: list[dict] = []
    outputs = {name: report_mod.fresh_output(work / f"job-{n}.jsonl") for name, n in (("1 rank", 1),
                                                                                       (f"{np_} ranks", np_))}
    for round_ in range(repeats):
        print(f"round {round_ + 1} of {repeats}: decoder (one process) ...", flush=True)
        for name, r in worker_run(decoder_spec)["variants"].items():
            decoder_runs.setdefault(name, []).append(r)
            print(f"  {name}: {r['tokens_per_s']:.1f} tokens/s ({r['seconds']:.1f} s)", flush=True)
        for name, ranks in (("1 rank", 1), (f"{np_} ranks", np_)):
            print(f"  hvdinfer generate, {name} ...", flush=True)
            argv = job_argv(model_dir, source, report_mod.fresh_output(outputs[name]), job_tokens, precision)
            job_runs[name].append(run_job(ranks, argv, work))
            r = job_runs[name][-1]
            print(f"    {r['wall_seconds']:.1f} s end to end, {r['compute_tokens_per_s']:.1f} tokens/s compute", flush=True)
        if python is not None:
            print("  HF transformers generate ...", flush=True)
            peer_runs.append(run_peer(python, model_dir, source, work / "peer.jsonl", job_tokens))
            print(f"    {peer_runs[-1]['wall_seconds']:.1f} s end to end, "
                  f"{peer_runs[-1]['compute_tokens_per_s']:.1f} tokens/s compute", flush=True)
    decoder = {name: best_run(runs, "seconds") for name, runs in decoder_runs.items()}
    jobs = {name: best_run(runs, "wall_seconds") for name, runs in job_runs.items()}
    for name, runs in job_runs.items():
        jobs[name]["compute_tokens_per_s"] = max(r["compute_tokens_per_s"] for r in runs)
    peer = None
    if peer_runs:
        peer = best_run(peer_runs, "wall_seconds")
        peer["compute_tokens_per_s"] = max(r["compute_tokens_per_s"] for r in peer_runs)
        ours, theirs = read_tokens(outputs["1 rank"]), read_tokens(work / "peer.jsonl")
        peer["identical_continuations"] = sum(a == b for a, b in zip(ours, theirs))
        peer["prompts"] = len(theirs)

    # Every other chunk's prompts stop within their first tokens; the others run to the end.
    continuations = read_tokens(outputs["1 rank"])
    early = {i for i in range(prompts) if (i // CHUNK) % 2}
    stops = early_stops(continuations, tokenizer.decode, early, min(3, job_tokens - 1))
    print(f"mixed lengths: {len(stops)} stop strings end the prompts of chunks 1, 3, ..; static vs dynamic on "
          f"{np_} ranks ...", flush=True)
    mixed_runs: dict[str, list[dict]] = {"static": [], "dynamic": []}
    for round_ in range(repeats):
        for schedule in mixed_runs:
            argv = job_argv(model_dir, source, report_mod.fresh_output(work / "mixed.jsonl"), job_tokens, precision,
                            "--schedule", schedule, "--stop", *stops)
            mixed_runs[schedule].append(run_job(np_, argv, work))
            r = mixed_runs[schedule][-1]
            print(f"  {schedule} ({round_ + 1} of {repeats}): {r['compute_seconds']:.1f} s compute "
                  f"(finish: {r['finish']})", flush=True)
    mixed = {name: best_run(runs, "compute_seconds") for name, runs in mixed_runs.items()}

    goals = goal_table(decoder, jobs, peer, np_)
    ratios = {"dynamic / static, half the prompts stop early (compute)":
              mixed["static"]["compute_seconds"] / mixed["dynamic"]["compute_seconds"],
              f"{np_} ranks / 1 rank, end to end": jobs[f"{np_} ranks"]["end_to_end_tokens_per_s"]
              / jobs["1 rank"]["end_to_end_tokens_per_s"]}
    if peer is not None:
        ratios["hvdinfer 1 rank / HF generate, compute"] = jobs["1 rank"]["compute_tokens_per_s"] / peer[
            "compute_tokens_per_s"]
        ratios[f"hvdinfer {np_} ranks / HF generate, compute"] = jobs[f"{np_} ranks"]["compute_tokens_per_s"] / peer[
            "compute_tokens_per_s"]
    from hvdinfer import runtime

    config = model_config(size, tokenizer.vocab_size)
    e = config.n_embd
    threads = {f"{n} rank{'s' if n > 1 else ''}": dict(zip(("intra_op", "inter_op"), runtime.thread_plan(
        runtime.RuntimeConfig(), n, runtime.host_cores()))) for n in (1, np_)}
    report = {
        "bench": "generate", "np": np_, "repeats": repeats, "cores": os.cpu_count(), **report_mod.machine(precision),
        "model": {"size": size, "weights": "random (gpt.random_init, seed 0), saved by gpt_loading.save_gpt",
                  "parameters": config.vocab_size * e + config.n_positions * e + 2 * e
                  + config.n_layer * (12 * e * e + 13 * e), "setup_seconds": setup["seconds"]},
        "workload": {"prompts": prompts, "prompt_tokens": prompt_tokens, "batch": BATCH, "chunk_size": CHUNK,
                     "job_new_tokens": job_tokens, "long_new_tokens": long_tokens, "batch_new_tokens": batch_tokens,
                     "recompute_batch": recompute_batch, "decoding": "greedy, fixed lengths (--ignore-eos; HF "
                                                                    "min_new_tokens = max_new_tokens)",
                     "mixed_stop_strings": stops},
        "peer": None if peer is None else f"HF transformers {peer['versions']['transformers']} generate, torch "
                                          f"{peer['versions']['torch']}, one process, {peer['torch_threads']} threads",
        "tf_threads_per_rank": threads, "peer_skipped": why or None, "layout_check": layout, "goals": goals, "ratios": ratios, "decoder": decoder,
        "jobs": {**jobs, **({"HF transformers generate": peer} if peer else {})}, "mixed": mixed,
    }
    print_table(report)
    report_mod.write_report(report, out, "generate", plot=plot_generate)
    return report


def plot_generate(report: dict, path: Path) -> None:
    plt = report_mod.pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    ax = axes[0][0]
    names = list(report["decoder"])
    bars = ax.bar([n.replace(", ", "\n") for n in names], [report["decoder"][n]["tokens_per_s"] for n in names],
                  color=["#4c72b0" if "recompute" in n else "#dd8452" for n in names])
    ax.bar_label(bars, fmt="%.1f")
    ax.set_yscale("log")
    ax.set_ylabel("new tokens / s (log)")
    w = report["workload"]
    ax.set_title(f"decoder: cache vs recompute (batch {w['recompute_batch']}, {w['long_new_tokens']} tokens), "
                 f"batch 1 vs 32", fontsize=9)

    ax = axes[0][1]
    names = list(report["jobs"])
    x = np.arange(len(names))
    for offset, key, label in ((-0.2, "end_to_end_tokens_per_s", "end to end"),
                               (0.2, "compute_tokens_per_s", "compute")):
        bars = ax.bar(x + offset, [report["jobs"][n][key] for n in names], 0.4, label=label,
                      color=["#4c72b0" if n.startswith("HF") else "#dd8452" for n in names],
                      hatch=None if key.startswith("end") else "//")
        ax.bar_label(bars, fmt="%.0f")
    ax.set_xticks(x, [n.replace(" generate", "\ngenerate") for n in names])
    ax.set_ylabel("new tokens / s")
    ax.legend(fontsize=8)
    ax.set_title(f"job: {w['prompts']} prompts x {w['job_new_tokens']} new tokens, batch {w['batch']}", fontsize=9)

    ax = axes[1][0]
    rows = [(n, r["phases"]) for n, r in report["jobs"].items()]
    groups = ("start-up", "model load", "input", "prefill", "decode steps", "host sampling", "other compute",
              "output + journal", "exit + other")
    colors = plt.get_cmap("tab10").colors
    for y, (name, phases) in enumerate(rows):
        totals = grouped(phases)
        left = 0.0
        for i, group in enumerate(groups):
            ax.barh(y, max(totals[group], 0.0), left=left, color=colors[i], label=group if y == 0 else None)
            left += max(totals[group], 0.0)
    ax.set_yticks(range(len(rows)), [n for n, _ in rows])
    ax.set_xlabel("seconds, launch to exit (rank 0)")
    ax.set_title("where the wall time goes", fontsize=9)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=3)

    ax = axes[1][1]
    mixed = report["mixed"]
    bars = ax.bar(list(mixed), [mixed[n]["compute_seconds"] for n in mixed], color=["#4c72b0", "#dd8452"])
    ax.bar_label(bars, fmt="%.1f s")
    ax.set_ylabel("compute seconds")
    ax.set_title(f"mixed lengths on {report['np']} ranks (every other chunk stops early): dynamic "
                 f"{list(report['ratios'].values())[0]:.2f}x static", fontsize=9)
    fig.suptitle(f"generate bench: {report['model']['size']}, {report['cores']} cores, {report['cpu_model']}, "
                 f"{report['precision']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# Phase groups for the picture: (group, words that put a phase in it), first match wins.
GROUPS = (("generate", ("generate (",)), ("host sampling", ("host sampling",)), ("prefill", ("prefill",)),
          ("decode steps", ("decode steps",)),
          ("start-up", ("launch", "interpreter", "import", "runtime", "precision")), ("model load", ("model load",)),
          ("input", ("indexing", "record check", "plan", "reading")), ("other compute", ("chunks",)),
          ("output + journal", ("output", "journal")), ("exit + other", ("exit", "other")))


def grouped(phases: dict[str, float]) -> dict[str, float]:
    """Phases summed into GROUPS ("generate" is the peer's undivided compute, drawn as decode steps)."""
    totals = dict.fromkeys((g for g, _ in GROUPS), 0.0)
    for phase, seconds in phases.items():
        totals[next(g for g, words in GROUPS if any(w in phase for w in words))] += seconds
    totals["decode steps"] += totals.pop("generate")
    return totals


# --- the worker: one process on every core --------------------------------------------------------
def worker(args) -> int:
    """`python -m hvdinfer.bench worker --mode generate --spec JSON`; prints its result as one JSON line."""
    spec = json.loads(args.spec)
    import tensorflow as tf

    from hvdinfer import runtime

    intra, inter = runtime.thread_plan(runtime.RuntimeConfig(), 1, runtime.host_cores())
    tf.config.threading.set_intra_op_parallelism_threads(intra)
    tf.config.threading.set_inter_op_parallelism_threads(inter)
    task = {"setup": _setup, "check": _check, "decoder": _decoder}[spec["task"]]
    print(json.dumps({"intra_op_threads": intra, "inter_op_threads": inter, **task(spec)}), flush=True)
    return 0


def _setup(spec: dict) -> dict:
    """The random-weight model directory, written once (reused while its weights file exists)."""
    from hvdinfer import assets
    from models import gpt, gpt_loading, registry
    from models.bpe import BPETokenizer

    started = time.perf_counter()
    model_dir = Path(spec["model_dir"])
    if not (model_dir / gpt_loading.WEIGHTS).is_file():
        tokenizer = BPETokenizer.from_dir(assets.resolve_tokenizer("gpt2"))
        config = model_config(spec["size"], tokenizer.vocab_size)
        gpt_loading.save_gpt(gpt.random_init(gpt.GPT(config), seed=0), tokenizer, config, model_dir)
    return {"seconds": time.perf_counter() - started}


def _check(spec: dict) -> dict:
    """hvdinfer's logits on HF's token sequences and its greedy continuations, against HF's."""
    from models import gpt_loading
    from models.decoding import SamplingParams, generate_batch

    model, tokenizer, _ = gpt_loading.load_gpt(spec["model_dir"])
    hf = np.load(spec["hf"])
    worst, identical = 0.0, 0
    for i in range(spec["prompts"]):
        tokens, length = hf[f"tokens_{i}"], int(hf[f"prompt_length_{i}"])
        ours = model({"input_ids": tokens[None], "attention_mask": np.ones((1, len(tokens)), np.int32)}).numpy()[0]
        worst = max(worst, float(np.abs(ours - hf[f"logits_{i}"]).max()))
        greedy = generate_batch(model, tokenizer, [tokens[:length].tolist()], [i],
                                SamplingParams(max_new_tokens=spec["new_tokens"], ignore_eos=True))[0]
        identical += greedy.tokens == tokens[length:].tolist()
    return {"prompts": spec["prompts"], "new_tokens": spec["new_tokens"], "max_logit_difference": worst,
            "identical_continuations": identical}


class _PhaseTimers:
    """Seconds and calls of the decoder's phases (prefill, steps, host sampling), wrapped from outside."""

    NAMES = (("_CachedSteps", "first", "prefill"), ("_CachedSteps", "next", "decode steps"),
             ("_RecomputeSteps", "first", "first full forward"), ("_RecomputeSteps", "next", "full forwards"),
             (None, "choose_tokens", "host sampling"))

    def __init__(self):
        from models import decoding

        self.totals: dict[str, list] = {}
        for owner_name, attr, phase in self.NAMES:
            owner = decoding if owner_name is None else getattr(decoding, owner_name)
            setattr(owner, attr, self._wrap(phase, getattr(owner, attr)))

    def _wrap(self, phase, fn):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                entry = self.totals.setdefault(phase, [0, 0.0])
                entry[0] += 1
                entry[1] += time.perf_counter() - start
        return timed

    def take(self) -> dict:
        out = {phase: {"calls": c, "seconds": s} for phase, (c, s) in self.totals.items()}
        self.totals = {}
        return out


def _decoder(spec: dict) -> dict:
    """generate_batch per variant (batch, new tokens, cache or not) on the first prompts, each after
    a warm-up of the same geometry (its graph traces, timed apart)."""
    from models import decoding, gpt_loading

    timers = _PhaseTimers()
    model, tokenizer, _ = gpt_loading.load_gpt(spec["model_dir"])
    texts = [json.loads(line)["prompt"] for line in Path(spec["prompts"]).read_text().splitlines()]
    results = {}
    for name, (batch, new_tokens, use_cache) in spec["variants"].items():
        prompts = tokenizer.encode_batch_ids(texts[:batch])
        params = decoding.SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
        max_len = decoding.check_batch(model, prompts, list(range(batch)), params, None)
        started = time.perf_counter()
        warm = decoding.SamplingParams(max_new_tokens=3, ignore_eos=True)
        decoding.generate_batch(model, tokenizer, prompts, list(range(batch)), warm, use_cache=use_cache,
                                max_length=max_len)
        warm_up = time.perf_counter() - started
        timers.take()
        load = os.getloadavg()[0]
        started = time.perf_counter()
        generations = decoding.generate_batch(model, tokenizer, prompts, list(range(batch)), params,
                                              use_cache=use_cache, max_length=max_len)
        seconds = time.perf_counter() - started
        tokens = sum(len(g.tokens) for g in generations)
        phases = timers.take()
        phases["rest of generate_batch"] = {"seconds": seconds - sum(p["seconds"] for p in phases.values())}
        results[name] = {"batch": batch, "new_tokens": new_tokens, "kv_cache": use_cache, "cache_columns": max_len,
                         "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
                         "warm_up_seconds": warm_up, "phases": phases, "load_before": load,
                         "load_after": os.getloadavg()[0]}
    return {"variants": results}

