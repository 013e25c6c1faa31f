"""`hvdinfer generate` on the job engine, under mpirun, on a debug-size GPT-2-layout checkpoint the
test writes in HF layout: the same bytes for 1, 2 and 3 ranks and either schedule, input order,
greedy with and without the KV cache, resume after kill -9, and the bad-input cases."""
import functools
import json
import os
import signal
import subprocess

import numpy as np
import pyarrow.parquet as pq
import pytest

from models import registry
from tests import tiny_gpt
from tests.integration.test_infer import ENV, hvdinfer_cmd, run_hvdinfer
from tests.integration.test_infer_engine import _rank_pid, _wait_for_chunks

PROMPTS = 150  # 3 chunks of 64, the last one short
CHUNK = 64
WORDS = ["the", "cat", "sat", "on", "mat", "a", "dog", "Hello", "world", "and"]
generate = functools.partial(run_hvdinfer, "generate")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    config = registry.gpt_size("debug")
    path = tmp_path_factory.mktemp("gpt") / "m"
    path.mkdir()
    return tiny_gpt.write_model_dir(path, tiny_gpt.random_checkpoint(config, seed=11), config)


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    rng = np.random.default_rng(2)
    path = tmp_path_factory.mktemp("in") / "prompts.jsonl"
    lines = [json.dumps({"id": f"q{i}", "prompt": " ".join(rng.choice(WORDS, rng.integers(1, 12)))})
             for i in range(PROMPTS)]
    path.write_text("\n".join(lines) + "\n")
    return path


def common(model_dir, prompts, out, *extra):
    return ["--model", model_dir, "--input", prompts, "--output", out, "--chunk-size", CHUNK, "--batch-size", 8,
            "--max-new-tokens", 12, "--temperature", 0.9, "--top-k", 50, "--top-p", 0.95, "--seed", 5, *extra]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, model_dir, prompts):
    """One rank, static: every other run must produce these exact bytes."""
    out = tmp_path_factory.mktemp("ref") / "ref.jsonl"
    proc = generate(1, *common(model_dir, prompts, out, "--schedule", "static"))
    assert proc.returncode == 0, proc.all
    return out.read_bytes()


def read_jsonl(data: bytes) -> list[dict]:
    return [json.loads(line) for line in data.decode().splitlines()]


def test_output_is_complete_and_in_input_order(reference):
    rows = read_jsonl(reference)
    assert [r["index"] for r in rows] == list(range(PROMPTS))
    assert [r["id"] for r in rows] == [f"q{i}" for i in range(PROMPTS)]
    for row in rows:
        assert set(row) == {"index", "id", "text", "tokens", "finish_reason"}
        assert 1 <= len(row["tokens"]) <= 12 and row["finish_reason"] in ("length", "eos")
        assert row["finish_reason"] == "eos" or len(row["tokens"]) == 12


@pytest.mark.parametrize("ranks,schedule", [(2, "dynamic"), (3, "static")])
def test_any_number_of_ranks_and_schedule_writes_the_same_bytes(tmp_path, model_dir, prompts, reference, ranks,
                                                                 schedule):
    out = tmp_path / "o.jsonl"
    proc = generate(ranks, *common(model_dir, prompts, out, "--schedule", schedule))
    assert proc.returncode == 0, proc.all
    assert out.read_bytes() == reference


def test_greedy_is_the_same_with_and_without_the_kv_cache_and_parquet_holds_it(tmp_path, model_dir, prompts):
    greedy = ["--temperature", 0, "--max-new-tokens", 8]
    cached, recomputed = tmp_path / "c.jsonl", tmp_path / "r.parquet"
    assert generate(2, *common(model_dir, prompts, cached, *greedy)).returncode == 0
    proc = generate(2, *common(model_dir, prompts, recomputed, *greedy, "--no-kv-cache"))
    assert proc.returncode == 0, proc.all
    rows = read_jsonl(cached.read_bytes())
    table = pq.read_table(recomputed).to_pylist()
    assert [r["tokens"] for r in rows] == [r["tokens"] for r in table]
    assert [r["text"] for r in rows] == [r["text"] for r in table]
    assert [r["id"] for r in table] == [f"q{i}" for i in range(PROMPTS)]


