"""The pure pieces of `hvdinfer finetune`: metrics from a confusion matrix, the per-epoch data shard
of each rank, steps per epoch, the batch order after a mid-epoch resume, when and which checkpoints
are written and found, the warm-up schedule, and the checks on the data before training."""
import dataclasses
import itertools
import json
import warnings

import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given, settings, strategies as st

from hvdinfer.parallel.data_parallel import LinearWarmup, scaled_learning_rate
from hvdinfer.runtime import JobError
from hvdinfer.tasks import finetune
from hvdinfer.tasks.finetune import (FinetuneConfig, LabeledSet, Position, batches_from, classification_metrics,
                                     epoch_shard, last_checkpoint, load_data, mid_epoch_checkpoint_due,
                                     steps_per_epoch)


def test_metrics_from_a_confusion_matrix_with_a_class_never_predicted():
    # rows: true a, b, c; columns: predicted a, b, c. Nothing is ever predicted as c.
    counts = np.array([[3, 1, 0],
                       [2, 4, 0],
                       [1, 1, 0]])
    with warnings.catch_warnings(), np.errstate(all="raise"):
        warnings.simplefilter("error")
        m = classification_metrics(counts, ["a", "b", "c"])
    assert m["examples"] == 12
    assert m["accuracy"] == pytest.approx(7 / 12)
    a, b, c = (m["per_class"][k] for k in "abc")
    assert (a["precision"], a["recall"], a["f1"], a["support"]) == pytest.approx((3 / 6, 3 / 4, 0.6, 4))
    assert (b["precision"], b["recall"], b["f1"], b["support"]) == pytest.approx((4 / 6, 4 / 6, 4 / 6, 6))
    assert (c["precision"], c["recall"], c["f1"], c["support"]) == (0.0, 0.0, 0.0, 2)
    assert m["macro_f1"] == pytest.approx((0.6 + 4 / 6 + 0.0) / 3)
    json.dumps(m)  # plain Python numbers, ready for metrics.json


