"""`hvdinfer bench comm`: communication measured where it matters (issue 11, point 4).

    .venv/bin/hvdinfer bench comm --out bench-out                       # (part of make bench where
    .venv/bin/hvdinfer bench comm --comm-parts local --out bench-out    #  namespaces can be made)

Three parts, each variant its own process tree, one after another:

  allreduce  2 namespace hosts x 1 rank (hvdinfer cluster), each host pinned to a core of its own,
             links shaped as 10 Gbit/s 0.1 ms and 1 Gbit/s 1 ms (hvdinfer cluster: tc netem, or
             hvdinfer.wire where the kernel has no netem): Horovod allreduce bus
             bandwidth for 16 and 64 MiB, measured as doctor --selftest does, next to a raw mpi4py
             Allreduce of the same buffer (alone, and beside Horovod's background thread in a run
             of its own), and again with TF's default allocator. Goal: >= 0.85 of the 1 Gbit/s link
             rate for 64 MiB.
  finetune   bench finetune's workload (minilm-l6, fixed batches of 16 x 64 tokens, one TF thread per
             rank): 1 host x 1 rank against 2 hosts x 1 rank on each link, with and without fp16
             gradient compression, and on 1 Gbit/s also a fusion threshold + cycle time and Horovod
             autotune; and on a 250 Mbit/s link, where compression starts to pay. Goal: >= 1.7x on
             10 Gbit/s. With --comm-timeline, extra runs record rank 0's
             Horovod timeline and split each steady-state step's communication into negotiation,
             fusion-buffer copies and the MPI transfer.
  local      one host, 2 ranks, no namespaces: a 16 MiB Horovod allreduce taken apart against
             mpi4py's (host copies, a freshly allocated output, fusion of 64 tensors, Average's
             scaling), under HOROVOD_CYCLE_TIME and HOROVOD_FUSION_THRESHOLD variants and with TF's
             default allocator instead of the runtime's pooling one; then fine-tuning on the host,
             1 rank and 2 ranks, with the runtime's defaults and with TF's default allocator.

Each link's shaping (netem's qdisc, or the userspace wire's settings) is in the report
(`links.<link>.shaping`). Namespace hosts share this machine's cores; --cpus-per-host 1
(taskset) gives each its own, so a 2-host run computes on two cores like two machines and the
1-host baseline on one. The 1-host baseline runs first and last; the scaling figures divide by the
mean of the two (the drift between them is in the report, with the load average around every run),
and are also given from each run's fastest step, for a machine that other work shares.
"""
from __future__ import annotations

import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from hvdinfer import cluster as cluster_mod
from hvdinfer.bench import report as report_mod
from hvdinfer.doctor import bus_bandwidth  # as doctor --selftest reports it

PARTS = ("allreduce", "finetune", "local")
LINKS = {"10gbit": cluster_mod.Shape(delay="0.1ms", rate="10gbit"),
         "1gbit": cluster_mod.Shape(delay="1ms", rate="1gbit"),
         # Slower than the issue's two: where the gradient transfer outlasts what backprop hides.
         "250mbit": cluster_mod.Shape(delay="1ms", rate="250mbit")}
ALLREDUCE_LINKS = ("10gbit", "1gbit")
LINK_COLORS = {"10gbit": "#dd8452", "1gbit": "#4c72b0", "250mbit": "#8172b3"}
SIZES_MIB = (16, 64)
# A run times its methods interleaved (each call after a barrier), so all see the same load. Raw MPI
# from the main thread while Horovod's background thread runs (the "beside hvd" methods) gets its own
# run: it slowed the Horovod calls after it (a 64 MiB hvd allreduce over 1 Gbit/s: 0.75 of the link
# interleaved with it, 0.93 without).
LINK_METHODS = ("mpi4py alone", "hvd", "hvd+numpy")
LOCAL_METHODS = ("mpi4py alone", "hvd", "hvd+numpy", "hvd from numpy", "hvd average", "hvd 64 tensors")
BESIDE_METHODS = ("mpi4py beside hvd", "mpi4py fresh output")
LOCAL_ENVS = {
    "defaults": {},
    "cycle 0.1 ms": {"HOROVOD_CYCLE_TIME": "0.1"},
    "cycle 5 ms": {"HOROVOD_CYCLE_TIME": "5"},
    "fusion off": {"HOROVOD_FUSION_THRESHOLD": "0"},
    # The runtime pools CPU tensor memory (TF's BFC allocator); this is TF's own default instead.
    "TF default allocator": {"TF_CPU_ALLOCATOR_USE_BFC": "false"},
}
# The allreduce over each link: with the runtime's defaults, and (hvd and mpi4py alone only) with TF's
# default allocator, whose fresh output buffer each call is what the pooling allocator saves.
LINK_RUNS = {"defaults": ({}, LINK_METHODS), "MPI from the main thread": ({}, ("mpi4py beside hvd",)),
             "TF default allocator": ({"TF_CPU_ALLOCATOR_USE_BFC": "false"}, ("mpi4py alone", "hvd"))}
