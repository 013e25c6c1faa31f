"""The parallel degrees of a job, checked once: data (dp), pipeline (pp) and tensor (tp) parallelism.

    ranks = dp x tp        each rank runs pp pipeline stages, one per device it owns

`--pp K` cuts the model into K stages on K devices of one rank (hvdinfer/parallel/placement.py),
`--tp T` splits every block's heads and MLP columns over T ranks (hvdinfer/parallel/tensor_parallel.py),
and the job engine hands chunks to the dp = ranks / T groups. `ParallelConfig` is what the flags
say; `ParallelDims` is what they mean for this world, refused with a clear error when it cannot work
(3 ranks with --tp 2; --pp 4 on a model with 2 blocks; 12 heads over --tp 5).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from hvdinfer.runtime import JobError


@dataclasses.dataclass(frozen=True)
class ParallelConfig:
    """Model parallelism as the flags ask for it (defaults: none, data parallelism only)."""

    pp: int = 1
    """Pipeline stages per rank, each on its own device (--pp)."""
    tp: int = 1
    """Ranks that share every block's weights, heads and MLP columns split between them (--tp)."""
    micro_batches: int = 1
    """GPipe: each batch is cut into this many micro-batches that flow through the stages (--micro-batches)."""
    plan: Path | None = None
    """A JSON stage plan (layer-name patterns per stage) instead of the balanced default (--plan)."""

    def __post_init__(self):
        for name in ("pp", "tp", "micro_batches"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise JobError(f"--{name.replace('_', '-')} must be an integer >= 1, got {value!r}")
        if self.plan is not None and self.pp == 1:
            raise JobError("--plan places pipeline stages: give --pp K (K >= 2) with it")
        if self.micro_batches > 1 and self.pp == 1:
            raise JobError("--micro-batches splits batches between pipeline stages: give --pp K (K >= 2) with it")

    @property
    def enabled(self) -> bool:
        """Whether any model parallelism is asked for (else the model runs as it is)."""
        return self.pp > 1 or self.tp > 1

    @property
    def forward_uses_horovod(self) -> bool:
        """Whether the model's forward itself runs Horovod collectives (--tp's row-parallel sums);
        pipeline stages only place layers on this rank's devices."""
        return self.tp > 1

    def identity(self) -> dict:
        """What a job's identity gains from these settings: nothing when they are the defaults, so a
        journal written before the flags existed still resumes."""
        if not self.enabled:
            return {}
        return {"pp": self.pp, "tp": self.tp, "micro_batches": self.micro_batches,
                "plan": str(self.plan) if self.plan else None}


@dataclasses.dataclass(frozen=True)
class ParallelDims:
    """dp x tp ranks, pp stages per rank; `world_size` is the number of ranks (hvd.size())."""

    dp: int
    pp: int
    tp: int
    world_size: int

    def __post_init__(self):
        for name in ("dp", "pp", "tp", "world_size"):
            if getattr(self, name) < 1:
                raise JobError(f"parallel degree {name} must be >= 1, got {getattr(self, name)}")
        if self.dp * self.tp != self.world_size:
            raise JobError(f"dp {self.dp} x tp {self.tp} = {self.dp * self.tp} ranks, but the job has "
                           f"{self.world_size}: launch dp x tp ranks")

    @classmethod
    def from_config(cls, config: ParallelConfig, world_size: int) -> "ParallelDims":
        """dp = ranks / tp; the ranks must fill whole tensor-parallel groups."""
        if world_size % config.tp:
            raise JobError(f"--tp {config.tp} needs a multiple of {config.tp} ranks (ranks = dp x tp), "
                           f"but the job has {world_size}")
        return cls(dp=world_size // config.tp, pp=config.pp, tp=config.tp, world_size=world_size)

    @property
    def pp_enabled(self) -> bool:
        return self.pp > 1

    @property
    def tp_enabled(self) -> bool:
        return self.tp > 1

    def tp_group(self, rank: int) -> list[int]:
        """The ranks of `rank`'s tensor-parallel group: consecutive ranks, so a group stays on one host
        when each host runs a multiple of tp ranks."""
        first = rank // self.tp * self.tp
        return list(range(first, first + self.tp))

    def tp_groups(self) -> list[list[int]]:
        return [list(range(g * self.tp, (g + 1) * self.tp)) for g in range(self.dp)]

    def dp_groups(self) -> list[list[int]]:
        """For each tp index, the ranks that hold the same shard (gradients are averaged among them)."""
        return [list(range(t, self.world_size, self.tp)) for t in range(self.tp)]

    def check_model(self, blocks: int, heads: int, widths: dict[str, int]) -> None:
        """The model can be cut this way: at least one block per stage; heads and each split width
        (`widths`: name -> size, e.g. the MLP's inner width) divisible by tp."""
        if self.pp > blocks:
            raise JobError(f"--pp {self.pp} on a model with {blocks} block(s): a pipeline stage needs at least "
                           f"one block, so at most --pp {blocks}")
        if heads % self.tp:
            raise JobError(f"--tp {self.tp} does not divide the model's {heads} attention heads")
        for name, width in widths.items():
            if width % self.tp:
                raise JobError(f"--tp {self.tp} does not divide the model's {name} {width}")

    def check_devices(self, available: int, what: str) -> None:
        """Each rank needs pp devices of its own."""
        if self.pp > available:
            raise JobError(f"--pp {self.pp} needs {self.pp} devices per rank, but {what}")

    def describe(self) -> str:
        return f"dp {self.dp} x tp {self.tp} ranks, pp {self.pp} stage(s) per rank"
