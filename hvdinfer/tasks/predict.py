"""`hvdinfer.predict`: any Keras model (or callable) over NumPy rows, on every rank of the job,
with the engine's dynamic allocation, journal, resume and watchdog.

    # horovodrun -np 2 python my_script.py   (or mpirun -np 2 ...)
    import hvdinfer
    hvdinfer.init()
    preds = hvdinfer.predict(model, x, batch_size=256)        # every row, in input order, on every rank
    hvdinfer.predict(model, x, batch_size=256, output="preds.npy", resume=True)  # streamed + journaled

Every rank holds `x` (the script loaded it), so chunks travel as row ranges, not data. Without
`output` the coordinator gathers the rows in memory and sends them to every rank; with `output`
(.npy) it streams them in order into the file, journaling each chunk in `output.parts/` first, and
every rank returns the file's path.
"""
from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from hvdinfer import output as output_mod
from hvdinfer.engine import job, journal as journal_mod, runner, watchdog
from hvdinfer.engine.journal import ChunkResult
from hvdinfer.engine.progress import Progress
from hvdinfer.runtime import JobError

Inputs = "np.ndarray | Mapping[str, np.ndarray]"


def row_count(x) -> int:
    """Rows of an array, or of a dict of arrays that must all have as many."""
    if isinstance(x, Mapping):
        if not x:
            raise JobError("predict: x is an empty dict")
        counts = {name: len(np.asarray(value)) for name, value in x.items()}
        if len(set(counts.values())) != 1:
            raise JobError(f"predict: the arrays of x have different numbers of rows: {counts}")
        return next(iter(counts.values()))
    x = np.asarray(x)
    if x.ndim == 0:
        raise JobError("predict: x must have a first axis of rows, got a scalar")
    return len(x)


def take_rows(x, start: int, stop: int):
    if isinstance(x, Mapping):
        return {name: np.asarray(value)[start:stop] for name, value in x.items()}
    return np.asarray(x)[start:stop]


def inputs_digest(x) -> str:
    """sha256 of the rows (names, dtypes, shapes and bytes): a resumed job must see the same."""
    digest = hashlib.sha256()
    items = sorted(x.items()) if isinstance(x, Mapping) else [("", x)]
    for name, value in items:
        value = np.ascontiguousarray(value)
        digest.update(f"{name}|{value.dtype.str}|{value.shape}".encode())
        digest.update(value.data)
    return digest.hexdigest()


def model_fingerprint(model) -> str:
    """sha256 of a Keras model's weights (or the callable's qualified name)."""
    weights = getattr(model, "get_weights", None)
    if weights is None:
        return f"callable:{getattr(model, '__module__', '?')}.{getattr(model, '__qualname__', type(model).__name__)}"
    digest = hashlib.sha256()
    for w in weights():
        digest.update(np.ascontiguousarray(w).data)
    return digest.hexdigest()


def batch_function(model) -> Callable:
    """The model as one function of a batch: a compiled call for Keras models, else as given."""
    import tensorflow as tf

    if isinstance(model, tf.keras.Model):
        return tf.function(lambda batch: model(batch, training=False), reduce_retracing=True)
    return model


def as_arrays(out) -> dict[str, np.ndarray]:
    """A model's output (tensor, array, list or dict of them) as named NumPy arrays."""
    if isinstance(out, Mapping):
        return {str(k): np.asarray(v) for k, v in out.items()}
    if isinstance(out, (list, tuple)):
        return {f"output_{i}": np.asarray(v) for i, v in enumerate(out)}
    return {"output": np.asarray(out)}


