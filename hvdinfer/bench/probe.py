"""A probed `hvdinfer infer` or `hvdinfer generate`: the real job, with timers wrapped around its phases
from outside the task code, and each rank's peak RSS. The engine, peer and generate benches launch
it in place of the `hvdinfer` script (one process per rank, under mpirun, as always):

    mpirun -np 2 ... python -m hvdinfer.bench probe --out DIR -- infer --model ... --output out.npy

Each rank writes DIR/rank-R.json: when its process started, how long the interpreter and
TensorFlow took to import, then for every probed function (PROBES for infer, GENERATE_PROBES for
generate) the number of calls, their total seconds, the first call's seconds (where a graph is
traced) and the first start and last end (wall clock, so phases line up with the launcher's own
clock), and `peak_rss_mb` (getrusage: the process's high-water mark, which polling would miss).
Functions that run on helper threads (prepare, journal writes) overlap the main thread's compute;
their totals say how busy that thread was, not how much wall time they took.
"""
from __future__ import annotations

import functools
import importlib
import json
import os
import resource
import shutil
import sys
import threading
import time
from pathlib import Path

from hvdinfer.bench import report as report_mod

# (module, attribute path, phase): the functions `hvdinfer infer` calls through module attributes,
# so replacing the attribute times every call.
PROBES = (
    ("hvdinfer.engine.job", "start", "runtime start (MPI, Horovod, threads, watchdog)"),
    ("hvdinfer.runtime", "resolve_precision", "precision agreement"),
    ("hvdinfer.tasks.infer", "load_model", "model load"),
    ("hvdinfer.tasks.infer", "warm_up", "trace"),
    ("hvdinfer.tasks.text_job", "plan_job", "plan (coordinator: index + check + send; workers: wait)"),
    ("hvdinfer.tasks.text_job", "index_input", "indexing"),
    ("hvdinfer.tasks.text_job", "check_records", "record check (--on-error fail)"),
    ("hvdinfer.engine.journal", "DiskJournal.__init__", "journal open"),
    ("hvdinfer.engine.runner", "run_chunks", "chunks (all ranks)"),
    ("hvdinfer.tasks.infer", "TextChunks.prepare", "parse + tokenise + batch (helper thread)"),
    ("hvdinfer.tasks.infer", "TextChunks.compute", "model forward"),
    ("hvdinfer.engine.journal", "DiskJournal.put", "journal writes (writer thread)"),
    ("hvdinfer.engine.journal", "DiskJournal.read", "journal reads"),
    ("hvdinfer.engine.journal", "DiskJournal.close", "journal removal"),
    ("hvdinfer.engine.journal", "MemoryJournal.put", "in-memory results (writer thread)"),
    ("hvdinfer.tasks.infer", "write_output", "output writing"),
    ("hvdinfer.engine.runner", "finish", "finish (summary to every rank)"),
)
# The same for `hvdinfer generate`, down to the decoder's phases (models/decoding.py).
GENERATE_PROBES = (
    ("hvdinfer.engine.job", "start", "runtime start (MPI, Horovod, threads, watchdog)"),
    ("hvdinfer.runtime", "resolve_precision", "precision agreement"),
    ("hvdinfer.tasks.generate", "load_model", "model load"),
    ("hvdinfer.tasks.text_job", "plan_job", "plan (coordinator: index + check + send; workers: wait)"),
    ("hvdinfer.tasks.text_job", "index_input", "indexing"),
    ("hvdinfer.tasks.text_job", "check_records", "record check (--on-error fail)"),
    ("hvdinfer.engine.journal", "DiskJournal.__init__", "journal open"),
    ("hvdinfer.engine.runner", "run_chunks", "chunks (all ranks)"),
    ("hvdinfer.tasks.generate", "PromptChunks.prepare", "parse + tokenise + batch (helper thread)"),
    ("hvdinfer.tasks.generate", "PromptChunks.compute", "generate the chunk's batches"),
    ("models.decoding", "generate_batch", "one batch"),
    ("models.decoding", "_CachedSteps.first", "prefill"),
    ("models.decoding", "_CachedSteps.next", "decode step"),
    ("models.decoding", "_RecomputeSteps.first", "first full forward (no cache)"),
    ("models.decoding", "_RecomputeSteps.next", "full forward per token (no cache)"),
    ("models.decoding", "choose_tokens", "host sampling + stop rules"),
    ("hvdinfer.engine.journal", "DiskJournal.put", "journal writes (writer thread)"),
    ("hvdinfer.engine.journal", "DiskJournal.read", "journal reads"),
    ("hvdinfer.engine.journal", "DiskJournal.close", "journal removal"),
    ("hvdinfer.engine.journal", "MemoryJournal.put", "in-memory results (writer thread)"),
    ("hvdinfer.tasks.generate", "write_output", "output writing"),
    ("hvdinfer.engine.runner", "finish", "finish (summary to every rank)"),
)
PROBES_BY_COMMAND = {"infer": PROBES, "generate": GENERATE_PROBES}


