"""Iteration-level (continuous) batching over a GPT: a fixed number of slots share one KV cache,
each slot holds one sequence at its own column, and every step advances every active slot by one
token. A sequence joins at any step (its prompt is prefilled straight into its slot's cache row)
and leaves the step it finishes, freeing its slot for the next one: a long continuation never
holds short ones back.

    decoder = SlotDecoder(GPTSlots(model, slots=8), tokenizer)
    decoder.admit([("req-1", [15496, 995], SamplingParams(max_new_tokens=8), 0)])
    while decoder.active:
        for event in decoder.step(): ...   # (key, new token ids, text so far, finish_reason or None)

The decoder holds the decode policy; the model math is a slot compute (`SlotCompute`): `GPTSlots`
runs a models.gpt GPT on one device, and hvdinfer/parallel's DecoderRunner offers the same two calls
for a model split into pipeline stages or tensor-parallel shards. A slot cache is laid out like
models.gpt's, (layers, 2, slots, heads, max_len, head_dim); prefill and step read and write only the
rows and columns of the sequences they compute (sparse scatter and gather), so a step costs what the
active sequences cost, not the whole cache. Each slot's positions start at 0 and its columns at 0: a
sequence computes what it would alone, so greedy continuations equal models.decoding.generate_batch's.
Sampling, stop strings and end-of-text are decoding's (`next_token`, the per-prompt Philox stream).
Nothing here knows about ranks or HTTP.
"""
from __future__ import annotations

import dataclasses
from typing import Protocol

import numpy as np
import tensorflow as tf

from models import gpt
from models.bpe import BPETokenizer
from models.decoding import SamplingParams, _Row, left_pad, next_token, row_generator

_IDS = tf.TensorSpec([None], tf.int32)
_GRID = tf.TensorSpec([None, None], tf.int32)


class SlotCompute(Protocol):
    """The model math a SlotDecoder drives: a KV cache of `slots` rows x `max_len` columns."""

    slots: int
    max_len: int
    vocab_size: int

    def prefill(self, input_ids: np.ndarray, attention_mask: np.ndarray, rows: list[int]) -> np.ndarray:
        """Left-padded prompts (k, length) into cache rows `rows`, columns 0 .. length-1; the logits
        (k, vocab) after each prompt's last token."""

    def step(self, token_ids: np.ndarray, positions: np.ndarray, rows: list[int], columns: np.ndarray,
             cache_mask: np.ndarray) -> np.ndarray:
        """One token for each of rows `rows` (k,), at its position, written at its cache column;
        cache_mask (k, width) marks the columns each attends to. The next-token logits (k, vocab)."""


def slot_indices(rows: tf.Tensor, columns_per_row: tf.Tensor, heads: int) -> tf.Tensor:
    """[0, kv, row, head, column] of each (row, column) pair in layer 0 of a slot cache, shaped
    (2, k, heads, ncols, 5) like stacked keys and values; add [layer, 0, 0, 0, 0] for another layer."""
    k, ncols = tf.shape(columns_per_row)[0], tf.shape(columns_per_row)[1]
    shape = [2, k, heads, ncols]
    kv = tf.reshape(tf.range(2), [2, 1, 1, 1])
    row = tf.reshape(rows, [1, -1, 1, 1])
    head = tf.reshape(tf.range(heads), [1, 1, heads, 1])
    column = tf.reshape(columns_per_row, [1, k, 1, ncols])
    parts = [tf.zeros(shape, tf.int32), tf.broadcast_to(kv, shape), tf.broadcast_to(row, shape),
             tf.broadcast_to(head, shape), tf.broadcast_to(column, shape)]
    return tf.stack(parts, axis=-1)


