"""What every job over a text file shares, whatever it computes per record (embeddings, class
scores, generated text): the coordinator indexes the input once and checks its records, every
rank learns the plan, the journal opens (or resumes), the chunks run on the engine, and the
coordinator learns what was computed and how fast.

A task supplies the `runner.ChunkTask` (parse, tokenise, run the model on one chunk), the job's
identity (everything that changes a chunk's result) and the writer of its output.
"""
from __future__ import annotations

import dataclasses
import hashlib
import shutil
import time
from pathlib import Path
from typing import Protocol

from hvdinfer import assets, runtime
from hvdinfer.data import chunks, readers
from hvdinfer.engine import journal as journal_mod, link as link_mod, runner, watchdog
from hvdinfer.engine.job import Job
from hvdinfer.engine.progress import Progress
from hvdinfer.runtime import JobError

LOG = runtime.LOG
CHUNKS_PER_JOB = 128  # auto chunk size: about this many chunks, so dynamic allocation can balance


class TextJobConfig(Protocol):
    """The fields of a task's config that this module reads."""

    input: Path
    output: Path
    input_format: str | None
    text_field: str
    id_field: str
    on_error: str
    batch_size: int
    chunk_size: int
    resume: bool
    journal: bool
    quiet: bool
    progress_interval: float


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
    naming file, line and field (with --on-error skip bad records are counted as chunks compute)."""
    if cfg.on_error == "skip":
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
               schedule: str, precision: str) -> Computed | None:
    """Every rank: compute the chunks the journal lacks. The coordinator gets what was computed
    (its journal still open for the output), workers None."""
    rt = engine.rt
    journal = progress = None
    todo: list[int] = []
    if rt.is_coordinator:
        journal = (journal_mod.DiskJournal(journal_mod.journal_dir(cfg.output), identity, cfg.resume)
                   if cfg.journal else journal_mod.MemoryJournal())
        todo = [c.id for c in plan if c.id not in journal.done]
        done_records = sum(plan[c].count for c in journal.done)
        LOG.info("%d records in %d chunks of %d (%d to compute), %d rank(s), %s schedule, precision %s",
                 index.records, len(plan), chunk_size, len(todo), rt.size, schedule, precision)
        progress = Progress(index.records, done_records, not cfg.quiet, cfg.progress_interval, name)
    start = time.perf_counter()
    runner.run_chunks(task, engine.link, rt.rank, rt.size, schedule, todo, journal, progress)
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