# Settings compared with the runtime's for fine-tuning on one host (bench comm --comm-local-env
# overrides): TF's default allocator, which the runtime replaced with its pooling one.
LOCAL_CANDIDATES = [{"TF_CPU_ALLOCATOR_USE_BFC": "false"}]
FINETUNE = {"batch": 16, "seq": 64, "model_size": "minilm-l6"}
WARMUP_STEPS = 2  # the finetune worker's untimed first steps (tracing, the initial broadcast)


@dataclasses.dataclass(frozen=True)
class Row:
    """One fine-tuning variant: where it runs, the Horovod env it sets, the worker flags it adds."""

    link: str
    """"1host" (the baseline: one host x one rank), a LINKS key (2 hosts x 1 rank), or "local" (one
    host, unpinned, `ranks` ranks)."""
    name: str
    env: dict = dataclasses.field(default_factory=dict)
    flags: tuple = ()
    ranks: int = 2
    steps_factor: int = 1
    """Autotune needs more steps to try its settings: it runs this many times the steps."""
    timeline: bool = False
    """Record rank 0's Horovod timeline (its writer thread polls, which costs a 1-core host compute
    time: a timeline row is a breakdown, its speed is not the variant's)."""


def autotune_env(log: str) -> dict:
    # Horovod autotune, shortened to fit a bench: a score per 5 steps, no warm-up scores.
    return {"HOROVOD_AUTOTUNE": "1", "HOROVOD_AUTOTUNE_LOG": log, "HOROVOD_AUTOTUNE_WARMUP_SAMPLES": "0",
            "HOROVOD_AUTOTUNE_STEPS_PER_SAMPLE": "1"}


def finetune_rows(tuning: tuple[int, float], work: Path, timeline: bool = False) -> list[Row]:
    """The fine-tuning table: each row one run (the 1-host baseline is run first and last)."""
    fusion_mib, cycle_ms = tuning
    tuned = {"HOROVOD_FUSION_THRESHOLD": str(fusion_mib * 2**20), "HOROVOD_CYCLE_TIME": f"{cycle_ms:g}"}
    fp16 = ("--compression", "fp16")
    rows = [
        Row("10gbit", "defaults"),
        Row("10gbit", "fp16 compression", flags=fp16),
        Row("1gbit", "defaults"),
        Row("1gbit", "fp16 compression", flags=fp16),
        Row("1gbit", f"fusion {fusion_mib} MiB, cycle {cycle_ms:g} ms", env=tuned),
        Row("1gbit", "autotune", env=autotune_env(str(work / "autotune-1gbit.csv")), steps_factor=3),
        Row("250mbit", "defaults"),
        Row("250mbit", "fp16 compression", flags=fp16),
    ]
    if timeline:
        rows += [Row(link, "defaults, timeline", timeline=True) for link in LINKS]
    return rows


def local_rows(candidates: list[dict], timeline: bool = False) -> list[Row]:
    """One host, unpinned, as bench finetune runs: 1 rank and 2 ranks, with the runtime's defaults
    and with each candidate env."""
    rows = [Row("local", "1 rank", ranks=1), Row("local", "2 ranks, defaults")]
    for env in candidates:
        label = ", ".join(f"{k}={v}" for k, v in env.items())
        rows += [Row("local", f"1 rank, {label}", env=env, ranks=1), Row("local", f"2 ranks, {label}", env=env)]
    if timeline:
        rows.append(Row("local", "2 ranks, defaults, timeline", timeline=True))
    return rows


