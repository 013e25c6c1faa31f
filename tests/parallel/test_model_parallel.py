"""Model parallelism, one table of combinations: each row (model, task, dp, pp, tp, micro-batches) runs
the task as `hvdinfer TASK --pp K --tp T --micro-batches M` runs it (through cli.dispatch, in this
process) and is compared with the single-device result:

  infer     embeddings within 1e-5 of the plain job's (--pp/--tp off: each rank runs the whole model);
  generate  the same continuations token for token, and the model's logits (prefill, decode steps,
            no-cache) within 1e-5 relative to their scale;
  finetune  the pipelined classifier's initial weights and gradients equal the single-device model's
            within 1e-5, a short fine-tuning run ends on the same weights (within 1e-4), and the tuned
            model classifies the same pipelined (class probabilities within 1e-5). Under --tp the run
            is compared with one device doing what the row's dp replicas do together (the plain job
            at this world size would have dp = ranks), each rank's weight and gradient slices with
            the single-device model's, and the model directory and checkpoints must hold the full
            model: it loads without --tp, and a resume from a checkpoint ends bit for bit the same.

A row runs where the world has dp x tp ranks: `make parallel` runs this file at 1, 2 and 3 ranks,
and tests/integration/test_model_parallel_np4.py at 4. Debug sizes and a few records: seconds a row.
"""
import collections
import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from hvdinfer import cli, runtime
from hvdinfer.collect import allgather_json
from hvdinfer.engine import watchdog
from models import bert, decoding, gpt_loading, heads, loading, registry
from tests import tiny, tiny_gpt

NP3 = True
MAX_PP = 2
try:  # the stages' logical CPU devices, before TF initialises its devices (conftest's init leaves them be)
    runtime.stage_devices(MAX_PP)
    NO_STAGES = None
except runtime.JobError as exc:
    NO_STAGES = str(exc)


@dataclasses.dataclass(frozen=True)
class Row:
    model: str
    task: str
    dp: int
    pp: int = 1
    tp: int = 1
    micro_batches: int = 1

    @property
    def ranks(self) -> int:
        return self.dp * self.tp

    def flags(self) -> list[str]:
        return ["--pp", str(self.pp), "--tp", str(self.tp), "--micro-batches", str(self.micro_batches)]

    def __str__(self):
        return f"{self.model}-{self.task}-dp{self.dp}-pp{self.pp}-tp{self.tp}-mb{self.micro_batches}"


TABLE = [
    Row("bert", "infer", dp=1, pp=2),
    Row("bert", "infer", dp=1, pp=2, micro_batches=3),
    Row("gpt", "generate", dp=1, pp=2),
    Row("gpt", "generate", dp=1, pp=2, micro_batches=2),
    Row("bert", "finetune", dp=1, pp=2, micro_batches=2),
    Row("bert", "infer", dp=1, tp=2),
    Row("bert", "infer", dp=1, pp=2, tp=2, micro_batches=2),
    Row("gpt", "generate", dp=1, tp=2),
    Row("gpt", "generate", dp=1, pp=2, tp=2, micro_batches=2),
    Row("bert", "finetune", dp=2, pp=2, micro_batches=2),
    Row("bert", "finetune", dp=1, tp=2),
    Row("bert", "infer", dp=3, pp=2, micro_batches=2),
    Row("gpt", "generate", dp=3, pp=2, micro_batches=2),
    Row("bert", "infer", dp=2, tp=2),
    Row("gpt", "generate", dp=2, pp=2, tp=2, micro_batches=2),
    Row("bert", "finetune", dp=2, tp=2),
]
WORDS = ["the", "cat", "sat", "on", "mat", "a", "dog", "Hello", "world", "and"]
GENERATE = ["--max-new-tokens", "6", "--temperature", "0.8", "--top-k", "20", "--seed", "3", "--batch-size", "4"]
TRAINING = {"batch_size": 4, "lr": 3e-3, "warmup_steps": 2, "seed": 7, "max_length": 16, "epochs": 1, "dropout": 0.1,
            "precision": "fp32"}
FINETUNE = [part for key, value in TRAINING.items() for part in (f"--{key.replace('_', '-')}", str(value))]
TP_EPOCHS = 2  # the tp rows train two epochs, so that a resume from the first checkpoint can be compared


