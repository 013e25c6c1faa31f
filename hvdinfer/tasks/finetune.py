"""Data-parallel fine-tuning of a sentence embedder + classifier head, with exact resume.

    mpirun -np 2 --oversubscribe --bind-to none .venv/bin/hvdinfer finetune --model minilm-l6 \
        --task classify --train train.jsonl --eval eval.jsonl --output-dir runs/rt
    ... the same command with --resume continues from the last epoch checkpoint.

The data path, top-down: read + validate (every rank, before any training) -> tokenise -> each
epoch a seeded permutation of the training set, dealt round-robin to the ranks and padded by
wrap-around so every rank takes the same number of steps -> `fit` with hvd.DistributedOptimizer ->
at each epoch end: evaluation over the whole eval set across ranks (confusion counts allreduced),
metrics.json and an atomic checkpoint from the coordinator -> at the end, DIR is a model directory
that `hvdinfer infer --task classify` loads.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import tensorflow as tf

from hvdinfer import collect, output, runtime
from hvdinfer.data import batching, readers
from hvdinfer.runtime import JobError

LOG = runtime.LOG
CHECKPOINTS = "checkpoints"
MODEL_FILES = ("config.json", "modules.json", "sentence_bert_config.json", "tokenizer.json", "1_Pooling")


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    """One `hvdinfer finetune` job."""

    model: str
    """Base model: a model id (minilm-l6) or a model directory."""
    train: Path
    """Training records (JSONL, CSV/TSV, with a text and a label field)."""
    eval: Path
    """Held-out records, evaluated across all ranks after every epoch."""
    output_dir: Path
    """Where checkpoints, metrics.json, TensorBoard logs and the final model directory go."""
    task: str = "classify"
    """Only classify for now."""
    text_field: str = "text"
    """Field or column holding the text."""
    label_field: str = "label"
    """Field or column holding the class label."""
    epochs: int = 2
    """Epochs in all (a resumed run continues up to this many)."""
    batch_size: int = 16
    """Records per step per rank; the effective batch is batch_size x ranks."""
    lr: float = 3e-5
    """Base learning rate for one rank; scaled by the number of ranks unless no_lr_scaling."""
    no_lr_scaling: bool = False
    """Use lr as given instead of lr x ranks."""
    warmup_steps: int = 50
    """Linear warm-up steps from 0 to the (scaled) rate, which then stays constant."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    dropout: float = 0.1
    """Dropout on the sentence embedding before the classifier (stateless: resume stays exact)."""
    max_length: int = 128
    """Tokens per text after truncation."""
    seed: int = 0
    """Seeds the head's initialisation, the data order of every epoch and dropout."""
    resume: bool = False
    """Continue from the last checkpoint in output_dir."""
    precision: str = "auto"
    """auto (bf16 where the hardware computes it natively, else fp32), fp32, or bf16 compute with
    float32 weights, optimizer state and loss."""

    def __post_init__(self):
        if self.task != "classify":
            raise JobError(f"--task {self.task}: only classify can be fine-tuned")
        for name in ("epochs", "batch_size", "max_length"):
            if getattr(self, name) < 1:
                raise JobError(f"--{name.replace('_', '-')} must be >= 1")
        if self.precision not in runtime.PRECISIONS:
            raise JobError(f"--precision must be one of {', '.join(runtime.PRECISIONS)}, not {self.precision!r}")
        if self.lr <= 0 or self.warmup_steps < 0 or not 0 <= self.dropout < 1:
            raise JobError("--lr must be > 0, --warmup-steps >= 0 and 0 <= --dropout < 1")


@dataclasses.dataclass
class LabeledSet:
    path: Path
    texts: list[str]
    labels: np.ndarray  # int class ids


def read_labeled(path: Path, cfg: FinetuneConfig) -> list[readers.Record]:
    """The records of a labelled file; any bad record is an error naming file and line."""
    try:
        report = readers.read_records(path, None, cfg.text_field, None, cfg.label_field)
    except readers.InputError as exc:
        raise JobError(str(exc)) from None
    if report.errors:
        more = len(report.errors) - 1
        raise JobError(report.errors[0].error + (f" (and {more} more bad records)" if more else ""))
    return report.records


