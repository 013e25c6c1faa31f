"""Decode policy over models.gpt: sampling parameters, per-prompt random streams, stop rules, and
batches of prompts of different lengths. The model only turns tokens into logits (`prefill`,
`decode_step`, or `last_logits` without a cache); every choice made from them happens here, on
the host, in numpy.

    generate_batch(model, tokenizer, [[15496, 995], [464]], [0, 1], SamplingParams(max_new_tokens=8))

Prompts are left-padded to the longest, so every row's next token lands in the same cache column;
positions are counted per row, so a padded prompt computes what it would alone. A prompt's random
stream is a Philox generator keyed by (seed, prompt index) and nothing else, drawing exactly one
uniform per generated token: its continuation does not depend on the batch it shares, the rank
that runs it or the order batches run in. A row that finishes keeps being computed with the batch
(its outputs frozen) until every row has finished.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Callable, Sequence

import numpy as np

from models.bpe import BPETokenizer
from models.gpt import GPT

FINISH_REASONS = ("length", "stop", "eos")
# Default cache lengths are rounded up to this, so batches of similar lengths share one compiled
# decode step; a step only reads the columns written so far, so the spare ones cost memory only.
CACHE_COLUMNS_MULTIPLE = 64


def _check_int(name: str, value, low: int, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < low or (high is not None and value > high):
        raise ValueError(f"{name} must be " + (f">= {low}" if high is None else f"in {low}..{high}")
                         + f", got {value}")


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to choose each next token and when to stop."""

    max_new_tokens: int = 16
    """Most tokens generated per prompt (>= 1)."""
    temperature: float = 0.0
    """Softmax temperature (>= 0); 0 takes the most likely token (greedy), ignoring top_k, top_p and seed."""
    top_k: int = 0
    """Sample among the top_k most likely tokens only; 0 keeps them all."""
    top_p: float = 1.0
    """Sample among the fewest most likely tokens whose probabilities add up to top_p, in (0, 1]; 1 keeps all."""
    seed: int = 0
    """With the prompt index, the key of the prompt's random stream (0 <= seed < 2**64)."""
    stop: tuple[str, ...] = ()
    """Strings that end a continuation; its text is cut before the first one that appears."""
    eos_token_id: int | None = None
    """Token that ends a continuation; None: the tokenizer's end-of-text token."""
    ignore_eos: bool = False
    """Generate past the end-of-text token (until max_new_tokens or a stop string)."""

    def __post_init__(self):
        _check_int("max_new_tokens", self.max_new_tokens, 1)
        for name in ("temperature", "top_p"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
                raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
            if not math.isfinite(value):
                raise ValueError(f"{name} must be finite, got {value}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        _check_int("top_k", self.top_k, 0)
        _check_int("seed", self.seed, 0, 2**64 - 1)
        if self.eos_token_id is not None:
            _check_int("eos_token_id", self.eos_token_id, 0)
        if not isinstance(self.ignore_eos, bool):
            raise TypeError(f"ignore_eos must be a bool, got {type(self.ignore_eos).__name__}")
        stop = (self.stop,) if isinstance(self.stop, str) else self.stop
        if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) and s for s in stop):
            raise ValueError(f"stop must be a list of non-empty strings, got {self.stop!r}")
        object.__setattr__(self, "stop", tuple(stop))

    @classmethod
    def from_dict(cls, values: dict) -> "SamplingParams":
        """From a request or config dict; unknown keys are errors."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown sampling parameter(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**values)


@dataclasses.dataclass(frozen=True)
class Generation:
    """One prompt's continuation."""

    tokens: list[int]
    """Generated ids, up to and including the end-of-text token or the one that completed a stop string."""
    text: str
    """The continuation only (no prompt), cut before a stop string, special tokens left out."""
    finish_reason: str
    """"length" (max_new_tokens reached), "stop" (a stop string appeared) or "eos" (end-of-text token)."""


def row_generator(seed: int, prompt_index: int) -> np.random.Generator:
    """The random stream of one prompt: a function of (seed, prompt index) only."""
    _check_int("prompt index", prompt_index, 0, 2**64 - 1)
    return np.random.Generator(np.random.Philox(key=seed + (prompt_index << 64)))