def rows_here():
    return [pytest.param(row, id=str(row)) for row in TABLE if row.ranks == runtime.launcher_size()]


def shared_dir(tmp_path_factory, name: str) -> Path:
    """A directory every rank names the same: the coordinator's, shared by a first collective."""
    return Path(allgather_json(str(tmp_path_factory.mktemp(name)))[0])


@pytest.fixture(scope="module")
def files(rt, tmp_path_factory):
    root = shared_dir(tmp_path_factory, "mp")
    # Every rank makes the model, so Keras names the variables of later models alike on every rank
    # (Horovod matches the broadcasts of fine-tuning by those names).
    base = tiny.random_model(3)
    if rt.is_coordinator:
        tiny.write_model_dir(root / "bert", base, max_seq_length=16)
        config = registry.gpt_size("debug")
        (root / "gpt").mkdir()
        tiny_gpt.write_model_dir(root / "gpt", tiny_gpt.random_checkpoint(config, seed=4), config)
        rng = np.random.default_rng(0)
        texts = [" ".join(rng.choice(WORDS, rng.integers(1, 9))) for _ in range(21)]
        (root / "texts.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts[:8]))
        for name, n, seed in (("train", 8, 0), ("eval", 5, 1)):
            labelled = [{"text": " ".join(list(rng.choice(WORDS[:6], rng.integers(0, 4))) + [k]), "label": label}
                        for i in range(n) for label, k in [(("neg", "dog"), ("pos", "cat"))[(i + seed) % 2]]]
            (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in labelled))
    allgather_json(0)
    return root


def run_task(files: Path, row: Row, out: Path, parallel: bool, extra: tuple[str, ...] = ()) -> None:
    """The task of `row` as the CLI runs it, with or without its model-parallel flags."""
    flags = (row.flags() if parallel else []) + list(extra)
    if row.task == "infer":
        argv = ["infer", "--model", str(files / "bert"), "--input", str(files / "texts.jsonl"), "--output", str(out),
                "--batch-size", "8", "--quiet", "--no-journal"]
    elif row.task == "generate":
        argv = ["generate", "--model", str(files / "gpt"), "--input", str(files / "prompts.jsonl"), "--output",
                str(out), *GENERATE, "--quiet", "--no-journal"]
    else:
        argv = ["finetune", "--model", str(files / "bert"), "--train", str(files / "train.jsonl"), "--eval",
                str(files / "eval.jsonl"), "--output-dir", str(out), *FINETUNE]
    watchdog.beat(f"running {argv[0]}", armed=True)
    assert cli.dispatch(cli.build_parser().parse_args(argv + flags)) == 0
    # The stuck-rank watchdog judges jobs; the checks between them are not one.
    watchdog.beat("checking results", armed=False)


_REFERENCES: dict = {}


def reference(files: Path, row: Row) -> Path:
    """The task's single-device result (every rank runs the whole model), once per task and world."""
    if row.task not in _REFERENCES:
        out = files / f"reference-{row.task}" / ("out" if row.task == "finetune" else "out.jsonl")
        run_task(files, row, out, parallel=False)
        _REFERENCES[row.task] = out
    return _REFERENCES[row.task]


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.skipif(NO_STAGES is not None, reason=f"no stage devices: {NO_STAGES}")
@pytest.mark.parametrize("row", rows_here())
def test_combination_equals_single_device(rt, files, row):
    if row.task == "finetune" and row.tp > 1:
        out = files / str(row) / "out"
        run_task(files, row, out, parallel=True, extra=("--epochs", str(TP_EPOCHS), "--checkpoint-every", "1"))
        check_finetune_tp(rt, files, row, out)
        return
    want = reference(files, row)
    out = files / str(row) / ("out" if row.task == "finetune" else "out.jsonl")
    run_task(files, row, out, parallel=True)
    if row.task == "finetune":
        check_finetune(rt, files, row, want, out)
    elif rt.is_coordinator and row.task == "infer":
        got, expected = read(out), read(want)
        assert [r["index"] for r in got] == [r["index"] for r in expected]
        np.testing.assert_allclose([r["embedding"] for r in got], [r["embedding"] for r in expected], atol=1e-5)
    elif row.task == "generate":
        if rt.is_coordinator:
            assert read(out) == read(want)
        check_decoder_logits(files, row)


