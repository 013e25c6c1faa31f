"""Data-parallel fine-tuning of a sentence embedder + classifier head, with exact resume.

    mpirun -np 2 --oversubscribe --bind-to none .venv/bin/hvdinfer finetune --model minilm-l6 \
        --task classify --train train.jsonl --eval eval.jsonl --output-dir runs/rt [--checkpoint-every N]
    ... the same command with --resume continues from the last checkpoint.

The data path, top-down: read + validate (every rank, before any training) -> tokenise -> each
epoch a seeded permutation of the training set, dealt round-robin to the ranks and padded by
wrap-around so every rank takes the same number of steps -> `fit` with hvd.DistributedOptimizer ->
every N optimizer steps (--checkpoint-every) a mid-epoch checkpoint -> at each epoch end:
evaluation over the whole eval set across ranks (confusion counts allreduced), metrics.json and an
atomic epoch checkpoint from the coordinator -> at the end, DIR is a model directory that
`hvdinfer infer --task classify` loads.

Checkpoints live in DIR/checkpoints (written as hvdinfer/engine/checkpoints.py describes): `epoch-NNNN`
after each epoch, and at most one `step-NNNNNNNN` (the newest mid-epoch one; an epoch checkpoint
makes it stale and removes it). Each holds the weights, optimizer state and dropout counter, and
state.json with the position (epochs done, steps into the next epoch, optimizer step) and the run's
identity. Only the coordinator writes them, each staged in a hidden directory and renamed into place. `--resume` continues from the furthest one:
from a mid-epoch checkpoint, a first `fit` runs the rest of the interrupted epoch (its seeded batch
order, less the batches already trained) and that epoch's evaluation and checkpoint, then training
goes on epoch by epoch. The weights end bitwise as an uninterrupted run's. The resumed epoch's
logged train loss and accuracy are Keras' running means since the resume, so they cover only the
steps trained after it (`train_steps` in its metrics.json record says how many); its evaluation
covers the whole eval set as always.

Model parallelism (hvdinfer/parallel): `--pp K` trains a PipelineModel (stages, micro-batches) on
each rank. `--tp T` shards every block over T ranks, so a model replica is a group of T ranks (dp =
ranks / T groups): the data is dealt to the groups, not the ranks (every rank of a group trains on
the same batches), the learning rate scales with dp, gradients are averaged only among the ranks
holding the same shard (data_parallel.py), the evaluation is counted once per group, and
checkpoints and the final model directory hold the full model, gathered from the shards
(parallel/sharded_state.py) and sliced again on resume.

Test-only knob: HVDINFER_TEST_EXIT_AFTER_CHECKPOINT (engine/checkpoints.py), a crash right after the
coordinator's k-th checkpoint, for the resume tests.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path

import numpy as np
import tensorflow as tf

from hvdinfer import collect, output, runtime
from hvdinfer.data import batching, readers
from hvdinfer.data.shard import deal_wrapped
from hvdinfer.engine import checkpoints
from hvdinfer.engine import job as engine_job
from hvdinfer.engine import watchdog
from hvdinfer.engine.keras_beat import TrainingProgress, WatchdogBeat
from hvdinfer.parallel.dims import ParallelConfig
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
    """Records per step per model replica (a rank, or a group of --tp ranks); the effective batch is
    batch_size x replicas."""
    lr: float = 3e-5
    """Base learning rate for one replica; scaled by the number of replicas unless no_lr_scaling."""
    no_lr_scaling: bool = False
    """Use lr as given instead of lr x replicas."""
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
    checkpoint_every: int = 0
    """Also checkpoint every this many optimizer steps, mid-epoch (0: only at epoch ends)."""
    stall_timeout: float = 60.0
    """End the job when a rank makes no progress (a training step) for this many seconds."""
    precision: str = "auto"
    """auto (bf16 where the hardware computes it natively, else fp32), fp32, or bf16 compute with
    float32 weights, optimizer state and loss."""
    parallel: ParallelConfig = ParallelConfig()
    """Model parallelism: --pp K stages (with --micro-batches) on K devices per rank, --tp T ranks per model
    replica (ranks = dp x T)."""
    grad_compression: str = "none"
    """Gradients on the wire: none (fp32, exact) or fp16 (half the bytes, for slow links between hosts)."""

    def __post_init__(self):
        if self.task != "classify":
            raise JobError(f"--task {self.task}: only classify can be fine-tuned")
        for name in ("epochs", "batch_size", "max_length"):
            if getattr(self, name) < 1:
                raise JobError(f"--{name.replace('_', '-')} must be >= 1")
        if self.checkpoint_every < 0:
            raise JobError("--checkpoint-every must be >= 0 (0: checkpoints at epoch ends only)")
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


@dataclasses.dataclass(frozen=True)
class Replica:
    """This rank's place in data parallelism: model replica `index` of `count`. A replica is one rank,
    or under --tp a group of ranks that train on the same data; the first rank of a group reports
    its results (`reports`), so nothing is counted once per tp rank."""

    count: int
    index: int
    reports: bool = True

    @classmethod
    def of(cls, rt: runtime.Runtime, group=None) -> "Replica":
        if group is None:
            return cls(rt.size, rt.rank)
        return cls(group.dims.dp, group.dp_rank, group.is_leader)


def epoch_shard(n: int, epoch: int, seed: int, replicas: int, replica: int, batch_size: int) -> np.ndarray:
    """Replica `replica`'s record order for `epoch`: a seeded permutation dealt round-robin, wrapped so
    every replica holds exactly steps x batch_size records (none runs out first and hangs the allreduce)."""
    order = np.random.default_rng([seed, epoch]).permutation(n)
    return deal_wrapped(order, replicas, replica, steps_per_epoch(n, replicas, batch_size) * batch_size)


def steps_per_epoch(n: int, replicas: int, batch_size: int) -> int:
    return max(1, -(-n // (replicas * batch_size)))


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


@dataclasses.dataclass(frozen=True, order=True)
class Position:
    """Where training stands: `epoch` epochs done and `step_in_epoch` optimizer steps into the next one."""

    epoch: int
    step_in_epoch: int = 0

    def step(self, steps_per_epoch: int) -> int:
        """The optimizer step of the whole run."""
        return self.epoch * steps_per_epoch + self.step_in_epoch


def batches_from(start: Position, cfg: FinetuneConfig, data: LabeledSet, token_ids: list[list[int]], pad_id: int,
                 replicas: int, replica: int):
    """Replica `replica`'s endless (inputs, labels) batches from `start` on, in the order `fit` consumes
    them: `start`'s epoch in its seeded order less the batches already trained, then whole epochs."""
    lengths = np.array([len(t) for t in token_ids])
    epoch, skip = start.epoch, start.step_in_epoch
    while True:
        order = epoch_shard(len(data.texts), epoch, cfg.seed, replicas, replica, cfg.batch_size)
        rng = np.random.default_rng([cfg.seed, epoch, replica])
        for rows in bucketed_steps(order, lengths, cfg.batch_size, rng)[skip:]:
            batch = batching.make_batches(rows, [token_ids[r] for r in rows], len(rows), pad_id,
                                          sort_by_length=False)[0]
            yield batch.inputs(), data.labels[rows]
        epoch, skip = epoch + 1, 0


