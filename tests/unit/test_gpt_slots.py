"""Continuous batching (models/slots.py) at the debug size: sequences that join and leave at any
step produce what models.decoding.generate_batch produces for each prompt alone, greedy and sampled;
a finished or cancelled sequence frees its slot at once; bad prompts are refused before compute."""
import pytest

from models import gpt, gpt_weights, registry
from models.bpe import BPETokenizer
from models.decoding import SamplingParams, generate_batch
from models.slots import GPTSlots, SlotDecoder
from tests import tiny_gpt

CONFIG = registry.gpt_size("debug")
PROMPTS = [[11, 260, 262, 5, 99], [7], [280, 281, 40, 41, 42, 43, 44, 45, 46], [3, 4]]


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    model = gpt.build(gpt.GPT(CONFIG))
    gpt_weights.assign(model, tiny_gpt.random_checkpoint(CONFIG, seed=5))
    tokenizer = BPETokenizer.from_dir(tiny_gpt.write_vocab(tmp_path_factory.mktemp("vocab")))
    return model, tokenizer


def _decoder(lm, slots: int) -> SlotDecoder:
    model, tokenizer = lm
    return SlotDecoder(GPTSlots(model, slots), tokenizer)


def _run(decoder, arrivals):
    """arrivals: {step: [(key, prompt, params, index)]}; returns {key: (tokens, text, reason)} and
    the step each finished at."""
    got, done_at, step = {}, {}, 0
    while arrivals or decoder.active:
        events = decoder.admit(arrivals.pop(step, []))
        events += decoder.step() if decoder.active else []
        for e in events:
            tokens, _, _ = got.get(e.key, ([], "", None))
            got[e.key] = (tokens + e.tokens, e.text, e.finish_reason)
            if e.finish_reason:
                done_at[e.key] = step
        step += 1
    return got, done_at


@pytest.mark.parametrize("params", [SamplingParams(max_new_tokens=10),
                                    SamplingParams(max_new_tokens=10, temperature=1.0, top_k=40, seed=7)])
def test_joining_at_any_step_equals_each_prompt_alone(lm, params):
    decoder = _decoder(lm, 3)
    arrivals = {0: [("a", PROMPTS[0], params, 0), ("b", PROMPTS[1], params, 1)], 3: [("c", PROMPTS[2], params, 2)],
                11: [("d", PROMPTS[3], params, 3)]}
    got, _ = _run(decoder, arrivals)
    for key, (prompt, index) in zip("abcd", zip(PROMPTS, range(4))):
        want = generate_batch(*lm, [prompt], [index], params)[0]
        assert got[key] == (want.tokens, want.text, want.finish_reason)


def test_a_short_sequence_is_not_held_back_and_frees_its_slot(lm):
    decoder = _decoder(lm, 2)
    long, short = SamplingParams(max_new_tokens=30, ignore_eos=True), SamplingParams(max_new_tokens=2, ignore_eos=True)
    got, done_at = _run(decoder, {0: [("long", PROMPTS[0], long, 0), ("s1", PROMPTS[1], short, 1)],
                                  2: [("s2", PROMPTS[3], short, 2)]})
    assert done_at["s1"] == 0 and done_at["s2"] == 2 and done_at["long"] == 28  # admit + step: 2 tokens a loop
    assert len(got["long"][0]) == 30 and decoder.free == 2


def test_cancel_frees_the_slot_and_bad_prompts_are_refused(lm):
    decoder = _decoder(lm, 1)
    decoder.admit([("x", PROMPTS[0], SamplingParams(max_new_tokens=20, ignore_eos=True), 0)])
    assert decoder.free == 0 and decoder.cancel("x") and decoder.free == 1 and not decoder.cancel("x")
    with pytest.raises(ValueError, match="empty"):
        decoder.admit([("e", [], SamplingParams(), 0)])
    with pytest.raises(ValueError, match="positions"):
        decoder.admit([("l", [1] * 120, SamplingParams(max_new_tokens=20), 0)])
    with pytest.raises(ValueError, match="free slots"):
        decoder.admit([("p", [1], SamplingParams(), 0), ("q", [2], SamplingParams(), 1)])