def _close(got, want, what: str) -> None:
    """Within 1e-5 of the single-device values, relative to their scale (logits of random weights run to ~10^2)."""
    scale = max(1.0, float(np.abs(want).max()))
    assert np.abs(np.asarray(got) - np.asarray(want)).max() <= 1e-5 * scale, what


def check_decoder_logits(files: Path, row: Row) -> None:
    """Every rank: the parallel model's logits (cached prefill + decode steps, and the full recompute)."""
    from hvdinfer.parallel import parallelize
    from hvdinfer.parallel.dims import ParallelConfig

    plain, tokenizer, _ = gpt_loading.load_gpt(files / "gpt")
    runner, _, _ = parallelize.load_gpt(files / "gpt", ParallelConfig(row.pp, row.tp, row.micro_batches))
    prompts = [tokenizer.encode(t) for t in ("Hello world", "the cat sat on the mat")]
    ids, mask = decoding.left_pad(prompts)
    _close(runner.last_logits(ids, mask).numpy(), plain.last_logits(ids, mask).numpy(), "no-cache logits")
    mine, theirs = runner.new_cache(2, 16), plain.new_cache(2, 16)
    _close(runner.prefill(ids, mask, mine)[0].numpy(), plain.prefill(ids, mask, theirs)[0].numpy(), "prefill")
    cache_mask = np.zeros((2, 16), np.int32)
    cache_mask[:, :ids.shape[1]] = mask
    positions = mask.sum(axis=1).astype(np.int32)
    for step in range(2):
        column = ids.shape[1] + step
        cache_mask[:, column] = 1
        tokens = np.array([5, 11], np.int32) + step
        _close(runner.decode_step(tokens, positions + step, column, mine, cache_mask)[0].numpy(),
               plain.decode_step(tokens, positions + step, column, theirs, cache_mask)[0].numpy(), f"decode {step}")
    check_slot_decoder(plain, runner, tokenizer, prompts)


def check_slot_decoder(plain, runner, tokenizer, prompts) -> None:
    """The server's iteration-level batching over the parallel model (its slot cache): the same logits
    for prompts prefilled into any rows and stepped together, and the same tokens for sequences that
    join at different steps."""
    from models.slots import GPTSlots, SlotDecoder

    mine, theirs = runner.slot_cache(3, 32), GPTSlots(plain, 3, 32)
    ids, mask = decoding.left_pad(prompts)
    _close(mine.prefill(ids, mask, [2, 0]), theirs.prefill(ids, mask, [2, 0]), "slot prefill")
    cache_mask = np.concatenate([mask, np.ones((2, 1), np.int32)], axis=1)
    step = ([5, 11], mask.sum(axis=1), [2, 0], [ids.shape[1]] * 2, cache_mask)
    _close(mine.step(*step), theirs.step(*step), "slot step")
    params = decoding.SamplingParams(max_new_tokens=5, ignore_eos=True)
    arrivals = {0: [("a", prompts[0], params, 0)], 2: [("b", prompts[1], params, 1), ("c", [7], params, 2)]}
    results = []
    for compute in (mine, theirs):
        decoder, tokens, waiting = SlotDecoder(compute, tokenizer), collections.defaultdict(list), dict(arrivals)
        for at in range(12):
            for event in decoder.admit(waiting.pop(at, [])) + (decoder.step() if decoder.active else []):
                tokens[event.key] += event.tokens
        results.append(dict(tokens))
    assert results[0] == results[1] and all(len(t) == 5 for t in results[0].values()), results


