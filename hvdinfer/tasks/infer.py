"""Distributed batch inference: many texts in, one result per text out, complete and in input order.

    mpirun -np 2 --oversubscribe --bind-to none .venv/bin/hvdinfer infer \
        --model minilm-l6 --input reviews.csv --output emb.jsonl
    NP=4 launch/run.sh infer --model minilm-l6 --input in.jsonl --output emb.npy

The data path, top-down: read (every rank parses the whole file, so every rank sees the same bad
records) -> shard (good records sorted by length and dealt round-robin, so every rank gets the
same mix of long and short texts) -> batch (tokenise this rank's shard, sort by token count, pad
each batch to its own longest) -> model (one compiled forward per batch) -> collect (allgather in
global order) -> write (coordinator only, atomic).
"""
from __future__ import annotations

import dataclasses
import functools
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from hvdinfer import assets, collect, output, runtime
from hvdinfer.data import batching, readers
from hvdinfer.data.shard import ShardPlan
from hvdinfer.runtime import JobError

LOG = runtime.LOG
TASKS = ("embed", "classify")
PRECISIONS = ("fp32", "bf16")
ON_ERROR = ("fail", "skip")


@dataclasses.dataclass(frozen=True)
class InferConfig:
    """One `hvdinfer infer` job."""

    model: str
    """A model id (see hvdinfer.assets.ASSETS) or a saved model directory."""
    input: Path
    """JSONL, CSV/TSV with a header, or plain text (one record per line)."""
    output: Path
    """.jsonl: one line per input record, in input order; .npy: the embeddings array in order."""
    task: str = "embed"
    """embed (sentence embeddings) or classify (needs a model directory with a classifier head)."""
    batch_size: int = 64
    """Records per forward pass, per rank."""
    max_length: int = 0
    """Tokens per text after truncation; 0 = the model's own (256 for minilm-l6)."""
    text_field: str = "text"
    """Field (JSONL) or column (CSV/TSV) holding the text."""
    id_field: str = "id"
    """Field or column holding the record id; the 0-based record index when absent."""
    input_format: str | None = None
    """Override the format the extension implies: jsonl, csv, tsv, text."""
    on_error: str = "fail"
    """fail: stop at the first bad record; skip: keep it as an error line and go on."""
    quiet: bool = False
    """No progress bar and no summary."""
    metrics_json: Path | None = None
    """Also write the job's summary (counts, records/s, seconds) to this JSON file."""
    precision: str = "fp32"
    """fp32, or bf16 compute (float32 weights, pooling and output): about 2x faster on CPUs with
    AVX512-BF16 or AMX; embeddings within cosine 0.999 of fp32 (tests/integration/test_minilm.py)."""

    def __post_init__(self):
        if self.task not in TASKS:
            raise JobError(f"--task must be one of {', '.join(TASKS)}, not {self.task!r}")
        if self.precision not in PRECISIONS:
            raise JobError(f"--precision must be one of {', '.join(PRECISIONS)}, not {self.precision!r}")
        if self.on_error not in ON_ERROR:
            raise JobError(f"--on-error must be one of {', '.join(ON_ERROR)}, not {self.on_error!r}")
        if self.batch_size < 1:
            raise JobError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.max_length < 0 or self.max_length == 1:
            raise JobError(f"--max-length must be 0 (the model's) or >= 2, got {self.max_length}")
        if self.output.suffix not in (".jsonl", ".npy"):
            raise JobError(f"--output {self.output}: use a .jsonl or .npy file")
        if self.output.suffix == ".npy" and self.task != "embed":
            raise JobError("--output .npy holds embeddings only; use .jsonl with --task classify")


@dataclasses.dataclass
class Loaded:
    model: Any
    tokenizer: Any
    max_length: int
    labels: list[str] | None


def load_model(cfg: InferConfig) -> Loaded:
    """Resolve the model id or directory and load it, or raise a JobError that says why."""
    import tensorflow as tf

    from models import heads, loading

    # Keras: the policy must be in force when the layers are built; variables stay float32.
    tf.keras.mixed_precision.set_global_policy("mixed_bfloat16" if cfg.precision == "bf16" else "float32")
    try:
        model_dir = assets.resolve_model(cfg.model) if cfg.model in assets.ASSETS else Path(cfg.model)
    except assets.AssetError as exc:
        raise JobError(str(exc)) from None
    if not model_dir.is_dir():
        raise JobError(f"--model {cfg.model}: not a known model id ({', '.join(assets.ASSETS)}) "
                       f"nor a model directory")
    if cfg.task == "classify" and not heads.has_head(model_dir):
        raise JobError(f"--model {cfg.model}: has no classifier head ({heads.HEAD_CONFIG}); "
                       f"fine-tune one with `hvdinfer finetune` or use --task embed")
    load = loading.load_classifier if cfg.task == "classify" else loading.load_sentence_embedder
    try:
        model, tokenizer, info = load(model_dir)
    except (OSError, ValueError, KeyError) as exc:
        raise JobError(f"--model {cfg.model}: cannot load model: {exc}") from None
    max_length = cfg.max_length or info.max_seq_length
    if max_length > info.config.max_position:
        raise JobError(f"--max-length {max_length} exceeds the model's {info.config.max_position} positions")
    return Loaded(model, tokenizer, max_length, getattr(model, "labels", None))


