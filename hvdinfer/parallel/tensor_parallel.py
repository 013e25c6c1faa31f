"""Tensor parallelism across ranks (Megatron-LM's pattern), applied to a model from outside.

The T ranks of a group (consecutive ranks, `ParallelDims.tp_group`) share every block:

- column-parallel: the q, k, v projections (heads split: rank t keeps heads t*H/T .. (t+1)*H/T - 1,
  with their columns of the fused GPT-2 `c_attn`) and the MLP's first layer (its columns);
- row-parallel: the attention output and the MLP's second layer keep the matching rows, so each
  rank computes a partial sum, added up by one allreduce inside the group's Horovod process set,
  then the bias once;
- embeddings, LayerNorms and the head are replicated.

So each rank holds about 1/T of the block weights, and a block costs two allreduces of the
activations (batch x length x width) per forward. `shard_gpt` / `shard_bert` swap a model's
(unbuilt) blocks for sharded ones made of the model's own layer classes with a local config
(H/T heads, 1/T of the widths) and `RowParallelDense` output projections: the model code runs
unchanged. `shard_spec` says how each checkpoint tensor is sliced; hvdinfer/parallel/loading.py
reads only each rank's slice.

Gradients follow Megatron's f/g pair: the row-parallel sum passes gradients through unchanged (the
output is replicated), and the input of the column-parallel layers sums its gradient over the
group (BERT's q, k and v share one f, as Megatron's fused QKV layer does: `SharedCopy`). The
groups' process sets are added after Horovod starts (HOROVOD_DYNAMIC_PROCESS_SETS, set by the
runtime), by every rank, in the same order.

Data parallelism across groups: only the leader of each group (its first rank) runs the job engine,
over a communicator of the leaders (`TPGroup.leaders`); the leader sends every model call to its
group over the group's own link (`announce`) and the other ranks repeat it (`runners.follow`), so
all ranks of a group run the same collectives in the same order. Fine-tuning needs no leader: every
rank of a group runs the same `fit` on the same batches, and data parallelism averages gradients
among the ranks holding the same shard (`TPGroup.replica_set`, data_parallel.py).
"""
from __future__ import annotations

import dataclasses
import re

import tensorflow as tf

from hvdinfer import runtime
from hvdinfer.engine import link as link_mod
from hvdinfer.parallel.dims import ParallelDims

LOG = runtime.LOG
keras = tf.keras
CALL = 21  # link tag of the leader's model calls to its group

_PROCESS_SETS: dict[tuple[int, ...], object] = {}
_GROUPS: dict[tuple[int, int], "TPGroup"] = {}


def process_sets(groups: list[list[int]]) -> list:
    """Horovod process sets for `groups`, added once per job; every rank must call this with the same groups."""
    import horovod.tensorflow as hvd

    found = []
    for ranks in groups:
        key = tuple(ranks)
        if len(ranks) == hvd.size():
            found.append(hvd.global_process_set)  # a second set of every rank is refused
            continue
        if key not in _PROCESS_SETS:
            # Horovod: a collective over every rank; registered identically everywhere.
            _PROCESS_SETS[key] = hvd.add_process_set(list(ranks))
        found.append(_PROCESS_SETS[key])
    return found


@dataclasses.dataclass
class TPGroup:
    """This rank's tensor-parallel group."""

    dims: ParallelDims
    rank: int
    """Global rank."""
    members: list[int]
    process_set: object
    """The group's Horovod process set: the row-parallel allreduces run in it."""
    link: link_mod.Link
    """Point-to-point link inside the group (the leader is its rank 0)."""
    leaders: link_mod.Link | None
    """Link among the groups' leaders: the job engine's communicator (None on the other ranks)."""

    @property
    def tp_rank(self) -> int:
        return self.members.index(self.rank)

    @property
    def dp_rank(self) -> int:
        return self.rank // self.dims.tp

    @property
    def is_leader(self) -> bool:
        return self.tp_rank == 0

    @property
    def leader(self) -> int:
        return self.members[0]

    @property
    def replica_root(self) -> int:
        """The global rank whose shard this rank's replicas start from: this tp rank of the first group."""
        return self.dims.dp_groups()[self.tp_rank][0]

    def replica_set(self):
        """The Horovod process set of the ranks holding this rank's shard (this tp rank of every group):
        where data parallelism averages gradients and broadcasts; None with a single group. Every rank
        calls it, in the same order (it adds process sets)."""
        if self.dims.dp == 1:
            return None
        return process_sets(self.dims.dp_groups())[self.tp_rank]

    def announce(self, message) -> None:
        """Leader: send a model call to the other ranks of the group."""
        for member in range(1, len(self.members)):
            self.link.send(message, member, CALL)

    def receive(self):
        from hvdinfer.engine import watchdog

        return self.link.wait(CALL, 0, lambda: watchdog.beat(f"following rank {self.leader}"))[1]


