"""GPT-2's byte-level BPE on a tiny generated vocabulary: the three file layouts agree, decoding
inverts encoding, and the end-of-text token."""
import json

import pytest

from models.bpe import BPETokenizer
from tests import tiny_gpt

TEXTS = ["Hello world", "the cat sat on the mat", "  naïve café — 東京\n\tdog and", "<|endoftext|>the", ""]


@pytest.fixture
def tokenizers_by_layout(tmp_path):
    hf = BPETokenizer.from_dir(tiny_gpt.write_vocab(tmp_path / "hf"))
    openai = BPETokenizer.from_dir(tiny_gpt.write_vocab(tmp_path / "openai", ("encoder.json", "vocab.bpe")))
    hf.save(tmp_path / "saved")
    (tmp_path / "saved" / "vocab.json").unlink()  # tokenizer.json alone
    return {"vocab.json": hf, "encoder.json": openai, "tokenizer.json": BPETokenizer.from_dir(tmp_path / "saved")}


def test_layouts_give_the_same_ids(tokenizers_by_layout):
    ids = {name: tok.encode_batch_ids(TEXTS) for name, tok in tokenizers_by_layout.items()}
    assert ids["vocab.json"] == ids["encoder.json"] == ids["tokenizer.json"]
    vocab, _ = tiny_gpt.vocabulary()
    assert ids["vocab.json"][0] == [vocab["Hello"], vocab["Ġworld"]]
    assert ids["vocab.json"][1] == [vocab[w] for w in ["the", "Ġcat", "Ġsat", "Ġon", "Ġthe", "Ġmat"]]
    assert ids["vocab.json"][3] == [vocab["<|endoftext|>"], vocab["the"]]
    assert ids["vocab.json"][4] == []


def test_decode_inverts_encode_and_leaves_out_end_of_text(tokenizers_by_layout):
    for tok in tokenizers_by_layout.values():
        for text in TEXTS[:3]:
            assert tok.decode(tok.encode(text)) == text
        assert tok.decode(tok.encode("a<|endoftext|>b")) == "ab"
        assert tok.eos_id == 289 and tok.vocab_size == 290


def test_saved_files_are_hf_layout(tmp_path):
    tok = BPETokenizer.from_dir(tiny_gpt.write_vocab(tmp_path / "in"))
    tok.save(tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["merges.txt", "tokenizer.json", "vocab.json"]
    assert json.loads((tmp_path / "out" / "vocab.json").read_text()) == tiny_gpt.vocabulary()[0]
    saved = json.loads((tmp_path / "out" / "tokenizer.json").read_text())
    assert saved["model"]["type"] == "BPE" and saved["pre_tokenizer"]["type"] == "ByteLevel"
    assert saved["added_tokens"][0]["content"] == "<|endoftext|>" and saved["added_tokens"][0]["special"]


def test_errors(tmp_path):
    with pytest.raises(ValueError, match="no GPT-2 vocabulary: want tokenizer.json, vocab.json \\+ merges.txt, "
                                         "or encoder.json \\+ vocab.bpe"):
        BPETokenizer.from_dir(tmp_path)
    vocab, merges = tiny_gpt.vocabulary()
    del vocab["<|endoftext|>"]
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("\n".join(merges))
    with pytest.raises(ValueError, match="the vocabulary has no <|endoftext|> token"):
        BPETokenizer.from_dir(tmp_path)
    with pytest.raises(TypeError, match="text 1 is int, not str"):
        BPETokenizer.from_dir(tiny_gpt.write_vocab(tmp_path / "ok")).encode_batch_ids(["a", 3])
