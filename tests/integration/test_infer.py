"""`hvdinfer infer` end to end under mpirun on a generated debug-size model directory:
input order, N-invariance, plain text in and .npy out (under horovodrun, through launch/run.sh), and
every bad-input case (fail and skip)."""
import functools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests import tiny

HVDINFER = str(Path(sys.executable).with_name("hvdinfer"))
ENV = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", TF_CPP_MIN_LOG_LEVEL="2")
WORDS = ["the", "cat", "sat", "on", "mat", "a", "dog", "dogs", "run", "zebra"]


def hvdinfer_cmd(command, np_, *args):
    return ["mpirun", "-np", str(np_), "--oversubscribe", "--bind-to", "none", HVDINFER, command, *map(str, args)]


def run_hvdinfer(command, np_, *args, timeout=180, env=None):
    """`hvdinfer COMMAND ARGS` under mpirun -np NP; the process with .all (stdout + stderr) and .seconds."""
    start = time.monotonic()
    proc = subprocess.run(hvdinfer_cmd(command, np_, *args), env=dict(ENV, **(env or {})), capture_output=True,
                          text=True, timeout=timeout)
    proc.seconds = time.monotonic() - start
    proc.all = proc.stdout + proc.stderr
    return proc


infer_cmd = functools.partial(hvdinfer_cmd, "infer")
infer = functools.partial(run_hvdinfer, "infer")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny.write_model_dir(tmp_path_factory.mktemp("model") / "m", tiny.random_model(3), max_seq_length=16)


@pytest.fixture(scope="module")
def texts():
    rng = np.random.default_rng(0)
    return [" ".join(rng.choice(WORDS, size=rng.integers(1, 25))) for _ in range(23)]


@pytest.fixture(scope="module")
def good_input(tmp_path_factory, texts):
    path = tmp_path_factory.mktemp("in") / "in.jsonl"
    path.write_text("".join(json.dumps({"id": f"r{i}", "text": t}) + "\n" for i, t in enumerate(texts)))
    return path


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def reference(model_dir, texts):
    """Each text alone, unpadded, through the loaded Keras model: what every N must reproduce."""
    from models import loading

    model, tokenizer, info = loading.load_sentence_embedder(model_dir)
    out = []
    for text in texts:
        enc = tokenizer.encode_batch([text])
        out.append(model({"input_ids": enc.input_ids, "attention_mask": enc.attention_mask}).numpy()[0])
    return np.stack(out)


def truncated_count(model_dir, texts):
    from models import loading

    return int(loading.load_sentence_embedder(model_dir)[1].encode_batch(texts).truncated.sum())


def test_results_are_complete_ordered_and_equal_an_independent_forward(tmp_path, model_dir, good_input, texts):
    # 1 and 3 ranks (uneven shards); test_infer_engine.py shows every rank count and schedule gives the same bytes.
    want = reference(model_dir, texts)
    truncated = truncated_count(model_dir, texts)
    assert 0 < truncated < len(texts)
    for np_ in (1, 3):
        out = tmp_path / f"out{np_}.jsonl"
        proc = infer(np_, "--model", model_dir, "--input", good_input, "--output", out, "--batch-size", 4)
        assert proc.returncode == 0, proc.all
        rows = read_jsonl(out)
        assert [r["id"] for r in rows] == [f"r{i}" for i in range(len(texts))]
        got = np.array([r["embedding"] for r in rows])
        np.testing.assert_allclose(got, want, atol=1e-5)
        assert f"ok {len(texts)}, skipped 0, truncated {truncated}" in proc.stdout
        assert proc.stdout.count("infer:") == 1  # only the coordinator reports


# One input per format, record 0 good ("the cat"), the rest bad; the JSONL one holds every bad kind.
BAD_INPUTS = [
    # format, file name, content, each bad record's id (the record index, or the CSV id column) and
    # message (format with {path}), in file order
    ("jsonl", "in.jsonl",
     b'{"text": "the cat"}\n{"text": "a dog"\n{"body": "a dog"}\n{"text": "  "}\n{"text": "\xff\xfe dog"}\n',
     [(1, "{path}:2: malformed JSON"), (2, "{path}:3: field 'text': missing"),
      (3, "{path}:4: field 'text': empty text"), (4, "{path}:5: invalid UTF-8")]),
    ("csv", "in.csv", b'id,text\n1,the cat\n2,"  "\n', [("2", "{path}:3: field 'text': empty text")]),
    ("text", "in.txt", b"the cat\n\xff\xfe dog\n", [(1, "{path}:2: invalid UTF-8")]),
]


def test_bad_records_fail_the_job_naming_the_first_with_file_line_field_and_no_output(tmp_path, model_dir):
    # One check for every format: the first bad record named, the others counted. Each format's
    # messages are the skip test's below (the same text).
    _, filename, content, bad = BAD_INPUTS[0]
    src = tmp_path / filename
    src.write_bytes(content)
    out = tmp_path / "out.jsonl"
    proc = infer(2, "--model", model_dir, "--input", src, "--output", out)
    assert proc.returncode != 0
    assert proc.seconds < 30
    expected = "hvdinfer: error: " + bad[0][1].format(path=src)
    assert proc.all.count(expected) == 1, proc.all
    assert f"(and {len(bad) - 1} more bad records; --on-error skip keeps going)" in proc.all, proc.all
    assert "Traceback" not in proc.all
    assert not out.exists() and list(tmp_path.iterdir()) == [src]


