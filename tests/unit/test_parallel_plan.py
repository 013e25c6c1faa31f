"""Model parallelism without ranks: ParallelConfig and ParallelDims errors, stage plans (validation,
patterns, balancing, plan files), parameter counts of whole and sharded layers, checkpoint slices."""
import json

import numpy as np
import pytest

from hvdinfer.parallel import placement, tensor_parallel
from hvdinfer.parallel.dims import ParallelConfig, ParallelDims
from hvdinfer.parallel.placement import LayerSize, StagePlan
from hvdinfer.runtime import JobError
from models import bert, gpt, registry

GPT_LAYERS = ["wte", "wpe", "block_0", "block_1", "block_2", "block_3", "ln_f"]


# --- ParallelConfig and ParallelDims --------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, message", [
    ({"pp": 0}, "--pp must be an integer >= 1"),
    ({"tp": 1.5}, "--tp must be an integer >= 1"),
    ({"micro_batches": 4}, "--micro-batches splits batches between pipeline stages: give --pp"),
    ({"plan": "p.json"}, "--plan places pipeline stages: give --pp"),
])
def test_parallel_config_refuses_what_cannot_mean_anything(kwargs, message):
    with pytest.raises(JobError, match=message):
        ParallelConfig(**kwargs)


def test_parallel_config_identity_is_empty_by_default():
    assert ParallelConfig().identity() == {} and not ParallelConfig().enabled
    assert ParallelConfig(pp=2, micro_batches=4).identity() == {"pp": 2, "tp": 1, "micro_batches": 4, "plan": None}


def test_dims_from_flags_and_their_groups():
    dims = ParallelDims.from_config(ParallelConfig(tp=2, pp=2), 4)
    assert (dims.dp, dims.pp, dims.tp, dims.world_size) == (2, 2, 2, 4)
    assert dims.pp_enabled and dims.tp_enabled
    assert dims.tp_groups() == [[0, 1], [2, 3]] and dims.tp_group(3) == [2, 3]
    assert dims.dp_groups() == [[0, 2], [1, 3]]
    plain = ParallelDims.from_config(ParallelConfig(), 3)
    assert (plain.dp, plain.pp_enabled, plain.tp_enabled) == (3, False, False)


def test_dims_refuse_ranks_that_do_not_fill_tensor_parallel_groups():
    with pytest.raises(JobError, match=r"--tp 2 needs a multiple of 2 ranks \(ranks = dp x tp\), but the job has 3"):
        ParallelDims.from_config(ParallelConfig(tp=2), 3)
    with pytest.raises(JobError, match="dp 2 x tp 2 = 4 ranks, but the job has 3"):
        ParallelDims(dp=2, pp=1, tp=2, world_size=3)


def test_dims_refuse_models_that_cannot_be_cut_this_way():
    with pytest.raises(JobError, match=r"--pp 4 on a model with 2 block\(s\).*at most --pp 2"):
        ParallelDims(1, 4, 1, 1).check_model(blocks=2, heads=4, widths={})
    with pytest.raises(JobError, match="--tp 3 does not divide the model's 4 attention heads"):
        ParallelDims(1, 1, 3, 3).check_model(blocks=2, heads=4, widths={})
    with pytest.raises(JobError, match="--tp 2 does not divide the model's intermediate_size 63"):
        ParallelDims(1, 1, 2, 2).check_model(blocks=2, heads=4, widths={"intermediate_size": 63})
    with pytest.raises(JobError, match="--pp 3 needs 3 devices per rank, but this host has 2 GPUs"):
        ParallelDims(1, 3, 1, 1).check_devices(2, "this host has 2 GPUs")


def test_tensor_parallel_checks_the_real_model_config():
    with pytest.raises(JobError, match="--pp 3 on a model with 2 block"):
        tensor_parallel.check_model(ParallelDims(1, 3, 1, 1), gpt.GPT(registry.gpt_size("debug")))
    with pytest.raises(JobError, match="--tp 3 does not divide the model's 4 attention heads"):
        tensor_parallel.check_model(ParallelDims(1, 1, 3, 3), bert.SentenceEmbedder(registry.size("debug")))


# --- stage plans --------------------------------------------------------------------------------------
def test_plan_assigns_layers_by_globs_and_ranges():
    plan = StagePlan((("wte", "wpe", "block_{0..1}"), ("block_[23]", "ln_*")))
    assert plan.assign(GPT_LAYERS) == [0, 0, 0, 0, 1, 1, 1]