def check_finetune(rt, files: Path, row: Row, want: Path, out: Path) -> None:
    from hvdinfer.parallel import parallelize
    from hvdinfer.parallel.dims import ParallelConfig

    # The runs: the same weights at the end (Adam's steps amplify rounding a little).
    if rt.is_coordinator:
        import safetensors.numpy

        for name in ("model.safetensors", "classifier.safetensors"):
            got, expected = (safetensors.numpy.load_file(str(d / name)) for d in (out, want))
            assert got.keys() == expected.keys()
            for key in got:
                np.testing.assert_allclose(got[key], expected[key], atol=1e-4, err_msg=key)
    if rt.size > 1:
        return  # the model-level checks below do not depend on the ranks: the 1-rank row makes them
    # The model: same initial weights, same loss and gradients on a batch (dropout on).
    labels = ["neg", "pos"]
    embedder, tokenizer, _ = loading.load_sentence_embedder(files / "bert")
    tf.keras.utils.set_random_seed(7)
    plain = bert.build(heads.TextClassifier(embedder, labels, 0.1, 7))
    piped, _, _ = parallelize.classifier_for_training(files / "bert", labels, 0.1, 7,
                                                      ParallelConfig(row.pp, row.tp, row.micro_batches))
    for a, b in zip(plain.weights, piped.inner.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.name)
    ids, _ = tokenizer.encode_ids(["the cat sat", "a dog", "the mat on a dog", "cat", "run the dog"], 16)
    batch = [np.array(i + [0] * (8 - len(i)), np.int32) for i in ids]
    inputs = {"input_ids": np.stack(batch), "attention_mask": (np.stack(batch) != 0).astype(np.int32)}
    y = np.array([1, 0, 0, 1, 0])
    losses = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    grads = []
    for model, variables in ((plain, plain.trainable_variables), (piped, piped.inner.trainable_variables)):
        with tf.GradientTape() as tape:
            loss = losses(y, model(inputs, training=True))
        grads.append((loss.numpy(), tape.gradient(loss, variables)))
    assert abs(grads[0][0] - grads[1][0]) < 1e-5
    for var, a, b in zip(plain.trainable_variables, grads[0][1], grads[1][1]):
        np.testing.assert_allclose(tf.convert_to_tensor(b).numpy(), tf.convert_to_tensor(a).numpy(), atol=1e-5,
                                   err_msg=var.name)
    # The tuned model directory classifies the same pipelined (infer --task classify --pp).
    allgather_json(0)  # the coordinator has written it
    tuned, _, _ = loading.load_classifier(out)
    staged, _, _ = parallelize.load_embedder(out, True, ParallelConfig(row.pp, row.tp, row.micro_batches))
    np.testing.assert_allclose(staged.forward(inputs["input_ids"], inputs["attention_mask"]).numpy(),
                               tf.nn.softmax(tuned(inputs)).numpy(), atol=1e-5)


def saved_model(model_dir: Path) -> dict[str, np.ndarray]:
    import safetensors.numpy

    return {**safetensors.numpy.load_file(str(model_dir / "model.safetensors")),
            **safetensors.numpy.load_file(str(model_dir / "classifier.safetensors"))}


def check_finetune_tp(rt, files: Path, row: Row, out: Path) -> None:
    """Every rank: a tp row's run (with a checkpoint every step), model directory, checkpoints, model, and
    (one dp group) resume."""
    import safetensors.numpy

    # The run ends where one device doing what the row's dp replicas do together ends. The files are
    # the same for every rank: the coordinator checks them (the one-device run is the row's costliest part).
    allgather_json(0)  # the coordinator has written the directory
    got = saved_model(out)
    if rt.is_coordinator:
        want = one_device_finetune(files, row.dp, TP_EPOCHS)
        assert got.keys() == want.keys()
        for key in want:
            np.testing.assert_allclose(got[key], want[key], atol=1e-4, err_msg=key)
        # Checkpoints hold the full model (the last one is what the directory holds) and full Adam moments.
        last = safetensors.numpy.load_file(str(out / "checkpoints" / f"epoch-{TP_EPOCHS:04d}" / "ckpt.safetensors"))
        for key in got:
            np.testing.assert_array_equal(last[key], got[key], err_msg=key)
            assert last[f"optimizer/m/{key}"].shape == got[key].shape, key
    allgather_json(0)  # the others wait here, not inside the next collective
    check_tp_classifier(files, row, out)
    if row.dp > 1:
        return  # the resume below takes a whole run: the 2-rank row makes it
    # Resuming from the first epoch's checkpoint (each rank reading its slices again) ends bit for bit the same.
    resumed = files / f"{row}-resumed" / "out"
    if rt.is_coordinator:
        shutil.copytree(out / "checkpoints" / "epoch-0001", resumed / "checkpoints" / "epoch-0001")
        shutil.copy(out / "metrics.json", resumed / "metrics.json")
    allgather_json(0)
    run_task(files, row, resumed, parallel=True, extra=("--epochs", str(TP_EPOCHS), "--resume"))
    allgather_json(0)
    again = saved_model(resumed)
    assert again.keys() == got.keys()
    for key in got:
        np.testing.assert_array_equal(again[key], got[key], err_msg=key)