def confusion(model, tokenizer, data: LabeledSet, num_labels: int, replica: Replica, batch_size: int,
              max_length: int) -> np.ndarray:
    """The eval set's confusion matrix (true x predicted), computed in shards (one per replica) and
    summed over ranks, each replica's counts once."""
    from hvdinfer.data.shard import ShardPlan

    mine = ShardPlan(len(data.texts), replica.count, "strided").indices(replica.index)
    counts = np.zeros((num_labels, num_labels), np.int64)
    ids, _ = tokenizer.encode_ids([data.texts[i] for i in mine], max_length)
    for number, batch in enumerate(batching.make_batches(mine, ids, batch_size * 4, tokenizer.pad_id)):
        watchdog.beat(f"evaluating batch {number + 1}")
        predicted = np.argmax(model(batch.inputs(), training=False).numpy(), axis=1)
        np.add.at(counts, (data.labels[batch.indices], predicted), 1)
    return collect.allreduce_sum(counts if replica.reports else np.zeros_like(counts))


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
            "train_sha256": digest.hexdigest(), **cfg.parallel.identity()}


def mid_epoch_checkpoint_due(position: Position, steps: int, every: int) -> bool:
    """Whether the step that reached `position` ends with a mid-epoch checkpoint: every `every` steps
    of the whole run, except at an epoch end, which has its own."""
    return every > 0 and position.step(steps) % every == 0 and 0 < position.step_in_epoch < steps


