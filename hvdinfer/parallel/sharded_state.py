"""A tensor-parallel classifier's training state as the FULL model's: gathered from a group's shards
for checkpoints and the final model directory, and sliced again on resume.

Under --tp each rank holds 1/tp of every block's weights and of their optimizer slots. A checkpoint
holds the whole model instead, in one file written once (`ckpt.safetensors`):

    embeddings.*, encoder.layer.N.*      the encoder, under the HF names and in the layout of model.safetensors
    classifier.weight, classifier.bias   the head, as classifier.safetensors holds it
    dropout.counter                      the dropout's call counter (its masks resume exactly)
    optimizer/iterations                 the optimizer's step
    optimizer/m/NAME, optimizer/v/NAME   each trainable variable's slots (Adam's moments), laid out as NAME

The ranks of the first dp group gather it (each sharded tensor allgathered in the group's Horovod
process set; the other groups hold the same shards) and the coordinator writes it. On resume every
rank reads only its slices, one tensor at a time, as the base model was loaded (loading.py), so
nothing depends on which tp rank wrote what. The replicated tensors (embeddings, LayerNorms, the
head, the row-parallel biases) get the same gradients on every rank of a group, as in Megatron-LM;
each gather checks that they are still identical (a digest per tensor) and fails loudly if not.

`ShardedState` offers what engine/checkpoints.py calls on a tf.train.Checkpoint (`write`, `read`).
"""
from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import numpy as np
import tensorflow as tf

from hvdinfer import runtime
from hvdinfer.parallel import loading, tensor_parallel
from hvdinfer.parallel.tensor_parallel import TPGroup
from hvdinfer.runtime import JobError

SUFFIX = ".safetensors"
OPTIMIZER = "optimizer/"


@dataclasses.dataclass(frozen=True)
class Entry:
    """One tensor of the full state and the variable that holds this rank's part of it."""

    key: str
    variable: tf.Variable
    transposed: bool
    """Stored transposed (HF Linear weights are (out, in), Keras kernels (in, out))."""
    spec: tuple[int, int] | None
    """(axis, parts) of the split in the stored layout (tensor_parallel.shard_spec); None: replicated."""

    def stored(self, value: np.ndarray) -> np.ndarray:
        return np.array(value.T if self.transposed else value, order="C")  # (ascontiguousarray makes scalars 1-d)

    @property
    def is_model(self) -> bool:
        return not self.key.startswith(OPTIMIZER)


def classifier_entries(classifier, optimizer=None) -> list[Entry]:
    """Every variable of a (sharded) TextClassifier and of its optimizer, each once, with its key."""
    from models import weights

    entries = [Entry(name, var, transposed, tensor_parallel.shard_spec(tensor_parallel.BERT_SHARDS, name))
               for name, (var, transposed) in weights.hf_variables(classifier.embedder).items()]
    entries += [Entry("classifier.weight", classifier.classifier.kernel, True, None),
                Entry("classifier.bias", classifier.classifier.bias, False, None),
                Entry("dropout.counter", classifier.dropout.counter, False, None)]
    _check_once("the classifier's", [w for w in classifier.weights], [e.variable for e in entries])
    if optimizer is None:
        return entries
    # Keras names a slot `{slot}/{its variable's name}` (Optimizer.add_variable_from_reference).
    owners = {e.variable.name.split(":")[0]: e for e in entries if e.variable.trainable}
    if len(owners) != sum(e.variable.trainable for e in entries):
        raise ValueError("two trainable variables of the classifier share a name: optimizer slots would be ambiguous")
    for var in optimizer.variables:
        if var is optimizer.iterations:
            entries.append(Entry(OPTIMIZER + "iterations", var, False, None))
            continue
        slot, _, owner = var.name.split(":")[0].partition("/")
        if owner not in owners or tuple(var.shape) != tuple(owners[owner].variable.shape):
            raise ValueError(f"optimizer variable {var.name} is not a slot of one of the model's variables")
        e = owners[owner]
        entries.append(Entry(f"{OPTIMIZER}{slot}/{e.key}", var, e.transposed, e.spec))
    _check_once("the optimizer's", list(optimizer.variables), [e.variable for e in entries if not e.is_model])
    return entries


def _check_once(what: str, variables: list, covered: list) -> None:
    ids = [id(v) for v in covered]
    missing = [v.name for v in variables if id(v) not in set(ids)]
    if missing or len(set(ids)) != len(ids) or len(ids) != len(variables):
        raise ValueError(f"{what} {len(variables)} variables are not each mapped once (unmapped: {missing})")