# ---------------------------------------------------------------- pure parts (unit-tested)

def parse_tuning(text: str) -> tuple[int, float]:
    """"32:10" -> (32, 10.0): a fusion threshold in MiB and a cycle time in ms."""
    try:
        fusion, cycle = text.split(":")
        parsed = int(fusion), float(cycle)
    except ValueError:
        raise ValueError(f"expected FUSION_MIB:CYCLE_MS such as 32:10, got {text!r}") from None
    if parsed[0] < 0 or parsed[1] <= 0:
        raise ValueError(f"expected a fusion threshold >= 0 MiB and a cycle time > 0 ms, got {text!r}")
    return parsed


def timeline_phases(events: list[dict], skip_steps: int) -> dict:
    """Where a Horovod timeline's steps went: per activity, the wall seconds during which at least
    one tensor was in it, per step, over the steps after the first `skip_steps`.

    The timeline models each tensor as a process (pid) going through top-level phases, NEGOTIATE_X
    then X (ALLREDUCE, ALLGATHER, ...), with activities nested in X (MEMCPY_IN_FUSION_BUFFER,
    MPI_ALLREDUCE, ...). A gradient's k-th collective is step k's, and its k-th negotiation precedes it.
    "communication" is the union of the collectives themselves (negotiation excluded).
    """
    stacks: dict[int, list] = defaultdict(list)
    collectives = Counter()  # pid -> collectives started
    spans: dict[str, list] = defaultdict(list)
    for event in events:
        phase, pid = event.get("ph"), event.get("pid")
        if phase == "B":
            stack = stacks[pid]
            if stack:
                step = stack[-1][2]
            else:
                step = collectives[pid]
                if not event["name"].startswith("NEGOTIATE_"):
                    collectives[pid] += 1
            stack.append((event["name"], event["ts"], step))
        elif phase == "E" and stacks[pid]:
            name, start, step = stacks[pid].pop()
            if step >= skip_steps:
                spans[name].append((start, event["ts"]))
                if not stacks[pid] and not name.startswith("NEGOTIATE_"):
                    spans["communication"].append((start, event["ts"]))
    steps = max(collectives.values(), default=0) - skip_steps
    if steps <= 0:
        return {"steps": 0, "per_step_seconds": {}}
    return {"steps": steps,
            "per_step_seconds": {name: union_length(s) / 1e6 / steps for name, s in sorted(spans.items())}}


def union_length(spans: list[tuple[float, float]]) -> float:
    """Total length covered by possibly overlapping [start, end] spans."""
    total, reach = 0.0, None
    for start, end in sorted(spans):
        if reach is None or start > reach:
            total += end - start
            reach = end
        elif end > reach:
            total += end - reach
            reach = end
    return total


def read_timeline(path: Path) -> list[dict]:
    """A Horovod timeline file (a JSON array, closed after every event; "" or absent: no events)."""
    text = path.read_text().strip() if path.is_file() else ""
    if not text:
        return []
    try:
        return json.loads(text)
    except json.JSONDecodeError:  # cut mid-event by an exit: keep the complete ones
        return json.loads(text[:text.rfind("},") + 1] + "]")


def goal_table(allreduce: dict, scaling: dict, links: dict) -> dict:
    """The issue's two goals, each with its measured value, bound and verdict."""
    table = {}
    one = allreduce.get("1gbit", {}).get("defaults", {}).get("methods", {}).get("hvd", {}).get("64")
    if one:
        rate = links["1gbit"].rate_bytes_per_s()
        table["allreduce 64 MiB bus bandwidth / 1 Gbit/s link rate"] = report_mod.goal(
            one["bus_Bps"] / rate, ">=", 0.85, fastest_call=one["best_bus_Bps"] / rate)
    ten = scaling.get("10gbit/defaults")
    if ten is not None:
        table["finetune 2 hosts / 1 host, 10 Gbit/s"] = report_mod.goal(ten, ">=", 1.7)
    return table


def scaling_ratios(results: dict, baseline_rates: list[float]) -> dict:
    """Each 2-host fine-tuning row's samples/s over the 1-host baseline's (the mean of its runs)."""
    base = statistics.fmean(baseline_rates)
    return {key: r["records_per_s"] / base for key, r in results.items() if _two_hosts(key, r)}


