"""What every job over a text file shares, whatever it computes per record (embeddings, class
scores, generated text): the coordinator indexes the input once and checks its records, every
rank learns the plan, the journal opens (or resumes), the chunks run on the engine, and the
coordinator learns what was computed and how fast.

A task supplies the `runner.ChunkTask` (parse, tokenise, run the model on one chunk), the job's
identity (everything that changes a chunk's result) and the writer of its output.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import shutil
import time
from pathlib import Path
from typing import Any

from hvdinfer import assets, output, runtime
from hvdinfer.data import chunks, readers
from hvdinfer.engine import journal as journal_mod, link as link_mod, runner, schedule as schedule_mod, watchdog
from hvdinfer.engine.job import Job
from hvdinfer.engine.progress import Progress
from hvdinfer.parallel.dims import ParallelConfig
from hvdinfer.runtime import JobError

LOG = runtime.LOG
CHUNKS_PER_JOB = 128  # auto chunk size: about this many chunks, so dynamic allocation can balance
ON_ERROR = ("fail", "skip")


@dataclasses.dataclass(frozen=True)
class TextJobConfig:
    """The settings every job over a text file takes; a task's config adds its own."""

    model: str
    """A model id (see hvdinfer.assets.ASSETS) or a model directory."""
    input: Path
    """JSONL, CSV/TSV with a header, or plain text (one record per line); .gz/.bz2 too."""
    output: Path
    """The task's output file, in input order; OUTPUT.parts/ is its journal."""
    batch_size: int = 64
    """Records per batch."""
    text_field: str = "text"
    """Field (JSONL) or column (CSV/TSV) holding the text."""
    id_field: str = "id"
    """Field or column holding the record id; the 0-based record index when absent."""
    input_format: str | None = None
    """Override the format the extension implies: jsonl, csv, tsv, text."""
    on_error: str = "fail"
    """fail: stop before any compute if any record is bad; skip: keep it as an error row and go on."""
    quiet: bool = False
    """No progress and no summary."""
    metrics_json: Path | None = None
    """Also write the job's summary (counts, rates, seconds) to this JSON file."""
    precision: str = "auto"
    """auto (bf16 only where the hardware computes it natively), fp32, or bf16 compute."""
    schedule: str = "dynamic"
    """dynamic: chunks on demand, a slower rank takes fewer; static: chunk c on rank c % ranks."""
    chunk_size: int = 0
    """Records per chunk (a multiple of 64); 0 = about 1/128 of the input, at least 4 batches."""
    resume: bool = False
    """Reuse the finished chunks in OUTPUT.parts/ of an interrupted run of this same job."""
    journal: bool = True
    """False: hold results in memory instead (no resume; for small jobs and benchmarks)."""
    stall_timeout: float = watchdog.DEFAULT_TIMEOUT_S
    """End the job when a rank makes no progress for this many seconds."""
    progress_interval: float = 30.0
    """Seconds between progress lines when stderr is not a terminal."""
    parallel: ParallelConfig = ParallelConfig()
    """Model parallelism (--pp, --tp, --micro-batches, --plan); default: the model whole on every rank."""

    OUTPUT_SUFFIXES = (".jsonl", ".parquet")

    def __post_init__(self):
        for name, allowed in (("precision", runtime.PRECISIONS), ("on_error", ON_ERROR),
                              ("schedule", schedule_mod.KINDS)):
            if getattr(self, name) not in allowed:
                raise JobError(f"--{name.replace('_', '-')} must be one of {', '.join(allowed)}, "
                               f"not {getattr(self, name)!r}")
        if self.batch_size < 1:
            raise JobError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.chunk_size < 0 or self.chunk_size % chunks.GRANULE:
            raise JobError(f"--chunk-size must be 0 (auto) or a positive multiple of {chunks.GRANULE}, "
                           f"got {self.chunk_size}")
        if self.output.suffix not in self.OUTPUT_SUFFIXES:
            *most, last = self.OUTPUT_SUFFIXES
            raise JobError(f"--output {self.output}: use a {', '.join(most)} or {last} file")
        if self.resume and not self.journal:
            raise JobError("--resume needs the journal; drop --no-journal")
        if self.stall_timeout <= 0 or self.progress_interval <= 0:
            raise JobError("--stall-timeout and --progress-interval must be > 0 seconds")