def gather(value: np.ndarray, spec: tuple[int, int], group: TPGroup, name: str) -> np.ndarray:
    """The whole tensor from every group rank's slice `value` (stored layout): each holds piece t of
    each of the `parts` equal parts along the axis (GPT-2's fused q/k/v are 3 parts, the rest 1)."""
    import horovod.tensorflow as hvd

    axis, parts = spec
    tp = group.dims.tp
    local = np.moveaxis(value, axis, 0)
    # Horovod: allgather inside the group's process set, in the group's rank order (= tp rank order).
    pieces = hvd.allgather(tf.constant(np.ascontiguousarray(local)), name=name,
                           process_set=group.process_set).numpy()
    rest = local.shape[1:]
    piece = local.shape[0] // parts
    whole = pieces.reshape(tp, parts, piece, *rest).swapaxes(0, 1).reshape(tp * local.shape[0], *rest)
    return np.moveaxis(whole, 0, axis)


class ShardedState:
    """The full training state of a tensor-parallel classifier (a runners.PipelineModel under --tp)."""

    def __init__(self, model, optimizer, group: TPGroup):
        self.group = group
        self.entries = classifier_entries(getattr(model, "inner", model), optimizer)
        self.full: dict[str, np.ndarray] = {}

    # --- checkpoints and the model directory: the shards gathered ----------------------------------------
    def gather(self, optimizer: bool = True) -> None:
        """Every rank: the ranks of the first dp group put the whole state together, kept by the
        coordinator for `write` / `model_tensors` (the model alone when not `optimizer`)."""
        self.full = {}
        if self.group.dp_rank != 0:
            return
        entries = [e for e in self.entries if optimizer or e.is_model]
        self._check_replicated([e for e in entries if e.spec is None])
        keep = self.group.rank == 0
        for e in entries:
            value = e.stored(e.variable.numpy())
            if e.spec is not None:
                value = gather(value, e.spec, self.group, f"sharded_state.{e.key}")
            if keep:
                self.full[e.key] = value

    def _check_replicated(self, entries: list[Entry]) -> None:
        """Every rank of the group holds the same replicated tensors, bit for bit."""
        import horovod.tensorflow as hvd

        digests = np.stack([np.frombuffer(hashlib.sha256(e.stored(e.variable.numpy()).tobytes()).digest(), np.uint8)
                            for e in entries])
        everyone = hvd.allgather(tf.constant(digests[np.newaxis]), name="sharded_state.digests",
                                 process_set=self.group.process_set).numpy()
        for i, e in enumerate(entries):
            if any(not np.array_equal(other[i], everyone[0][i]) for other in everyone):
                raise JobError(f"tensor parallelism: the replicated tensor {e.key} differs between the ranks of group "
                               f"{self.group.members}, whose steps should be identical (a nondeterministic op? "
                               "TF_DETERMINISTIC_OPS=1 rules those out); the last checkpoint resumes them in step")

    def write(self, path: str) -> str:
        """Coordinator, after `gather`: the full state as PATH.safetensors."""
        import safetensors.numpy

        if not self.full:
            raise RuntimeError("ShardedState.write on a rank that did not gather the state")
        safetensors.numpy.save_file(self.full, path + SUFFIX)
        return path + SUFFIX

    def model_tensors(self) -> dict[str, np.ndarray]:
        """Coordinator, after `gather`: the encoder's tensors as model.safetensors holds them."""
        return {e.key: self.full[e.key] for e in self.entries
                if e.is_model and not e.key.startswith(("classifier.", "dropout."))}

    # --- resume: this rank's slices --------------------------------------------------------------------
    def read(self, path: str) -> "ShardedState":
        """Every rank: its slice of every tensor of PATH.safetensors, all checked before anything is
        assigned (every variable has its tensor, of the right full shape; every tensor has a place)."""
        from safetensors import safe_open

        file = Path(path + SUFFIX)
        tp, tp_rank = self.group.dims.tp, self.group.tp_rank
        with safe_open(str(file), framework="numpy") as f:
            keys = set(f.keys())
            extra = sorted(keys - {e.key for e in self.entries})
            for e in self.entries:
                if e.key not in keys:
                    raise JobError(f"--resume: {file} lacks {e.key}")
                local = list(reversed(e.variable.shape)) if e.transposed else list(e.variable.shape)
                want, have = loading.full_shape(local, e.spec, tp), list(f.get_slice(e.key).get_shape())
                if have != want:
                    raise JobError(f"--resume: {file}: {e.key} has shape {tuple(have)}, this model needs {tuple(want)}")
            if extra:
                raise JobError(f"--resume: {file} holds tensors this model has no place for: {', '.join(extra[:10])}")
            for e in self.entries:
                value = loading.read_slice(f, e.key, e.spec, tp, tp_rank)
                e.variable.assign((value.T if e.transposed else value).astype(e.variable.dtype.as_numpy_dtype))
        runtime.LOG.debug("read rank %d's slices of %s", self.group.rank, file)
        return self

    def assert_consumed(self) -> "ShardedState":
        """What tf.train.Checkpoint.read's status offers: `read` has already checked both ways."""
        return self