def fastest_step_ratios(results: dict) -> dict:
    """The same ratios from each run's fastest step (2 x batch / its time over batch / the baseline
    runs' fastest): what the runs reach in the moments this shared machine leaves them alone."""
    base = min(min(r["step_seconds"]) for key, r in results.items() if key.startswith("1host/"))
    return {key: r["ranks"] * base / min(r["step_seconds"]) for key, r in results.items() if _two_hosts(key, r)}


def _two_hosts(key: str, result: dict) -> bool:
    return result.get("ranks") == 2 and key.split("/")[0] in LINKS


# ---------------------------------------------------------------- orchestration

def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _cluster_env(cluster, scratch: Path, np_: int, extra: dict) -> dict:
    env = cluster_mod.launch_env(cluster, scratch, "mpirun", np_)
    for key in report_mod.CLEAR_ENV:
        env.pop(key, None)
    # launch/run.sh runs `$HVDINFER ARGS` on every rank: here the bench worker under this Python.
    env.update(TF_CPP_MIN_LOG_LEVEL="2", OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               HVDINFER=sys.executable, FORWARD_ENV=" ".join(extra), **extra)
    return env


def run_worker(name: str, flags: list[str], env: dict, cluster=None, np_: int = 1, timeout: float = 600) -> dict:
    """One worker run, on the cluster's hosts or (cluster None) on this host under mpirun; its JSON
    result with the load average before and after."""
    before = load()
    if cluster is not None:
        wire_before = cluster_mod.switch_cpu_seconds(cluster)
        with tempfile.TemporaryDirectory(prefix="hvdinfer-comm-") as scratch:
            cmd = cluster_mod.command(cluster, ["-m", "hvdinfer.bench", "worker", *flags])
            result = report_mod.run_json(name, cmd, _cluster_env(cluster, Path(scratch), np_, env), timeout)
        if cluster.shaping.startswith("wire"):
            result["wire_cpu_s"] = round(cluster_mod.switch_cpu_seconds(cluster) - wire_before, 2)
    else:
        cmd = report_mod.mpirun_prefix(np_) + report_mod.worker_command(flags)  # local ranks inherit env
        result = report_mod.run_json(name, cmd, report_mod.bench_env(**env), timeout)
    return {**result, "load_before": before, "load_after": load()}


def allreduce_flags(methods, sizes, repeats: int) -> list[str]:
    return ["--mode", "allreduce", "--methods", ",".join(methods), "--sizes-mib", ",".join(map(str, sizes)),
            "--repeats", str(repeats)]


def finetune_flags(steps: int, row: Row) -> list[str]:
    return ["--mode", "train", "--threads", "1", "--records", str(steps * row.steps_factor),
            "--batch", str(FINETUNE["batch"]), "--seq", str(FINETUNE["seq"]), "--model-size", FINETUNE["model_size"],
            *row.flags]


def run_finetune(row: Row, steps: int, work: Path, cluster=None) -> dict:
    key = f"{row.link}/{row.name}"
    timeline = work / (key.replace("/", "-").replace(" ", "_").replace(",", "") + ".timeline.json")
    timeline.unlink(missing_ok=True)
    env = dict(row.env)
    if row.timeline:
        env["HOROVOD_TIMELINE"] = str(timeline)
    print(f"finetune {key} ...", flush=True)
    result = run_worker(key, finetune_flags(steps, row), env, cluster, row.ranks)
    result.update(link=row.link, variant=row.name, ranks=row.ranks, env=row.env, flags=list(row.flags))
    if row.timeline:
        result["timeline"] = timeline_phases(read_timeline(timeline), WARMUP_STEPS)
        timeline.unlink(missing_ok=True)  # megabytes each: the summary is what the report keeps
    step = statistics.median(result["step_seconds"])
    print(f"  {key:44s} {result['records_per_s']:7.2f} samples/s, step {step:.3f} s  "
          f"(load {result['load_before'][0]:.1f})", flush=True)
    for phase, seconds in result.get("timeline", {}).get("per_step_seconds", {}).items():
        print(f"    timeline {phase:38s} {seconds * 1e3:8.1f} ms/step", flush=True)
    return result