def next_token(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    """Choose a token from one row's logits (vocab,): greedy, or one uniform draw from `rng` over
    the tempered, top-k and top-p filtered distribution."""
    if params.temperature == 0:
        return int(np.argmax(logits))
    scores = logits.astype(np.float64) / params.temperature
    if 0 < params.top_k < scores.size:
        kth = np.partition(scores, -params.top_k)[-params.top_k]
        scores = np.where(scores >= kth, scores, -np.inf)
    probs = np.exp(scores - scores.max())
    probs /= probs.sum()
    if params.top_p < 1:
        order = np.argsort(-probs, kind="stable")
        keep = order[:int(np.searchsorted(np.cumsum(probs[order]), params.top_p)) + 1]
        kept = np.zeros_like(probs)
        kept[keep] = probs[keep]
        probs = kept / kept.sum()
    cdf = np.cumsum(probs)
    return int(min(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"), probs.size - 1))


class _Row:
    """One prompt's continuation as it grows, and why it ended."""

    def __init__(self, tokenizer: BPETokenizer, params: SamplingParams, eos_id: int | None,
                 rng: np.random.Generator):
        self.tokenizer, self.params, self.eos_id, self.rng = tokenizer, params, eos_id, rng
        self.tokens: list[int] = []
        self.text: str | None = None
        self.finish_reason: str | None = None

    def add(self, token: int) -> None:
        self.tokens.append(token)
        if token == self.eos_id:
            self.finish_reason = "eos"
        elif self.params.stop:
            text = self.tokenizer.decode(self.tokens)
            found = [i for i in (text.find(s) for s in self.params.stop) if i >= 0]
            if found:
                self.text, self.finish_reason = text[:min(found)], "stop"
        if self.finish_reason is None and len(self.tokens) == self.params.max_new_tokens:
            self.finish_reason = "length"

    def result(self) -> Generation:
        text = self.tokenizer.decode(self.tokens) if self.text is None else self.text
        return Generation(tokens=list(self.tokens), text=text, finish_reason=self.finish_reason)


def choose_tokens(rows: Sequence[_Row], logits: np.ndarray, params: SamplingParams, fed: np.ndarray) -> None:
    """The host's share of one step: every unfinished row's next token from its logits (batch, vocab),
    written into `fed` and added to the row. Greedy takes every row's argmax in one vectorised call;
    sampling draws from each row's own stream, one uniform per token (`next_token`)."""
    greedy = logits.argmax(axis=1) if params.temperature == 0 else None
    for r, row in enumerate(rows):
        if row.finish_reason is None:
            fed[r] = greedy[r] if greedy is not None else next_token(logits[r], params, row.rng)
            row.add(int(fed[r]))


def left_pad(prompts: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, attention_mask) int32 (n, longest), each prompt right-aligned after 0-padding."""
    width = max(len(p) for p in prompts)
    input_ids = np.zeros((len(prompts), width), np.int32)
    attention_mask = np.zeros((len(prompts), width), np.int32)
    for row, prompt in enumerate(prompts):
        if len(prompt):
            input_ids[row, width - len(prompt):] = prompt
            attention_mask[row, width - len(prompt):] = 1
    return input_ids, attention_mask


class _CachedSteps:
    """Prefill once, then one decode step per token against a preallocated cache."""

    def __init__(self, model: GPT, input_ids: np.ndarray, attention_mask: np.ndarray, max_len: int):
        self.model, self.input_ids, self.attention_mask = model, input_ids, attention_mask
        self.cache = model.new_cache(input_ids.shape[0], max_len)
        self.cache_mask = np.zeros((input_ids.shape[0], max_len), np.int32)
        self.cache_mask[:, :input_ids.shape[1]] = attention_mask
        self.column = input_ids.shape[1]
        self.positions = attention_mask.sum(axis=1).astype(np.int32)

    def first(self):
        return self.model.prefill(self.input_ids, self.attention_mask, self.cache)[0]

    def next(self, tokens: np.ndarray):
        self.cache_mask[:, self.column] = 1
        logits, self.cache = self.model.decode_step(tokens, self.positions, self.column, self.cache, self.cache_mask)
        self.column += 1
        self.positions += 1
        return logits


class _RecomputeSteps:
    """No cache: the whole sequence through the model for every token (the slow baseline)."""

    def __init__(self, model: GPT, input_ids: np.ndarray, attention_mask: np.ndarray):
        self.model, self.input_ids, self.attention_mask = model, input_ids, attention_mask

    def first(self):
        return self.model.last_logits(self.input_ids, self.attention_mask)

    def next(self, tokens: np.ndarray):
        self.input_ids = np.concatenate([self.input_ids, tokens[:, None]], axis=1)
        self.attention_mask = np.concatenate([self.attention_mask, np.ones_like(tokens)[:, None]], axis=1)
        return self.model.last_logits(self.input_ids, self.attention_mask)


def check_batch(model: GPT, prompts: Sequence[Sequence[int]], prompt_indices: Sequence[int],
                params: SamplingParams, max_length: int | None) -> int:
    """All the errors a batch can have, before any compute; returns the cache length to use."""
    if len(prompts) != len(prompt_indices):
        raise ValueError(f"{len(prompts)} prompts but {len(prompt_indices)} prompt indices")
    if not prompts:
        raise ValueError("no prompts to generate from")
    config = model.config
    for prompt, index in zip(prompts, prompt_indices):
        _check_int("prompt index", index, 0, 2**64 - 1)
        if len(prompt) == 0:
            raise ValueError(f"prompt {index} is empty: a continuation needs at least one token to follow")
        ids = np.asarray(prompt)
        if not np.issubdtype(ids.dtype, np.integer) or ids.min() < 0 or ids.max() >= config.vocab_size:
            raise ValueError(f"prompt {index} holds ids outside 0..{config.vocab_size - 1}")
        if len(prompt) + params.max_new_tokens > config.n_positions:
            raise ValueError(f"prompt {index} has {len(prompt)} tokens: with max_new_tokens {params.max_new_tokens} "
                             f"it needs {len(prompt) + params.max_new_tokens} positions, the model has "
                             f"n_positions {config.n_positions}")
    needed = max(len(p) for p in prompts) + params.max_new_tokens
    if max_length is None:
        return -(-needed // CACHE_COLUMNS_MULTIPLE) * CACHE_COLUMNS_MULTIPLE
    _check_int("max_length", max_length, 1)
    if max_length < needed:
        raise ValueError(f"max_length {max_length} is shorter than the longest prompt plus max_new_tokens ({needed})")
    return max_length


def generate_batch(model: GPT, tokenizer: BPETokenizer, prompts_token_ids: Sequence[Sequence[int]],
                   prompt_indices: Sequence[int], params: SamplingParams, use_cache: bool = True,
                   max_length: int | None = None, on_step: Callable[[int], None] | None = None) -> list[Generation]:
    """Continue every prompt (token ids) of one batch; prompt_indices key their random streams.

    use_cache=False recomputes the whole sequence for every token (the baseline the cache is
    measured against; same greedy tokens). max_length is the cache's columns (left padding, prompt
    and continuation), at least the longest prompt plus max_new_tokens: one compiled decode step
    serves every batch of one size and max_length. Default: that sum rounded up to a multiple of
    CACHE_COLUMNS_MULTIPLE. on_step(n) is called after the n-th token of the batch is chosen (a
    heartbeat for long generations).
    """
    max_len = check_batch(model, prompts_token_ids, prompt_indices, params, max_length)
    eos_id = None if params.ignore_eos else (tokenizer.eos_id if params.eos_token_id is None else params.eos_token_id)
    rows = [_Row(tokenizer, params, eos_id, row_generator(params.seed, index)) for index in prompt_indices]
    input_ids, attention_mask = left_pad(prompts_token_ids)
    steps = (_CachedSteps(model, input_ids, attention_mask, max_len) if use_cache
             else _RecomputeSteps(model, input_ids, attention_mask))
    # Ids past the tokenizer's (a padded embedding table) could not be decoded: never chosen.
    usable = min(tokenizer.vocab_size, model.config.vocab_size)
    fed = input_ids[:, -1].copy()
    logits = steps.first()
    for step in itertools.count(1):
        choose_tokens(rows, logits.numpy()[:, :usable], params, fed)
        if on_step is not None:
            on_step(step)
        if all(row.finish_reason is not None for row in rows):
            return [row.result() for row in rows]
        logits = steps.next(fed)