@pytest.mark.parametrize("stages, message", [
    ((("wte", "wpe", "block_*"), ("block_3", "ln_f")), "layer block_3 matches stages 0, 1"),
    ((("wte", "wpe", "block_{0..2}"), ("ln_f",)), r"layer\(s\) block_3 in no stage"),
    ((("wte", "wpe", "block_{0..3}"), ("ln_f", "lm_head")), "stage 1 pattern 'lm_head' matches no layer"),
    ((("wte", "wpe", "block_{0..1}", "ln_f"), ("block_{2..3}",)), "layer block_2 is on stage 1 after a layer on stage 0"
                                                                   "|layer ln_f is on stage 0 after a layer on stage 1"),
    ((("block_{3..1}",),), r"range \{3..1\} runs backwards"),
])
def test_plan_errors_name_the_layer_and_stage(stages, message):
    with pytest.raises(JobError, match=message):
        StagePlan(stages).assign(GPT_LAYERS)


def test_plan_files_are_checked(tmp_path):
    path = tmp_path / "plan.json"
    path.write_text(json.dumps({"stages": [["wte", "wpe", "block_{0..1}"], ["block_{2..3}", "ln_f"]]}))
    assert StagePlan.load(path).assign(GPT_LAYERS) == [0, 0, 0, 0, 1, 1, 1]
    assert StagePlan.load(path).to_dict() == json.loads(path.read_text())
    path.write_text("{not json")
    with pytest.raises(JobError, match="not valid JSON"):
        StagePlan.load(path)
    path.write_text(json.dumps({"stage": []}))
    with pytest.raises(JobError, match=r'expected \{"stages"'):
        StagePlan.load(path)
    with pytest.raises(JobError, match="cannot read it"):
        StagePlan.load(tmp_path / "missing.json")
    path.write_text(json.dumps({"stages": [["wte", "wpe", "block_*", "ln_f"]]}))
    with pytest.raises(JobError, match="has 1 stage.* but --pp is 2"):
        placement.plan_for([LayerSize(n, 1, 4) for n in GPT_LAYERS], 2, path)


def test_balanced_plan_minimises_the_largest_stage():
    sizes = [LayerSize(n, p, 4 * p) for n, p in zip(GPT_LAYERS, [40, 8, 10, 10, 10, 10, 1])]
    plan = placement.balanced_plan(sizes, 2)
    assert plan.stages == (("wte", "wpe"), ("block_0", "block_1", "block_2", "block_3", "ln_f"))
    plan = placement.balanced_plan(sizes, 3)
    assert plan.stages[0] == ("wte",)
    assert max(sum(s.parameters for s in sizes if s.name in stage) for stage in plan.stages) == 40
    with pytest.raises(JobError, match="--pp 8: the model has 7 layers"):
        placement.balanced_plan(sizes, 8)


def test_placement_describes_stages_with_block_ranges():
    sizes = [LayerSize(n, 1, 4) for n in GPT_LAYERS]
    where = placement.make_placement(sizes, StagePlan((("wte", "wpe", "block_{0..2}"), ("block_3", "ln_f"))),
                                     ["/CPU:0", "/CPU:1"])
    assert where.describe(sizes) == ["stage 0 on /CPU:0: wte, wpe, block_{0..2} (5 parameters)",
                                     "stage 1 on /CPU:1: block_3, ln_f (2 parameters)"]
    assert where.layer_of_scope("gpt_3/block_3/attn/c_attn") == "block_3"
    assert where.layer_of_scope("gpt/wte") == "wte" and where.layer_of_scope("kv_cache") is None
    assert placement.micro_batch_bounds(5, 2) == [0, 2, 5]


# --- parameter counts (graph-mode build, nothing allocated) --------------------------------------------
def _built_counts(model):
    return [(name, sum(int(np.prod(w.shape)) for w in layer.weights)) for name, layer in model.named_layers()]


@pytest.mark.parametrize("family", ["bert", "gpt"])
def test_layer_parameters_match_a_real_build_whole_and_sharded(family):
    from hvdinfer.parallel.parallelize import layer_sizes

    if family == "gpt":
        make, build = (lambda: gpt.GPT(registry.gpt_size("debug"))), gpt.build
    else:
        make, build = (lambda: bert.SentenceEmbedder(registry.size("debug"))), bert.build
    whole = layer_sizes(make, ParallelDims(1, 2, 1, 1))
    assert [(s.name, s.parameters) for s in whole] == _built_counts(build(make()))
    assert all(s.bytes == 4 * s.parameters for s in whole)
    half = layer_sizes(make, ParallelDims(1, 2, 2, 2))
    for w, h in zip(whole, half):
        if w.name.startswith("block_"):
            assert 0.5 < h.parameters / w.parameters < 0.52  # LayerNorms and output biases stay whole
        else:
            assert h.parameters == w.parameters
    # Keras classes switched back after the graph build: an eager model still runs.
    assert build(make()) is not None