def make_group(dims: ParallelDims, rank: int) -> TPGroup:
    """This rank's group: process sets and communicators, made once per (dp, tp) by every rank together."""
    key = (dims.dp, dims.tp)
    if key in _GROUPS:
        return _GROUPS[key]
    from mpi4py import MPI

    sets = process_sets(dims.tp_groups())
    members = dims.tp_group(rank)
    world = MPI.COMM_WORLD
    group_comm = world.Split(color=rank // dims.tp, key=rank)
    is_leader = rank == members[0]
    leaders_comm = world.Split(color=0 if is_leader else MPI.UNDEFINED, key=rank)
    group = TPGroup(dims, rank, members, sets[rank // dims.tp], link_mod.Link(dims.tp, group_comm),
                    link_mod.Link(dims.dp, leaders_comm) if is_leader else None)
    _GROUPS[key] = group
    return group


# --- the collectives, with Megatron's gradients -----------------------------------------------------
def reduce_from_group(x: tf.Tensor, process_set) -> tf.Tensor:
    """g: the sum over the group forward; the gradient passes through (the output is replicated)."""
    import horovod.tensorflow as hvd

    @tf.custom_gradient
    def reduce(t):
        total = hvd.allreduce(tf.cast(t, tf.float32), op=hvd.Sum, process_set=process_set)
        return tf.cast(total, t.dtype), lambda dy: dy

    return reduce(x)


def copy_to_group(x: tf.Tensor, process_set) -> tf.Tensor:
    """f: identity forward; the gradient is summed over the group (each rank saw only its columns)."""
    import horovod.tensorflow as hvd

    @tf.custom_gradient
    def copy(t):
        def grad(dy):
            return tf.cast(hvd.allreduce(tf.cast(dy, tf.float32), op=hvd.Sum, process_set=process_set), dy.dtype)

        return tf.identity(t), grad

    return copy(x)


class SharedCopy:
    """f taken once for several column-parallel layers that read the same input, as Megatron's fused
    QKV layer takes it once (BERT's q, k and v are three layers): the first reader makes the copy,
    the others reuse it. The block input's gradient is then two terms, the residual's and one
    allreduced sum, which every rank adds alike. With an f per layer it would be four, and TF's AddN
    reorders three or more inputs by which buffer it can reuse, a matter of timing: the replicated
    weights of a group's ranks drifted apart by rounding, and no two runs were the same."""

    def __init__(self, process_set, readers: int):
        self.process_set, self.readers = process_set, readers
        self._input = self._output = None
        self._left = 0

    def __call__(self, x: tf.Tensor) -> tf.Tensor:
        if self._input is not x:
            self._input, self._output, self._left = x, copy_to_group(x, self.process_set), self.readers
        copied = self._output
        self._left -= 1
        if not self._left:  # every reader has it: hold no tensor between calls
            self._input = self._output = None
        return copied


class ColumnParallelDense(keras.layers.Dense):
    """A Dense holding some of the full layer's output columns; its input's gradient is summed over the
    group (by its own f, or by a SharedCopy it shares with the other layers that read the same input)."""

    def __init__(self, units: int, process_set=None, copy: SharedCopy | None = None, **kwargs):
        super().__init__(units, **kwargs)
        self.process_set = process_set
        self.copy = copy

    def call(self, inputs):
        if self.copy is not None:
            inputs = self.copy(inputs)
        elif self.process_set is not None:
            inputs = copy_to_group(inputs, self.process_set)
        return super().call(inputs)


class RowParallelDense(keras.layers.Dense):
    """A Dense holding some of the full layer's input rows: x_t @ W_t summed over the group, plus the bias
    once. Without a process set (planning only) the sum is left out."""

    def __init__(self, units: int, process_set=None, **kwargs):
        super().__init__(units, **kwargs)
        self.process_set = process_set

    def call(self, inputs):
        kernel = tf.cast(self.kernel, inputs.dtype)
        partial = tf.tensordot(inputs, kernel, [[inputs.shape.rank - 1], [0]])
        if self.process_set is not None:
            partial = reduce_from_group(partial, self.process_set)
        return partial + tf.cast(self.bias, partial.dtype)


# --- sharded blocks ---------------------------------------------------------------------------------
def check_model(dims: ParallelDims, model) -> None:
    """The model's heads and widths split evenly over tp, and its blocks over pp."""
    from models import gpt

    config = model.config
    if isinstance(model, gpt.GPT):
        dims.check_model(config.n_layer, config.n_head, {"MLP width": 4 * config.n_embd})
    else:
        dims.check_model(config.num_layers, config.num_heads, {"intermediate_size": config.intermediate_size})


def shard_gpt(model, tp: int, process_set) -> None:
    """Swap the (unbuilt) GPT's attention and MLP layers for this rank's 1/tp shard."""
    from models import gpt

    config = model.config
    local = dataclasses.replace(config, n_embd=config.n_embd // tp, n_head=config.n_head // tp)
    for block in model.blocks:
        attn = gpt.Attention(local, name="attn")
        attn.c_attn = ColumnParallelDense(3 * local.n_embd, process_set, name="c_attn")
        attn.c_proj = RowParallelDense(config.n_embd, process_set, name="c_proj")
        mlp = gpt.MLP(local, name="mlp")
        mlp.c_fc = ColumnParallelDense(4 * local.n_embd, process_set, name="c_fc")
        mlp.c_proj = RowParallelDense(config.n_embd, process_set, name="c_proj")
        block.attn, block.mlp = attn, mlp


def shard_bert(model, tp: int, process_set) -> None:
    """Swap the (unbuilt) BERT encoder's blocks for this rank's 1/tp shard."""
    from models import bert

    encoder = _encoder(model)
    config = encoder.config
    local = dataclasses.replace(config, hidden_size=config.hidden_size // tp, num_heads=config.num_heads // tp,
                                intermediate_size=config.intermediate_size // tp)
    blocks = []
    for i in range(config.num_layers):
        block = bert.TransformerBlock(local, name=f"block_{i}")
        shared = SharedCopy(process_set, 3) if process_set is not None else None
        for name in ("query", "key", "value"):
            setattr(block, name, ColumnParallelDense(local.hidden_size, process_set, shared, name=name))
        block.attention_out = RowParallelDense(config.hidden_size, process_set, name="attention_out")
        block.ffn_in = ColumnParallelDense(local.intermediate_size, process_set, name="ffn_in")
        block.ffn_out = RowParallelDense(config.hidden_size, process_set, name="ffn_out")
        blocks.append(block)
    encoder.blocks = blocks


def _encoder(model):
    from models import bert, heads

    if isinstance(model, heads.TextClassifier):
        model = model.embedder
    if isinstance(model, bert.SentenceEmbedder):
        return model.encoder
    return model


def apply_tensor_parallel(model, dims: ParallelDims, group: TPGroup | None) -> None:
    """Shard the (unbuilt) model's blocks over the group (or over no group, to count a shard's size)."""
    from models import gpt

    process_set = group.process_set if group is not None else None
    (shard_gpt if isinstance(model, gpt.GPT) else shard_bert)(model, dims.tp, process_set)


# --- how each checkpoint tensor is sliced -----------------------------------------------------------
# (pattern on the HF name without prefix, axis in checkpoint layout, parts): `parts` equal parts along the
# axis, each cut into tp slices (GPT-2's fused q, k, v are 3 parts).
GPT_SHARDS = ((r"h\.\d+\.attn\.c_attn\.(weight|bias)", -1, 3),
              (r"h\.\d+\.mlp\.c_fc\.(weight|bias)", -1, 1),
              (r"h\.\d+\.(attn|mlp)\.c_proj\.weight", 0, 1))
# HF BERT Linear weights are (out, in): columns of the Keras kernel are rows in the checkpoint.
BERT_SHARDS = ((r"encoder\.layer\.\d+\.attention\.self\.(query|key|value)\.(weight|bias)", 0, 1),
               (r"encoder\.layer\.\d+\.intermediate\.dense\.(weight|bias)", 0, 1),
               (r"encoder\.layer\.\d+\.(attention\.output|output)\.dense\.weight", 1, 1))


def shard_spec(shards, name: str) -> tuple[int, int] | None:
    """(axis, parts) for a sharded tensor, None for a replicated one."""
    for pattern, axis, parts in shards:
        if re.fullmatch(pattern, name):
            return axis, parts
    return None


def shard_ranges(length: int, parts: int, tp: int, tp_rank: int) -> list[tuple[int, int]]:
    """The [start, stop) ranges of rank tp_rank's slice along an axis of `length` made of `parts` parts."""
    part = length // parts
    piece = part // tp
    return [(p * part + tp_rank * piece, p * part + (tp_rank + 1) * piece) for p in range(parts)]