def auto_chunk_size(records: int, batch_size: int, most: int) -> int:
    """About CHUNKS_PER_JOB chunks, each at least 4 batches and at most `most` records (unless 4
    batches need more), a multiple of the index granule."""
    granule = chunks.GRANULE
    want = max(-(-records // CHUNKS_PER_JOB), 4 * batch_size)
    size = -(-want // granule) * granule
    return min(size, max(most, -(-4 * batch_size // granule) * granule))


# --- model ----------------------------------------------------------------------------------------
def resolve_model_dir(model: str) -> Path:
    """A registered model id (fetched and verified into the cache) or a model directory."""
    try:
        model_dir = assets.resolve_model(model) if model in assets.ASSETS else Path(model)
    except assets.AssetError as exc:
        raise JobError(str(exc)) from None
    if not model_dir.is_dir():
        raise JobError(f"--model {model}: not a known model id ({', '.join(assets.ASSETS)}) nor a model directory")
    return model_dir


def model_digest(model_dir: Path) -> str:
    """sha256 over the files that decide the outputs (weights, config, tokenizer, head)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in model_dir.rglob("*") if p.is_file() and not p.name.startswith(".")):
        digest.update(path.relative_to(model_dir).as_posix().encode() + b"\0")
        with open(path, "rb") as fh:
            while block := fh.read(1 << 20):
                digest.update(block)
    return digest.hexdigest()


# --- input ----------------------------------------------------------------------------------------
def index_input(cfg: TextJobConfig) -> chunks.InputIndex:
    """Coordinator: the input's index; compressed input is decompressed once into the journal dir."""
    spill = journal_mod.journal_dir(cfg.output)
    try:
        with watchdog.quiet(f"indexing {cfg.input}"):
            return chunks.index_input(cfg.input, cfg.input_format, cfg.text_field, None,
                                      spill_dir=spill if compressed(cfg.input) else None)
    except readers.InputError as exc:
        raise JobError(str(exc)) from None


def compressed(path: Path) -> bool:
    return path.suffix in (".gz", ".bz2")


def check_records(cfg: TextJobConfig, index: chunks.InputIndex, plan: list[chunks.Chunk]) -> None:
    """With --on-error fail: every record parsed before any compute; the first bad one ends the job
    naming file, line and field (with --on-error skip bad records are counted as chunks compute).
    The journal notes the input that passed, so a --resume of the job does not parse it all again."""
    if cfg.on_error == "skip":
        return
    checked = {"input": index.identity(), "text_field": cfg.text_field, "id_field": cfg.id_field}
    parts = journal_mod.journal_dir(cfg.output)
    if cfg.resume and cfg.journal and journal_mod.records_checked(parts, checked):
        runtime.LOG.info("--resume: every record of %s was checked when this job began; not parsed again", cfg.input)
        return
    first, count = None, 0
    for chunk in plan:
        watchdog.beat(f"checking records of chunk {chunk.id}")
        for record in chunks.parse_chunk(index, chunk, chunks.read_chunk_bytes(index, chunk), cfg.text_field,
                                         cfg.id_field):
            if not record.ok:
                first, count = first or record.error, count + 1
    if count:
        more = count - 1
        raise JobError(first + (f" (and {more} more bad records; --on-error skip keeps going)" if more else ""))
    if cfg.journal:
        journal_mod.note_records_checked(parts, checked)


def plan_job(cfg: TextJobConfig, rt: runtime.Runtime, link, most_per_chunk: int
             ) -> tuple[chunks.InputIndex, list[chunks.Chunk], int]:
    """(index, chunks, chunk size): the coordinator indexes (and checks) the input and tells every
    worker the plan; workers receive the index without its offsets, which only the coordinator reads."""
    if not rt.is_coordinator:
        return link.wait(link_mod.BROADCAST, 0, lambda: watchdog.beat("waiting for rank 0 to index the input"))[1]
    index = index_input(cfg)
    chunk_size = cfg.chunk_size or auto_chunk_size(index.records, cfg.batch_size, most_per_chunk)
    plan = index.chunks(chunk_size)
    check_records(cfg, index, plan)
    light = dataclasses.replace(index, offsets=index.offsets[:0], lines=index.lines[:0])
    for worker in range(1, rt.size):
        link.send((light, plan, chunk_size), worker, link_mod.BROADCAST)
    return index, plan, chunk_size


# --- the chunks -----------------------------------------------------------------------------------
@dataclasses.dataclass
class FileChunks:
    """The input side of a `runner.ChunkTask` over a text file: the coordinator sends each chunk
    with its raw bytes; the rank that computes it parses them. A task adds `prepare` and `compute`."""

    cfg: TextJobConfig
    index: chunks.InputIndex
    plan: list[chunks.Chunk]
    loaded: Any = None
    """The task's model and tokenizer, on every rank."""

    def payload(self, chunk_id: int) -> tuple[chunks.Chunk, bytes]:
        chunk = self.plan[chunk_id]
        return chunk, chunks.read_chunk_bytes(self.index, chunk)

    def records(self, payload: tuple[chunks.Chunk, bytes]) -> tuple[chunks.Chunk, list[readers.Record], list[int]]:
        """(chunk, its records, the positions of the good ones)."""
        chunk, data = payload
        records = chunks.parse_chunk(self.index, chunk, data, self.cfg.text_field, self.cfg.id_field)
        return chunk, records, [i for i, r in enumerate(records) if r.ok]


@dataclasses.dataclass
class Computed:
    """What the coordinator knows once every chunk is journaled."""

    journal: journal_mod.MemoryJournal | journal_mod.DiskJournal
    todo: list[int]
    """The chunks this run computed (the others came from the journal)."""
    records_computed: int
    seconds: float

    @property
    def records_per_s(self) -> float:
        return self.records_computed / self.seconds if self.seconds else 0.0


def run_chunks(cfg: TextJobConfig, engine: Job, index: chunks.InputIndex, plan: list[chunks.Chunk],
               chunk_size: int, task: runner.ChunkTask, identity: dict, name: str,
               schedule: str, precision: str, model=None) -> Computed | None:
    """Every rank: compute the chunks the journal lacks. The coordinator gets what was computed
    (its journal still open for the output), workers None.

    With a tensor-parallel `model` (hvdinfer/parallel) only the leader of each group runs the
    engine, over the leaders' own link; the group's other ranks repeat its model calls."""
    rt = engine.rt
    group = getattr(model, "group", None)
    if group is not None and not group.is_leader:
        model.follow()
        return None
    link, rank, size = (group.leaders, group.dp_rank, group.dims.dp) if group else (engine.link, rt.rank, rt.size)
    journal = progress = None
    todo: list[int] = []
    if rt.is_coordinator:
        journal = (journal_mod.DiskJournal(journal_mod.journal_dir(cfg.output), identity, cfg.resume)
                   if cfg.journal else journal_mod.MemoryJournal())
        todo = [c.id for c in plan if c.id not in journal.done]
        done_records = sum(plan[c].count for c in journal.done)
        LOG.info("%d records in %d chunks of %d (%d to compute), %d rank(s), %s schedule, precision %s",
                 index.records, len(plan), chunk_size, len(todo), size, schedule, precision)
        progress = Progress(index.records, done_records, not cfg.quiet, cfg.progress_interval, name)
    start = time.perf_counter()
    with model.leading() if group else contextlib.nullcontext():
        runner.run_chunks(task, link, rank, size, schedule, todo, journal, progress)
    seconds = time.perf_counter() - start
    if not rt.is_coordinator:
        return None
    progress.close()
    return Computed(journal, todo, sum(plan[c].count for c in todo), seconds)


def close_journal(cfg: TextJobConfig, computed: Computed) -> None:
    """Coordinator, once the output is committed: the journal (or a compressed input's spill) goes."""
    computed.journal.close(finished=True)
    if not cfg.journal:  # a compressed input's spill is the only thing in OUT.parts/
        shutil.rmtree(journal_mod.journal_dir(cfg.output), ignore_errors=True)


def finish(cfg: TextJobConfig, computed: Computed, plan: list[chunks.Chunk], chunk_size: int, ranks: int,
           precision: tuple[str, str], started: float, fields: dict, line: str) -> dict:
    """Coordinator: the job's summary (the task's `fields`, then what every text job reports), written
    to --metrics-json, and `line` printed with the journal's share unless --quiet."""
    summary = {**fields, "ranks": ranks, "schedule": cfg.schedule, "chunks": len(plan),
               "chunks_computed": len(computed.todo), "chunk_size": chunk_size, "precision": precision[0],
               "precision_reason": precision[1], "compute_seconds": computed.seconds,
               "total_seconds": time.perf_counter() - started, "output": str(cfg.output)}
    if cfg.metrics_json:
        output.write_json(cfg.metrics_json, summary)
    if not cfg.quiet:
        reused = len(plan) - len(computed.todo)
        print(line + (f" ({reused} of {len(plan)} chunks reused from the journal)" if reused else ""), flush=True)
    return summary
