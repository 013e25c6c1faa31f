"""Running a parallelised model: each layer under its stage's device, GPipe micro-batches, the KV cache
with its stage, and a tensor-parallel group's leader and followers.

A runner holds a model built by `parallelize` and offers what the tasks call on a plain model:

    EncoderRunner.forward(input_ids, attention_mask)  embeddings, or class probabilities (infer)
    EncoderRunner.embed(input_ids, attention_mask)    embeddings, a classifier's too (serve)
    EncoderRunner.outputs(inputs, training)           the same math for training (PipelineModel.call)
    DecoderRunner.new_cache / prefill / decode_step / last_logits   what models/decoding calls on a GPT
    DecoderRunner.slot_cache(slots)                   what models/slots.SlotDecoder drives (the server)

Micro-batches (GPipe): a batch is cut into M micro-batches and the graph holds M chains, each
running stage 0, 1, .., K-1 under that stage's device; nothing orders chain m's stage s+1 against
chain m+1's stage s, so TF's executor runs them at the same time (inter-op threads >= K, which the
runtime gives --pp K) and the pipeline fills as in GPipe's schedule. Outputs are concatenated in row
order, so they equal the single-device outputs (row by row, the math is the same). Training keeps
dropout and the classifier on the whole batch, so dropout draws the single-device mask.

Generation keeps one cache variable per (stage, micro-batch), on the stage's device, holding that
stage's blocks: (blocks, 2, rows, heads (this rank's, under --tp), max_len, head_dim), written and
read sparsely like models/gpt.py's cache. Caches of a geometry (batch, max_len) are kept and reused
for every batch of that geometry, with one compiled prefill and one compiled decode step each. A slot
cache (iteration-level batching: each row a sequence that joins and leaves at any step) is a variable
per stage too, over all slots; its micro-batches split the rows each call computes.

Under --tp the leader of each group runs the job engine; every public call it makes inside
`leading()` is first sent to the group (`TPGroup.announce`), and the others repeat it in `follow()`.
Outside `leading()` (loading, warm-up) all ranks of a group make the same calls themselves.
"""
from __future__ import annotations

import collections
import contextlib
from typing import Iterator

import numpy as np
import tensorflow as tf

from hvdinfer.parallel.placement import Placement, micro_batch_bounds
from hvdinfer.parallel.tensor_parallel import TPGroup

keras = tf.keras
CACHE_GEOMETRIES = 4  # cache sets kept (each is a whole batch's KV cache)


class _Runner:
    def __init__(self, model, placement: Placement | None, micro_batches: int, group: TPGroup | None):
        self.model, self.placement, self.micro_batches, self.group = model, placement, micro_batches, group
        self.config = model.config
        self._leading = False
        blocks = [name for name, _ in model.named_layers() if name.startswith("block_")]
        # Consecutive blocks on one stage run as one range: (device scope of the stage, start, stop).
        self.stages: list[tuple[str | None, int, int]] = []
        for i, name in enumerate(blocks):
            device = placement.device(name) if placement else None
            if self.stages and self.stages[-1][0] == device:
                self.stages[-1] = (device, self.stages[-1][1], i + 1)
            else:
                self.stages.append((device, i, i + 1))

    def device(self, layer: str):
        """The device scope `layer` runs under (none without a pipeline)."""
        return tf.device(self.placement.device(layer)) if self.placement else contextlib.nullcontext()

    @staticmethod
    def on(device: str | None):
        return tf.device(device) if device else contextlib.nullcontext()

    # --- a tensor-parallel group: the leader's calls repeated by the others ---------------------------
    def _call(self, op: str, *args):
        if self._leading:
            self.group.announce((op, args))
        return getattr(self, "_" + op)(*args)

    @contextlib.contextmanager
    def leading(self) -> Iterator[None]:
        """Leader of a tensor-parallel group: every call inside is repeated by the group; at the end the
        group is released from `follow`. A no-op without tensor parallelism."""
        self._leading = self.group is not None and self.group.is_leader
        try:
            yield
        finally:
            if self._leading:
                self._leading = False
                self.group.announce(None)

    def follow(self) -> None:
        """A group's other ranks: repeat the leader's calls until it is done."""
        while (message := self.group.receive()) is not None:
            op, args = message
            getattr(self, "_" + op)(*args)

    @property
    def is_follower(self) -> bool:
        return self.group is not None and not self.group.is_leader


