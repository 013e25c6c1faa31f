"""Distributed batch inference: many texts in, one result per text out, complete and in input order,
at any input size, resumable after any crash.

    mpirun -np 2 --oversubscribe --bind-to none .venv/bin/hvdinfer infer \
        --model minilm-l6 --input reviews.csv --output emb.parquet
    ... after a crash, the same command with --resume computes only what is missing.
    NP=4 launch/run.sh infer --model minilm-l6 --input in.jsonl.gz --output emb.npy --schedule static

The data path, top-down:
  index (coordinator: one pass records where every 64th record starts; with --on-error fail a
  second pass parses every record, so a bad one stops the job before any compute)
  -> journal (coordinator: OUT.parts/ holds the finished chunks; --resume keeps the whole ones)
  -> schedule (chunks of records handed out on demand, or fixed in advance; each travels with
  its raw bytes, so only the coordinator reads the input)
  -> prepare (any rank, on a helper thread: parse the chunk, tokenise, sort by length, cut into
  batches padded to their own longest)
  -> model (one compiled forward per batch)
  -> journal (each chunk's result, atomically, with a checksum)
  -> write (coordinator: the chunks streamed in input order into .jsonl, .npy or .parquet, then
  the journal is removed).
Every chunk's result depends on its records alone, so any rank may compute it and a resumed or
re-scheduled job writes the same bytes.
"""
from __future__ import annotations

import dataclasses
import functools
import time
from pathlib import Path
from typing import Any

import numpy as np

from hvdinfer import collect, output, runtime
from hvdinfer.data import batching, chunks
from hvdinfer.engine import job, runner, watchdog
from hvdinfer.engine.journal import ChunkResult
from hvdinfer.runtime import JobError
from hvdinfer.tasks import text_job

LOG = runtime.LOG
TASKS = ("embed", "classify")
PRECISIONS = runtime.PRECISIONS
ON_ERROR = text_job.ON_ERROR
MAX_AUTO_CHUNK = 4096


@dataclasses.dataclass(frozen=True)
class InferConfig(text_job.TextJobConfig):
    """One `hvdinfer infer` job (the fields every text job takes: text_job.TextJobConfig)."""

    output: Path
    """.jsonl (one line per input record), .npy (the embeddings array) or .parquet, in input order."""
    task: str = "embed"
    """embed (sentence embeddings) or classify (needs a model directory with a classifier head)."""
    max_length: int = 0
    """Tokens per text after truncation; 0 = the model's own (256 for minilm-l6)."""

    OUTPUT_SUFFIXES = output.SUFFIXES

    def __post_init__(self):
        super().__post_init__()
        if self.task not in TASKS:
            raise JobError(f"--task must be one of {', '.join(TASKS)}, not {self.task!r}")
        if self.max_length < 0 or self.max_length == 1:
            raise JobError(f"--max-length must be 0 (the model's) or >= 2, got {self.max_length}")
        if self.output.suffix == ".npy" and self.task != "embed":
            raise JobError("--output .npy holds embeddings only; use .jsonl or .parquet with --task classify")


# --- model ----------------------------------------------------------------------------------------
@dataclasses.dataclass
class Loaded:
    model: Any
    tokenizer: Any
    max_length: int
    labels: list[str] | None
    model_dir: Path
    forward: Any
    """(input_ids, attention_mask) -> outputs: `compiled_forward`, or a parallelised model's own."""
    pad_multiple: int
    """Batch widths are rounded up to this: batching.pad_multiple of the precision (1 in fp32)."""


