"""Language-model data: a small byte-level BPE trained on the training texts, one token stream,
training windows dealt to ranks, and held-out windows that score every held-out token exactly once.

Read top-down as the data flows:

    train_tokenizer(training texts)                   GPT-2's byte-level BPE, a small vocabulary
    token_stream(token ids of each text, eos)         EOS text0 EOS text1 ... (an EOS opens every text)
    TrainWindows(stream, context, ...)                optimizer step s -> this rank's batch of
                                                      (context + 1)-token windows, a pure function of s
    heldout_windows(token ids of each text, ...)      strided windows, each target scored once
    nats_per_char(total NLL, characters)              the comparable figure

Why a vocabulary of its own (measured on this 2-core AMD EPYC, fp32, 1 thread per rank, a training
step of 4 layers x width 128, context 128, batch 16): GPT-2's 50,257-entry output layer makes the
step 9x slower than a 2,048-entry one (3.65 s vs 0.41 s; 6x at width 256), almost all of it the
head. Per character the small vocabulary still wins after its shorter tokens: byte-level BPE
trained on the training works averages 2.63 held-out characters per token at 2,048 entries (1.90
at 512, 2.33 at 1,024, 2.86 at 4,096), GPT-2's about 3.5.

Held-out loss is reported in nats per character, total token NLL / characters of the evaluated
text: it does not depend on how a tokenizer cuts the text, so models with different vocabularies
(or a character-level one) compare directly. Each held-out text is evaluated as its own sequence
EOS + tokens, every token predicted once from the tokens before it in that text (at least
context - stride of them once past the first window).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np

from hvdinfer.data.shard import deal_wrapped
from models.bpe import EOS


def train_tokenizer(texts: Sequence[str], vocab_size: int):
    """A byte-level BPE set up as GPT-2's (ByteLevel pre-tokenizer without a prefix space, ByteLevel
    decoder, all 256 byte symbols in the vocabulary so any text encodes) with `vocab_size` ids,
    EOS among them (id 0), learnt from `texts` alone. Deterministic for the same texts and size."""
    import tokenizers
    from tokenizers import decoders, models as tk_models, pre_tokenizers, processors, trainers

    if vocab_size < 257 + 1:
        raise ValueError(f"vocab_size {vocab_size}: a byte-level BPE needs at least 258 ids (256 bytes, EOS, a merge)")
    tokenizer = tokenizers.Tokenizer(tk_models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(list(texts), trainer)
    return tokenizer


def token_stream(token_ids: Sequence[Sequence[int]], eos_id: int) -> np.ndarray:
    """The texts' ids as one int32 stream, an EOS before each text: a window that crosses from one
    text into the next sees where the first ends, and every text starts after an EOS, as the
    held-out texts are scored."""
    parts = []
    for ids in token_ids:
        parts += [np.array([eos_id], np.int32), np.asarray(ids, np.int32)]
    return np.concatenate(parts) if parts else np.zeros(0, np.int32)


@dataclasses.dataclass(frozen=True)
class TrainWindows:
    """Fixed windows of context + 1 tokens over the stream (inputs = the first context, targets = the
    last context), dealt to ranks by data epoch.

    Data epoch e cuts the stream at a seeded offset o_e in [0, context) (so the cut points differ
    from epoch to epoch) into `per_epoch` windows o_e + k * context, shuffles them with a seeded
    permutation and deals it round-robin to the ranks (shard.deal_wrapped), each rank
    `steps_per_epoch` x batch_size of them, every rank taking the same number of steps. Windows the
    deal leaves over (fewer than ranks x batch_size) are skipped that epoch only. Everything is a
    pure function of (seed, step), so a resumed run draws exactly the batches an uninterrupted one
    would."""

    stream: np.ndarray
    context: int
    batch_size: int
    size: int
    rank: int
    seed: int

    def __post_init__(self):
        if len(self.stream) < 2 * self.context + 1:
            raise ValueError(f"{len(self.stream)} training tokens: need at least 2 x context + 1 = "
                             f"{2 * self.context + 1} for two windows")

    @property
    def per_epoch(self) -> int:
        """Windows per data epoch: those that fit at any offset."""
        return (len(self.stream) - self.context) // self.context

    @property
    def steps_per_epoch(self) -> int:
        return max(1, self.per_epoch // (self.size * self.batch_size))

    def starts(self, epoch: int) -> np.ndarray:
        """This rank's window starts for data epoch `epoch`, in the order it trains them."""
        rng = np.random.default_rng([self.seed, epoch])
        offset = int(rng.integers(self.context))
        order = offset + self.context * rng.permutation(self.per_epoch)
        return deal_wrapped(order, self.size, self.rank, self.steps_per_epoch * self.batch_size)

    def batches(self, first_step: int, steps: int):
        """(inputs, targets), each (batch_size, context) int32, for optimizer steps first_step ..
        first_step + steps - 1."""
        epoch, starts = -1, None
        offsets = np.arange(self.context + 1)
        for step in range(first_step, first_step + steps):
            if step // self.steps_per_epoch != epoch:
                epoch = step // self.steps_per_epoch
                starts = self.starts(epoch)
            b = step % self.steps_per_epoch
            rows = self.stream[starts[b * self.batch_size:(b + 1) * self.batch_size, None] + offsets]
            yield rows[:, :-1], rows[:, 1:]