def load_data(cfg: FinetuneConfig) -> tuple[LabeledSet, LabeledSet, list[str]]:
    """Both sets, checked before any training: labels present, >= 2 classes, eval labels known."""
    train, eval_ = read_labeled(cfg.train, cfg), read_labeled(cfg.eval, cfg)
    names = sorted({str(r.label) for r in train})
    if len(names) < 2:
        raise JobError(f"{cfg.train}: every record has label {names[0]!r}; a classifier needs at least two classes")
    unseen = sorted({str(r.label) for r in eval_} - set(names))
    if unseen:
        line = next(r.line for r in eval_ if str(r.label) == unseen[0])
        raise JobError(f"{cfg.eval}:{line}: field '{cfg.label_field}': label {unseen[0]!r} does not occur in "
                       f"{cfg.train} (training labels: {', '.join(names)})")
    index = {name: i for i, name in enumerate(names)}

    def labeled_set(path: Path, records: list[readers.Record]) -> LabeledSet:
        return LabeledSet(path, [r.text for r in records], np.array([index[str(r.label)] for r in records]))

    return labeled_set(cfg.train, train), labeled_set(cfg.eval, eval_), names


def epoch_shard(n: int, epoch: int, seed: int, size: int, rank: int, batch_size: int) -> np.ndarray:
    """This rank's record order for `epoch`: a seeded permutation dealt round-robin, wrapped so every
    rank holds exactly steps x batch_size records (no rank runs out first and hangs the allreduce)."""
    order = np.random.default_rng([seed, epoch]).permutation(n)
    steps = steps_per_epoch(n, size, batch_size)
    mine = order[rank::size]
    if len(mine) == 0:
        mine = order
    return np.resize(mine, steps * batch_size)