def process_start_epoch() -> float:
    """When this process was created (the kernel's start time, 10 ms resolution), as time.time()."""
    fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    started = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22 of stat(5), seconds since boot
    uptime = float(Path("/proc/uptime").read_text().split()[0])
    return time.time() - (uptime - started)


class Timers:
    def __init__(self):
        self.calls: dict[str, dict] = {}
        self.lock = threading.Lock()

    def wrap(self, name: str, fn):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            start = time.time()
            try:
                return fn(*args, **kwargs)
            finally:
                end = time.time()
                with self.lock:
                    entry = self.calls.setdefault(name, {"calls": 0, "seconds": 0.0, "first_start": start,
                                                         "first_call_seconds": end - start})
                    entry["calls"] += 1
                    entry["seconds"] += end - start
                    entry["last_end"] = end
        return timed

    def install(self, probes=PROBES) -> None:
        for module_name, attr, _ in probes:
            owner = importlib.import_module(module_name)
            *path, name = attr.split(".")
            for part in path:
                owner = getattr(owner, part)
            if not hasattr(owner, name):
                raise RuntimeError(f"bench probe: {module_name}.{attr} is gone; update hvdinfer/bench/probe.py")
            setattr(owner, name, self.wrap(attr, getattr(owner, name)))


def run(out: Path, argv: list[str]) -> int:
    """`hvdinfer ARGV` on this rank with the command's probes installed; the rank's timings to OUT/rank-R.json."""
    started = time.time()
    import tensorflow  # noqa: F401 - the import the job would otherwise pay inside the runtime start

    imported_tf = time.time()
    from hvdinfer import cli

    timers = Timers()
    timers.install(PROBES_BY_COMMAND.get(argv[0] if argv else "", PROBES))
    imported = time.time()
    rc = cli.main(argv)
    rank = int(os.environ.get("OMPI_COMM_WORLD_RANK", os.environ.get("HOROVOD_RANK", "0")))
    out.mkdir(parents=True, exist_ok=True)
    record = {"rank": rank, "process_start": process_start_epoch(), "probe_start": started,
              "tensorflow_imported": imported_tf, "hvdinfer_imported": imported, "main_returned": time.time(),
              "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "calls": timers.calls}
    tmp = out / f".rank-{rank}.json.tmp"
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, out / f"rank-{rank}.json")
    return rc


def read(out: Path) -> dict[int, dict]:
    """Every rank's record from a probed run, by rank."""
    return {r["rank"]: r for r in (json.loads(p.read_text()) for p in sorted(out.glob("rank-*.json")))}


# ---------------------------------------------------------------- the launcher's side

