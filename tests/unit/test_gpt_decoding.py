"""Decode policy at the debug size: cache vs recompute, batches vs prompts alone, per-prompt random
streams, top-k/top-p, stop strings, end-of-text, finished rows, and the checks made before compute."""
import numpy as np
import pytest

from models import gpt, gpt_weights, registry
from models.bpe import BPETokenizer
from models.decoding import Generation, SamplingParams, generate_batch, next_token, row_generator
from tests import tiny_gpt

CONFIG = registry.gpt_size("debug")
PROMPTS = [[11, 260, 262, 5, 99], [7], [280, 281, 40, 41, 42, 43, 44, 45, 46], [3, 4]]
INDICES = [0, 1, 2, 3]
GREEDY = SamplingParams(max_new_tokens=12)
SAMPLED = SamplingParams(max_new_tokens=12, temperature=1.0, top_k=40, top_p=0.9, seed=7)


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    model = gpt.build(gpt.GPT(CONFIG))
    gpt_weights.assign(model, tiny_gpt.random_checkpoint(CONFIG, seed=5))
    tokenizer = BPETokenizer.from_dir(tiny_gpt.write_vocab(tmp_path_factory.mktemp("vocab")))
    return model, tokenizer


def _generate(lm, prompts, indices, params, **kwargs):
    return generate_batch(*lm, prompts, indices, params, **kwargs)


def _alone(lm, params, **kwargs):
    return [_generate(lm, [p], [i], params, **kwargs)[0] for p, i in zip(PROMPTS, INDICES)]


def test_greedy_batch_equals_prompts_alone_with_and_without_cache(lm):
    batched = _generate(lm, PROMPTS, INDICES, GREEDY)
    recomputed = _generate(lm, PROMPTS, INDICES, GREEDY, use_cache=False)
    alone = _alone(lm, GREEDY)
    for b, r, a in zip(batched, recomputed, alone):
        assert b == r == a
        assert b.finish_reason == "length" and len(b.tokens) == 12
        assert b.text == lm[1].decode(b.tokens)
    assert len({tuple(g.tokens) for g in batched}) == len(PROMPTS)  # not one stuck continuation


def test_sampling_depends_only_on_seed_and_prompt_index(lm):
    batched = _generate(lm, PROMPTS, INDICES, SAMPLED)
    reordered = _generate(lm, PROMPTS[::-1], INDICES[::-1], SAMPLED)[::-1]
    alone = _alone(lm, SAMPLED)
    no_cache = _generate(lm, PROMPTS, INDICES, SAMPLED, use_cache=False)
    assert batched == reordered == alone == no_cache
    assert batched != _generate(lm, PROMPTS, INDICES, GREEDY)
    other_seed = _generate(lm, PROMPTS, INDICES, SamplingParams(**{**vars(SAMPLED), "seed": 8}))
    assert [g.tokens for g in other_seed] != [g.tokens for g in batched]
    # The same prompt under another index draws another stream.
    moved = _generate(lm, PROMPTS[:1], [9], SAMPLED)[0]
    assert moved.tokens != batched[0].tokens


def test_top_k_1_is_greedy(lm):
    params = SamplingParams(max_new_tokens=12, temperature=1.5, top_k=1, seed=3)
    assert _generate(lm, PROMPTS, INDICES, params) == _generate(lm, PROMPTS, INDICES, GREEDY)


def test_next_token_filters():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    draws = lambda params: {next_token(logits, params, row_generator(0, i)) for i in range(300)}
    assert draws(SamplingParams(temperature=1.0)) == {0, 1, 2, 3}
    assert draws(SamplingParams(temperature=1.0, top_k=2)) == {0, 1}
    assert draws(SamplingParams(temperature=1.0, top_p=0.79)) == {0, 1}
    assert draws(SamplingParams(temperature=1.0, top_p=0.81)) == {0, 1, 2}
    assert draws(SamplingParams(temperature=1.0, top_p=0.1)) == {0}
    assert draws(SamplingParams()) == {0}


def _ascii_stop(text: str, start: int) -> str:
    for i in range(start, len(text) - 1):
        if text[i:i + 2].isascii() and text[i:i + 2].isprintable():
            return text[i:i + 2]
    raise AssertionError(f"no ASCII pair in {text!r}")


def test_stop_string_cuts_the_text_and_ends_the_row(lm):
    full = _generate(lm, PROMPTS, INDICES, GREEDY)
    stop = _ascii_stop(full[2].text, len(lm[1].decode(full[2].tokens[:4])))
    stopped = _generate(lm, PROMPTS, INDICES, SamplingParams(max_new_tokens=12, stop=["never there", stop]))
    for before, after in zip(full, stopped):
        if stop in before.text:
            assert after.finish_reason == "stop"
            assert after.text == before.text[:before.text.index(stop)] and stop not in after.text
            assert after.tokens == before.tokens[:len(after.tokens)] and stop in lm[1].decode(after.tokens)
            assert stop not in lm[1].decode(after.tokens[:-1])
        else:
            assert after == before
    assert stopped[2].finish_reason == "stop" and len(stopped[2].tokens) < 12