def bench_comm(out: Path, parts: list[str], steps: int, calls: int, tuning: tuple[int, float],
               local_candidates: list[dict], timeline: bool = False) -> dict:
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise ValueError(f"unknown comm parts {sorted(unknown)}; known: {', '.join(PARTS)}")
    work = out / "comm-work"
    work.mkdir(parents=True, exist_ok=True)
    report = {"bench": "comm", **report_mod.machine(), "cores": os.cpu_count(), "load_before": load(),
              "cpus_per_host": 1, "links": {k: {"asked": dataclasses.asdict(v)} for k, v in LINKS.items()},
              "finetune_workload": {**FINETUNE, "steps": steps, "warmup_steps": WARMUP_STEPS, "threads_per_rank": 1},
              "allreduce": {}, "finetune": {}, "local": {}}
    reason = cluster_mod.available() if {"allreduce", "finetune"} & set(parts) else None
    if reason:
        print(f"bench comm: the namespace parts are skipped: {reason}", flush=True)
        report["skipped"] = reason
    name = f"cb{os.getpid() % 10**6}"
    if "finetune" in parts and not reason:
        report["finetune"]["1host/first"] = _baseline(steps, work, name)
    for link, shape in LINKS.items():
        if reason or not {"allreduce", "finetune"} & set(parts):
            break
        with cluster_mod.running(2, 1, shape, name, cpus_per_host=1) as cluster:
            report["links"][link]["shaping"] = cluster.shaping
            print(f"{link}: {cluster.shaping}", flush=True)
            if "allreduce" in parts and link in ALLREDUCE_LINKS:
                report["allreduce"][link] = {}
                for label, (env, methods) in LINK_RUNS.items():
                    print(f"allreduce over 2 hosts, {link}, {label} ...", flush=True)
                    measured = run_worker(f"allreduce {link} {label}", allreduce_flags(methods, SIZES_MIB, calls), env,
                                          cluster, 2)
                    report["allreduce"][link][label] = measured
                    _print_allreduce(measured, shape.rate_bytes_per_s())
            if "finetune" in parts:
                for row in finetune_rows(tuning, work, timeline):
                    if row.link == link:
                        report["finetune"][f"{link}/{row.name}"] = run_finetune(row, steps, work, cluster)
    if "finetune" in parts and not reason:
        report["finetune"]["1host/last"] = _baseline(steps, work, name)
        autotune_log = work / "autotune-1gbit.csv"
        if autotune_log.is_file():
            report["autotune_log"] = autotune_log.read_text().splitlines()
    if "local" in parts:
        for label, env in LOCAL_ENVS.items():
            print(f"allreduce on one host, 2 ranks, {label} ...", flush=True)
            measured = run_worker(f"local {label}", allreduce_flags(LOCAL_METHODS, (16,), calls * 2), env, None, 2)
            report["local"][label] = measured
            _print_allreduce(measured, None)
        print("allreduce on one host, 2 ranks, MPI from the main thread beside Horovod ...", flush=True)
        measured = run_worker("local beside", allreduce_flags(BESIDE_METHODS, (16,), calls * 2), {}, None, 2)
        report["local_mpi_beside_hvd"] = measured
        _print_allreduce(measured, None)
        for row in local_rows(local_candidates, timeline):
            report["finetune"][f"local/{row.name}"] = run_finetune(row, steps, work)
    baselines = [r["records_per_s"] for k, r in report["finetune"].items() if k.startswith("1host/")]
    report["scaling"] = scaling_ratios(report["finetune"], baselines) if baselines else {}
    report["scaling_fastest_step"] = fastest_step_ratios(report["finetune"]) if baselines else {}
    local = {k: r["records_per_s"] for k, r in report["finetune"].items() if k.startswith("local/")}
    if "local/1 rank" in local:
        report["scaling"].update({k: v / local["local/1 rank"] for k, v in local.items() if k != "local/1 rank"})
    if len(baselines) == 2:
        report["baseline_drift"] = baselines[1] / baselines[0]
    report["goals"] = goal_table(report["allreduce"], report["scaling"], LINKS)
    report["load_after"] = load()
    _print_summary(report)
    report_mod.write_report(report, out, "comm", plot_comm)
    return report