def checkpoint_name(position: Position, steps: int) -> str:
    return f"step-{position.step(steps):08d}" if position.step_in_epoch else f"epoch-{position.epoch:04d}"


@dataclasses.dataclass(frozen=True)
class SavedCheckpoint:
    position: Position
    path: Path
    state: dict


def last_checkpoint(cfg: FinetuneConfig) -> SavedCheckpoint | None:
    """The complete checkpoint furthest into training (epoch end or mid-epoch), if any."""
    found = [SavedCheckpoint(Position(state["epoch"], state.get("step_in_epoch", 0)), path, state)
             for path, state in checkpoints.complete(cfg.output_dir / CHECKPOINTS, "epoch-*", "step-*")]
    return max(found, key=lambda c: c.position, default=None)


def drop_mid_epoch_checkpoints(root: Path, keep: Path | None = None) -> None:
    """Remove every mid-epoch checkpoint but `keep`: renamed out of last_checkpoint's sight first."""
    checkpoints.remove(root, "step-*", keep)


def write_model_dir(model, base_dir: Path, out_dir: Path, max_length: int,
                    encoder_tensors: dict[str, np.ndarray] | None = None) -> None:
    """DIR becomes a model directory: the base model's config and tokenizer, the tuned encoder (the
    model's, or `encoder_tensors`: the full encoder gathered from tensor-parallel shards), the head."""
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
    model = getattr(model, "inner", model)  # a pipelined model's classifier (hvdinfer/parallel/runners.py)
    if encoder_tensors is None:
        weights.save_weights(model.embedder, out_dir / "model.safetensors")
    else:
        weights.write_safetensors(encoder_tensors, out_dir / "model.safetensors")
    heads.save_head(model, out_dir)


def build_model(cfg: FinetuneConfig, labels: list[str], precision: str):
    """(classifier, tokenizer, base model dir) from the base model, computing in `precision`."""
    from hvdinfer import assets
    from models import bert, heads, loading

    tf.keras.mixed_precision.set_global_policy("mixed_bfloat16" if precision == "bf16" else "float32")
    try:
        base = assets.resolve_model(cfg.model) if cfg.model in assets.ASSETS else Path(cfg.model)
        if cfg.parallel.enabled:
            from hvdinfer.parallel import parallelize

            return parallelize.classifier_for_training(base, labels, cfg.dropout, cfg.seed, cfg.parallel)
        embedder, tokenizer, info = loading.load_sentence_embedder(base)
    except (assets.AssetError, OSError, ValueError, KeyError) as exc:
        raise JobError(f"--model {cfg.model}: cannot load model: {exc}") from None
    tf.keras.utils.set_random_seed(cfg.seed)  # the head's initial weights: then broadcast from rank 0
    model = bert.build(heads.TextClassifier(embedder, labels, cfg.dropout, cfg.seed))
    return model, tokenizer, info.model_dir


def check_resume(cfg: FinetuneConfig, labels: list[str], size: int, train: LabeledSet,
                 precision: str) -> SavedCheckpoint | None:
    """The checkpoint to continue from, after checking it continues this very run; None: start fresh."""
    found = last_checkpoint(cfg) if cfg.resume else None
    if cfg.resume and found is None:
        LOG.warning("--resume: no checkpoint in %s; starting from the base model", cfg.output_dir / CHECKPOINTS)
    if found is None:
        return None
    checkpoints.check_same_run(found.path, found.state, training_identity(cfg, labels, size, train, precision))
    if found.position > Position(cfg.epochs):
        raise JobError(f"--resume: the last checkpoint {found.path.name} is {found.position.epoch} epoch(s) and "
                       f"{found.position.step_in_epoch} step(s) in, beyond --epochs {cfg.epochs}")
    return found


