"""hvdinfer.generate under size 1, `mpirun -np 2` and `-np 3`: every prompt's continuation in input
order on every rank, the same whatever the number of ranks (each prompt's random stream is keyed by
the seed and its index), equal to the model-level decoder's, and streamed to a file with resume."""
import json

import pytest

import hvdinfer
from hvdinfer.collect import allgather_json
from models import decoding, gpt_loading, registry
from tests import tiny_gpt

NP3 = True
PROMPTS = ["Hello world", "the cat sat", "", "a dog and the cat sat on the mat", "the"] * 7
SETTINGS = dict(max_new_tokens=7, temperature=0.8, top_k=20, seed=9, batch_size=4, chunk_size=64)


@pytest.fixture(scope="module")
def model_dir(rt, tmp_path_factory):
    # Every rank must name the same directory: the coordinator's, shared by a first collective.
    path = tmp_path_factory.mktemp("gpt") / "m"
    if rt.is_coordinator:
        path.mkdir()
        config = registry.gpt_size("debug")
        tiny_gpt.write_model_dir(path, tiny_gpt.random_checkpoint(config, seed=4), config)
    return allgather_json(str(path))[0]


def test_continuations_come_back_in_order_equal_to_the_decoder(rt, model_dir):
    got = hvdinfer.generate(model_dir, PROMPTS, progress=False, on_error="skip", **SETTINGS)
    assert len(got) == len(PROMPTS)
    assert got[2] == {"error": "prompts[2]: empty text"}
    assert allgather_json(got) == [got] * rt.size  # every rank holds the same list

    model, tokenizer, _ = gpt_loading.load_gpt(model_dir)
    params = decoding.SamplingParams(max_new_tokens=7, temperature=0.8, top_k=20, seed=9)
    for index in (0, 3, 34):  # alone, in a batch of one: the same tokens as in the job's batches
        alone = decoding.generate_batch(model, tokenizer, [tokenizer.encode(PROMPTS[index])], [index], params)[0]
        assert got[index] == {"text": alone.text, "tokens": list(alone.tokens), "finish_reason": alone.finish_reason}


def test_streamed_output_and_resume(rt, model_dir, tmp_path_factory):
    path = allgather_json(str(tmp_path_factory.mktemp("o") / "out.jsonl"))[0]
    prompts = [p for p in PROMPTS if p]
    returned = hvdinfer.generate(model_dir, prompts, output=path, progress=False, **SETTINGS)
    assert str(returned) == path
    again = hvdinfer.generate(model_dir, prompts, output=path + ".2.jsonl", resume=True, progress=False, **SETTINGS)
    if rt.is_coordinator:
        first = [json.loads(line) for line in open(path)]
        assert [row["index"] for row in first] == list(range(len(prompts)))
        assert open(again).read() == open(path).read()


def test_bad_calls_are_clear_errors(rt, model_dir):
    with pytest.raises(hvdinfer.JobError, match="prompts must be a list of strings"):
        hvdinfer.generate(model_dir, "one string")
    with pytest.raises(hvdinfer.JobError, match="unknown or fixed setting.*: temprature"):
        hvdinfer.generate(model_dir, ["a"], temprature=0.5)