class EncoderRunner(_Runner):
    """A sentence embedder or classifier (models/bert.py, models/heads.py), parallelised."""

    def __init__(self, model, placement, micro_batches, group):
        super().__init__(model, placement, micro_batches, group)
        self.labels = getattr(model, "labels", None)
        self.embedder = getattr(model, "embedder", model)
        spec = tf.TensorSpec([None, None], tf.int32)
        self._graph = tf.function(self._forward_graph, input_signature=[spec, spec])
        # A classifier's sentence embeddings: its encoder's pooled output, without the head.
        self._embed_graph = self._graph if self.labels is None else tf.function(
            lambda ids, mask: self.outputs({"input_ids": ids, "attention_mask": mask}, head=False),
            input_signature=[spec, spec])

    def forward(self, input_ids, attention_mask) -> tf.Tensor:
        """Embeddings (batch, hidden), or class probabilities (batch, labels) for a classifier."""
        return self._call("forward", np.asarray(input_ids, np.int32), np.asarray(attention_mask, np.int32))

    def embed(self, input_ids, attention_mask) -> tf.Tensor:
        """Sentence embeddings (batch, hidden), a classifier's too."""
        return self._call("embed", np.asarray(input_ids, np.int32), np.asarray(attention_mask, np.int32))

    def warm_up(self, pad_id: int = 0) -> None:
        """Trace the forward (and a classifier's embeddings) once; every rank of a group at the same time."""
        ids = np.full((1, 8), pad_id, np.int32)
        self._forward(ids, np.ones_like(ids))
        if self._embed_graph is not self._graph:
            self._embed(ids, np.ones_like(ids))

    def _forward(self, input_ids, attention_mask):
        return self._graph(input_ids, attention_mask)

    def _embed(self, input_ids, attention_mask):
        return self._embed_graph(input_ids, attention_mask)

    def _forward_graph(self, input_ids, attention_mask):
        out = self.outputs({"input_ids": input_ids, "attention_mask": attention_mask}, training=False)
        return tf.nn.softmax(out, axis=-1) if self.labels is not None else out

    def outputs(self, inputs: dict, training: bool = False, head: bool = True) -> tf.Tensor:
        """The model's outputs (a classifier's logits; its pooled embeddings with head=False), stage by
        stage, micro-batch by micro-batch."""
        from models import bert

        input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
        token_types = inputs.get("token_type_ids")
        encoder, count = self.embedder.encoder, self.micro_batches
        bounds = micro_batch_bounds(tf.shape(input_ids)[0], count) if count > 1 else None
        pooled = []
        for m in range(count):
            rows = slice(bounds[m], bounds[m + 1]) if count > 1 else slice(None)
            ids, mask = input_ids[rows], attention_mask[rows]
            with self.device("embeddings"):
                x = encoder.embeddings(ids, None if token_types is None else token_types[rows])
                bias = bert.mask_bias(mask, x.dtype)
            for device, start, stop in self.stages:
                with self.on(device):
                    x = encoder.run_blocks(x, bias, start, stop)
            with self.device("pool"):
                pooled.append(self.embedder.pool(x, mask))
        pooled = pooled[0] if count == 1 else tf.concat(pooled, axis=0)
        if self.labels is None or not head:
            return pooled
        with self.device("dropout"):
            pooled = self.model.dropout(pooled, training=training)
        with self.device("classifier"):
            return self.model.classifier(pooled)


class PipelineModel(keras.Model):
    """A Keras model over an EncoderRunner, for compile / fit / evaluate: the runner's stages and
    micro-batches in the training graph (gradients run on the stages' devices, where their ops were)."""

    def __init__(self, runner: EncoderRunner, **kwargs):
        super().__init__(**kwargs)
        self.inner = runner.model
        self.runner = runner
        self.config = runner.config
        self.labels = runner.labels

    def call(self, inputs, training=False):
        return self.runner.outputs(inputs, training=training)