@dataclasses.dataclass(frozen=True)
class Training:
    """What the work between steps and epochs needs to know about this run."""

    cfg: FinetuneConfig
    rt: runtime.Runtime
    replica: Replica
    tokenizer: object
    evaluation: LabeledSet
    labels: list[str]
    ckpt: tf.train.Checkpoint
    """What a checkpoint writes: a tf.train.Checkpoint, or under --tp the ShardedState (the full model)."""
    identity: dict
    """training_identity: written into every checkpoint."""
    precision_reason: str
    steps: int
    """Optimizer steps per epoch."""
    sharded: object = None
    """--tp: the parallel/sharded_state.ShardedState, gathered before each checkpoint; else None."""


class EvaluateAndCheckpoint(tf.keras.callbacks.Callback):
    """Every cfg.checkpoint_every optimizer steps a mid-epoch checkpoint; at every epoch end eval across
    ranks, then (coordinator) log, TensorBoard, metrics.json and an epoch checkpoint."""

    def __init__(self, job: Training, start: Position, history: list[dict]):
        super().__init__()
        self.job, self.history = job, history
        self.skipped = start.step_in_epoch  # batches of the first epoch trained before a resume: Keras counts from 0
        self.epoch = start.epoch
        self.written = checkpoints.WriteCounter()
        self.writer = (tf.summary.create_file_writer(str(job.cfg.output_dir / "tensorboard"))
                       if job.rt.is_coordinator else None)
        self.start = time.perf_counter()

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        position = Position(self.epoch, self.skipped + batch + 1)
        if mid_epoch_checkpoint_due(position, self.job.steps, self.job.cfg.checkpoint_every):
            self.checkpoint(position)

    def on_epoch_end(self, epoch, logs=None):
        cfg = self.job.cfg
        counts = confusion(self.model, self.job.tokenizer, self.job.evaluation, len(self.job.labels),
                           self.job.replica, cfg.batch_size, cfg.max_length)
        metrics = classification_metrics(counts, self.job.labels)
        record = {"epoch": epoch + 1, "train_loss": float(logs["loss"]), "train_accuracy": float(logs["accuracy"]),
                  "train_steps": self.job.steps - self.skipped, "eval": metrics,
                  "seconds": time.perf_counter() - self.start}
        self.skipped = 0
        self.history.append(record)
        if self.job.rt.is_coordinator:
            LOG.info("epoch %d/%d: loss %.4f, eval accuracy %.4f, macro-F1 %.4f (%d examples)", epoch + 1, cfg.epochs,
                     record["train_loss"], metrics["accuracy"], metrics["macro_f1"], metrics["examples"])
            with self.writer.as_default(step=epoch + 1):
                tf.summary.scalar("train/loss", record["train_loss"])
                tf.summary.scalar("eval/accuracy", metrics["accuracy"])
                tf.summary.scalar("eval/macro_f1", metrics["macro_f1"])
            self.writer.flush()
            # metrics.json before the checkpoint: a resume from the previous one drops this epoch's record.
            output.write_json(cfg.output_dir / "metrics.json", {
                "labels": self.job.labels, "precision": self.job.identity["precision"],
                "precision_reason": self.job.precision_reason, "epochs": self.history})
        self.checkpoint(Position(epoch + 1))

    def checkpoint(self, position: Position) -> None:
        """Coordinator: an atomic checkpoint at `position`; then only the newest mid-epoch one stays. Under
        --tp every rank first takes part in gathering the full model from the shards."""
        if self.job.sharded is not None:
            self.job.sharded.gather()
        if not self.job.rt.is_coordinator:
            return
        root = self.job.cfg.output_dir / CHECKPOINTS
        state = {"epoch": position.epoch, "step_in_epoch": position.step_in_epoch,
                 "step": int(self.model.optimizer.iterations.numpy()), **self.job.identity}
        path = checkpoints.save(self.job.ckpt, root, checkpoint_name(position, self.job.steps), state)
        drop_mid_epoch_checkpoints(root, keep=path if position.step_in_epoch else None)
        if position.step_in_epoch:
            LOG.info("checkpoint %s: step %d of epoch %d", path.name, position.step_in_epoch, position.epoch + 1)
        self.written.wrote(path)


