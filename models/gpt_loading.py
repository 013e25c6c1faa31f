"""A GPT-2 model directory <-> (GPT, BPETokenizer, GPTConfig).

The directory is laid out as HF transformers saves a GPT2LMHeadModel, so either side can read what
the other wrote: `config.json` (model_type gpt2), `model.safetensors` (HF names, see
models/gpt_weights.py) and the vocabulary (`tokenizer.json`, and/or `vocab.json` + `merges.txt`,
or OpenAI's `encoder.json` + `vocab.bpe`; see models/bpe.py).

A fresh model to train from scratch is `save_gpt(gpt.random_init(gpt.GPT(config)), tokenizer,
config, out)` with any vocabulary directory, e.g. hvdinfer.assets.resolve_tokenizer("gpt2").
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

from models import gpt, gpt_weights
from models.bpe import BPETokenizer

CONFIG = "config.json"
WEIGHTS = "model.safetensors"


def read_config(model_dir: str | os.PathLike) -> gpt.GPTConfig:
    """The GPTConfig of `model_dir`/config.json."""
    path = Path(model_dir) / CONFIG
    try:
        return gpt.GPTConfig.from_hf(json.loads(path.read_text()))
    except FileNotFoundError:
        raise ValueError(f"{path.parent}: missing {CONFIG}") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON: {error}") from None
    except KeyError as error:
        raise ValueError(f"{path}: no {error.args[0]!r}") from None
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None


def check_vocabulary(tokenizer: BPETokenizer, config: gpt.GPTConfig, where: str | os.PathLike) -> None:
    """Every id the tokenizer makes must have a row in the model's embedding table."""
    if tokenizer.vocab_size > config.vocab_size:
        raise ValueError(f"{where}: the tokenizer has {tokenizer.vocab_size} ids but the model only "
                         f"vocab_size {config.vocab_size}")


def load_gpt(model_dir: str | os.PathLike) -> tuple[gpt.GPT, BPETokenizer, gpt.GPTConfig]:
    """Build the model `model_dir` describes and load its weights and tokenizer."""
    model_dir = Path(model_dir)
    config = read_config(model_dir)
    tokenizer = BPETokenizer.from_dir(model_dir)
    check_vocabulary(tokenizer, config, model_dir)
    weights_path = model_dir / WEIGHTS
    if not weights_path.is_file():
        raise ValueError(f"{model_dir}: missing {WEIGHTS}")
    model = gpt.build(gpt.GPT(config))
    gpt_weights.load_weights(model, weights_path)
    return model, tokenizer, config


def save_gpt(model: gpt.GPT, tokenizer: BPETokenizer, config: gpt.GPTConfig,
             model_dir: str | os.PathLike) -> Path:
    """Write a model directory that load_gpt and HF transformers both read. It appears complete or
    not at all: written beside `model_dir` and moved into place; an existing non-empty `model_dir`
    is refused."""
    model_dir = Path(model_dir)
    if model.config != config:
        raise ValueError(f"the model was built for {model.config}, not {config}")
    check_vocabulary(tokenizer, config, model_dir)
    if model_dir.exists() and any(model_dir.iterdir()):
        raise FileExistsError(f"{model_dir} exists and is not empty")
    model_dir.parent.mkdir(parents=True, exist_ok=True)
    # os.mkdir, not mkdtemp: the directory gets the umask's mode, like any other output.
    staging = model_dir.parent / f".{model_dir.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        hf = {**config.to_hf(), "bos_token_id": tokenizer.eos_id, "eos_token_id": tokenizer.eos_id}
        (staging / CONFIG).write_text(json.dumps(hf, indent=2) + "\n")
        gpt_weights.save_weights(model, staging / WEIGHTS)
        tokenizer.save(staging)
        os.replace(staging, model_dir)  # onto an empty directory too
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return model_dir