def test_kill_9_of_a_rank_then_resume_gives_the_same_bytes(tmp_path, model_dir, prompts, reference):
    out = tmp_path / "k.jsonl"
    parts = out.with_name(out.name + ".parts")
    proc = subprocess.Popen(hvdinfer_cmd("generate", 2, *common(model_dir, prompts, out)),
                            env=dict(ENV, HVDINFER_TEST_CHUNK_SECONDS="3"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    _wait_for_chunks(parts, 1, proc)
    os.kill(_rank_pid(proc.pid, 1), signal.SIGKILL)
    assert proc.wait(timeout=30) != 0
    assert not out.exists() and len(list(parts.glob("chunk-*.npz"))) in (1, 2)

    changed = generate(2, *common(model_dir, prompts, out, "--seed", 6, "--resume"))
    assert changed.returncode != 0 and "seed: journal has 5, this run has 6" in changed.all

    resumed = generate(2, *common(model_dir, prompts, out, "--resume"))
    assert resumed.returncode == 0, resumed.all
    assert out.read_bytes() == reference
    # The first run checked every prompt before computing (--on-error fail): the resume does not again.
    assert f"every record of {prompts} was checked when this job began; not parsed again" in resumed.all


def test_bad_prompts_fail_before_compute_or_keep_their_place_with_skip_and_long_ones_are_counted(tmp_path,
                                                                                                model_dir):
    source = tmp_path / "bad.jsonl"
    too_long = " ".join(["the cat sat"] * 200)  # longer than the context: left-truncated, counted
    source.write_text('{"id": 0, "prompt": "the cat"}\n{"id": 1, "prompt": ""}\n{"id": 2, "prompt": "a dog"}\n'
                      + json.dumps({"id": 3, "prompt": too_long}) + "\n")
    out, metrics = tmp_path / "b.jsonl", tmp_path / "m.json"
    failed = generate(2, "--model", model_dir, "--input", source, "--output", out)
    assert failed.returncode != 0 and f"{source}:2: field 'prompt': empty text" in failed.all and not out.exists()
    assert "Traceback" not in failed.all

    skipped = generate(2, "--model", model_dir, "--input", source, "--output", out, "--on-error", "skip",
                       "--max-new-tokens", 4, "--metrics-json", metrics)
    assert skipped.returncode == 0, skipped.all
    rows = read_jsonl(out.read_bytes())
    assert [r["index"] for r in rows] == [0, 1, 2, 3]
    assert rows[1] == {"index": 1, "id": 1, "error": f"{source}:2: field 'prompt': empty text"}
    assert "skipped 1" in skipped.all
    assert json.loads(metrics.read_text())["truncated"] == 1 and "truncated 1" in skipped.all
    assert len(rows[3]["tokens"]) <= 4


INVALID_SETTINGS = [
    (["--max-new-tokens", 128], "--max-new-tokens 128 leaves no room for a prompt in the model's context of 128"),
    (["--output", "x.npy"], "use a .jsonl or .parquet file"),
    (["--top-p", 0], "top_p"),
    (["--temperature", -1], "temperature"),
    (["--max-new-tokens", 0], "max_new_tokens"),
]


@pytest.mark.parametrize("flags,message", INVALID_SETTINGS[:2])
def test_invalid_settings_are_clear_errors(tmp_path, model_dir, prompts, flags, message):
    # One setting checked against the loaded model, one by the job's config before any compute.
    args = ["--model", model_dir, "--input", prompts, "--output", tmp_path / "x.jsonl", *flags]
    proc = generate(1, *args)
    assert proc.returncode != 0 and message in proc.all, proc.all
    assert "Traceback" not in proc.all


@pytest.mark.parametrize("flags,message", INVALID_SETTINGS[2:])
def test_invalid_sampling_settings_are_refused_by_the_jobs_config(tmp_path, model_dir, prompts, flags, message):
    # Where --output x.npy is refused above, so the same clear error; checked here without a launch.
    from hvdinfer import cli
    from hvdinfer.runtime import JobError

    argv = ["generate", "--model", model_dir, "--input", prompts, "--output", tmp_path / "x.jsonl", *flags]
    with pytest.raises(JobError, match=message):
        cli.dispatch(cli.build_parser().parse_args(list(map(str, argv))))