def run(cfg: FinetuneConfig, runtime_config: runtime.RuntimeConfig) -> dict:
    from hvdinfer.parallel import data_parallel, sharded_state

    rt = engine_job.start(runtime_config, cfg.stall_timeout).rt
    train, evaluation, labels = load_data(cfg)
    precision, precision_reason = runtime.resolve_precision(cfg.precision, collect.allgather_json)
    resume_from = check_resume(cfg, labels, rt.size, train, precision)
    start = resume_from.position if resume_from else Position(0)
    with watchdog.quiet("loading the model"):
        model, tokenizer, base_dir = build_model(cfg, labels, precision)
    if cfg.max_length > model.config.max_position:
        raise JobError(f"--max-length {cfg.max_length} exceeds the model's {model.config.max_position} positions")
    token_ids, _ = tokenizer.encode_ids(train.texts, cfg.max_length)

    group = getattr(getattr(model, "runner", None), "group", None)  # --tp: this rank's tensor-parallel group
    replica = Replica.of(rt, group)
    peak = data_parallel.scaled_learning_rate(cfg.lr, replica.count, not cfg.no_lr_scaling)
    optimizer, callbacks = data_parallel.apply_data_parallel(
        tf.keras.optimizers.AdamW(data_parallel.LinearWarmup(peak, cfg.warmup_steps), weight_decay=cfg.weight_decay),
        group=group, compression=cfg.grad_compression)
    model.compile(optimizer=optimizer, loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    # Keras creates optimizer slots lazily; build them now so a checkpoint restores into real variables.
    optimizer.build(model.trainable_variables)
    sharded = sharded_state.ShardedState(model, optimizer, group) if group is not None else None
    ckpt = sharded if sharded is not None else tf.train.Checkpoint(model=model, optimizer=optimizer)
    if resume_from:
        checkpoints.restore(ckpt, resume_from.path, optimizer, resume_from.state["step"])
        LOG.info("resumed from %s (%d of %d epochs done, then %d step(s))", resume_from.path, start.epoch,
                 cfg.epochs, start.step_in_epoch)

    history = [h for h in _read_history(cfg) if h["epoch"] <= start.epoch] if resume_from else []
    steps = steps_per_epoch(len(train.texts), replica.count, cfg.batch_size)
    identity = training_identity(cfg, labels, rt.size, train, precision)
    job = Training(cfg, rt, replica, tokenizer, evaluation, labels, ckpt, identity, precision_reason, steps, sharded)
    progress = TrainingProgress(Position(cfg.epochs).step(steps), start.step(steps), enabled=rt.is_coordinator)
    callbacks = callbacks + [WatchdogBeat(), progress, EvaluateAndCheckpoint(job, start, history)]
    verbose = 2 if rt.is_coordinator else 0
    began = time.perf_counter()
    epoch = start.epoch
    if start.step_in_epoch:  # the rest of the interrupted epoch, then its evaluation and checkpoint
        model.fit(batches_from(start, cfg, train, token_ids, tokenizer.pad_id, replica.count, replica.index),
                  steps_per_epoch=steps - start.step_in_epoch, epochs=epoch + 1, initial_epoch=epoch,
                  callbacks=callbacks, verbose=verbose)
        epoch += 1
    if epoch < cfg.epochs:
        model.fit(batches_from(Position(epoch), cfg, train, token_ids, tokenizer.pad_id, replica.count, replica.index),
                  steps_per_epoch=steps, epochs=cfg.epochs, initial_epoch=epoch, callbacks=callbacks, verbose=verbose)
    seconds = time.perf_counter() - began
    progress.close()
    if sharded is not None:
        sharded.gather(optimizer=False)  # Horovod: the full encoder from the first group's shards
    if rt.is_coordinator:
        write_model_dir(model, base_dir, cfg.output_dir, cfg.max_length,
                        sharded.model_tensors() if sharded is not None else None)
        LOG.info("wrote model directory %s", cfg.output_dir)
    trained = (Position(cfg.epochs).step(steps) - start.step(steps)) * cfg.batch_size * replica.count
    final = history[-1]["eval"] if history else {}
    return {"epochs": cfg.epochs, "ranks": rt.size, "seconds": seconds, "samples_per_s": trained / seconds if seconds else 0,
            "eval_accuracy": final.get("accuracy"), "eval_macro_f1": final.get("macro_f1"), "precision": precision,
            "precision_reason": precision_reason}


def _read_history(cfg: FinetuneConfig) -> list[dict]:
    path = cfg.output_dir / "metrics.json"
    return json.loads(path.read_text())["epochs"] if path.is_file() else []
