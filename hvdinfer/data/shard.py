"""Static shard plans: which global record indices each rank computes.

Pure functions of (n, size, rank): every index in 0..n-1 lands on exactly one rank, for any n >= 0
and size >= 1 (ranks beyond n get nothing). `contiguous` keeps neighbours together (good for
streaming reads and length-sorted input); `strided` deals round-robin (good when cost drifts along
the file).
"""
from __future__ import annotations

import dataclasses

import numpy as np

KINDS = ("contiguous", "strided")


@dataclasses.dataclass(frozen=True)
class ShardPlan:
    """A static assignment of n records to `size` ranks."""

    n: int
    size: int
    kind: str = "contiguous"

    def __post_init__(self):
        if self.n < 0:
            raise ValueError(f"ShardPlan: n must be >= 0, got {self.n}")
        if self.size < 1:
            raise ValueError(f"ShardPlan: size must be >= 1, got {self.size}")
        if self.kind not in KINDS:
            raise ValueError(f"ShardPlan: kind must be one of {KINDS}, got {self.kind!r}")

    def indices(self, rank: int) -> np.ndarray:
        """Global indices for `rank`, ascending."""
        if not 0 <= rank < self.size:
            raise ValueError(f"ShardPlan: rank {rank} outside 0..{self.size - 1}")
        if self.kind == "strided":
            return np.arange(rank, self.n, self.size, dtype=np.int64)
        start, stop = self.bounds(rank)
        return np.arange(start, stop, dtype=np.int64)

    def bounds(self, rank: int) -> tuple[int, int]:
        """[start, stop) of a contiguous shard: the first n % size ranks hold one extra record."""
        base, extra = divmod(self.n, self.size)
        start = rank * base + min(rank, extra)
        return start, start + base + (1 if rank < extra else 0)

    def counts(self) -> list[int]:
        """Records per rank, in rank order."""
        return [len(self.indices(r)) for r in range(self.size)]

    def max_count(self) -> int:
        """The largest shard: the number of steps every rank must take in lock-step."""
        return -(-self.n // self.size)


def deal_wrapped(order: np.ndarray, size: int, rank: int, count: int) -> np.ndarray:
    """`rank`'s share of `order` dealt round-robin, repeated or cut to exactly `count` items, so
    every rank takes the same number of data-parallel steps (a rank that ran out first would leave
    the others waiting in the gradient allreduce forever). A rank dealt nothing wraps `order`."""
    mine = order[rank::size]
    return np.resize(mine if len(mine) else order, count)