def read_input(cfg: InferConfig) -> readers.ReadReport:
    try:
        report = readers.read_records(cfg.input, cfg.input_format, cfg.text_field, cfg.id_field)
    except readers.InputError as exc:
        raise JobError(str(exc)) from None
    if cfg.on_error == "fail" and report.errors:
        first = report.errors[0]
        more = len(report.errors) - 1
        raise JobError(first.error + (f" (and {more} more bad records; --on-error skip keeps going)" if more else ""))
    return report


def shard_good_records(good: list[readers.Record], size: int, rank: int) -> np.ndarray:
    """Positions (into `good`) this rank computes: longest texts first, dealt round-robin."""
    by_length = np.argsort([-len(r.text) for r in good], kind="stable")
    return by_length[ShardPlan(len(good), size, "strided").indices(rank)]


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
    compiled_forward(loaded.model)(ids, np.ones_like(ids))


def run_shard(loaded: Loaded, texts: list[str], positions: np.ndarray, batch_size: int,
              progress) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(positions, outputs, truncated) of this rank's records, in the order they were computed."""
    ids, truncated = loaded.tokenizer.encode_ids(texts, loaded.max_length)
    batches = batching.make_batches(np.arange(len(texts)), ids, batch_size, pad_id=loaded.tokenizer.pad_id)
    forward = compiled_forward(loaded.model)
    width = len(loaded.labels) if loaded.labels else loaded.model.config.hidden_size
    outputs, order = [], []
    for batch in batches:
        outputs.append(forward(batch.input_ids, batch.attention_mask).numpy())
        order.append(batch.indices)
        progress(len(batch.indices))
    local = np.concatenate(order) if order else np.zeros(0, np.int64)
    emb = np.concatenate(outputs) if outputs else np.zeros((0, width), np.float32)
    return positions[local], emb.astype(np.float32), truncated[local]


class Progress:
    """A tqdm bar on the coordinator when stderr is a TTY; records/s scaled to all ranks."""

    def __init__(self, enabled: bool, total: int, size: int):
        self.size = size
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="rec", desc=f"infer x{size} ranks", file=sys.stderr)

    def __call__(self, done_here: int) -> None:
        if self.bar is not None:
            # Ranks hold equal shares and run in step, so this rank's progress stands for all.
            self.bar.update(min(done_here * self.size, self.bar.total - self.bar.n))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def output_rows(records: list[readers.Record], outputs: np.ndarray, labels: list[str] | None) -> list[dict]:
    """One row per input record, in input order: an embedding, a label with scores, or the error."""
    rows, g = [], 0
    for record in records:
        if not record.ok:
            rows.append({"id": record.id, "error": record.error})
            continue
        if labels:
            probs = outputs[g]
            rows.append({"id": record.id, "label": labels[int(np.argmax(probs))],
                         "scores": {label: float(p) for label, p in zip(labels, probs)}})
        else:
            rows.append({"id": record.id, "embedding": outputs[g].tolist()})
        g += 1
    return rows


def write_output(cfg: InferConfig, records: list[readers.Record], embeddings: np.ndarray,
                 labels: list[str] | None) -> None:
    if cfg.output.suffix == ".npy":
        full = np.full((len(records), embeddings.shape[1]), np.nan, np.float32)
        full[[r.index for r in records if r.ok]] = embeddings
        output.write_npy(cfg.output, full)
    else:
        output.write_jsonl(cfg.output, output_rows(records, embeddings, labels))


def run(cfg: InferConfig, runtime_config: runtime.RuntimeConfig) -> dict:
    rt = runtime.init_runtime(runtime_config)
    start = time.perf_counter()
    report = read_input(cfg)
    loaded = load_model(cfg)
    good = [r for r in report.records if r.ok]
    positions = shard_good_records(good, rt.size, rt.rank)
    LOG.info("%d records (%d bad), %d ranks, ~%d records per rank", len(report.records),
             len(report.errors), rt.size, len(positions))

    progress = Progress(rt.is_coordinator and not cfg.quiet, len(good), rt.size)
    warm_up(loaded)
    collect.allgather_json(0)  # Horovod: start the clock together
    compute_start = time.perf_counter()
    done, outputs, truncated = run_shard(loaded, [good[p].text for p in positions], positions, cfg.batch_size,
                                       progress)
    progress.close()
    result = collect.collect_ordered(done, {"output": outputs, "truncated": truncated}, expected_total=len(good))
    seconds = time.perf_counter() - compute_start

    summary = {"records": len(report.records), "ok": len(good), "skipped": len(report.errors),
               "truncated": int(result["truncated"].sum()), "ranks": rt.size,
               "compute_seconds": seconds, "records_per_s": len(good) / seconds if seconds else 0.0,
               "total_seconds": time.perf_counter() - start, "output": str(cfg.output)}
    if rt.is_coordinator:
        write_output(cfg, report.records, result["output"], loaded.labels)
        if cfg.metrics_json:
            output.write_json(cfg.metrics_json, summary)
        if not cfg.quiet:
            print(f"infer: {summary['records']} records -> {cfg.output}: ok {summary['ok']}, "
                  f"skipped {summary['skipped']}, truncated {summary['truncated']}; "
                  f"{summary['records_per_s']:.1f} records/s on {rt.size} rank(s)", flush=True)
    return summary