def test_end_of_text_ends_the_row_and_finished_rows_are_frozen(lm):
    full = _generate(lm, PROMPTS, INDICES, GREEDY)
    eos = full[0].tokens[3]
    first = full[0].tokens.index(eos)
    params = SamplingParams(max_new_tokens=12, eos_token_id=eos)
    batched = _generate(lm, PROMPTS, INDICES, params)
    assert batched[0] == Generation(full[0].tokens[:first + 1], lm[1].decode(full[0].tokens[:first + 1]), "eos")
    assert batched == _alone(lm, params)
    ignored = _generate(lm, PROMPTS, INDICES, SamplingParams(max_new_tokens=12, eos_token_id=eos, ignore_eos=True))
    assert ignored == full


def test_tokenizer_end_of_text_is_the_default_and_left_out_of_the_text(lm):
    model, tokenizer = lm
    bias = model.wte.embeddings.numpy()
    try:  # make end-of-text the most likely token everywhere: a huge component along ln_f's output
        boosted = bias.copy()
        boosted[tokenizer.eos_id] = 50 * np.sign(model.ln_f.gamma.numpy())
        model.wte.embeddings.assign(boosted)
        got = _generate(lm, PROMPTS, INDICES, GREEDY)
    finally:
        model.wte.embeddings.assign(bias)
    assert [g.finish_reason for g in got] == ["eos"] * 4
    assert all(g.tokens[-1] == tokenizer.eos_id and "<|endoftext|>" not in g.text for g in got)


def test_loop_ends_when_every_row_has_finished(lm):
    full = _generate(lm, PROMPTS[:1], [0], GREEDY)[0]
    steps = []
    got = _generate(lm, PROMPTS[:1], [0], SamplingParams(max_new_tokens=12, eos_token_id=full.tokens[2]),
                    on_step=steps.append)[0]
    assert got.finish_reason == "eos" and steps == list(range(1, len(got.tokens) + 1)) and len(steps) <= 3


def test_fixed_max_length_shares_one_decode_graph(lm):
    model = lm[0]
    before = model._decode_step_graph.experimental_get_tracing_count()
    first = _generate(lm, PROMPTS[:2], [0, 1], GREEDY, max_length=40)
    second = _generate(lm, PROMPTS[2:], [2, 3], GREEDY, max_length=40)
    assert model._decode_step_graph.experimental_get_tracing_count() - before == 1
    assert first + second == _generate(lm, PROMPTS, INDICES, GREEDY)


@pytest.mark.parametrize("values, error, message", [
    ({"temperature": -0.5}, ValueError, r"temperature must be >= 0 \(0 is greedy\), got -0.5"),
    ({"temperature": float("nan")}, ValueError, "temperature must be finite"),
    ({"top_p": 0.0}, ValueError, r"top_p must be in \(0, 1\], got 0.0"),
    ({"top_p": 1.5}, ValueError, r"top_p must be in \(0, 1\], got 1.5"),
    ({"top_k": -1}, ValueError, "top_k must be >= 0, got -1"),
    ({"top_k": 2.0}, TypeError, "top_k must be an int, got float 2.0"),
    ({"max_new_tokens": 0}, ValueError, "max_new_tokens must be >= 1, got 0"),
    ({"max_new_tokens": True}, TypeError, "max_new_tokens must be an int, got bool"),
    ({"seed": -1}, ValueError, r"seed must be in 0\.\.18446744073709551615, got -1"),
    ({"stop": ["ok", ""]}, ValueError, "stop must be a list of non-empty strings"),
    ({"eos_token_id": -2}, ValueError, "eos_token_id must be >= 0"),
])
def test_invalid_parameters_are_refused(values, error, message):
    with pytest.raises(error, match=message):
        SamplingParams(**values)


def test_from_dict_refuses_unknown_keys_and_accepts_one_stop_string():
    assert SamplingParams.from_dict({"stop": "\n", "top_p": 0.5}).stop == ("\n",)
    with pytest.raises(ValueError, match=r"unknown sampling parameter\(s\) max_tokens, topk; known: eos_token_id"):
        SamplingParams.from_dict({"max_tokens": 3, "topk": 2})


@pytest.mark.parametrize("prompts, indices, kwargs, message", [
    ([[1] * 120], [4], {}, r"prompt 4 has 120 tokens: with max_new_tokens 12 it needs 132 positions, the model "
                           r"has n_positions 128"),
    ([[1, 2], []], [0, 1], {}, "prompt 1 is empty"),
    ([[1, 512]], [0], {}, r"prompt 0 holds ids outside 0\.\.511"),
    ([[1, 2]], [0, 1], {}, "1 prompts but 2 prompt indices"),
    ([], [], {}, "no prompts"),
    ([[1, 2, 3]], [0], {"max_length": 14}, r"max_length 14 is shorter than the longest prompt plus max_new_tokens \(15\)"),
])
def test_batch_errors_come_before_compute(lm, prompts, indices, kwargs, message):
    with pytest.raises(ValueError, match=message):
        _generate(lm, prompts, indices, GREEDY, **kwargs)
