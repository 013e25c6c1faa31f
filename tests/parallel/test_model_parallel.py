"""Model parallelism, one table of combinations: each row (model, task, dp, pp, tp, micro-batches) runs
the task as `hvdinfer TASK --pp K --tp T --micro-batches M` runs it (through cli.dispatch, in this
process) and is compared with the single-device result:

  infer     embeddings within 1e-5 of the plain job's (--pp/--tp off: each rank runs the whole model);
  generate  the same continuations token for token, and the model's logits (prefill, decode steps,
            no-cache) within 1e-5 relative to their scale;
  finetune  the pipelined classifier's initial weights and gradients equal the single-device model's
            within 1e-5, a short fine-tuning run ends on the same weights (within 1e-4), and the tuned
            model classifies the same pipelined (class probabilities within 1e-5).

A row runs where the world has dp x tp ranks: `make parallel` runs this file at 1, 2 and 3 ranks,
and tests/integration/test_model_parallel_np4.py at 4. Debug sizes and a few records: seconds a row.
"""
import dataclasses
import json
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
    Row("bert", "infer", dp=3, pp=2, micro_batches=2),
    Row("gpt", "generate", dp=3, pp=2, micro_batches=2),
    Row("bert", "infer", dp=2, tp=2),
    Row("gpt", "generate", dp=2, pp=2, tp=2, micro_batches=2),
]
WORDS = ["the", "cat", "sat", "on", "mat", "a", "dog", "Hello", "world", "and"]
GENERATE = ["--max-new-tokens", "6", "--temperature", "0.8", "--top-k", "20", "--seed", "3", "--batch-size", "4"]
FINETUNE = ["--batch-size", "4", "--lr", "3e-3", "--warmup-steps", "2", "--seed", "7", "--max-length", "16",
            "--epochs", "1", "--dropout", "0.1"]


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


def run_task(files: Path, row: Row, out: Path, parallel: bool) -> None:
    """The task of `row` as the CLI runs it, with or without its model-parallel flags."""
    flags = row.flags() if parallel else []
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