class _StageCaches:
    """The KV cache of one geometry (batch, max_len): a variable per (stage, micro-batch), on the
    stage's device, with its compiled prefill and decode step."""

    def __init__(self, runner: "DecoderRunner", batch: int, max_len: int):
        self.runner, self.batch, self.max_len = runner, batch, max_len
        count = min(runner.micro_batches, batch)
        self.bounds = micro_batch_bounds(batch, count)
        model = runner.model
        self.vars = []
        for device, start, stop in runner.stages:
            with runner.on(device):
                self.vars.append([tf.Variable(tf.zeros((stop - start, 2, self.bounds[m + 1] - self.bounds[m],
                                                        runner.heads, max_len, runner.head_dim), model.compute_dtype),
                                              trainable=False, name=f"kv_cache_{start}")
                                  for m in range(count)])
        ids = tf.TensorSpec([batch, None], tf.int32)
        self.prefill = tf.function(self._prefill, input_signature=[ids, ids])
        row = tf.TensorSpec([batch], tf.int32)
        self.decode_step = tf.function(self._decode_step, input_signature=[
            row, row, tf.TensorSpec([], tf.int32), tf.TensorSpec([batch, max_len], tf.int32)])

    def _memory(self, stage: int, m: int, write_columns, read_columns=None):
        """models/gpt Memory for one stage's blocks of micro-batch m: write the new keys and values at
        `write_columns`, attend over `read_columns` (None: over the new ones)."""
        cache = self.vars[stage][m]
        start = self.runner.stages[stage][1]
        rows = self.bounds[m + 1] - self.bounds[m]

        def memory(layer, k, v):
            at = tf.constant([layer - start, 0, 0, 0, 0])
            cache.scatter_nd_update(_indices(rows, self.runner.heads, write_columns) + at, tf.stack([k, v]))
            if read_columns is None:
                return k, v
            past = tf.gather_nd(cache, _indices(rows, self.runner.heads, read_columns) + at)
            return past[0], past[1]

        return memory

    def _prefill(self, input_ids, attention_mask):
        from models import gpt

        runner, logits = self.runner, []
        columns = tf.range(tf.shape(input_ids)[1])
        for m in range(len(self.bounds) - 1):
            ids, mask = input_ids[self.bounds[m]:self.bounds[m + 1]], attention_mask[self.bounds[m]:self.bounds[m + 1]]
            with runner.device("wte"):
                bias = gpt.causal_bias(mask, runner.model.compute_dtype)
            hidden = runner.hidden(ids, gpt.positions_from_mask(mask), bias,
                                   [self._memory(s, m, columns) for s in range(len(runner.stages))])
            logits.append(runner.logits(_last_real(hidden, mask)))
        return tf.concat(logits, axis=0)

    def _decode_step(self, token_ids, positions, step_index, cache_mask):
        from models import gpt

        runner, logits = self.runner, []
        new, past = step_index[tf.newaxis], tf.range(step_index + 1)
        for m in range(len(self.bounds) - 1):
            rows = slice(self.bounds[m], self.bounds[m + 1])
            with runner.device("wte"):
                bias = gpt.cache_bias(cache_mask[rows, :step_index + 1], runner.model.compute_dtype)
            hidden = runner.hidden(token_ids[rows, tf.newaxis], positions[rows, tf.newaxis], bias,
                                   [self._memory(s, m, new, past) for s in range(len(runner.stages))])
            logits.append(runner.logits(hidden[:, 0]))
        return tf.concat(logits, axis=0)