def command(np_: int, out: Path, argv: list[str]) -> list[str]:
    """mpirun -np N python -m hvdinfer.bench probe --out OUT -- ARGV."""
    return report_mod.mpirun_prefix(np_) + [sys.executable, "-m", "hvdinfer.bench", "probe", "--out", str(out),
                                            "--", *argv]


def launch(np_: int, argv: list[str], out: Path, timeout: float = 900, **env: str) -> dict:
    """A probed `hvdinfer ARGV --quiet --metrics-json OUT/metrics.json` (infer or generate) on np_ ranks, to the end:
    the launcher's wall seconds (mpirun start to exit), the job's summary and every rank's record."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    metrics = out / "metrics.json"
    launched = time.time()
    proc = report_mod.run_to_end(command(np_, out, [*argv, "--quiet", "--metrics-json", str(metrics)]),
                                 report_mod.bench_env(**env), timeout)
    ended = time.time()
    if proc.returncode:
        raise RuntimeError(f"probed hvdinfer {' '.join(argv[:1])} failed (exit {proc.returncode}):\n"
                           f"{proc.stderr[-2000:]}")
    return {"launched": launched, "ended": ended, "wall_seconds": ended - launched,
            "metrics": json.loads(metrics.read_text()), "ranks": read(out)}


def seconds(rank: dict, name: str) -> float:
    return rank["calls"].get(name, {}).get("seconds", 0.0)


def startup_phases(run: dict) -> dict[str, float]:
    """The coordinator's phases from the launch to its model being loaded."""
    r0 = run["ranks"][0]
    return {
        "launch (mpirun to rank 0 process)": r0["process_start"] - run["launched"],
        "interpreter start": r0["probe_start"] - r0["process_start"],
        "import tensorflow": r0["tensorflow_imported"] - r0["probe_start"],
        "import hvdinfer": r0["hvdinfer_imported"] - r0["tensorflow_imported"],
        "runtime start (MPI, Horovod, watchdog)": seconds(r0, "start"),
        "precision agreement": seconds(r0, "resolve_precision"),
        "model load": seconds(r0, "load_model"),
    }


def planning_phases(run: dict) -> dict[str, float]:
    """The coordinator's phases from indexing the input to the journal being open."""
    s = functools.partial(seconds, run["ranks"][0])
    return {
        "indexing": s("index_input"),
        "record check": s("check_records"),
        "plan to workers": s("plan_job") - s("index_input") - s("check_records"),
        "journal open": s("DiskJournal.__init__"),
    }


def ending_phases(run: dict) -> dict[str, float]:
    """The coordinator's phases from its last chunk to the launcher's exit."""
    s = functools.partial(seconds, run["ranks"][0])
    return {
        "output writing (journal reads included)": s("write_output"),
        "journal removal": s("DiskJournal.close"),
        "exit (MPI finalize, mpirun)": run["ended"] - run["ranks"][0]["main_returned"],
    }


def breakdown(run: dict) -> dict[str, float]:
    """Where the coordinator's wall time went, launch to exit, in order; the phases add up to the
    launcher's wall time (`other` is what falls between probed calls). `overlapped` items ran on
    helper threads during the chunks and are already inside them."""
    r0 = run["ranks"][0]
    s = functools.partial(seconds, r0)
    chunks = s("run_chunks")
    phases = {
        **startup_phases(run),
        "trace (first forward)": s("warm_up"),
        **planning_phases(run),
        "chunks: rank 0 model forward": s("TextChunks.compute"),
        "chunks: rank 0 other (waiting for workers, test sleeps, hand-offs)": chunks - s("TextChunks.compute"),
        **ending_phases(run),
    }
    phases["other"] = run["wall_seconds"] - sum(phases.values())
    overlapped = {"tokenise (rank 0 helper thread)": s("TextChunks.prepare"),
                  "journal writes (rank 0 writer thread)": s("DiskJournal.put"),
                  "journal reads (inside output writing)": s("DiskJournal.read")}
    return {"phases": phases, "overlapped": overlapped}
