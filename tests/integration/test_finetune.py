"""`hvdinfer finetune` end to end under mpirun on a generated debug-size base model: exact resume,
evaluation across ranks over an eval set the ranks cannot split evenly, uneven training shards, the
output as a model directory for `infer --task classify`, and bad input failing before training.

Every text pads to the same 8 tokens (batching pads to a multiple of 8), so `fit` traces once and
each run takes seconds."""
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy
import tensorflow as tf

from tests import tiny

HVDINFER = str(Path(sys.executable).with_name("hvdinfer"))
ENV = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", TF_CPP_MIN_LOG_LEVEL="2")
LABELS = ["neg", "pos"]
KEYWORD = {"neg": "dog", "pos": "cat"}  # the word that gives the label away
FILLER = ["the", "sat", "on", "mat", "a", "run"]
TRAINING = ("--batch-size", 4, "--lr", 3e-3, "--warmup-steps", 2, "--seed", 7, "--max-length", 16)


def hvdinfer(np_, command, *args, timeout=120, env=None):
    """`mpirun -np np_ hvdinfer command args`; on a timeout the whole process group is killed."""
    cmd = ["mpirun", "-np", str(np_), "--oversubscribe", "--bind-to", "none", HVDINFER, command, *map(str, args)]
    start = time.monotonic()
    proc = subprocess.Popen(cmd, env=dict(ENV, **(env or {})), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"{' '.join(cmd)} still running after {timeout} s:\n{stdout}{stderr}")
    result = subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
    result.seconds = time.monotonic() - start
    result.all = stdout + stderr
    return result


def finetune(np_, base, train, eval_, out, *args, timeout=120, env=None):
    return hvdinfer(np_, "finetune", "--model", base, "--train", train, "--eval", eval_, "--output-dir", out,
                    *TRAINING, *args, timeout=timeout, env=env)


def labelled(n, seed):
    """n records, labels alternating, each text a few filler words and its label's keyword (3-7 tokens)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        label = LABELS[i % 2]
        words = list(rng.choice(FILLER, size=rng.integers(0, 5))) + [KEYWORD[label]]
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": label})
    return rows


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def read_metrics(out):
    return json.loads((out / "metrics.json").read_text())


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tiny.write_model_dir(tmp_path_factory.mktemp("base") / "m", tiny.random_model(3), max_seq_length=16)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return {"train": write_jsonl(root / "train.jsonl", labelled(24, 0)),
            "eval": write_jsonl(root / "eval.jsonl", labelled(21, 1)),  # 21: odd, so 2 ranks hold 11 and 10
            "train7": write_jsonl(root / "train7.jsonl", labelled(7, 2)),
            "eval2": write_jsonl(root / "eval2.jsonl", labelled(2, 3))}


@pytest.fixture(scope="module")
def straight(tmp_path_factory, base, data):
    """3 epochs on 2 ranks in one go."""
    out = tmp_path_factory.mktemp("straight") / "out"
    proc = finetune(2, base, data["train"], data["eval"], out, "--epochs", 3)
    assert proc.returncode == 0, proc.all
    return out


CRASH = "HVDINFER_TEST_EXIT_AFTER_CHECKPOINT"  # the coordinator exits right after its k-th checkpoint


@dataclasses.dataclass
class Resumed:
    out: Path
    first: list
    """The 1-epoch run's metrics."""
    crashed: subprocess.CompletedProcess
    left: tuple
    """(checkpoints, metrics epochs) the crashed run left."""
    last: subprocess.CompletedProcess


@pytest.fixture(scope="module")
def resumed(tmp_path_factory, base, data):
    """1 epoch on 2 ranks; that finished run extended by --resume to 3 epochs with --checkpoint-every 2
    and crashed right after its first checkpoint; --resume again to the end.

    24 records, batch 4, 2 ranks: 3 steps an epoch, 9 in all. --checkpoint-every 2 checkpoints at
    step 4 (mid epoch 2), 6 (end of epoch 2), 8 (mid epoch 3) and 9 (end of epoch 3)."""
    out = tmp_path_factory.mktemp("resumed") / "out"
    proc = finetune(2, base, data["train"], data["eval"], out, "--epochs", 1)
    assert proc.returncode == 0, proc.all
    first = read_metrics(out)["epochs"]
    args = ("--epochs", 3, "--checkpoint-every", 2, "--resume")
    crashed = finetune(2, base, data["train"], data["eval"], out, *args, env={CRASH: "1"})
    left = checkpoints(out), read_metrics(out)["epochs"]
    last = finetune(2, base, data["train"], data["eval"], out, *args)
    assert last.returncode == 0, last.all
    return Resumed(out, first, crashed, left, last)