def steps_per_epoch(n: int, size: int, batch_size: int) -> int:
    return max(1, -(-n // (size * batch_size)))


def bucketed_steps(order: np.ndarray, lengths: np.ndarray, batch_size: int, rng: np.random.Generator,
                   pool_batches: int = 32) -> list[np.ndarray]:
    """Cut `order` into batches of similar token length: sort pools of `pool_batches` batches by
    length, cut them, then shuffle the batches, so each step pads little but the order stays random."""
    steps = []
    pool = batch_size * pool_batches
    for start in range(0, len(order), pool):
        chunk = order[start:start + pool]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        steps += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    return [steps[i] for i in rng.permutation(len(steps))]


def batches_from(epoch: int, cfg: FinetuneConfig, data: LabeledSet, token_ids: list[list[int]], pad_id: int,
                 rt: runtime.Runtime):
    """Endless (inputs, labels) batches from `epoch` on, in the order `fit` consumes them."""
    lengths = np.array([len(t) for t in token_ids])
    while True:
        order = epoch_shard(len(data.texts), epoch, cfg.seed, rt.size, rt.rank, cfg.batch_size)
        rng = np.random.default_rng([cfg.seed, epoch, rt.rank])
        for rows in bucketed_steps(order, lengths, cfg.batch_size, rng):
            batch = batching.make_batches(rows, [token_ids[r] for r in rows], len(rows), pad_id,
                                          sort_by_length=False)[0]
            yield batch.inputs(), data.labels[rows]
        epoch += 1


def confusion(model, tokenizer, data: LabeledSet, num_labels: int, rt: runtime.Runtime, batch_size: int,
              max_length: int) -> np.ndarray:
    """The eval set's confusion matrix (true x predicted), computed in shards and summed over ranks."""
    from hvdinfer.data.shard import ShardPlan

    mine = ShardPlan(len(data.texts), rt.size, "strided").indices(rt.rank)
    counts = np.zeros((num_labels, num_labels), np.int64)
    ids, _ = tokenizer.encode_ids([data.texts[i] for i in mine], max_length)
    for batch in batching.make_batches(mine, ids, batch_size * 4, tokenizer.pad_id):
        predicted = np.argmax(model(batch.inputs(), training=False).numpy(), axis=1)
        np.add.at(counts, (data.labels[batch.indices], predicted), 1)
    return collect.allreduce_sum(counts)


def classification_metrics(counts: np.ndarray, labels: list[str]) -> dict:
    """Accuracy, macro-F1 and per-class precision/recall/F1 from a confusion matrix."""
    true_pos = np.diag(counts).astype(float)
    predicted, actual = counts.sum(0).astype(float), counts.sum(1).astype(float)
    precision = np.divide(true_pos, predicted, out=np.zeros_like(true_pos), where=predicted > 0)
    recall = np.divide(true_pos, actual, out=np.zeros_like(true_pos), where=actual > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros_like(true_pos),
                   where=(precision + recall) > 0)
    return {"accuracy": float(true_pos.sum() / max(1, counts.sum())), "macro_f1": float(f1.mean()),
            "examples": int(counts.sum()),
            "per_class": {label: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
                          for label, p, r, f, s in zip(labels, precision, recall, f1, actual)}}


def training_identity(cfg: FinetuneConfig, labels: list[str], size: int, train: LabeledSet, precision: str) -> dict:
    """What must not change between a run and its resume for the resume to be exact (`precision` as
    resolved, so `auto` resumes on the same hardware and refuses to switch precision on other)."""
    import hashlib

    digest = hashlib.sha256()
    for text, label in zip(train.texts, train.labels):
        digest.update(f"{label}\t{text}\n".encode("utf-8", "surrogateescape"))
    return {"labels": labels, "size": size, "seed": cfg.seed, "batch_size": cfg.batch_size, "lr": cfg.lr,
            "no_lr_scaling": cfg.no_lr_scaling, "warmup_steps": cfg.warmup_steps, "weight_decay": cfg.weight_decay,
            "dropout": cfg.dropout, "max_length": cfg.max_length, "precision": precision,
            "train_sha256": digest.hexdigest()}


def checkpoint_dir(cfg: FinetuneConfig, epoch: int) -> Path:
    return cfg.output_dir / CHECKPOINTS / f"epoch-{epoch:04d}"


def last_checkpoint(cfg: FinetuneConfig) -> tuple[int, Path] | None:
    root = cfg.output_dir / CHECKPOINTS
    done = sorted(p for p in root.glob("epoch-*") if (p / "state.json").is_file()) if root.is_dir() else []
    return (int(done[-1].name.split("-")[1]), done[-1]) if done else None


def save_checkpoint(ckpt, cfg: FinetuneConfig, epoch: int, state: dict) -> Path:
    """Coordinator only: weights + optimizer state (tf.train.Checkpoint) + state.json, swapped in whole."""
    final = checkpoint_dir(cfg, epoch)
    staging = final.with_name(f".{final.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    ckpt.write(str(staging / "ckpt"))
    (staging / "state.json").write_text(json.dumps(state, indent=2))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(staging, final)
    return final


def write_model_dir(model, base_dir: Path, out_dir: Path, max_length: int) -> None:
    """DIR becomes a model directory: the base model's config and tokenizer, the tuned encoder, the head."""
    from models import heads, weights

    for name in MODEL_FILES:
        src, dst = base_dir / name, out_dir / name
        if src.is_dir():
            shutil.copytree(src, dst, dirs_exist_ok=True)
        elif src.is_file():
            shutil.copy2(src, dst)
    # The tuned model saw texts cut at max_length: infer should cut them the same way by default.
    sbert = out_dir / "sentence_bert_config.json"
    settings = json.loads(sbert.read_text()) if sbert.is_file() else {}
    output.write_json(sbert, {**settings, "max_seq_length": max_length})
    weights.save_weights(model.embedder, out_dir / "model.safetensors")
    heads.save_head(model, out_dir)


def build_model(cfg: FinetuneConfig, labels: list[str], precision: str):
    """(classifier, tokenizer, base model dir) from the base model, computing in `precision`."""
    from hvdinfer import assets
    from models import bert, heads, loading

    tf.keras.mixed_precision.set_global_policy("mixed_bfloat16" if precision == "bf16" else "float32")
    try:
        base = assets.resolve_model(cfg.model) if cfg.model in assets.ASSETS else Path(cfg.model)
        embedder, tokenizer, info = loading.load_sentence_embedder(base)
    except (assets.AssetError, OSError, ValueError, KeyError) as exc:
        raise JobError(f"--model {cfg.model}: cannot load model: {exc}") from None
    tf.keras.utils.set_random_seed(cfg.seed)  # the head's initial weights: then broadcast from rank 0
    model = bert.build(heads.TextClassifier(embedder, labels, cfg.dropout, cfg.seed))
    return model, tokenizer, info.model_dir


def check_resume(cfg: FinetuneConfig, labels: list[str], size: int, train: LabeledSet,
                 precision: str) -> tuple[int, Path] | None:
    """(epoch, checkpoint dir) to continue from, after checking it continues this very run; None: start fresh."""
    found = last_checkpoint(cfg) if cfg.resume else None
    if cfg.resume and found is None:
        LOG.warning("--resume: no checkpoint in %s; starting from the base model", cfg.output_dir / CHECKPOINTS)
    if found is None:
        return None
    state = json.loads((found[1] / "state.json").read_text())
    now = training_identity(cfg, labels, size, train, precision)
    changed = {k: (state.get(k), v) for k, v in now.items() if state.get(k) != v}
    if changed:
        raise JobError(f"--resume: {found[1]} was written with other settings, so resuming would not continue "
                       "the same run: " + "; ".join(f"{k} was {a!r}, now {b!r}" for k, (a, b) in changed.items()))
    if found[0] > cfg.epochs:
        raise JobError(f"--resume: the last checkpoint is epoch {found[0]}, beyond --epochs {cfg.epochs}")
    return found


def restore(ckpt, optimizer, checkpoint: Path) -> None:
    """Every rank reads the checkpoint; rank 0's copy is then broadcast anyway (BroadcastGlobalVariablesCallback)."""
    ckpt.read(str(checkpoint / "ckpt")).assert_consumed()
    step = json.loads((checkpoint / "state.json").read_text())["step"]
    if int(optimizer.iterations.numpy()) != step:
        raise JobError(f"--resume: {checkpoint} restored step {int(optimizer.iterations.numpy())}, expected {step}")


class EvaluateAndCheckpoint(tf.keras.callbacks.Callback):
    """At every epoch end: eval across ranks, then (coordinator) log, TensorBoard, metrics.json and an
    atomic checkpoint."""

    def __init__(self, cfg, rt, model, tokenizer, evaluation, labels, ckpt, identity, history, precision_reason):
        super().__init__()
        self.cfg, self.rt, self.net, self.tokenizer = cfg, rt, model, tokenizer
        self.evaluation, self.labels, self.ckpt, self.identity, self.history = evaluation, labels, ckpt, identity, history
        self.precision_reason = precision_reason
        self.writer = tf.summary.create_file_writer(str(cfg.output_dir / "tensorboard")) if rt.is_coordinator else None
        self.start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        counts = confusion(self.net, self.tokenizer, self.evaluation, len(self.labels), self.rt, self.cfg.batch_size,
                           self.cfg.max_length)
        metrics = classification_metrics(counts, self.labels)
        record = {"epoch": epoch + 1, "train_loss": float(logs["loss"]), "train_accuracy": float(logs["accuracy"]),
                  "eval": metrics, "seconds": time.perf_counter() - self.start}
        self.history.append(record)
        if not self.rt.is_coordinator:
            return
        LOG.info("epoch %d/%d: loss %.4f, eval accuracy %.4f, macro-F1 %.4f (%d examples)", epoch + 1,
                 self.cfg.epochs, record["train_loss"], metrics["accuracy"], metrics["macro_f1"], metrics["examples"])
        with self.writer.as_default(step=epoch + 1):
            tf.summary.scalar("train/loss", record["train_loss"])
            tf.summary.scalar("eval/accuracy", metrics["accuracy"])
            tf.summary.scalar("eval/macro_f1", metrics["macro_f1"])
        self.writer.flush()
        step = int(self.net.optimizer.iterations.numpy())
        save_checkpoint(self.ckpt, self.cfg, epoch + 1, {"epoch": epoch + 1, "step": step, **self.identity})
        output.write_json(self.cfg.output_dir / "metrics.json", {
            "labels": self.labels, "precision": self.identity["precision"], "precision_reason": self.precision_reason,
            "epochs": self.history})


def run(cfg: FinetuneConfig, runtime_config: runtime.RuntimeConfig) -> dict:
    from hvdinfer.parallel import data_parallel

    rt = runtime.init_runtime(runtime_config)
    train, evaluation, labels = load_data(cfg)
    precision, precision_reason = runtime.resolve_precision(cfg.precision, collect.allgather_json)
    resume_from = check_resume(cfg, labels, rt.size, train, precision)
    first_epoch = resume_from[0] if resume_from else 0
    model, tokenizer, base_dir = build_model(cfg, labels, precision)
    if cfg.max_length > model.config.max_position:
        raise JobError(f"--max-length {cfg.max_length} exceeds the model's {model.config.max_position} positions")
    token_ids, _ = tokenizer.encode_ids(train.texts, cfg.max_length)

    peak = data_parallel.scaled_learning_rate(cfg.lr, rt.size, not cfg.no_lr_scaling)
    optimizer, callbacks = data_parallel.apply_data_parallel(
        tf.keras.optimizers.AdamW(data_parallel.LinearWarmup(peak, cfg.warmup_steps), weight_decay=cfg.weight_decay))
    model.compile(optimizer=optimizer, loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    # Keras creates optimizer slots lazily; build them now so a checkpoint restores into real variables.
    optimizer.build(model.trainable_variables)
    ckpt = tf.train.Checkpoint(model=model, optimizer=optimizer)
    if resume_from:
        restore(ckpt, optimizer, resume_from[1])
        LOG.info("resumed from %s (epoch %d of %d)", resume_from[1], first_epoch, cfg.epochs)

    history = [h for h in _read_history(cfg) if h["epoch"] <= first_epoch] if resume_from else []
    epoch_end = EvaluateAndCheckpoint(cfg, rt, model, tokenizer, evaluation, labels, ckpt,
                                      training_identity(cfg, labels, rt.size, train, precision), history,
                                      precision_reason)
    steps = steps_per_epoch(len(train.texts), rt.size, cfg.batch_size)
    start = time.perf_counter()
    if first_epoch < cfg.epochs:
        model.fit(batches_from(first_epoch, cfg, train, token_ids, tokenizer.pad_id, rt), steps_per_epoch=steps,
                  epochs=cfg.epochs, initial_epoch=first_epoch, callbacks=callbacks + [epoch_end],
                  verbose=2 if rt.is_coordinator else 0)
    seconds = time.perf_counter() - start
    if rt.is_coordinator:
        write_model_dir(model, base_dir, cfg.output_dir, cfg.max_length)
        LOG.info("wrote model directory %s", cfg.output_dir)
    trained = (cfg.epochs - first_epoch) * steps * cfg.batch_size * rt.size
    final = history[-1]["eval"] if history else {}
    return {"epochs": cfg.epochs, "ranks": rt.size, "seconds": seconds, "samples_per_s": trained / seconds if seconds else 0,
            "eval_accuracy": final.get("accuracy"), "eval_macro_f1": final.get("macro_f1"), "precision": precision,
            "precision_reason": precision_reason}


def _read_history(cfg: FinetuneConfig) -> list[dict]:
    path = cfg.output_dir / "metrics.json"
    return json.loads(path.read_text())["epochs"] if path.is_file() else []
