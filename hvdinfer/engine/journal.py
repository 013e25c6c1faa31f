"""The durable journal: every finished chunk on disk, atomically and with a checksum.

Layout, next to the output (`OUT.parts/` for `OUT`):

    job.json                          what this job is: model, input identity, every setting that
                                      changes results; a resume with anything else is refused
    lock                              held (flock) by the running coordinator: two jobs never share it
    chunk-00000042.<sha256/128>.npz   one finished chunk: its arrays plus a JSON `meta` entry

A chunk file is written to a temp name, fsynced, then renamed, so it is either whole or absent; its
name carries the checksum of its bytes, so a truncated or altered file is recognised on resume,
deleted and computed again, never trusted. Only the coordinator touches the journal. After the
final output is committed the journal is removed; a journal left behind means an unfinished job,
and a new run of it must say `--resume` (or delete the directory): finished work is never thrown
away silently.

`MemoryJournal` keeps the same results in memory, for jobs that return them to the caller
(`hvdinfer.predict` without an output file) and as the no-resume baseline in benchmarks.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from hvdinfer import runtime
from hvdinfer.runtime import JobError

JOB_FILE = "job.json"
LOCK_FILE = "lock"
CHECKED_FILE = "records-checked.json"
"""Written once every record of the input has been checked (--on-error fail): what was checked."""
META = "__meta__"
_CHUNK = re.compile(r"^chunk-(\d{8})\.([0-9a-f]{32})\.npz$")


@dataclasses.dataclass
class ChunkResult:
    """What one chunk produced: `records` input records, per-record arrays and JSON-able meta."""

    records: int
    arrays: dict[str, np.ndarray]
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_bytes(self) -> bytes:
        buffer = io.BytesIO()
        meta = json.dumps({"records": self.records, **self.meta}, ensure_ascii=False).encode("utf-8")
        np.savez(buffer, **self.arrays, **{META: np.frombuffer(meta, np.uint8)})
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> "ChunkResult":
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files if name != META}
            meta = json.loads(npz[META].tobytes().decode("utf-8"))
        return cls(meta.pop("records"), arrays, meta)


def checksum(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:32]


def journal_dir(output: Path) -> Path:
    return output.with_name(output.name + ".parts")


class MemoryJournal:
    """Finished chunks held in memory (no resume)."""

    def __init__(self):
        self._chunks: dict[int, ChunkResult] = {}

    @property
    def done(self) -> set[int]:
        return set(self._chunks)

    def put(self, chunk_id: int, result: ChunkResult) -> None:
        self._chunks[chunk_id] = result

    def read(self, chunk_id: int) -> ChunkResult:
        return self._chunks[chunk_id]

    def close(self, finished: bool) -> None:
        if finished:
            self._chunks.clear()


class DiskJournal:
    """Finished chunks on disk; opened by the coordinator only."""

    def __init__(self, directory: Path, identity: dict, resume: bool):
        self.dir = Path(directory)
        self.identity = identity
        self._files: dict[int, Path] = {}
        self._lock_fd: int | None = None
        self._open(resume)

    @property
    def done(self) -> set[int]:
        return set(self._files)

    def _open(self, resume: bool) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lock()
        job_file = self.dir / JOB_FILE
        if job_file.is_file():
            self._check_identity(json.loads(job_file.read_text(encoding="utf-8")), resume)
            self._scan()
        else:
            if resume:
                runtime.LOG.info("--resume: no journal at %s; starting from the beginning", self.dir)
            _write_atomic(job_file, json.dumps(self.identity, indent=2, ensure_ascii=False).encode("utf-8"))

    def _lock(self) -> None:
        import fcntl

        fd = os.open(self.dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise JobError(f"{self.dir} is in use by another running job (coordinator pid {holder}); "
                           "wait for it or stop it first") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._lock_fd = fd

    def _check_identity(self, recorded: dict, resume: bool) -> None:
        finished = sum(1 for p in self.dir.iterdir() if _CHUNK.match(p.name))
        if not resume:
            raise JobError(f"{self.dir} holds {finished} finished chunk(s) of an unfinished run; rerun with --resume "
                           f"to finish it, or delete {self.dir} to start over")
        changed = [f"{key}: journal has {recorded.get(key)!r}, this run has {self.identity.get(key)!r}"
                   for key in sorted(set(recorded) | set(self.identity)) if recorded.get(key) != self.identity.get(key)]
        if changed:
            raise JobError(f"--resume: {self.dir} belongs to a different job, so its chunks cannot be reused ("
                           + "; ".join(changed) + f"); delete {self.dir} to start this job over")

    def _scan(self) -> None:
        """Trust only whole chunks: a checksum mismatch or leftover temp file is deleted."""
        bad = 0
        for path in sorted(self.dir.iterdir()):
            match = _CHUNK.match(path.name)
            if path.name.endswith(".tmp"):
                path.unlink()
            elif match:
                chunk_id = int(match.group(1))
                if checksum(path.read_bytes()) != match.group(2) or chunk_id in self._files:
                    path.unlink()
                    bad += 1
                else:
                    self._files[chunk_id] = path
        runtime.LOG.info("--resume: %d finished chunk(s) in %s%s", len(self._files), self.dir,
                         f"; {bad} corrupt or duplicate chunk file(s) deleted, to be computed again" if bad else "")

    def put(self, chunk_id: int, result: ChunkResult) -> None:
        data = result.to_bytes()
        path = self.dir / f"chunk-{chunk_id:08d}.{checksum(data)}.npz"
        _write_atomic(path, data)
        self._files[chunk_id] = path

    def read(self, chunk_id: int) -> ChunkResult:
        path = self._files[chunk_id]
        data = path.read_bytes()
        if checksum(data) != _CHUNK.match(path.name).group(2):
            raise JobError(f"{path}: checksum mismatch (changed on disk during the job); rerun with --resume")
        return ChunkResult.from_bytes(data)

    def close(self, finished: bool) -> None:
        """Release the lock; when the output is committed, the journal has served its purpose."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        if finished:
            shutil.rmtree(self.dir, ignore_errors=True)

    def chunks_in_order(self) -> Iterator[tuple[int, ChunkResult]]:
        for chunk_id in sorted(self._files):
            yield chunk_id, self.read(chunk_id)


def records_checked(directory: Path, checked: dict) -> bool:
    """Whether a run over this journal already checked every record of exactly this input (`checked`
    names it by content: path, size, sha256, record count, and the fields read)."""
    try:
        return json.loads((directory / CHECKED_FILE).read_text(encoding="utf-8")) == checked
    except (OSError, ValueError):
        return False


def note_records_checked(directory: Path, checked: dict) -> None:
    """Record that every record of the input `checked` names passed the check, so a --resume of this
    job need not parse them all again (minutes for 10M records)."""
    directory.mkdir(parents=True, exist_ok=True)
    _write_atomic(directory / CHECKED_FILE, json.dumps(checked, sort_keys=True).encode("utf-8"))


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a power cut
    finally:
        os.close(dir_fd)