def slot_memory(cache: tf.Variable, heads: int, rows, write_columns, read_columns=None, first_layer: int = 0):
    """A models.gpt Memory over a slot cache holding blocks first_layer.. : each block's new keys and
    values are written at (rows, write_columns), and it attends over (rows, read_columns), or over the
    new ones alone when read_columns is None (a prefill)."""
    write = slot_indices(rows, write_columns, heads)
    read = None if read_columns is None else slot_indices(rows, read_columns, heads)

    def memory(layer, k, v):
        at = tf.constant([layer - first_layer, 0, 0, 0, 0])
        cache.scatter_nd_update(write + at, tf.stack([k, v]))
        if read is None:
            return k, v
        got = tf.gather_nd(cache, read + at)
        return got[0], got[1]

    return memory


def all_columns(grid: tf.Tensor) -> tf.Tensor:
    """Columns 0 .. width-1 for each row of a (k, width) grid: a prefill writes them, a step reads them."""
    return tf.tile(tf.range(tf.shape(grid)[1])[tf.newaxis], [tf.shape(grid)[0], 1])


class GPTSlots:
    """A models.gpt GPT's slot cache on one device, with its prefill and step compiled once each."""

    def __init__(self, model: gpt.GPT, slots: int, max_len: int | None = None):
        if slots < 1:
            raise ValueError(f"slots must be >= 1, got {slots}")
        self.model, self.slots = model, slots
        self.max_len = max_len or model.config.n_positions
        self.vocab_size = model.config.vocab_size
        self.cache = model.new_cache(slots, self.max_len)
        self._prefill = tf.function(self._prefill_graph, input_signature=[_GRID, _GRID, _IDS])
        self._step = tf.function(self._step_graph, input_signature=[_IDS, _IDS, _IDS, _IDS, _GRID])

    def prefill(self, input_ids, attention_mask, rows) -> np.ndarray:
        return self._prefill(tf.constant(input_ids, tf.int32), tf.constant(attention_mask, tf.int32),
                             tf.constant(rows, tf.int32)).numpy()

    def step(self, token_ids, positions, rows, columns, cache_mask) -> np.ndarray:
        return self._step(*(tf.constant(x, tf.int32) for x in (token_ids, positions, rows, columns,
                                                                cache_mask))).numpy()

    def _prefill_graph(self, input_ids, attention_mask, rows):
        model = self.model
        memory = slot_memory(self.cache, model.config.n_head, rows, all_columns(input_ids))
        hidden = model._hidden(input_ids, gpt.positions_from_mask(attention_mask),
                               gpt.causal_bias(attention_mask, model.compute_dtype), memory)
        return model.wte.logits(gpt._last_real(hidden, attention_mask))

    def _step_graph(self, token_ids, positions, rows, columns, cache_mask):
        model = self.model
        memory = slot_memory(self.cache, model.config.n_head, rows, columns[:, tf.newaxis], all_columns(cache_mask))
        hidden = model._hidden(token_ids[:, tf.newaxis], positions[:, tf.newaxis],
                               gpt.cache_bias(cache_mask, model.compute_dtype), memory)
        return model.wte.logits(hidden[:, 0])


@dataclasses.dataclass
class _Slot:
    key: object
    row: _Row
    column: int
    """The cache column the next fed token is written at."""
    position: int
    """The position of the next fed token."""
    fed: int
    """The token to feed at the next step."""
    sent: int = 0
    """Tokens already reported in events."""


@dataclasses.dataclass(frozen=True)
class Event:
    """What one step did to one sequence."""

    key: object
    tokens: list[int]
    """The tokens chosen since the last event of this sequence."""
    text: str
    """The whole continuation so far (cut before a stop string once one appeared)."""
    finish_reason: str | None
    """None while it goes on; else "length", "stop" or "eos" (models.decoding's reasons)."""