@pytest.mark.parametrize("name, filename, content, bad", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_skip_keeps_bad_records_in_place_and_computes_the_rest(tmp_path, model_dir, name, filename, content, bad):
    src = tmp_path / filename
    src.write_bytes(content)
    out = tmp_path / "out.jsonl"
    proc = infer(2, "--model", model_dir, "--input", src, "--output", out, "--on-error", "skip")
    assert proc.returncode == 0, proc.all
    rows = read_jsonl(out)
    assert len(rows) == 1 + len(bad)
    assert "embedding" in rows[0]
    np.testing.assert_allclose(rows[0]["embedding"], reference(model_dir, ["the cat"])[0], atol=1e-5)
    for row, (id_, message) in zip(rows[1:], bad):
        assert row["id"] == id_ and row["error"].startswith(message.format(path=src)), row
    assert f"ok 1, skipped {len(bad)}, truncated 0" in proc.stdout


def test_missing_input_file_and_unreadable_model(tmp_path, model_dir, good_input):
    proc = infer(2, "--model", model_dir, "--input", tmp_path / "nope.jsonl", "--output", tmp_path / "o.jsonl")
    assert proc.returncode != 0 and proc.all.count(f"hvdinfer: error: {tmp_path / 'nope.jsonl'}: no such input file") == 1

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    proc = infer(2, "--model", broken, "--input", good_input, "--output", tmp_path / "o.jsonl")
    assert proc.returncode != 0
    assert proc.all.count(f"hvdinfer: error: --model {broken}: cannot load model: {broken / 'config.json'}: not valid JSON") == 1, proc.all

    assert not (tmp_path / "o.jsonl").exists()


def test_an_unknown_model_id_and_a_model_without_a_head_for_classify_are_refused(tmp_path, model_dir, good_input):
    # Where the unreadable model above ends the job (infer.load_model), so the same one message; no launch.
    from hvdinfer.runtime import JobError
    from hvdinfer.tasks.infer import InferConfig, load_model

    def load(model, task):
        load_model(InferConfig(model=str(model), input=good_input, output=tmp_path / "o.jsonl", task=task), "fp32")

    with pytest.raises(JobError, match=r"not a known model id \(minilm-l6\) nor a model directory"):
        load("no-such-model", "embed")
    with pytest.raises(JobError, match=r"has no classifier head \(classifier\.json\)"):
        load(model_dir, "classify")


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory):
    from models import heads

    path = tiny.write_model_dir(tmp_path_factory.mktemp("clf") / "m", tiny.random_model(5), max_seq_length=16)
    model = heads.TextClassifier(tiny.random_model(5), ["neg", "neutral", "pos"])
    from models import bert

    bert.build(model)
    rng = np.random.default_rng(1)
    model.classifier.kernel.assign(rng.normal(0, 3.0, model.classifier.kernel.shape).astype(np.float32))
    heads.save_head(model, path)
    return path


def test_classify_gives_label_and_scores_in_order_for_any_ranks(tmp_path, classifier_dir, good_input, texts):
    from models import loading

    model, tokenizer, _ = loading.load_classifier(classifier_dir)
    want = []
    for text in texts:
        enc = tokenizer.encode_batch([text])
        logits = model({"input_ids": enc.input_ids, "attention_mask": enc.attention_mask}).numpy()[0]
        want.append(np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum())
    want = np.array(want)
    assert len(set(np.argmax(want, 1).tolist())) > 1  # the check below means something
    for np_ in (1, 3):
        out = tmp_path / f"c{np_}.jsonl"
        proc = infer(np_, "--model", classifier_dir, "--task", "classify", "--input", good_input, "--output", out)
        assert proc.returncode == 0, proc.all
        rows = read_jsonl(out)
        assert [r["id"] for r in rows] == [f"r{i}" for i in range(len(texts))]
        scores = np.array([[r["scores"][l] for l in ("neg", "neutral", "pos")] for r in rows])
        np.testing.assert_allclose(scores, want, atol=1e-5)
        assert [r["label"] for r in rows] == [["neg", "neutral", "pos"][i] for i in np.argmax(want, 1)]


def test_horovodrun_via_launch_script_reads_plain_text_and_writes_npy_quietly(tmp_path, model_dir, texts):
    src, out, metrics = tmp_path / "in.txt", tmp_path / "e.npy", tmp_path / "m.json"
    src.write_text("\n".join(texts) + "\n")
    root = Path(__file__).resolve().parents[2]
    env = dict(ENV, NP="2", LAUNCHER="horovodrun")
    proc = subprocess.run([str(root / "launch" / "run.sh"), "infer", "--model", str(model_dir), "--input", str(src),
                           "--output", str(out), "--quiet", "--metrics-json", str(metrics)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout == ""
    np.testing.assert_allclose(np.load(out), reference(model_dir, texts), atol=1e-5)
    assert json.loads(metrics.read_text())["ranks"] == 2  # the launch script under horovodrun (test_launch.py: mpirun)