def heldout_windows(length: int, context: int, stride: int) -> list[tuple[int, int]]:
    """How to score a sequence of `length` tokens (its first, an EOS, is never a target) with
    windows of at most `context` inputs: [(start, first scored), ...]. A window takes inputs
    seq[start : start + n] and targets seq[start + 1 : start + 1 + n], n = min(context,
    length - 1 - start), and scores its targets from offset `first scored` on. Windows advance by
    `stride`; the last is pulled back to end at the sequence's end. Every target 1 .. length - 1 is
    scored by exactly one window."""
    if not 0 < stride <= context:
        raise ValueError(f"stride {stride} must be in 1..context ({context})")
    if length < 2:
        return []
    windows, scored_to, start = [], 1, 0  # scored_to: the first target index not yet scored
    while scored_to < length:
        start = min(start, max(0, length - 1 - context))
        windows.append((start, scored_to - (start + 1)))
        scored_to = start + 1 + min(context, length - 1 - start)
        start += stride
    return windows


@dataclasses.dataclass
class HeldoutSet:
    """Held-out windows as arrays, rows padded to `context`: ids, attention mask (1 = real input),
    targets and weights (1 = a scored target)."""

    input_ids: np.ndarray
    attention_mask: np.ndarray
    targets: np.ndarray
    weights: np.ndarray
    characters: int
    """Characters of the held-out texts (what the NLL is divided by)."""

    @property
    def scored_tokens(self) -> int:
        return int(self.weights.sum())


def heldout_set(token_ids: Sequence[Sequence[int]], texts: Sequence[str], eos_id: int, context: int,
                stride: int) -> HeldoutSet:
    """Every held-out text as the sequence EOS + its ids, cut by heldout_windows."""
    rows = []
    for ids in token_ids:
        seq = np.concatenate([[eos_id], np.asarray(ids, np.int32)]).astype(np.int32)
        rows += [(seq, start, first) for start, first in heldout_windows(len(seq), context, stride)]
    n = len(rows)
    input_ids = np.full((n, context), eos_id, np.int32)
    mask = np.zeros((n, context), np.int32)
    targets = np.zeros((n, context), np.int32)
    weights = np.zeros((n, context), np.float32)
    for i, (seq, start, first) in enumerate(rows):
        count = min(context, len(seq) - 1 - start)
        input_ids[i, :count] = seq[start:start + count]
        targets[i, :count] = seq[start + 1:start + 1 + count]
        mask[i, :count] = 1
        weights[i, first:count] = 1
    return HeldoutSet(input_ids, mask, targets, weights, sum(len(t) for t in texts))


def nats_per_char(total_nll: float, characters: int) -> float:
    """Held-out loss per character: total token NLL (nats) / characters of the evaluated text."""
    if characters <= 0:
        raise ValueError("no held-out characters")
    return total_nll / characters


def bits_per_char(nats: float) -> float:
    return nats / math.log(2)