def load_model(cfg: InferConfig, precision: str) -> Loaded:
    """Resolve the model id or directory and load it (parallelised under --pp/--tp), or raise a
    JobError that says why."""
    import tensorflow as tf

    from models import heads, loading

    # Keras: the policy must be in force when the layers are built; variables stay float32.
    tf.keras.mixed_precision.set_global_policy("mixed_bfloat16" if precision == "bf16" else "float32")
    model_dir = text_job.resolve_model_dir(cfg.model)
    if cfg.task == "classify" and not heads.has_head(model_dir):
        raise JobError(f"--model {cfg.model}: has no classifier head ({heads.HEAD_CONFIG}); "
                       f"fine-tune one with `hvdinfer finetune` or use --task embed")
    load = loading.load_classifier if cfg.task == "classify" else loading.load_sentence_embedder
    try:
        if cfg.parallel.enabled:
            from hvdinfer.parallel import parallelize

            model, tokenizer, info = parallelize.load_embedder(model_dir, cfg.task == "classify", cfg.parallel)
        else:
            model, tokenizer, info = load(model_dir)
    except (OSError, ValueError, KeyError) as exc:
        raise JobError(f"--model {cfg.model}: cannot load model: {exc}") from None
    max_length = cfg.max_length or info.max_seq_length
    if max_length > info.config.max_position:
        raise JobError(f"--max-length {max_length} exceeds the model's {info.config.max_position} positions")
    forward = model.forward if cfg.parallel.enabled else compiled_forward(model)
    return Loaded(model, tokenizer, max_length, getattr(model, "labels", None), model_dir, forward,
                  batching.pad_multiple(precision))


@functools.lru_cache(maxsize=4)
def compiled_forward(model):
    """One traced function for every batch shape: embeddings, or class probabilities for a classifier."""
    import tensorflow as tf

    spec = tf.TensorSpec([None, None], tf.int32)
    probabilities = getattr(model, "labels", None) is not None

    @tf.function(input_signature=[spec, spec])
    def forward(input_ids, attention_mask):
        out = model({"input_ids": input_ids, "attention_mask": attention_mask}, training=False)
        return tf.nn.softmax(out, axis=-1) if probabilities else out

    return forward


def warm_up(loaded: Loaded) -> None:
    """Trace the compiled forward once, outside the timed region (one trace serves every shape)."""
    ids = np.full((1, 8), loaded.tokenizer.pad_id, np.int32)
    loaded.forward(ids, np.ones_like(ids))  # under --tp every rank of a group at once


# --- the chunk task -------------------------------------------------------------------------------
class TextChunks(text_job.FileChunks):
    """`runner.ChunkTask` for text input: bytes -> records -> token batches -> model outputs."""

    def prepare(self, chunk_id: int, payload: tuple[chunks.Chunk, bytes]):
        chunk, records, good = self.records(payload)
        ids, truncated = self.loaded.tokenizer.encode_ids([records[i].text for i in good], self.loaded.max_length)
        batches = batching.make_batches(np.asarray(good, np.int64), ids, self.cfg.batch_size,
                                        pad_id=self.loaded.tokenizer.pad_id, multiple=self.loaded.pad_multiple)
        return chunk, records, batches, good, np.asarray(truncated, bool)

    def compute(self, prepared) -> ChunkResult:
        chunk, records, batches, good, truncated_good = prepared
        forward = self.loaded.forward
        width = len(self.loaded.labels) if self.loaded.labels else self.loaded.model.config.hidden_size
        values = np.full((len(records), width), np.nan, np.float32)
        for number, batch in enumerate(batches):
            watchdog.beat(f"computing chunk {chunk.id}, batch {number + 1} of {len(batches)}")
            values[batch.indices] = forward(batch.input_ids, batch.attention_mask).numpy()
        truncated = np.zeros(len(records), bool)
        truncated[good] = truncated_good
        return ChunkResult(len(records), {"values": values, "truncated": truncated},
                           {"ids": [r.id for r in records], "errors": [r.error for r in records]})


# --- output ---------------------------------------------------------------------------------------
def output_schema(width: int, labels: list[str] | None):
    return output.classification_schema(labels) if labels else output.embedding_schema(width)