class _SlotStages:
    """A slot cache (models/slots.py's SlotCompute) of a parallelised decoder: a variable per stage, on
    the stage's device, (its blocks, 2, slots, heads, max_len, head_dim), with a compiled prefill and
    step over any rows; under --tp each call is repeated by the group."""

    def __init__(self, runner: "DecoderRunner", slots: int, max_len: int):
        self.runner, self.slots, self.max_len = runner, slots, max_len
        self.vocab_size = runner.config.vocab_size
        self.micro_batches = min(runner.micro_batches, slots)
        self.vars = []
        for device, start, stop in runner.stages:
            with runner.on(device):
                self.vars.append(tf.Variable(tf.zeros((stop - start, 2, slots, runner.heads, max_len, runner.head_dim),
                                                      runner.model.compute_dtype), trainable=False,
                                             name=f"slot_cache_{start}"))
        ids, grid = tf.TensorSpec([None], tf.int32), tf.TensorSpec([None, None], tf.int32)
        self.prefill_graph = tf.function(self._prefill, input_signature=[grid, grid, ids])
        self.step_graph = tf.function(self._step, input_signature=[ids, ids, ids, ids, grid])

    def prefill(self, input_ids, attention_mask, rows) -> np.ndarray:
        return self.runner._call("slot_prefill", (self.slots, self.max_len), _ids(input_ids), _ids(attention_mask),
                                 _ids(rows)).numpy()

    def step(self, token_ids, positions, rows, columns, cache_mask) -> np.ndarray:
        return self.runner._call("slot_step", (self.slots, self.max_len), _ids(token_ids), _ids(positions),
                                 _ids(rows), _ids(columns), _ids(cache_mask)).numpy()

    def _parts(self, rows: tf.Tensor) -> list[slice]:
        """The rows of each micro-batch (GPipe chains, as in _StageCaches)."""
        if self.micro_batches == 1:
            return [slice(None)]
        bounds = micro_batch_bounds(tf.shape(rows)[0], self.micro_batches)
        return [slice(bounds[m], bounds[m + 1]) for m in range(self.micro_batches)]

    def _memories(self, rows, write_columns, read_columns=None) -> list:
        """Each stage's models/gpt Memory over its slot cache, its index tensors made on its device."""
        from models.slots import slot_memory

        memories = []
        for cache, (device, start, _) in zip(self.vars, self.runner.stages):
            with self.runner.on(device):
                memories.append(slot_memory(cache, self.runner.heads, rows, write_columns, read_columns, start))
        return memories

    def _prefill(self, input_ids, attention_mask, rows):
        from models import gpt
        from models.slots import all_columns

        runner, logits = self.runner, []
        for part in self._parts(rows):
            ids, mask = input_ids[part], attention_mask[part]
            with runner.device("wte"):
                bias = gpt.causal_bias(mask, runner.model.compute_dtype)
            hidden = runner.hidden(ids, gpt.positions_from_mask(mask), bias,
                                   self._memories(rows[part], all_columns(ids)))
            logits.append(runner.logits(_last_real(hidden, mask)))
        return tf.concat(logits, axis=0)

    def _step(self, token_ids, positions, rows, columns, cache_mask):
        from models import gpt
        from models.slots import all_columns

        runner, logits = self.runner, []
        for part in self._parts(rows):
            mask = cache_mask[part]
            with runner.device("wte"):
                bias = gpt.cache_bias(mask, runner.model.compute_dtype)
            hidden = runner.hidden(token_ids[part][:, tf.newaxis], positions[part][:, tf.newaxis], bias,
                                   self._memories(rows[part], columns[part][:, tf.newaxis], all_columns(mask)))
            logits.append(runner.logits(hidden[:, 0]))
        return tf.concat(logits, axis=0)