def test_shard_ranges_cut_each_fused_part():
    assert tensor_parallel.shard_ranges(12, 3, 2, 0) == [(0, 2), (4, 6), (8, 10)]
    assert tensor_parallel.shard_ranges(12, 3, 2, 1) == [(2, 4), (6, 8), (10, 12)]
    assert tensor_parallel.shard_ranges(8, 1, 4, 3) == [(6, 8)]
    assert tensor_parallel.shard_spec(tensor_parallel.GPT_SHARDS, "h.3.attn.c_attn.weight") == (-1, 3)
    assert tensor_parallel.shard_spec(tensor_parallel.GPT_SHARDS, "h.3.attn.c_proj.bias") is None
    assert tensor_parallel.shard_spec(tensor_parallel.BERT_SHARDS, "encoder.layer.0.output.dense.weight") == (1, 1)
    assert tensor_parallel.shard_spec(tensor_parallel.BERT_SHARDS,
                                      "encoder.layer.0.attention.output.LayerNorm.weight") is None


# --- checkpoints sliced per tensor-parallel rank ---------------------------------------------------------
@pytest.mark.parametrize("family", ["bert", "gpt"])
def test_each_rank_loads_its_slices_which_together_make_the_checkpoint(tmp_path, family):
    import safetensors.numpy

    from hvdinfer.parallel import loading
    from models import gpt_weights, weights
    from tests import tiny, tiny_gpt

    if family == "gpt":
        config = registry.gpt_size("debug")
        full = tiny_gpt.random_checkpoint(config, seed=2)
        make, build, table = (lambda: gpt.GPT(config)), gpt.build, gpt_weights.hf_variables
        prefix = "transformer."
    else:
        full = weights.hf_tensors(tiny.random_model(2))
        make, build, table = (lambda: bert.SentenceEmbedder(registry.size("debug"))), bert.build, weights.hf_variables
        prefix = ""
    path = tmp_path / "model.safetensors"
    safetensors.numpy.save_file(full, str(path))
    shards = []
    for rank in range(2):
        model = make()
        tensor_parallel.apply_tensor_parallel(model, ParallelDims(1, 1, 2, 2), None)  # no group: shapes only
        build(model)
        loading.load_weights(model, path, tp=2, tp_rank=rank)
        shards.append({name: (var.numpy().T if transposed else var.numpy())
                       for name, (var, transposed) in table(model).items()})
    shards_of = tensor_parallel.GPT_SHARDS if family == "gpt" else tensor_parallel.BERT_SHARDS
    for name, value in full.items():
        name = name.removeprefix(prefix)
        spec = tensor_parallel.shard_spec(shards_of, name)
        if spec is None:
            assert all(np.array_equal(s[name], value) for s in shards), name
            continue
        axis, parts = spec
        halves = [np.split(s[name], parts, axis=axis) for s in shards]  # each rank: its piece of every part
        joined = np.concatenate([np.concatenate([h[p] for h in halves], axis=axis) for p in range(parts)], axis=axis)
        np.testing.assert_array_equal(joined, value, err_msg=name)


def test_sliced_loading_checks_before_assigning(tmp_path):
    import safetensors.numpy

    from hvdinfer.parallel import loading
    from tests import tiny_gpt

    config = registry.gpt_size("debug")
    tensors = tiny_gpt.random_checkpoint(config, seed=2)
    model = gpt.build(gpt.GPT(config))
    before = model.wte.embeddings.numpy().copy()
    broken = dict(tensors, **{"transformer.h.0.mlp.c_fc.weight": np.zeros((64, 100), np.float32)})
    safetensors.numpy.save_file(broken, str(tmp_path / "a.safetensors"))
    with pytest.raises(ValueError, match=r"h.0.mlp.c_fc.weight: checkpoint shape \(64, 100\)"):
        loading.load_weights(model, tmp_path / "a.safetensors")
    extra = dict(tensors, **{"transformer.h.9.attn.c_attn.weight": np.zeros((1,), np.float32)})
    safetensors.numpy.save_file(extra, str(tmp_path / "b.safetensors"))
    with pytest.raises(ValueError, match="no place in the model: transformer.h.9.attn.c_attn.weight"):
        loading.load_weights(model, tmp_path / "b.safetensors")
    np.testing.assert_array_equal(model.wte.embeddings.numpy(), before)  # nothing assigned


def test_doctor_prints_the_plan_without_allocating_the_model(capsys):
    from hvdinfer import doctor

    assert doctor.print_plan("bert:debug", ParallelConfig(pp=2, tp=2)) == 0
    out = capsys.readouterr().out
    assert "debug (BERT, 2 blocks), 23,360 parameters" in out
    assert "block_0          1  /CPU:1" in out and "1/2 (heads, MLP columns; 0.5" in out
    assert 'plan (--plan)      {"stages": [' in out and "bytes on /CPU:1" in out
    with pytest.raises(JobError, match="both a BERT and a GPT size; say bert:debug or gpt:debug"):
        doctor.plan_model("debug")
    with pytest.raises(JobError, match="unknown GPT size"):
        doctor.plan_model("gpt:huge")