def one_device_finetune(files: Path, replicas: int, epochs: int) -> dict[str, np.ndarray]:
    """The weights `replicas` data-parallel replicas reach together (what finetune.run trains), on one
    device: every step each replica's batch through the plain model with the step's dropout mask, the
    gradients averaged (hvd.DistributedOptimizer), one AdamW update at the scaled rate."""
    from hvdinfer.parallel.data_parallel import LinearWarmup
    from hvdinfer.tasks import finetune
    from models import weights

    cfg = finetune.FinetuneConfig(model=str(files / "bert"), train=files / "train.jsonl", eval=files / "eval.jsonl",
                                  output_dir=files, **{**TRAINING, "epochs": epochs})
    train, _, labels = finetune.load_data(cfg)
    model, tokenizer, _ = finetune.build_model(cfg, labels, "fp32")
    token_ids, _ = tokenizer.encode_ids(train.texts, cfg.max_length)
    feeds = [finetune.batches_from(finetune.Position(0), cfg, train, token_ids, tokenizer.pad_id, replicas, r)
             for r in range(replicas)]
    optimizer = tf.keras.optimizers.AdamW(LinearWarmup(cfg.lr * replicas, cfg.warmup_steps),
                                          weight_decay=cfg.weight_decay)
    losses = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    variables = model.trainable_variables
    for step in range(epochs * finetune.steps_per_epoch(len(train.texts), replicas, cfg.batch_size)):
        total = None
        for feed in feeds:
            inputs, labels_ = next(feed)
            model.dropout.counter.assign(step)  # each replica draws this step's mask
            with tf.GradientTape() as tape:
                loss = losses(labels_, model(inputs, training=True))
            grads = [tf.convert_to_tensor(g) for g in tape.gradient(loss, variables)]
            total = grads if total is None else [a + b for a, b in zip(total, grads)]
        optimizer.apply_gradients(zip([g / replicas for g in total], variables))
    return {**weights.hf_tensors(model.embedder), "classifier.weight": model.classifier.kernel.numpy().T,
            "classifier.bias": model.classifier.bias.numpy()}


def rank_slice(full: np.ndarray, spec, tp: int, tp_rank: int) -> np.ndarray:
    """Rank tp_rank's slice of a tensor in checkpoint layout (what it should hold of it)."""
    from hvdinfer.parallel import tensor_parallel

    if spec is None:
        return full
    axis, parts = spec
    ranges = tensor_parallel.shard_ranges(full.shape[axis], parts, tp, tp_rank)
    return np.concatenate([np.take(full, np.arange(a, b), axis=axis) for a, b in ranges], axis=axis)


