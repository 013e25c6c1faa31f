"""`parallelize(model_fn, dims, config)`: model parallelism applied to a model from outside, in one order.

    1. tensor parallelism (--tp T): the blocks are swapped for this rank's 1/T shard (heads and MLP
       columns), with the row-parallel sums in the group's Horovod process set (tensor_parallel.py);
    2. pipeline parallelism (--pp K): the stage plan (balanced by parameters, or --plan) and the build
       with every variable on its stage's device (placement.py);
    3. micro-batches (--micro-batches M): the runner's stages x micro-batches graphs (runners.py).
Data parallelism comes last and from outside the model: the job engine hands chunks to the dp
groups (infer, generate), or hvd.DistributedOptimizer averages gradients (finetune,
data_parallel.py; under --tp among the ranks holding the same shard). The model arrives unbuilt
(`model_fn` makes it, so its parameters can also be counted without allocating them) and leaves
built, its weights still to load: `load_weights` reads each rank's slices one tensor at a time.
The loaders below do all of it for the tasks.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

from hvdinfer import runtime
from hvdinfer.parallel import loading as loading_mod, placement as placement_mod, runners, tensor_parallel
from hvdinfer.parallel.dims import ParallelConfig, ParallelDims

LOG = runtime.LOG


def _family(model):
    """(build, runner class) of the model's family."""
    from models import bert, gpt

    if isinstance(model, gpt.GPT):
        return gpt.build, runners.DecoderRunner
    return bert.build, runners.EncoderRunner


def layer_sizes(model_fn: Callable, dims: ParallelDims) -> list[placement_mod.LayerSize]:
    """Each named layer's parameters on one rank (its shard under tp), counted without allocating them."""
    def shard():
        model = model_fn()
        if dims.tp_enabled:
            tensor_parallel.apply_tensor_parallel(model, dims, None)
        return model

    build = _family(model_fn())[0]
    return placement_mod.layer_parameters(shard, build)


def parallelize(model_fn: Callable, dims: ParallelDims, config: ParallelConfig,
                rt: runtime.Runtime | None = None):
    """The model `model_fn` makes, built under `dims` (see the module docstring), in a runner."""
    rt = rt or runtime.init_runtime()
    model = model_fn()
    tensor_parallel.check_model(dims, model)
    build, runner_class = _family(model)
    group = None
    if dims.tp_enabled:
        group = tensor_parallel.make_group(dims, rt.rank)
        tensor_parallel.apply_tensor_parallel(model, dims, group)
        LOG.info("applied tensor parallelism: %d ranks per group (%s), heads and MLP columns split, row-parallel "
                 "sums allreduced in each group's process set", dims.tp, ", ".join(map(str, dims.tp_groups())))
    placement = None
    if dims.pp_enabled:
        devices = stage_devices(dims, rt)
        placement = placement_mod.apply_pipeline(model, build, layer_sizes(model_fn, dims), dims.pp, config.plan,
                                                 devices)
        LOG.info("applied pipeline parallelism: %d stages on %s", dims.pp, ", ".join(devices))
    else:
        build(model)
    if config.micro_batches > 1:
        LOG.info("applied micro-batching: %d micro-batches per batch through the stages (GPipe)", config.micro_batches)
    return runner_class(model, placement, config.micro_batches, group)


def stage_devices(dims: ParallelDims, rt: runtime.Runtime) -> list[str]:
    """This rank's pp devices: the runtime's when it was started for them, else made now (CPU host)."""
    if len(rt.devices) >= dims.pp:
        return list(rt.devices[:dims.pp])
    import tensorflow as tf

    gpus = tf.config.get_visible_devices("GPU")
    if gpus:
        dims.check_devices(len(gpus), f"rank {rt.rank} sees {len(gpus)} GPU(s): start its runtime with "
                                      f"pipeline_stages={dims.pp} (the CLI does for --pp)")
    return runtime.stage_devices(dims.pp)


def dims_for(config: ParallelConfig, rt: runtime.Runtime | None = None) -> ParallelDims:
    rt = rt or runtime.init_runtime()
    return ParallelDims.from_config(config, rt.size)


def load_weights(runner, path: str | Path) -> int:
    """The encoder's or decoder's weights from a safetensors file, this rank's slices only."""
    group = runner.group
    return loading_mod.load_weights(runner.model, path, group.dims.tp if group else 1, group.tp_rank if group else 0)