@pytest.fixture(scope="module")
def predictions(tmp_path_factory, straight, data):
    """`infer --task classify` of the straight run's model on the eval file, in a single process."""
    out = tmp_path_factory.mktemp("pred") / "pred.jsonl"
    proc = hvdinfer(1, "infer", "--model", straight, "--task", "classify", "--input", data["eval"], "--output", out)
    assert proc.returncode == 0, proc.all
    return read_jsonl(out)


def classify(model_dir, texts):
    from models import loading

    model, tokenizer, _ = loading.load_classifier(model_dir)
    enc = tokenizer.encode_batch(texts)
    return model({"input_ids": enc.input_ids, "attention_mask": enc.attention_mask}).numpy()


def test_resume_continues_exactly_where_a_straight_run_would_be(straight, resumed, data):
    out = resumed.out
    assert f"resumed from {out / 'checkpoints' / 'epoch-0001'}" in resumed.crashed.stderr, resumed.crashed.stderr
    metrics = read_metrics(out)
    assert [e["epoch"] for e in metrics["epochs"]] == [1, 2, 3]
    assert metrics["epochs"][0] == resumed.first[0]  # the first run's history is kept, not recomputed
    for name in ("model.safetensors", "classifier.safetensors"):
        want, got = safetensors.numpy.load_file(str(straight / name)), safetensors.numpy.load_file(str(out / name))
        assert sorted(got) == sorted(want)
        for key in want:
            np.testing.assert_allclose(got[key], want[key], atol=1e-6, rtol=0, err_msg=f"{name}: {key}")
    texts = [r["text"] for r in read_jsonl(data["eval"])]
    np.testing.assert_allclose(classify(out, texts), classify(straight, texts), atol=1e-5, rtol=0)
    for path in (straight, out):
        assert json.loads((path / "checkpoints" / "epoch-0003" / "state.json").read_text())["step"] == 9


def checkpoints(out):
    return sorted(p.name for p in (out / "checkpoints").iterdir())


def checkpoint_variables(path):
    reader = tf.train.load_checkpoint(str(path / "ckpt"))
    return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()}


def test_a_run_killed_after_a_mid_epoch_checkpoint_resumes_to_the_straight_runs_weights(straight, resumed):
    out, crashed, last = resumed.out, resumed.crashed, resumed.last
    assert crashed.returncode != 0 and f"{CRASH}=1: exiting after writing" in crashed.stderr, crashed.all
    assert "checkpoint step-00000004: step 1 of epoch 2" in crashed.stderr
    assert resumed.left == (["epoch-0001", "step-00000004"], resumed.first)  # nothing of epoch 2 recorded
    # Resumed 1 step into epoch 2: its last 2 steps and evaluation, then all of epoch 3.
    assert f"resumed from {out / 'checkpoints' / 'step-00000004'} (1 of 3 epochs done, then 1 step(s))" in last.stderr
    assert "checkpoint step-00000008: step 2 of epoch 3" in last.stderr
    assert "progress: 9/9 steps (100.0%)" in last.stderr, last.all  # the run's steps, the resumed 4 included
    assert checkpoints(out) == ["epoch-0001", "epoch-0002", "epoch-0003"]  # epoch checkpoints make mid-epoch ones stale
    for name in ("model.safetensors", "classifier.safetensors"):
        want, got = safetensors.numpy.load_file(str(straight / name)), safetensors.numpy.load_file(str(out / name))
        assert sorted(got) == sorted(want)
        for key in want:
            diff = np.abs(got[key] - want[key]).max()
            assert np.array_equal(got[key], want[key]), f"{name}: {key}: max |diff| {diff}"
    # Bitwise the same optimizer state, step and dropout counter too, at every epoch end.
    for epoch in ("epoch-0001", "epoch-0002", "epoch-0003"):
        want = checkpoint_variables(straight / "checkpoints" / epoch)
        got = checkpoint_variables(out / "checkpoints" / epoch)
        assert sorted(got) == sorted(want)
        for key in want:
            assert np.array_equal(got[key], want[key]), f"{epoch}: {key}"
    epochs, whole = read_metrics(out)["epochs"], read_metrics(straight)["epochs"]
    assert [e["eval"] for e in epochs] == [e["eval"] for e in whole]
    # The resumed epoch's train loss is Keras' mean over the 2 steps trained after the resume.
    assert [e["train_steps"] for e in epochs] == [3, 2, 3] and [e["train_steps"] for e in whole] == [3, 3, 3]
    assert epochs[2]["train_loss"] == whole[2]["train_loss"]