class SlotDecoder:
    """`slots` sequences decoded together, each joining and leaving at any step."""

    def __init__(self, compute: SlotCompute, tokenizer: BPETokenizer):
        self.compute, self.tokenizer = compute, tokenizer
        self.max_len, self.vocab_size = compute.max_len, compute.vocab_size
        self.cache_mask = np.zeros((compute.slots, self.max_len), np.int32)
        self.slots: list[_Slot | None] = [None] * compute.slots
        self.usable = min(tokenizer.vocab_size, compute.vocab_size)

    # --- state --------------------------------------------------------------------------------
    @property
    def active(self) -> int:
        return sum(s is not None for s in self.slots)

    @property
    def free(self) -> int:
        return len(self.slots) - self.active

    def keys(self) -> list:
        return [s.key for s in self.slots if s is not None]

    def check(self, prompt: list[int], params: SamplingParams) -> None:
        """The errors a prompt can have, before it takes a slot."""
        if not prompt:
            raise ValueError("the prompt is empty: a continuation needs at least one token to follow")
        ids = np.asarray(prompt)
        if not np.issubdtype(ids.dtype, np.integer) or ids.min() < 0 or ids.max() >= self.vocab_size:
            raise ValueError(f"the prompt holds ids outside 0..{self.vocab_size - 1}")
        if len(prompt) + params.max_new_tokens > self.max_len:
            raise ValueError(f"the prompt has {len(prompt)} tokens: with max_tokens {params.max_new_tokens} it needs "
                             f"{len(prompt) + params.max_new_tokens} positions, the model has {self.max_len}")

    # --- joining and leaving ----------------------------------------------------------------
    def admit(self, requests: list[tuple[object, list[int], SamplingParams, int]]) -> list[Event]:
        """Prefill (key, prompt ids, params, stream index) sequences into free slots, choosing each
        one's first token; returns their first events (a sequence may finish at once)."""
        if len(requests) > self.free:
            raise ValueError(f"{len(requests)} sequences but {self.free} free slots")
        if not requests:
            return []
        for _, prompt, params, _ in requests:
            self.check(prompt, params)
        rows = [i for i, s in enumerate(self.slots) if s is None][:len(requests)]
        input_ids, attention_mask = left_pad([prompt for _, prompt, _, _ in requests])
        logits = self.compute.prefill(input_ids, attention_mask, rows)[:, :self.usable]
        width = input_ids.shape[1]
        events = []
        for r, ((key, prompt, params, index), slot) in enumerate(zip(requests, rows)):
            eos = None if params.ignore_eos else (self.tokenizer.eos_id if params.eos_token_id is None
                                                  else params.eos_token_id)
            row = _Row(self.tokenizer, params, eos, row_generator(params.seed, index))
            self.cache_mask[slot] = 0
            self.cache_mask[slot, :width] = attention_mask[r]
            token = next_token(logits[r], params, row.rng)
            row.add(token)
            self.slots[slot] = _Slot(key, row, width, len(prompt), token)
            events.append(self._event(slot))
        return events

    def cancel(self, key) -> bool:
        """Free the slot of `key` now (its client went away); False if it holds none."""
        for i, s in enumerate(self.slots):
            if s is not None and s.key == key:
                self.slots[i] = None
                return True
        return False

    # --- one step -----------------------------------------------------------------------------
    def step(self) -> list[Event]:
        """One token for every active sequence; finished ones leave their slot."""
        rows = [i for i, s in enumerate(self.slots) if s is not None]
        if not rows:
            return []
        live = [self.slots[i] for i in rows]
        if max(s.column for s in live) >= self.max_len:
            raise ValueError("a sequence ran past the cache")  # check() makes this unreachable
        for i, s in zip(rows, live):
            self.cache_mask[i, s.column] = 1
        width = max(s.column for s in live) + 1
        logits = self.compute.step(np.array([s.fed for s in live], np.int32),
                                   np.array([s.position for s in live], np.int32), rows,
                                   np.array([s.column for s in live], np.int32),
                                   self.cache_mask[rows, :width])[:, :self.usable]
        events = []
        for r, (i, s) in enumerate(zip(rows, live)):
            s.column += 1
            s.position += 1
            s.fed = next_token(logits[r], s.row.params, s.row.rng)
            s.row.add(s.fed)
            events.append(self._event(i))
        return events

    def _event(self, i: int) -> Event:
        s = self.slots[i]
        new = s.row.tokens[s.sent:]
        s.sent = len(s.row.tokens)
        done = s.row.finish_reason
        text = s.row.result().text
        if done is not None:
            self.slots[i] = None
        return Event(s.key, new, text, done)
