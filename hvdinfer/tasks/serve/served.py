"""The served model on one rank, and what one rank computes: a batch of texts -> embeddings or class
probabilities (the same compiled forward as `hvdinfer infer`), or sequences decoded with
iteration-level batching (models/slots.py). No HTTP and no MPI here: ranks.py feeds it messages.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from hvdinfer import assets
from hvdinfer.data import batching
from hvdinfer.runtime import JobError
from hvdinfer.tasks import text_job

KINDS = ("embed", "classify", "generate")


@dataclasses.dataclass
class Served:
    """One model, loaded on every rank the same way."""

    name: str
    """The id clients name it by (a registered id, else the directory's name)."""
    model_dir: Path
    kind: str
    """embed (a sentence embedder), classify (an embedder with a classifier head: also embeds) or generate."""
    model: Any
    tokenizer: Any
    context: int
    """Tokens per text (embedders: the model's max_seq_length) or positions (decoders)."""
    labels: list[str] | None = None
    embedder: Any = None
    precision: str = "fp32"
    runner: Any = None
    """Under --pp/--tp: the parallelised model (hvdinfer/parallel's EncoderRunner or DecoderRunner)."""

    def names(self) -> set[str]:
        return {self.name, str(self.model_dir), self.model_dir.name}

    def endpoints(self) -> set[str]:
        return {"generate": {"completions", "chat"}, "embed": {"embeddings"},
                "classify": {"embeddings", "classify"}}[self.kind]

    @property
    def group(self):
        """This rank's tensor-parallel group (hvdinfer/parallel), or None."""
        return getattr(self.runner, "group", None)


def model_kind(model_dir: Path) -> str:
    from models import heads

    config = model_dir / "config.json"
    try:
        if json.loads(config.read_text()).get("model_type") == "gpt2":
            return "generate"
    except (OSError, json.JSONDecodeError) as exc:
        raise JobError(f"--model {model_dir}: unreadable {config.name}: {exc}") from None
    return "classify" if heads.has_head(model_dir) else "embed"


def load(model: str, precision: str, parallel=None) -> Served:
    """The model on this rank; under --pp/--tp (`parallel` enabled) parallelised as `hvdinfer infer`
    and `generate` do it (an embedder or classifier is traced here, on every rank of a group together)."""
    import tensorflow as tf

    from models import gpt_loading, loading

    tf.keras.mixed_precision.set_global_policy("mixed_bfloat16" if precision == "bf16" else "float32")
    model_dir = text_job.resolve_model_dir(model)
    kind = model_kind(model_dir)
    name = model if model in assets.ASSETS else model_dir.name
    try:
        if parallel is not None and parallel.enabled:
            return _load_parallel(name, model_dir, kind, precision, parallel)
        if kind == "generate":
            lm, tokenizer, config = gpt_loading.load_gpt(model_dir)
            return Served(name, model_dir, kind, lm, tokenizer, config.n_positions, precision=precision)
        load_fn = loading.load_classifier if kind == "classify" else loading.load_sentence_embedder
        net, tokenizer, info = load_fn(model_dir)
    except (OSError, ValueError, KeyError) as exc:
        raise JobError(f"--model {model}: cannot load model: {exc}") from None
    embedder = net.embedder if kind == "classify" else net
    labels = [str(label) for label in net.labels] if kind == "classify" else None  # a plain list, not Keras' wrapper
    return Served(name, model_dir, kind, net, tokenizer, info.max_seq_length, labels, embedder, precision)


def _load_parallel(name: str, model_dir: Path, kind: str, precision: str, parallel) -> Served:
    from hvdinfer.parallel import parallelize

    if kind == "generate":  # its slot cache is made and traced by the rank loop (ranks.py)
        runner, tokenizer, config = parallelize.load_gpt(model_dir, parallel)
        return Served(name, model_dir, kind, runner.model, tokenizer, config.n_positions, precision=precision,
                      runner=runner)
    runner, tokenizer, info = parallelize.load_embedder(model_dir, kind == "classify", parallel)
    runner.warm_up(tokenizer.pad_id)  # every rank of a group traces together, before any request
    labels = [str(label) for label in runner.labels] if kind == "classify" else None
    return Served(name, model_dir, kind, runner.model, tokenizer, info.max_seq_length, labels, None, precision,
                  runner)


# Texts of a batch are sorted by length and computed this many at a time per TF thread: less
# padding, while each thread still has rows enough. Measured on minilm-l6, short texts, widths
# unrounded: one thread (a rank of two on 2 cores), groups of 32: 8 at a time 1.07-1.10x 16; two
# threads (one rank on 2 cores), served at 64 clients: 16 at a time 1.12x 8, and 32 no better than 16.
SUB_BATCH_PER_THREAD = 8


class TextForward:
    """Texts -> one float32 row each, sorted by length and cut into sub-batches padded to their own
    longest (as `infer` cuts a chunk)."""

    def __init__(self, served: Served, batch_size: int):
        import tensorflow as tf

        from hvdinfer.tasks import infer

        threads = tf.config.threading.get_intra_op_parallelism_threads() or os.cpu_count() or 1
        self.served, self.batch_size = served, min(batch_size, SUB_BATCH_PER_THREAD * threads)
        self.pad_multiple = batching.pad_multiple(served.precision)
        if served.runner is not None:  # traced when loaded
            self.forwards = {"embed": served.runner.embed}
            if served.kind == "classify":
                self.forwards["classify"] = served.runner.forward
            return
        self.forwards = {"embed": infer.compiled_forward(served.embedder)}
        if served.kind == "classify":
            self.forwards["classify"] = infer.compiled_forward(served.model)
        for forward in self.forwards.values():
            ids = np.full((1, 8), served.tokenizer.pad_id, np.int32)
            forward(ids, np.ones_like(ids))  # the one trace, before the first request

    def __call__(self, task: str, texts: list[str]) -> tuple[np.ndarray, list[int]]:
        """(values (n, width), tokens per text)."""
        ids, _ = self.served.tokenizer.encode_ids(texts)
        out = None
        for batch in batching.make_batches(np.arange(len(texts)), ids, self.batch_size,
                                           pad_id=self.served.tokenizer.pad_id, multiple=self.pad_multiple):
            values = self.forwards[task](batch.input_ids, batch.attention_mask).numpy()
            if out is None:
                out = np.empty((len(texts), values.shape[1]), np.float32)
            out[batch.indices] = values
        return out, [len(i) for i in ids]