@dataclasses.dataclass
class RowChunks:
    """`runner.ChunkTask` over in-memory rows that every rank holds."""

    x: Any
    rows: int
    chunk_size: int
    batch_size: int
    forward: Callable

    def payload(self, chunk_id: int) -> None:
        return None

    def prepare(self, chunk_id: int, payload) -> int:
        return chunk_id

    def compute(self, chunk_id: int) -> ChunkResult:
        start = chunk_id * self.chunk_size
        stop = min(self.rows, start + self.chunk_size)
        parts: dict[str, list[np.ndarray]] = {}
        for first in range(start, stop, self.batch_size):
            watchdog.beat(f"predicting rows {first}..{min(stop, first + self.batch_size) - 1}")
            for name, value in as_arrays(self.forward(take_rows(self.x, first, min(stop, first + self.batch_size)))).items():
                parts.setdefault(name, []).append(value)
        return ChunkResult(stop - start, {name: np.concatenate(values) for name, values in parts.items()})


def predict(model, x, batch_size: int = 256, output: str | Path | None = None, resume: bool = False,
            schedule: str = "dynamic", chunk_size: int = 0, progress: bool = True):
    """All of `model`'s outputs for the rows of `x`, in input order, on every rank (see module doc).

    Returns an ndarray (a dict of them for a model with several outputs), or with `output` the
    output file's Path.
    """
    engine = job.start()
    rt = engine.rt
    rows = row_count(x)
    if rows == 0:
        raise JobError("predict: x has no rows")
    if batch_size < 1:
        raise JobError(f"predict: batch_size must be >= 1, got {batch_size}")
    if output is not None and Path(output).suffix != ".npy":
        raise JobError(f"predict: output {output}: only .npy is supported for arrays")
    if resume and output is None:
        raise JobError("predict: resume=True needs output= (the journal lives beside it)")
    chunk_size = chunk_size or max(batch_size, -(-rows // 128))
    chunk_count = -(-rows // chunk_size)
    task = RowChunks(x, rows, chunk_size, batch_size, batch_function(model))

    journal = bar = None
    todo: list[int] = []
    if rt.is_coordinator:
        identity = {"task": "predict", "model": model_fingerprint(model), "inputs": inputs_digest(x), "rows": rows,
                    "chunk_size": chunk_size, "batch_size": batch_size}
        journal = (journal_mod.DiskJournal(journal_mod.journal_dir(Path(output)), identity, resume)
                   if output is not None else journal_mod.MemoryJournal())
        todo = [c for c in range(chunk_count) if c not in journal.done]
        done_rows = sum(min(chunk_size, rows - c * chunk_size) for c in journal.done)
        bar = Progress(rows, done_rows, progress, desc="predict", unit="rows")
    runner.run_chunks(task, engine.link, rt.rank, rt.size, schedule, todo, journal, bar)

    if output is not None:
        if rt.is_coordinator:
            bar.close()
            write_npy(Path(output), journal, chunk_count, rows)
            journal.close(finished=True)
        runner.finish(engine.link, rt.rank, rt.size, {"output": str(output)})
        return Path(output)
    result = None
    if rt.is_coordinator:
        bar.close()
        result = assemble(journal, chunk_count)
        journal.close(finished=True)
    return _single(runner.finish(engine.link, rt.rank, rt.size, result))


def assemble(journal, chunk_count: int) -> dict[str, np.ndarray]:
    results = [journal.read(c).arrays for c in range(chunk_count)]
    if not results:
        return {}
    return {name: np.concatenate([r[name] for r in results]) for name in results[0]}


def write_npy(path: Path, journal, chunk_count: int, rows: int) -> None:
    first = journal.read(0).arrays
    if len(first) != 1 or next(iter(first.values())).ndim != 2:
        raise JobError(f"predict: output {path} holds one (rows, width) array; the model gives "
                       f"{ {k: v.shape[1:] for k, v in first.items()} } per row")
    (name, value), = first.items()
    with output_mod.NpyWriter(path, rows, value.shape[1], value.dtype) as out:
        for c in range(chunk_count):
            watchdog.beat(f"writing chunk {c} of {chunk_count} to {path}")
            out.write_block(journal.read(c).arrays[name])


def _single(result: dict[str, np.ndarray]):
    return result["output"] if list(result) == ["output"] else result
