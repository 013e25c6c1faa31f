"""Which chunk each rank computes next: static (fixed in advance) or dynamic (on demand).

Pure bookkeeping, no MPI: the coordinator asks `next_for(rank, in_hand)` whenever a rank may take
more work, with `in_hand` the chunks that rank holds and has not finished. Every rank may hold one
chunk beyond the one it computes (`prefetch`), so its next chunk is read and tokenised while the
current one runs and no rank waits on a round trip between chunks.

- static: chunk c belongs to rank c % size, decided before the job starts; a slow rank delays the
  whole job by its whole share.
- dynamic: one queue in input order; whoever asks gets the next chunk, so a slower rank simply
  takes fewer. Near the end (fewer chunks left than ranks) a rank that still holds work gets no
  prefetch, so the last chunks go to idle ranks instead of queueing behind a slow one.

A chunk's result is a pure function of its records, so which rank computes it changes nothing in
the output.
"""
from __future__ import annotations

import collections
from typing import Iterable

KINDS = ("dynamic", "static")


class Schedule:
    def __init__(self, todo: Iterable[int], size: int, kind: str = "dynamic", prefetch: int = 1):
        if kind not in KINDS:
            raise ValueError(f"schedule must be one of {', '.join(KINDS)}, not {kind!r}")
        if size < 1 or prefetch < 0:
            raise ValueError(f"size must be >= 1 and prefetch >= 0, got {size}, {prefetch}")
        self.kind, self.size, self.prefetch = kind, size, prefetch
        todo = sorted(set(todo))
        if kind == "static":
            self._queues = [collections.deque(c for c in todo if c % size == r) for r in range(size)]
        else:
            self._queues = [collections.deque(todo)]

    def _queue(self, rank: int) -> collections.deque:
        return self._queues[rank if self.kind == "static" else 0]

    def next_for(self, rank: int, in_hand: int) -> int | None:
        """The next chunk for `rank`, or None when it should not take one now."""
        queue = self._queue(rank)
        if not queue or in_hand > self.prefetch:
            return None
        if self.kind == "dynamic" and in_hand > 0 and len(queue) < self.size:
            return None
        return queue.popleft()

    def exhausted_for(self, rank: int) -> bool:
        """True when no chunk will ever be handed to `rank` again."""
        return not self._queue(rank)