def output_block(first: int, result: ChunkResult, labels: list[str] | None, suffix: str) -> dict:
    """One chunk as an output block: record columns plus an embedding, or a label with scores
    (in .jsonl a {label: probability} object, in .parquet a vector in the schema's label order)."""
    values, errors = result.arrays["values"], result.meta["errors"]
    block = {"index": np.arange(first, first + result.records), "id": result.meta["ids"], "error": errors}
    if labels:
        best = np.argmax(np.nan_to_num(values, nan=-1.0), axis=1)
        block["label"] = [None if e else labels[b] for b, e in zip(best, errors)]
        block["scores"] = ([None if e else dict(zip(labels, row.tolist())) for row, e in zip(values, errors)]
                           if suffix == ".jsonl" else values)
    else:
        block["embedding"] = values
    return block


def write_output(cfg: InferConfig, journal, plan: list[chunks.Chunk], records: int, width: int,
                 labels: list[str] | None) -> dict:
    """Stream the journal's chunks into the output in input order; the counts it saw on the way."""
    counts = {"skipped": 0, "truncated": 0}
    with output.open_output(cfg.output, output_schema(width, labels), rows=records) as out:
        for chunk in plan:
            watchdog.beat(f"writing chunk {chunk.id} of {len(plan)} to {cfg.output}")
            result = journal.read(chunk.id)
            counts["skipped"] += sum(e is not None for e in result.meta["errors"])
            counts["truncated"] += int(result.arrays["truncated"].sum())
            out.write_block(output_block(chunk.first_record, result, labels, cfg.output.suffix))
    return counts


# --- the job --------------------------------------------------------------------------------------
def job_identity(cfg: InferConfig, index: chunks.InputIndex, chunk_size: int, precision: str,
                 loaded: Loaded) -> dict:
    """Everything that changes a chunk's result: a resume must match it exactly."""
    return {"task": cfg.task, "model": cfg.model, "model_sha256": text_job.model_digest(loaded.model_dir),
            "input": index.identity(), "chunk_size": chunk_size, "batch_size": cfg.batch_size,
            "max_length": loaded.max_length, "precision": precision, "pad_multiple": loaded.pad_multiple,
            "text_field": cfg.text_field,
            "id_field": cfg.id_field, **cfg.parallel.identity()}


def run(cfg: InferConfig, runtime_config: runtime.RuntimeConfig) -> dict:
    engine = job.start(runtime_config, cfg.stall_timeout)
    rt = engine.rt
    start = time.perf_counter()
    precision, precision_reason = runtime.resolve_precision(cfg.precision, collect.allgather_json)
    with watchdog.quiet("loading the model"):
        loaded = load_model(cfg, precision)
        warm_up(loaded)
    index, plan, chunk_size = text_job.plan_job(cfg, rt, engine.link, MAX_AUTO_CHUNK)
    identity = job_identity(cfg, index, chunk_size, precision, loaded) if rt.is_coordinator else {}
    computed = text_job.run_chunks(cfg, engine, index, plan, chunk_size, TextChunks(cfg, index, plan, loaded),
                                   identity, "infer", cfg.schedule, precision, loaded.model)
    summary = None
    if rt.is_coordinator:
        width = len(loaded.labels) if loaded.labels else loaded.model.config.hidden_size
        counts = write_output(cfg, computed.journal, plan, index.records, width, loaded.labels)
        text_job.close_journal(cfg, computed)
        ok = index.records - counts["skipped"]
        summary = text_job.finish(
            cfg, computed, plan, chunk_size, rt.size, (precision, precision_reason), start,
            {"records": index.records, "ok": ok, **counts, "records_per_s": computed.records_per_s},
            f"infer: {index.records} records -> {cfg.output}: ok {ok}, skipped {counts['skipped']}, truncated "
            f"{counts['truncated']}; {computed.records_per_s:.1f} records/s on {rt.size} rank(s)")
    return runner.finish(engine.link, rt.rank, rt.size, summary)