def test_evaluation_counts_every_eval_record_once_across_ranks(straight, predictions, data):
    truth = [r["label"] for r in read_jsonl(data["eval"])]
    predicted = [r["label"] for r in predictions]
    final = read_metrics(straight)["epochs"][-1]["eval"]
    assert final["examples"] == len(truth) == 21
    assert final["accuracy"] == sum(p == t for p, t in zip(predicted, truth)) / len(truth)
    assert sorted(final["per_class"]) == LABELS
    for label in LABELS:
        hits = sum(p == t == label for p, t in zip(predicted, truth))
        stats = final["per_class"][label]
        assert stats["support"] == truth.count(label)
        assert stats["precision"] == pytest.approx(hits / predicted.count(label) if label in predicted else 0.0)
        assert stats["recall"] == pytest.approx(hits / truth.count(label))
        p, r = stats["precision"], stats["recall"]
        assert stats["f1"] == pytest.approx(2 * p * r / (p + r) if p + r else 0.0)
    assert final["macro_f1"] == pytest.approx(np.mean([final["per_class"][l]["f1"] for l in LABELS]))


def test_output_dir_is_a_classifier_model_directory(straight, predictions):
    for name in ("config.json", "tokenizer.json", "model.safetensors", "classifier.json", "classifier.safetensors"):
        assert (straight / name).is_file(), name
    assert sorted(p.name for p in (straight / "checkpoints").iterdir()) == ["epoch-0001", "epoch-0002", "epoch-0003"]
    assert list((straight / "tensorboard").glob("events.out.tfevents.*"))
    assert json.loads((straight / "classifier.json").read_text())["labels"] == LABELS
    assert [r["id"] for r in predictions] == list(range(21))
    assert sorted({r["label"] for r in predictions}) == LABELS  # the model learnt to tell them apart
    accuracy = [e["eval"]["accuracy"] for e in read_metrics(straight)["epochs"]]
    assert accuracy[1] > accuracy[0]
    for row in predictions:
        assert row["label"] in LABELS and sorted(row["scores"]) == LABELS
        assert sum(row["scores"].values()) == pytest.approx(1.0, abs=1e-5)


def test_uneven_shards_on_three_ranks_finish(tmp_path, base, data):
    # 7 training records on 3 ranks (3, 2, 2 before wrap-around); 2 eval records, so rank 2 evaluates none.
    out = tmp_path / "out"
    proc = finetune(3, base, data["train7"], data["eval2"], out, "--epochs", 2, timeout=150)
    assert proc.returncode == 0, proc.all
    assert "2 epoch(s) on 3 rank(s)" in proc.stdout
    assert (out / "classifier.safetensors").is_file() and (out / "model.safetensors").is_file()
    assert [e["eval"]["examples"] for e in read_metrics(out)["epochs"]] == [2, 2]


GOOD = labelled(6, 4)
BAD_INPUTS = [
    # name, train records (None: no file; a string: the raw content), eval records (None: the good
    # eval set), expected message (format with {train}, {eval})
    ("label missing", [GOOD[0], {"text": "a cat"}, *GOOD[1:]], None, "{train}:2: field 'label': missing"),
    ("single class", [r for r in GOOD if r["label"] == "pos"], None,
     "{train}: every record has label 'pos'; a classifier needs at least two classes"),
    ("unseen eval label", GOOD, [GOOD[0], {"text": "a dog", "label": "maybe"}],
     "{eval}:2: field 'label': label 'maybe' does not occur in {train} (training labels: neg, pos)"),
    ("empty train file", "", None, "{train}: no records"),
    ("missing train file", None, None, "{train}: no such input file"),
]


LAUNCHED = ("label missing", "missing train file")  # a bad record and a bad file, under mpirun


def write_bad_input(tmp_path, data, train_rows, eval_rows):
    train = tmp_path / "train.jsonl"
    if isinstance(train_rows, str):
        train.write_text(train_rows)
    elif train_rows is not None:
        write_jsonl(train, train_rows)
    return train, write_jsonl(tmp_path / "eval.jsonl", eval_rows) if eval_rows else data["eval"]


@pytest.mark.parametrize("name, train_rows, eval_rows, message", [b for b in BAD_INPUTS if b[0] in LAUNCHED],
                         ids=LAUNCHED)
def test_bad_input_fails_before_training_with_one_message(tmp_path, base, data, name, train_rows, eval_rows,
                                                          message):
    train, eval_ = write_bad_input(tmp_path, data, train_rows, eval_rows)
    out = tmp_path / "out"
    proc = finetune(2, base, train, eval_, out, "--epochs", 1, timeout=60)
    assert proc.returncode != 0
    assert proc.seconds < 30
    expected = "hvdinfer: error: " + message.format(train=train, eval=eval_)
    assert proc.all.count(expected) == 1, proc.all
    assert proc.all.count("hvdinfer: error:") == 1 and "Traceback" not in proc.all
    assert not (out / "checkpoints").exists()