# --- what the tasks load ------------------------------------------------------------------------------
def load_gpt(model_dir: Path, config: ParallelConfig):
    """(DecoderRunner, tokenizer, GPTConfig) for a GPT-2 directory, parallelised: what
    models.gpt_loading.load_gpt gives a single device."""
    from models import gpt, gpt_loading
    from models.bpe import BPETokenizer

    gpt_config = gpt_loading.read_config(model_dir)
    tokenizer = BPETokenizer.from_dir(model_dir)
    gpt_loading.check_vocabulary(tokenizer, gpt_config, model_dir)
    weights = Path(model_dir) / gpt_loading.WEIGHTS
    if not weights.is_file():
        raise ValueError(f"{model_dir}: missing {gpt_loading.WEIGHTS}")
    runner = parallelize(lambda: gpt.GPT(gpt_config), dims_for(config), config)
    load_weights(runner, weights)
    return runner, tokenizer, gpt_config


def load_embedder(model_dir: Path, classify: bool, config: ParallelConfig):
    """(EncoderRunner, tokenizer, EmbedderInfo) for a sentence-transformers directory (with its classifier
    head when `classify`), parallelised: what models.loading gives a single device."""
    from models import bert, heads, loading
    from models.tokenizer import Tokenizer

    info = loading.read_info(model_dir)
    if classify:
        labels, dropout = heads.read_head(model_dir)

        def model_fn():
            return heads.TextClassifier(bert.SentenceEmbedder(info.config, normalize=info.normalize), labels, dropout)
    else:
        def model_fn():
            return bert.SentenceEmbedder(info.config, normalize=info.normalize)
    runner = parallelize(model_fn, dims_for(config), config)
    load_weights(runner, info.model_dir / "model.safetensors")
    if classify:
        heads.assign_head(runner.model, model_dir)
    tokenizer = Tokenizer.from_file(info.model_dir / "tokenizer.json", info.max_seq_length)
    return runner, tokenizer, info


def classifier_for_training(model_dir: Path, labels: list[str], dropout: float, seed: int, config: ParallelConfig):
    """(PipelineModel, tokenizer, model dir) for fine-tuning: the base encoder's weights (under --tp this
    rank's slices) and a fresh head initialised exactly as the single-device build initialises it
    (seeded right before the head, so it is also the same on every rank of a tensor-parallel group)."""
    import tensorflow as tf

    from models import bert, heads, loading
    from models.tokenizer import Tokenizer

    info = loading.read_info(model_dir)
    runner = parallelize(lambda: heads.TextClassifier(bert.SentenceEmbedder(info.config, normalize=info.normalize),
                                                      labels, dropout, seed), dims_for(config), config)
    load_weights(runner, info.model_dir / "model.safetensors")
    # The single-device path seeds right before building the head: draw its kernel the same way.
    tf.keras.utils.set_random_seed(seed)
    kernel = runner.model.classifier.kernel
    initializer = runner.model.classifier.kernel_initializer
    kernel.assign(type(initializer).from_config(initializer.get_config())(kernel.shape, kernel.dtype))
    tokenizer = Tokenizer.from_file(info.model_dir / "tokenizer.json", info.max_seq_length)
    return runners.PipelineModel(runner), tokenizer, info.model_dir


# --- the plan, for doctor and bench ---------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class PlanRow:
    layer: str
    stage: int
    device: str
    shard: str
    parameters: int
    bytes: int


def describe(model_fn: Callable, dims: ParallelDims, config: ParallelConfig,
             devices: list[str] | None = None
             ) -> tuple[list[PlanRow], dict[str, int], list[placement_mod.LayerSize]]:
    """(one row per layer, parameter bytes per device of one rank, the whole model's layer sizes): the
    plan `parallelize` would follow, computed without allocating the model."""
    probe = model_fn()
    tensor_parallel.check_model(dims, probe)
    sizes = layer_sizes(model_fn, dims)
    full = sizes if not dims.tp_enabled else layer_sizes(model_fn, dataclasses.replace(dims, tp=1, dp=dims.world_size))
    devices = devices or [f"stage {s}" for s in range(dims.pp)]
    if dims.pp_enabled:
        stage_of = placement_mod.plan_for(sizes, dims.pp, config.plan).assign([s.name for s in sizes])
    else:
        stage_of = [0] * len(sizes)
    rows, per_device = [], {}
    for size, stage, whole in zip(sizes, stage_of, full):
        shard = "replicated" if dims.tp_enabled else "whole"
        if dims.tp_enabled and size.name.startswith("block_"):
            shard = f"1/{dims.tp} (heads, MLP columns; {size.parameters / whole.parameters:.3f} of the block)"
        rows.append(PlanRow(size.name, stage, devices[stage], shard, size.parameters, size.bytes))
        per_device[devices[stage]] = per_device.get(devices[stage], 0) + size.bytes
    return rows, per_device, full