class DecoderRunner(_Runner):
    """A GPT (models/gpt.py), parallelised; models/decoding.generate_batch drives it like a GPT."""

    def __init__(self, model, placement, micro_batches, group):
        super().__init__(model, placement, micro_batches, group)
        self.heads = model.blocks[0].attn.config.n_head  # this rank's heads under --tp
        self.head_dim = model.config.head_dim
        self._caches: collections.OrderedDict[tuple[int, int], _StageCaches] = collections.OrderedDict()
        self._slot_caches: dict[tuple[int, int], _SlotStages] = {}
        spec = tf.TensorSpec([None, None], tf.int32)
        self._last_logits_graph = tf.function(self._last_logits_fn, input_signature=[spec, spec])

    # --- the model math, stage by stage ---------------------------------------------------------------
    def hidden(self, input_ids, positions, bias, memories: list | None = None):
        """Token vectors after ln_f; blocks run stage by stage, `memories[s]` the cache of stage s."""
        model = self.model
        with self.device("wte"):
            x = model.wte(input_ids)
        with self.device("wpe"):
            x = x + model.wpe(positions)
        for s, (device, start, stop) in enumerate(self.stages):
            with self.on(device):
                x = model.run_blocks(x, bias, start, stop, memory=memories[s] if memories else None)
        with self.device("ln_f"):
            return model.ln_f(x)

    def logits(self, hidden):
        """The tied head, where the token table lives (the last stage sends its vectors there)."""
        with self.device("wte"):
            return self.model.wte.logits(hidden)

    def _last_logits_fn(self, input_ids, attention_mask):
        from models import gpt

        count = self.micro_batches
        bounds = micro_batch_bounds(tf.shape(input_ids)[0], count) if count > 1 else None
        logits = []
        for m in range(count):
            rows = slice(bounds[m], bounds[m + 1]) if count > 1 else slice(None)
            ids, mask = input_ids[rows], attention_mask[rows]
            hidden = self.hidden(ids, gpt.positions_from_mask(mask), gpt.causal_bias(mask, self.model.compute_dtype))
            logits.append(self.logits(_last_real(hidden, mask)))
        return logits[0] if count == 1 else tf.concat(logits, axis=0)

    # --- what models/decoding calls ---------------------------------------------------------------------
    def new_cache(self, batch: int, max_len: int) -> _StageCaches:
        return self._cache((int(batch), int(max_len)))

    def _cache(self, geometry: tuple[int, int]) -> _StageCaches:
        if geometry in self._caches:
            self._caches.move_to_end(geometry)
        else:
            self._caches[geometry] = _StageCaches(self, *geometry)
            while len(self._caches) > CACHE_GEOMETRIES:
                self._caches.popitem(last=False)
        return self._caches[geometry]

    def prefill(self, input_ids, attention_mask, cache: _StageCaches) -> tuple[tf.Tensor, _StageCaches]:
        input_ids, attention_mask = _ids(input_ids), _ids(attention_mask)
        if input_ids.shape[0] != cache.batch or input_ids.shape[1] > cache.max_len:
            raise ValueError(f"prompts {input_ids.shape} do not fit a cache of {cache.batch} rows x {cache.max_len}")
        return self._call("prefill", input_ids, attention_mask, (cache.batch, cache.max_len)), cache

    def _prefill(self, input_ids, attention_mask, geometry):
        return self._cache(geometry).prefill(input_ids, attention_mask)

    def decode_step(self, token_ids, positions, step_index, cache: _StageCaches,
                    cache_mask) -> tuple[tf.Tensor, _StageCaches]:
        if not 0 <= int(step_index) < cache.max_len:
            raise ValueError(f"step_index {step_index} outside the cache's columns 0..{cache.max_len - 1}")
        return self._call("decode_step", _ids(token_ids), _ids(positions), np.int32(step_index),
                          (cache.batch, cache.max_len), _ids(cache_mask)), cache

    def _decode_step(self, token_ids, positions, step_index, geometry, cache_mask):
        return self._cache(geometry).decode_step(token_ids, positions, step_index, cache_mask)

    def last_logits(self, input_ids, attention_mask) -> tf.Tensor:
        return self._call("last_logits", _ids(input_ids), _ids(attention_mask))

    def _last_logits(self, input_ids, attention_mask):
        return self._last_logits_graph(input_ids, attention_mask)

    def slot_cache(self, slots: int, max_len: int | None = None) -> _SlotStages:
        """The slot cache of `slots` rows x `max_len` columns (default: the model's positions), made once."""
        return self._slots((int(slots), int(max_len or self.config.n_positions)))

    def _slots(self, geometry: tuple[int, int]) -> _SlotStages:
        if geometry not in self._slot_caches:
            self._slot_caches[geometry] = _SlotStages(self, *geometry)
        return self._slot_caches[geometry]

    def _slot_prefill(self, geometry, input_ids, attention_mask, rows):
        return self._slots(geometry).prefill_graph(input_ids, attention_mask, rows)

    def _slot_step(self, geometry, token_ids, positions, rows, columns, cache_mask):
        return self._slots(geometry).step_graph(token_ids, positions, rows, columns, cache_mask)

    def warm_up(self) -> None:
        """Nothing to trace ahead: a decode step is compiled per cache geometry on first use."""


def _ids(x) -> np.ndarray:
    return np.asarray(x, np.int32)


def _indices(rows: int, heads: int, columns: tf.Tensor) -> tf.Tensor:
    """[0, kv, row, head, column] of every cache cell in `columns`, shaped like stacked keys and values."""
    kv, row, head, column = tf.meshgrid(tf.range(2), tf.range(rows), tf.range(heads), columns, indexing="ij")
    return tf.stack([tf.zeros_like(kv), kv, row, head, column], axis=-1)


def _last_real(hidden, attention_mask):
    """hidden (batch, length, n) at each row's last real token, wherever the padding is."""
    length = tf.shape(attention_mask)[1]
    last = length - 1 - tf.argmax(tf.reverse(attention_mask, [1]), axis=1, output_type=tf.int32)
    return tf.gather(hidden, last, batch_dims=1)