def check_tp_classifier(files: Path, row: Row, out: Path) -> None:
    """Every rank: the tensor-parallel classifier for training holds its slice of the single-device
    model's weights, gets its slice of the single-device gradients (dropout on; the replicated ones bit
    for bit the same on every rank), is gathered whole, refuses replicated weights that differ; the
    tuned directory is the whole model (it loads without --tp) and classifies the same with --tp."""
    from hvdinfer.parallel import parallelize, sharded_state
    from hvdinfer.parallel.dims import ParallelConfig

    config = ParallelConfig(row.pp, row.tp, row.micro_batches)
    labels = ["neg", "pos"]
    embedder, tokenizer, _ = loading.load_sentence_embedder(files / "bert")
    tf.keras.utils.set_random_seed(7)
    plain = bert.build(heads.TextClassifier(embedder, labels, 0.1, 7))
    sharded, _, _ = parallelize.classifier_for_training(files / "bert", labels, 0.1, 7, config)
    group = sharded.runner.group
    mine = sharded_state.classifier_entries(sharded.inner)
    theirs = {e.key: e for e in sharded_state.classifier_entries(plain)}
    for e in mine:
        want = rank_slice(theirs[e.key].stored(theirs[e.key].variable.numpy()), e.spec, row.tp, group.tp_rank)
        np.testing.assert_array_equal(e.stored(e.variable.numpy()), want, err_msg=e.key)
    ids, _ = tokenizer.encode_ids(["the cat sat", "a dog", "the mat on a dog", "cat", "run the dog"], 16)
    batch = np.stack([np.array(i + [0] * (8 - len(i)), np.int32) for i in ids])
    inputs = {"input_ids": batch, "attention_mask": (batch != 0).astype(np.int32)}
    y = np.array([1, 0, 0, 1, 0])
    losses = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    grads = {}
    for name, model, entries in (("plain", plain, list(theirs.values())), ("tp", sharded, mine)):
        trainable = [e for e in entries if e.variable.trainable]
        with tf.GradientTape() as tape:
            loss = losses(y, model(inputs, training=True))
        values = tape.gradient(loss, [e.variable for e in trainable])
        grads[name] = (float(loss), {e.key: e.stored(tf.convert_to_tensor(g).numpy())
                                     for e, g in zip(trainable, values)})
    assert abs(grads["plain"][0] - grads["tp"][0]) < 1e-5
    for e in mine:
        if e.variable.trainable:
            want = rank_slice(grads["plain"][1][e.key], e.spec, row.tp, group.tp_rank)
            np.testing.assert_allclose(grads["tp"][1][e.key], want, atol=1e-5, err_msg=e.key)
    replicated = sorted(e.key for e in mine if e.variable.trainable and e.spec is None)
    digest = hashlib.sha256(b"".join(grads["tp"][1][k].tobytes() for k in replicated)).hexdigest()
    assert len(set(allgather_json(digest))) == 1, "replicated gradients differ between ranks"
    # Gathered whole: the single-device model's tensors; a replicated weight that differs is refused.
    state = sharded_state.ShardedState(sharded, None, group)
    state.gather()
    for key, value in state.full.items():
        np.testing.assert_array_equal(value, theirs[key].stored(theirs[key].variable.numpy()), err_msg=key)
    assert bool(state.full) == (group.rank == 0)
    if group.tp_rank == 1:
        sharded.inner.classifier.bias.assign_add([1.0, 0.0])
    if group.dp_rank == 0:
        with pytest.raises(runtime.JobError, match="replicated tensor classifier.bias differs between the ranks"):
            state.gather()
    # The tuned directory: the whole model, which classifies the same with --tp.
    allgather_json(0)
    tuned, _, _ = loading.load_classifier(out)
    split, _, _ = parallelize.load_embedder(out, True, config)
    np.testing.assert_allclose(split.forward(inputs["input_ids"], inputs["attention_mask"]).numpy(),
                               tf.nn.softmax(tuned(inputs)).numpy(), atol=1e-5)


@pytest.mark.skipif(NO_STAGES is not None, reason=f"no stage devices: {NO_STAGES}")
def test_variables_live_on_their_stage_and_tp_ranks_hold_their_share(rt, files):
    """Every variable on its layer's stage device; under --tp each rank holds its share of the blocks."""
    from hvdinfer.parallel import parallelize, placement
    from hvdinfer.parallel.dims import ParallelConfig

    tp = 2 if rt.size % 2 == 0 else 1
    runner, _, _ = parallelize.load_embedder(files / "bert", False, ParallelConfig(pp=2, tp=tp))
    for name, layer in runner.model.named_layers():
        for var in layer.weights:
            assert tf.DeviceSpec.from_string(var.device).device_index == runner.placement.stage(name), var.name
    held = placement.parameter_bytes(runner.model)
    assert set(held) == {"/CPU:0", "/CPU:1"}
    blocks = sum(int(np.prod(w.shape)) for b in runner.model.encoder.blocks for w in b.weights)
    whole = sum(int(np.prod(w.shape)) for b in bert.build(bert.SentenceEmbedder(registry.size("debug"))).encoder.blocks
                for w in b.weights)
    assert blocks / whole <= (0.52 if tp == 2 else 1.0)


def test_clear_errors_before_any_compute(rt, files):
    from hvdinfer.parallel import parallelize
    from hvdinfer.parallel.dims import ParallelConfig

    with pytest.raises(runtime.JobError, match="--pp 3 on a model with 2 block"):
        parallelize.load_gpt(files / "gpt", ParallelConfig(pp=3))
    if rt.size % 2:
        with pytest.raises(runtime.JobError, match=f"--tp 2 needs a multiple of 2 ranks.*the job has {rt.size}"):
            parallelize.load_embedder(files / "bert", False, ParallelConfig(tp=2))
    if rt.size == 3:
        with pytest.raises(runtime.JobError, match="--tp 3 does not divide the model's 4 attention heads"):
            parallelize.load_gpt(files / "gpt", ParallelConfig(tp=3))