@pytest.mark.parametrize("name, train_rows, eval_rows, message", [b for b in BAD_INPUTS if b[0] not in LAUNCHED],
                         ids=[b[0] for b in BAD_INPUTS if b[0] not in LAUNCHED])
def test_other_bad_input_is_refused_by_the_same_check(tmp_path, data, name, train_rows, eval_rows, message):
    # load_data, where the launched cases above end the job before training: the same one message.
    from hvdinfer.runtime import JobError
    from hvdinfer.tasks.finetune import FinetuneConfig, load_data

    train, eval_ = write_bad_input(tmp_path, data, train_rows, eval_rows)
    with pytest.raises(JobError) as info:
        load_data(FinetuneConfig(model="unused", train=train, eval=eval_, output_dir=tmp_path / "out"))
    assert str(info.value) == message.format(train=train, eval=eval_)


def test_resume_on_another_number_of_ranks_is_refused(tmp_path, base, data, straight):
    out = tmp_path / "out"
    shutil.copytree(straight / "checkpoints", out / "checkpoints")
    shutil.copy2(straight / "metrics.json", out / "metrics.json")
    proc = finetune(1, base, data["train"], data["eval"], out, "--epochs", 4, "--resume", timeout=60)
    assert proc.returncode != 0
    line = [l for l in proc.all.splitlines() if l.startswith("hvdinfer: error: --resume:")]
    assert len(line) == 1, proc.all
    assert f"{out / 'checkpoints' / 'epoch-0003'} was written with" in line[0]
    assert "size was 2, now 1" in line[0]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["epoch-0001", "epoch-0002", "epoch-0003"]


def test_max_length_beyond_the_models_positions_fails_before_training(tmp_path, base, data):
    out = tmp_path / "out"
    proc = finetune(1, base, data["train"], data["eval"], out, "--max-length", 100, timeout=60)
    assert proc.returncode != 0
    assert proc.all.count("hvdinfer: error: --max-length 100 exceeds the model's 64 positions") == 1, proc.all
    assert not (out / "checkpoints").exists()


def test_tuned_model_directory_truncates_as_training_did(tmp_path, straight):
    import json

    assert json.loads((straight / "sentence_bert_config.json").read_text())["max_seq_length"] == 16


def test_auto_precision_is_resolved_on_this_host_and_recorded(straight):
    from hvdinfer import runtime

    want = runtime.choose_precision("auto", runtime.cpuinfo_flags(runtime.read_cpuinfo()),
                                    runtime.visible_gpu_capabilities())
    metrics = read_metrics(straight)
    assert (metrics["precision"], metrics["precision_reason"]) == want
    state = json.loads((straight / "checkpoints" / "epoch-0002" / "state.json").read_text())
    assert state["precision"] == want[0]  # resolved, never "auto": a resume on this host matches


def test_a_stopped_rank_ends_training_in_time_naming_it_and_resume_finishes(tmp_path, base, data):
    import psutil

    out, timeout = tmp_path / "out", 10
    args = ("--epochs", 6, "--stall-timeout", timeout)  # stopped after epoch 2: 4 epochs' margin
    cmd = ["mpirun", "-np", "2", "--oversubscribe", "--bind-to", "none", HVDINFER, "finetune", "--model", base,
           "--train", data["train"], "--eval", data["eval"], "--output-dir", out, *TRAINING, *args]
    proc = subprocess.Popen(list(map(str, cmd)), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 90
    while not (out / "checkpoints" / "epoch-0002").is_dir():
        assert proc.poll() is None and time.monotonic() < deadline, "training ended or never started"
        time.sleep(0.05)
    rank1 = next(p for p in psutil.Process(proc.pid).children(recursive=True)
                 if p.environ().get("OMPI_COMM_WORLD_RANK") == "1")
    rank1.send_signal(signal.SIGSTOP)
    stopped_at = time.monotonic()
    try:
        text, _ = proc.communicate(timeout=timeout + 45)
    finally:
        if rank1.is_running():
            rank1.kill()
    assert time.monotonic() - stopped_at <= timeout + 15, text
    stuck = [line for line in text.splitlines() if "is stuck" in line]
    assert proc.returncode != 0 and len(stuck) == 1 and f"rank 1 of 2 (host" in stuck[0], text
    assert f"pid {rank1.pid}" in stuck[0]
    resumed = finetune(2, base, data["train"], data["eval"], out, *args, "--resume")
    assert resumed.returncode == 0, resumed.all
    assert [e["epoch"] for e in read_metrics(out)["epochs"]] == list(range(1, 7))
