"""Generated stand-ins for real assets: a WordPiece tokenizer.json, a debug-size model with random
weights, and a sentence-transformers model directory made of both. No downloads."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import tokenizers
from tokenizers import models as tk_models, normalizers, pre_tokenizers, processors

from models import bert, registry, weights

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "sat", "on", "mat", "a", "dog", "##s", "run"]
MODULES = [
    {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
    {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
]


def write_tokenizer(path: Path) -> Path:
    """A BERT-style WordPiece tokenizer.json that, like all-MiniLM-L6-v2's, carries its own fixed
    padding and truncation (which models.tokenizer must switch off)."""
    tok = tokenizers.Tokenizer(tk_models.WordPiece({w: i for i, w in enumerate(VOCAB)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                       special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tok.enable_truncation(4)
    tok.enable_padding(length=20, pad_id=0, pad_token="[PAD]")
    tok.save(str(path))
    return path


def random_model(seed: int, normalize: bool = True) -> bert.SentenceEmbedder:
    """The debug size with every variable random (biases and LayerNorms included)."""
    model = bert.build(bert.SentenceEmbedder(registry.size("debug"), normalize=normalize))
    rng = np.random.default_rng(seed)
    for var in model.weights:
        base = 1.0 if "gamma" in var.name else 0.0
        var.assign(base + rng.normal(0.0, 0.2, var.shape).astype(np.float32))
    return model


def write_model_dir(path: Path, model: bert.SentenceEmbedder, max_seq_length: int = 8,
                    modules: list | None = None, pooling: dict | None = None) -> Path:
    """A sentence-transformers directory laid out like all-MiniLM-L6-v2's."""
    (path / "1_Pooling").mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(model.config.to_hf()))
    (path / "modules.json").write_text(json.dumps(MODULES if modules is None else modules))
    (path / "1_Pooling" / "config.json").write_text(json.dumps(pooling or {
        "word_embedding_dimension": model.config.hidden_size, "pooling_mode_cls_token": False,
        "pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False}))
    (path / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": max_seq_length,
                                                                "do_lower_case": False}))
    write_tokenizer(path / "tokenizer.json")
    weights.save_weights(model, path / "model.safetensors")
    return path