def test_metrics_of_a_class_without_support_and_of_nothing_at_all():
    with warnings.catch_warnings(), np.errstate(all="raise"):
        warnings.simplefilter("error")
        m = classification_metrics(np.array([[5, 0], [0, 0]]), ["x", "y"])
        empty = classification_metrics(np.zeros((2, 2), np.int64), ["x", "y"])
    assert m["accuracy"] == 1.0 and m["per_class"]["x"]["f1"] == 1.0
    assert m["per_class"]["y"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert m["macro_f1"] == 0.5
    assert empty["accuracy"] == 0.0 and empty["examples"] == 0 and empty["macro_f1"] == 0.0


@pytest.mark.parametrize("n, size, batch, steps", [
    (24, 2, 4, 3), (7, 3, 4, 1), (8, 2, 4, 1), (9, 2, 4, 2), (1, 4, 16, 1), (100, 1, 10, 10), (101, 1, 10, 11),
])
def test_steps_per_epoch(n, size, batch, steps):
    assert steps_per_epoch(n, size, batch) == steps


def shards(n, epoch, seed, size, batch):
    return [epoch_shard(n, epoch, seed, size, rank, batch) for rank in range(size)]


@settings(max_examples=300, deadline=None)
@given(n=st.integers(1, 400), size=st.integers(1, 9), batch=st.integers(1, 17), epoch=st.integers(0, 50),
       seed=st.integers(0, 2**31))
def test_every_rank_takes_the_same_steps_and_every_record_is_used(n, size, batch, epoch, seed):
    steps = steps_per_epoch(n, size, batch)
    assert steps * size * batch >= n and (steps - 1) * size * batch < n
    parts = shards(n, epoch, seed, size, batch)
    for part in parts:
        assert len(part) == steps * batch  # the same number of steps on every rank: no allreduce left waiting
        assert part.min() >= 0 and part.max() < n
    np.testing.assert_array_equal(np.unique(np.concatenate(parts)), np.arange(n))
    if n >= size:  # the records each rank holds are its own; only its wrap-around repeats them
        distinct = [set(p.tolist()) for p in parts]
        assert sum(len(d) for d in distinct) == n
    for again, part in zip(shards(n, epoch, seed, size, batch), parts):
        np.testing.assert_array_equal(again, part)


@settings(max_examples=100, deadline=None)
@given(n=st.integers(12, 400), size=st.integers(1, 5), batch=st.integers(1, 9), epoch=st.integers(0, 50),
       seed=st.integers(0, 2**31))
def test_each_epoch_has_its_own_order(n, size, batch, epoch, seed):
    # n >= 12: two seeded permutations agree by chance with probability at most 1/12!.
    this, following = shards(n, epoch, seed, size, batch), shards(n, epoch + 1, seed, size, batch)
    assert any(not np.array_equal(a, b) for a, b in zip(this, following))
    other_seed = shards(n, epoch, seed + 1, size, batch)
    assert any(not np.array_equal(a, b) for a, b in zip(this, other_seed))


def test_fewer_records_than_ranks_still_gives_every_rank_full_batches():
    parts = shards(2, 0, 0, 3, 4)
    assert [len(p) for p in parts] == [4, 4, 4]
    assert set(parts[2].tolist()) == {0, 1}  # rank 2 has no record of its own: it repeats the epoch


def take(batches, count):
    return list(itertools.islice(batches, count))


@pytest.mark.parametrize("size", [1, 2, 3])
def test_a_mid_epoch_resume_trains_the_batches_a_straight_run_would_have_next(tmp_path, size):
    rng = np.random.default_rng(0)
    n, batch = 41, 3
    token_ids = [list(range(2, 2 + int(k))) for k in rng.integers(1, 12, n)]  # varied lengths: bucketing matters
    data = LabeledSet(tmp_path, [f"t{i}" for i in range(n)], np.arange(n) % 3)
    cfg = FinetuneConfig(model="m", train=tmp_path, eval=tmp_path, output_dir=tmp_path, batch_size=batch, seed=5)
    steps = steps_per_epoch(n, size, batch)
    for rank in range(size):
        straight = take(batches_from(Position(0), cfg, data, token_ids, 0, size, rank), 3 * steps)
        for start in (Position(0, 1), Position(0, steps - 1), Position(1), Position(1, 2), Position(2, steps - 1)):
            done = start.step(steps)
            resumed = take(batches_from(start, cfg, data, token_ids, 0, size, rank), 3 * steps - done)
            for (inputs, labels), (want_inputs, want_labels) in zip(resumed, straight[done:], strict=True):
                np.testing.assert_array_equal(labels, want_labels)
                assert sorted(inputs) == sorted(want_inputs)
                for key in inputs:
                    np.testing.assert_array_equal(inputs[key], want_inputs[key])
        # Skipping is not a no-op: the batches of an epoch differ from one another.
        assert any(not np.array_equal(a[1], b[1]) for a, b in zip(straight, straight[1:]))


@pytest.mark.parametrize("every, steps, total, want", [
    (0, 5, 15, []),
    (2, 5, 15, [2, 4, 6, 8, 12, 14]),  # 10 is an epoch end: the epoch checkpoint stands for it
    (5, 5, 15, []),
    (7, 5, 15, [7, 14]),
    (1, 3, 6, [1, 2, 4, 5]),
])
def test_mid_epoch_checkpoints_fall_every_n_steps_of_the_run_but_never_on_an_epoch_end(every, steps, total, want):
    positions = [Position((step - 1) // steps, (step - 1) % steps + 1) for step in range(1, total + 1)]
    assert [p.step(steps) for p in positions] == list(range(1, total + 1))
    assert [p.step(steps) for p in positions if mid_epoch_checkpoint_due(p, steps, every)] == want


def write_checkpoint(root, name, epoch, step_in_epoch, complete=True):
    path = root / "checkpoints" / name
    path.mkdir(parents=True)
    if complete:
        (path / "state.json").write_text(json.dumps({"epoch": epoch, "step_in_epoch": step_in_epoch, "step": 0}))
    return path


def test_resume_takes_the_checkpoint_furthest_into_training(tmp_path):
    cfg = FinetuneConfig(model="m", train=tmp_path, eval=tmp_path, output_dir=tmp_path)
    assert last_checkpoint(cfg) is None
    write_checkpoint(tmp_path, "epoch-0001", 1, 0)
    (tmp_path / "checkpoints" / "epoch-0001" / "state.json").write_text(json.dumps({"epoch": 1, "step": 3}))
    assert last_checkpoint(cfg).position == Position(1)  # written before mid-epoch checkpoints existed
    newest = write_checkpoint(tmp_path, "step-00000005", 1, 2)
    write_checkpoint(tmp_path, "step-00000007", 2, 1, complete=False)  # still staging when the run died
    write_checkpoint(tmp_path, ".step-00000008.partial", 2, 2)
    assert (last_checkpoint(cfg).path, last_checkpoint(cfg).position) == (newest, Position(1, 2))
    write_checkpoint(tmp_path, "epoch-0002", 2, 0)
    assert last_checkpoint(cfg).path.name == "epoch-0002"


def test_resume_refuses_a_checkpoint_past_the_requested_epochs(tmp_path):
    cfg = FinetuneConfig(model="m", train=tmp_path, eval=tmp_path, output_dir=tmp_path, epochs=1, resume=True)
    train = LabeledSet(tmp_path, ["a", "b"], np.array([0, 1]))
    identity = finetune.training_identity(cfg, ["x", "y"], 2, train, "fp32")
    path = write_checkpoint(tmp_path, "epoch-0001", 1, 0)
    (path / "state.json").write_text(json.dumps({"epoch": 1, "step_in_epoch": 0, "step": 3, **identity}))
    assert finetune.check_resume(cfg, ["x", "y"], 2, train, "fp32").path == path  # done: nothing left to train
    path = write_checkpoint(tmp_path, "step-00000004", 1, 1)
    (path / "state.json").write_text(json.dumps({"epoch": 1, "step_in_epoch": 1, "step": 4, **identity}))
    with pytest.raises(JobError, match="step-00000004 is 1 epoch.s. and 1 step.s. in, beyond --epochs 1"):
        finetune.check_resume(cfg, ["x", "y"], 2, train, "fp32")
    with pytest.raises(JobError, match="precision was 'fp32', now 'bf16'"):
        finetune.check_resume(dataclasses.replace(cfg, epochs=2), ["x", "y"], 2, train, "bf16")


def test_only_the_kept_mid_epoch_checkpoint_survives(tmp_path):
    root = tmp_path / "checkpoints"
    epoch = write_checkpoint(tmp_path, "epoch-0001", 1, 0)
    old, new = write_checkpoint(tmp_path, "step-00000002", 0, 2), write_checkpoint(tmp_path, "step-00000004", 1, 1)
    finetune.drop_mid_epoch_checkpoints(root, keep=new)
    assert sorted(p.name for p in root.iterdir()) == [epoch.name, new.name]
    finetune.drop_mid_epoch_checkpoints(root)
    assert [p.name for p in root.iterdir()] == [epoch.name]
    assert not old.exists()


def lr_at(schedule, step):
    return float(schedule(tf.constant(step, tf.int64)))


def test_linear_warmup_rises_to_the_peak_then_stays():
    schedule = LinearWarmup(2e-3, 4)
    assert lr_at(schedule, 0) == pytest.approx(2e-3 / 4)
    assert lr_at(schedule, 1) == pytest.approx(2e-3 * 2 / 4)
    assert lr_at(schedule, 3) == pytest.approx(2e-3)
    assert [lr_at(schedule, s) for s in (4, 10, 10_000)] == pytest.approx([2e-3] * 3)
    again = LinearWarmup.from_config(schedule.get_config())
    assert [lr_at(again, s) for s in (0, 3, 9)] == [lr_at(schedule, s) for s in (0, 3, 9)]


def test_no_warmup_is_a_constant_rate():
    schedule = LinearWarmup(1e-3, 0)
    assert [lr_at(schedule, s) for s in (0, 1, 500)] == pytest.approx([1e-3] * 3)


def test_learning_rate_scales_with_ranks_unless_told_not_to():
    assert scaled_learning_rate(1e-3, 4) == pytest.approx(4e-3)
    assert scaled_learning_rate(1e-3, 4, scale=False) == 1e-3


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def config(tmp_path, train, eval_):
    return FinetuneConfig(model="unused", train=write(tmp_path / "train.jsonl", train),
                          eval=write(tmp_path / "eval.jsonl", eval_), output_dir=tmp_path / "out")


def test_load_data_maps_labels_to_sorted_class_ids(tmp_path):
    train = [{"text": "a cat", "label": "pos"}, {"text": "a dog", "label": "neg"}, {"text": "cat", "label": "pos"}]
    cfg = config(tmp_path, train, [{"text": "the dog", "label": "neg"}])
    train_set, eval_set, names = load_data(cfg)
    assert names == ["neg", "pos"]
    assert train_set.texts == ["a cat", "a dog", "cat"] and train_set.labels.tolist() == [1, 0, 1]
    assert eval_set.labels.tolist() == [0]


@pytest.mark.parametrize("train, eval_, message", [
    ([{"text": "a", "label": "x"}, {"text": "b"}], [{"text": "a", "label": "x"}], "train.jsonl:2: field 'label': missing"),
    ([{"text": "a", "label": "x"}], [{"text": "a", "label": "x"}], "a classifier needs at least two classes"),
    ([{"text": "a", "label": "x"}, {"text": "b", "label": "y"}],
     [{"text": "c", "label": "x"}, {"text": "d", "label": "z"}],
     "eval.jsonl:2: field 'label': label 'z' does not occur in"),
], ids=["label missing", "one class", "unseen eval label"])
def test_load_data_refuses_bad_sets(tmp_path, train, eval_, message):
    with pytest.raises(JobError) as info:
        load_data(config(tmp_path, train, eval_))
    assert message in str(info.value)


def test_unseen_eval_label_names_the_file_line_not_the_record_index(tmp_path):
    train = [{"text": "a", "label": "x"}, {"text": "b", "label": "y"}]
    cfg = config(tmp_path, train, [])
    cfg.eval.write_text('\n{"text": "c", "label": "x"}\n\n{"text": "d", "label": "z"}\n')
    with pytest.raises(JobError) as info:
        load_data(cfg)
    assert str(info.value).startswith(f"{cfg.eval}:4: field 'label': label 'z' does not occur in")


@pytest.mark.parametrize("overrides, message", [
    ({"epochs": 0}, "--epochs must be >= 1"), ({"batch_size": 0}, "--batch-size must be >= 1"),
    ({"lr": 0.0}, "--lr must be > 0"), ({"dropout": 1.0}, "--dropout"), ({"task": "embed"}, "only classify"),
    ({"precision": "fp16"}, "--precision must be one of auto, fp32, bf16, not 'fp16'"),
    ({"checkpoint_every": -1}, "--checkpoint-every must be >= 0"),
])
def test_config_refuses_bad_values(tmp_path, overrides, message):
    with pytest.raises(JobError) as info:
        FinetuneConfig(model="m", train=tmp_path, eval=tmp_path, output_dir=tmp_path, **overrides)
    assert message in str(info.value)
