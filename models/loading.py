"""A sentence-transformers model directory -> (SentenceEmbedder, Tokenizer, EmbedderInfo).

The directory is what `hvdinfer.assets.resolve_model` returns (or one hvdinfer saved): HF
`config.json`, `model.safetensors`, `tokenizer.json`, and the sentence-transformers files that
say how token vectors become one sentence vector: `modules.json` (Transformer -> Pooling ->
optional Normalize), `1_Pooling/config.json` (must be plain mean pooling) and
`sentence_bert_config.json` (max_seq_length). Anything else in the module list is refused rather
than silently skipped, since it would change the embeddings.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from models import bert, heads, weights
from models.tokenizer import Tokenizer

TRANSFORMER = "sentence_transformers.models.Transformer"
POOLING = "sentence_transformers.models.Pooling"
NORMALIZE = "sentence_transformers.models.Normalize"


@dataclasses.dataclass(frozen=True)
class EmbedderInfo:
    """What was read from a model directory besides the weights."""

    model_dir: Path
    """The directory it was loaded from."""
    config: bert.BertConfig
    """Encoder shape, from config.json."""
    max_seq_length: int
    """Tokens per text after truncation, special tokens included (sentence_bert_config.json)."""
    normalize: bool
    """Whether embeddings are L2-normalised (a Normalize module in modules.json)."""


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path.parent}: missing {path.name}") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON: {error}") from None


def read_modules(model_dir: Path) -> tuple[str, bool]:
    """(pooling folder, normalize) from modules.json, which must be Transformer, Pooling[, Normalize]."""
    modules = sorted(_read_json(model_dir / "modules.json"), key=lambda m: m["idx"])
    types = [m["type"] for m in modules]
    if types not in ([TRANSFORMER, POOLING], [TRANSFORMER, POOLING, NORMALIZE]):
        raise ValueError(f"{model_dir}/modules.json: unsupported module list {types}; "
                         f"want {TRANSFORMER}, {POOLING}, optionally {NORMALIZE}")
    if modules[0].get("path", ""):
        raise ValueError(f"{model_dir}/modules.json: the Transformer module must live in the top folder")
    return modules[1]["path"], len(modules) == 3


def check_mean_pooling(pooling: dict, hidden_size: int, where: Path) -> None:
    """Only plain mean pooling over the masked tokens is implemented (models.bert.MeanPool)."""
    modes = {k: v for k, v in pooling.items() if k.startswith("pooling_mode_") and v}
    if modes != {"pooling_mode_mean_tokens": True}:
        raise ValueError(f"{where}: only mean pooling is supported, this model asks for {sorted(modes) or 'none'}")
    if pooling.get("word_embedding_dimension", hidden_size) != hidden_size:
        raise ValueError(f"{where}: word_embedding_dimension {pooling['word_embedding_dimension']} "
                         f"!= hidden_size {hidden_size}")


def read_info(model_dir: str | os.PathLike) -> EmbedderInfo:
    """Everything about a model directory except its weights and vocabulary."""
    model_dir = Path(model_dir)
    config = bert.BertConfig.from_hf(_read_json(model_dir / "config.json"))
    pooling_dir, normalize = read_modules(model_dir)
    pooling_config = model_dir / pooling_dir / "config.json"
    check_mean_pooling(_read_json(pooling_config), config.hidden_size, pooling_config)
    sbert_path = model_dir / "sentence_bert_config.json"
    sbert = _read_json(sbert_path) if sbert_path.exists() else {}
    if sbert.get("do_lower_case"):
        raise ValueError(f"{sbert_path}: do_lower_case is not supported (lowercasing belongs in tokenizer.json)")
    max_seq_length = sbert.get("max_seq_length") or config.max_position
    if not 2 <= max_seq_length <= config.max_position:
        raise ValueError(f"{sbert_path}: max_seq_length {max_seq_length} outside 2..{config.max_position} "
                         f"(max_position_embeddings)")
    return EmbedderInfo(model_dir=model_dir, config=config, max_seq_length=max_seq_length, normalize=normalize)


def load_sentence_embedder(model_dir: str | os.PathLike) -> tuple[bert.SentenceEmbedder, Tokenizer, EmbedderInfo]:
    """Build the model a sentence-transformers directory describes and load its weights and tokenizer."""
    info = read_info(model_dir)
    model = bert.build(bert.SentenceEmbedder(info.config, normalize=info.normalize))
    weights.load_weights(model, info.model_dir / "model.safetensors")
    tokenizer = Tokenizer.from_file(info.model_dir / "tokenizer.json", info.max_seq_length)
    return model, tokenizer, info


def load_classifier(model_dir: str | os.PathLike) -> tuple[heads.TextClassifier, Tokenizer, EmbedderInfo]:
    """The embedder of `model_dir` with its classifier head (classifier.json + classifier.safetensors)."""
    if not heads.has_head(model_dir):
        raise ValueError(f"{model_dir}: no {heads.HEAD_CONFIG}: this model has no classifier head")
    embedder, tokenizer, info = load_sentence_embedder(model_dir)
    return heads.load_head(embedder, info.model_dir), tokenizer, info