def _baseline(steps: int, work: Path, name: str) -> dict:
    with cluster_mod.running(1, 1, cluster_mod.Shape(), name, cpus_per_host=1) as cluster:
        return run_finetune(Row("1host", "1 host x 1 rank", ranks=1), steps, work, cluster)


def _print_allreduce(measured: dict, rate: float | None) -> None:
    for method, sizes in measured["methods"].items():
        for mib, figure in sizes.items():
            share = f" ({figure['bus_Bps'] / rate:.2f} of the link, fastest call {figure['best_bus_Bps'] / rate:.2f})" \
                if rate else ""
            print(f"  {method:22s} {mib:>3s} MiB {figure['seconds'] * 1e3:8.2f} ms (fastest "
                  f"{figure['min_seconds'] * 1e3:7.2f})  {figure['bus_Bps'] / 1e9:6.3f} GB/s{share}", flush=True)


def _print_summary(report: dict) -> None:
    if report["scaling"]:
        print("fine-tuning samples/s over the baseline (2 hosts / 1 host; local: 2 ranks / 1 rank), "
              "and from the fastest steps:")
        for key, value in report["scaling"].items():
            fastest = report["scaling_fastest_step"].get(key)
            print(f"  {key:44s} {value:.2f}x" + (f"  {fastest:.2f}x" if fastest else ""))
    if "baseline_drift" in report:
        print(f"  (1-host baseline, last run / first run: {report['baseline_drift']:.2f})")
    for name, goal in report["goals"].items():
        print(f"goal: {name:52s} {goal['value']:.2f} (goal {goal['goal']}: {'met' if goal['met'] else 'NOT MET'})")


def plot_comm(report: dict, path: Path) -> None:
    plt = report_mod.pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    ax = axes[0]
    labels, values, colors = [], [], []
    for link, runs in report["allreduce"].items():
        rate = cluster_mod.Shape(**report["links"][link]["asked"]).rate_bytes_per_s()
        for label, measured in runs.items():
            methods = ("mpi4py alone", "hvd") if label == "defaults" else ("hvd",)
            for method in methods:
                for mib, figure in measured["methods"].get(method, {}).items():
                    name = "mpi4py" if method == "mpi4py alone" else "hvd" if label == "defaults" else "hvd, TF alloc"
                    labels.append(f"{link}\n{name}\n{mib} MiB")
                    values.append(figure["bus_Bps"] / rate)
                    colors.append("#4c72b0" if name == "mpi4py" else "#dd8452" if name == "hvd" else "#c44e52")
    if values:
        bars = ax.bar(range(len(values)), values, color=colors)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
        ax.set_xticks(range(len(values)), labels, fontsize=6)
        ax.axhline(0.85, color="k", ls="--", lw=1)
    ax.set_ylabel("bus bandwidth / link rate")
    ax.set_title("allreduce, 2 hosts x 1 rank (goal: 0.85 at 1 Gbit/s, 64 MiB)", fontsize=9)
    ax = axes[1]
    names = list(report["scaling"])
    if names:
        bars = ax.barh(range(len(names)), [report["scaling"][n] for n in names],
                       color=[LINK_COLORS.get(n.split("/")[0], "#55a868") for n in names])
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
        ax.set_yticks(range(len(names)), names, fontsize=7)
        ax.axvline(1.7, color="k", ls="--", lw=1)
        ax.invert_yaxis()
    ax.set_xlabel("samples/s over 1 rank")
    ax.set_title(f"fine-tuning {report['finetune_workload']['model_size']}, 1 core per host", fontsize=9)
    ax = axes[2]
    envs = list(report["local"])
    if envs:
        methods = list(report["local"][envs[0]]["methods"])
        width = 0.8 / len(envs)
        for i, env in enumerate(envs):
            figures = report["local"][env]["methods"]
            ax.bar(np.arange(len(methods)) + i * width, [figures[m]["16"]["best_bus_Bps"] / 1e9 for m in methods],
                   width, label=env)
        ax.set_xticks(np.arange(len(methods)) + 0.4 - width / 2, methods, rotation=30, ha="right", fontsize=7)
        ax.legend(fontsize=7)
    ax.set_ylabel("GB/s (bus), fastest call")
    ax.set_title("one host, 2 ranks, 16 MiB allreduce", fontsize=9)
    fig.suptitle(f"bench comm: {report['cpu_model']}, {report['cores']} cores, load {report['load_before'][0]:.1f}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- worker (one allreduce run, every rank)

def worker(args) -> int:
    """Each method's allreduce of each size: warm-up calls, then `repeats` rounds in which every
    method is called once after a barrier (interleaved, so all see the same load); rank 0 prints
    the median and fastest seconds and bus bandwidths per method and size as JSON. "mpi4py alone"
    runs first, before Horovod starts its background thread; the rest after hvd.init()."""
    # Open MPI reads this at MPI_Init: the runtime's setting, so mpi4py alone waits as it does.
    os.environ.setdefault("OMPI_MCA_mpi_yield_when_idle", "1")
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    methods = [m for m in args.methods.split(",") if m]
    sizes = [int(s) for s in args.sizes_mib.split(",") if s]
    results: dict = {m: {} for m in methods}
    if "mpi4py alone" in methods:
        for mib in sizes:
            host = np.full(mib * 2**20 // 4, 1.0, np.float32)
            received = np.empty_like(host)
            seconds = _time_rounds({"mpi4py alone": lambda: comm.Allreduce(host, received, op=MPI.SUM)},
                                   comm.Barrier, args.repeats)
            results["mpi4py alone"][str(mib)] = _figures(seconds["mpi4py alone"], host.nbytes, comm.Get_size())
    import horovod.tensorflow as hvd
    import tensorflow as tf

    from hvdinfer import runtime

    rt = runtime.init_runtime(runtime.RuntimeConfig())
    for mib in sizes:
        host = np.full(mib * 2**20 // 4, 1.0, np.float32)
        tensor = tf.constant(host)
        calls = _calls(hvd, tf, comm, MPI, host, tensor, tf.split(tensor, 64))
        timed = _time_rounds({m: calls[m] for m in methods if m != "mpi4py alone"}, comm.Barrier, args.repeats)
        for method, seconds in timed.items():
            results[method][str(mib)] = _figures(seconds, host.nbytes, rt.size)
    if rt.is_coordinator:
        print(json.dumps({"ranks": rt.size, "hosts": rt.cross_size, "repeats": args.repeats,
                          "env": {k: v for k, v in os.environ.items() if k.startswith("HOROVOD_")},
                          "cores_per_rank": runtime.host_cores(), "methods": results}), flush=True)
    return 0


def _figures(seconds: list[float], nbytes: int, ranks: int) -> dict:
    median = statistics.median(seconds)
    return {"seconds": median, "min_seconds": min(seconds), "bus_Bps": bus_bandwidth(nbytes, median, ranks),
            "best_bus_Bps": bus_bandwidth(nbytes, min(seconds), ranks)}


def _calls(hvd, tf, comm, MPI, host, tensor, parts) -> dict:
    received = np.empty_like(host)
    return {
        # The same call as "mpi4py alone", with Horovod's background thread negotiating beside it.
        "mpi4py beside hvd": lambda: comm.Allreduce(host, received, op=MPI.SUM),
        "mpi4py fresh output": lambda: comm.Allreduce(host, np.empty_like(host), op=MPI.SUM),
        "hvd": lambda: hvd.allreduce(tensor, op=hvd.Sum),
        "hvd+numpy": lambda: hvd.allreduce(tensor, op=hvd.Sum).numpy(),  # doctor --selftest's way
        "hvd from numpy": lambda: hvd.allreduce(tf.convert_to_tensor(host), op=hvd.Sum),
        "hvd average": lambda: hvd.allreduce(tensor, op=hvd.Average),  # what DistributedOptimizer asks
        "hvd 64 tensors": lambda: hvd.grouped_allreduce(parts, op=hvd.Sum),  # fused, as gradients are
    }


def _time_rounds(calls: dict, barrier, repeats: int, warmup: int = 2) -> dict[str, list[float]]:
    """Seconds of every call, `repeats` rounds of each method once, after `warmup` calls of each."""
    for call in calls.values():
        for _ in range(warmup):
            call()
    seconds: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            barrier()
            start = time.perf_counter()
            call()
            seconds[name].append(time.perf_counter() - start)
    return seconds
