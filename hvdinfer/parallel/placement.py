"""Pipeline stages: which device holds and runs each named layer of a model, as data.

A `StagePlan` lists layer-name patterns per stage (shell globs, plus `{a..b}` for a range of
numbers), for example, for a 12-block GPT-2 on two stages:

    {"stages": [["wte", "wpe", "block_{0..4}"], ["block_{5..11}", "ln_f"]]}

`assign` checks it against the model's layers (`model.named_layers()`, in the order a token meets
them): every layer in exactly one stage, every pattern matching some layer, stages in layer order
and none empty. The default plan balances stages by parameter count, embeddings and head counted
(`balanced_plan`, counted by `layer_parameters` from a graph-mode build that allocates nothing);
`--plan plan.json` gives one of your own (`hvdinfer doctor --model M --pp K` prints the default).

`apply_pipeline` builds the model with each variable created on its layer's stage device (a
variable creator scope keyed by the layer in the variable's name scope, so the model's own builder
and loader run unchanged), and returns the `Placement` the runners (hvdinfer/parallel/runners.py)
use to run each layer under its device. Devices come from `runtime.stage_devices`: GPUs
local_rank*K .. local_rank*K+K-1 on a GPU host, K logical CPU devices elsewhere, so CI runs the
same placement code.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import json
import re
from pathlib import Path
from typing import Callable, Iterator, Sequence

from hvdinfer import runtime
from hvdinfer.runtime import JobError

LOG = runtime.LOG


@dataclasses.dataclass(frozen=True)
class LayerSize:
    """One named layer's weights."""

    name: str
    parameters: int
    bytes: int


def _pattern(pattern: str) -> re.Pattern:
    """A glob with `{a..b}` number ranges -> a full-match regular expression."""
    parts = re.split(r"\{(\d+)\.\.(\d+)\}", pattern)
    regex = ""
    for i, part in enumerate(parts):
        if i % 3 == 0:
            regex += fnmatch.translate(part).removeprefix("(?s:").removesuffix(")\\Z")
        elif i % 3 == 1:
            low, high = int(part), int(parts[i + 1])
            if low > high:
                raise JobError(f"plan pattern {pattern!r}: range {{{low}..{high}}} runs backwards")
            regex += "(?:" + "|".join(str(n) for n in range(low, high + 1)) + ")"
    return re.compile(regex + r"\Z")


@dataclasses.dataclass(frozen=True)
class StagePlan:
    """Layer-name patterns per pipeline stage."""

    stages: tuple[tuple[str, ...], ...]

    @classmethod
    def from_dict(cls, data, where: str = "plan") -> "StagePlan":
        if not isinstance(data, dict) or set(data) != {"stages"}:
            raise JobError(f"{where}: expected {{\"stages\": [[pattern, ...], ...]}}")
        stages = data["stages"]
        if (not isinstance(stages, list) or not stages
                or not all(isinstance(s, list) and all(isinstance(p, str) and p for p in s) for s in stages)):
            raise JobError(f"{where}: \"stages\" must be a non-empty list of lists of layer-name patterns")
        return cls(tuple(tuple(stage) for stage in stages))

    @classmethod
    def load(cls, path: str | Path) -> "StagePlan":
        try:
            data = json.loads(Path(path).read_text())
        except OSError as exc:
            raise JobError(f"--plan {path}: cannot read it: {exc.strerror or exc}") from None
        except json.JSONDecodeError as exc:
            raise JobError(f"--plan {path}: not valid JSON: {exc}") from None
        return cls.from_dict(data, f"--plan {path}")

    def to_dict(self) -> dict:
        return {"stages": [list(stage) for stage in self.stages]}

    def assign(self, layers: Sequence[str]) -> list[int]:
        """The stage of each layer (in `layers` order), after checking the plan covers every layer exactly
        once, every pattern matches a layer, and stages follow the layer order without gaps."""
        compiled = [[(p, _pattern(p)) for p in stage] for stage in self.stages]
        stage_of: list[int | None] = []
        for name in layers:
            hits = sorted({s for s, stage in enumerate(compiled) for _, rx in stage if rx.match(name)})
            if len(hits) > 1:
                raise JobError(f"plan: layer {name} matches stages {', '.join(map(str, hits))}; "
                               f"each layer belongs to exactly one stage")
            stage_of.append(hits[0] if hits else None)
        missing = [name for name, s in zip(layers, stage_of) if s is None]
        if missing:
            raise JobError(f"plan: layer(s) {', '.join(missing)} in no stage (the model's layers: "
                           f"{', '.join(layers)})")
        for s, stage in enumerate(compiled):
            for pattern, rx in stage:
                if not any(rx.match(name) for name in layers):
                    raise JobError(f"plan: stage {s} pattern {pattern!r} matches no layer of this model")
        for before, after, name in zip(stage_of, stage_of[1:], layers[1:]):
            if after < before:
                raise JobError(f"plan: layer {name} is on stage {after} after a layer on stage {before}; "
                               f"stages must follow the layer order")
        empty = sorted(set(range(len(self.stages))) - set(stage_of))
        if empty:
            raise JobError(f"plan: stage(s) {', '.join(map(str, empty))} hold no layer")
        return stage_of


def layer_parameters(model_fn: Callable[[], object], build: Callable[[object], object]) -> list[LayerSize]:
    """Parameters and bytes of each named layer of the model `model_fn` makes, counted from a build in a
    throwaway graph: no variable is allocated, so a model too big for this host can still be planned."""
    import tensorflow as tf

    with tf.Graph().as_default():
        model = model_fn()
        build(model)
        sizes = []
        for name, layer in model.named_layers():
            params = sum(int(w.shape.num_elements()) for w in layer.weights)
            sizes.append(LayerSize(name, params, sum(int(w.shape.num_elements()) * w.dtype.size for w in layer.weights)))
    # Keras: a layer made inside a tf.Graph switches its classes to Keras' v1 base classes, which breaks
    # every instance made eagerly; making the model once more eagerly (not built: nothing allocated)
    # switches them back.
    model_fn()
    return sizes


def balanced_plan(sizes: Sequence[LayerSize], stages: int) -> StagePlan:
    """Contiguous stages whose largest parameter count is as small as it can be (ties: earlier cuts)."""
    n = len(sizes)
    if not 1 <= stages <= n:
        raise JobError(f"--pp {stages}: the model has {n} layers to place")
    prefix = [0]
    for size in sizes:
        prefix.append(prefix[-1] + size.parameters)
    # best[k][i]: the smallest largest stage over the first i layers in k stages, and where its last stage starts
    inf = float("inf")
    best = [[(inf, 0)] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = (0, 0)
    for k in range(1, stages + 1):
        for i in range(k, n + 1):
            for j in range(k - 1, i):
                cost = max(best[k - 1][j][0], prefix[i] - prefix[j])
                if cost < best[k][i][0]:
                    best[k][i] = (cost, j)
    cuts, i = [], n
    for k in range(stages, 0, -1):
        j = best[k][i][1]
        cuts.append((j, i))
        i = j
    return StagePlan(tuple(tuple(s.name for s in sizes[a:b]) for a, b in reversed(cuts)))


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where each named layer lives and runs."""

    layers: tuple[str, ...]
    stage_of: tuple[int, ...]
    devices: tuple[str, ...]
    plan: StagePlan

    def stage(self, layer: str) -> int:
        return self.stage_of[self.layers.index(layer)]

    def device(self, layer: str) -> str:
        return self.devices[self.stage(layer)]

    def stage_layers(self, stage: int) -> list[str]:
        return [name for name, s in zip(self.layers, self.stage_of) if s == stage]

    def layer_of_scope(self, scope: str) -> str | None:
        """The named layer a variable belongs to, from its name scope ('gpt/block_3/attn/c_attn' -> 'block_3')."""
        for part in scope.split("/"):
            if part in self.layers:
                return part
        return None

    def describe(self, sizes: Sequence[LayerSize] | None = None) -> list[str]:
        """One line per stage: device, layers, parameters (when sizes are known)."""
        by_name = {s.name: s for s in sizes or ()}
        lines = []
        for stage, device in enumerate(self.devices):
            names = self.stage_layers(stage)
            line = f"stage {stage} on {device}: {_ranges(names)}"
            if by_name:
                line += f" ({sum(by_name[n].parameters for n in names):,} parameters)"
            lines.append(line)
        return lines


def _ranges(names: Sequence[str]) -> str:
    """'block_0, block_1, block_2' -> 'block_{0..2}'."""
    out, run = [], []
    for name in [*names, None]:
        match = re.fullmatch(r"(.*_)(\d+)", name or "")
        if match and run and match[1] == run[0][0] and int(match[2]) == run[-1][1] + 1:
            run.append((match[1], int(match[2])))
            continue
        if run:
            out.append(f"{run[0][0]}{run[0][1]}" if len(run) == 1 else f"{run[0][0]}{{{run[0][1]}..{run[-1][1]}}}")
            run = []
        if match:
            run = [(match[1], int(match[2]))]
        elif name is not None:
            out.append(name)
    return ", ".join(out)


def plan_for(sizes: Sequence[LayerSize], stages: int, plan_path: Path | None) -> StagePlan:
    """The user's plan when given (its stage count must be `stages`), else the balanced default."""
    if plan_path is None:
        return balanced_plan(sizes, stages)
    plan = StagePlan.load(plan_path)
    if len(plan.stages) != stages:
        raise JobError(f"--plan {plan_path} has {len(plan.stages)} stage(s) but --pp is {stages}")
    return plan


def make_placement(sizes: Sequence[LayerSize], plan: StagePlan, devices: Sequence[str]) -> Placement:
    names = [s.name for s in sizes]
    return Placement(tuple(names), tuple(plan.assign(names)), tuple(devices), plan)


@contextlib.contextmanager
def placement_scope(placement: Placement) -> Iterator[None]:
    """Every variable created inside lives on its layer's stage device (others stay where TF puts them)."""
    import tensorflow as tf

    def creator(next_creator, **kwargs):
        layer = placement.layer_of_scope(tf.get_current_name_scope())
        if layer is None:
            return next_creator(**kwargs)
        with tf.device(placement.device(layer)):
            return next_creator(**kwargs)

    with tf.variable_creator_scope(creator):
        yield


def apply_pipeline(model, build: Callable[[object], object], sizes: Sequence[LayerSize], stages: int,
                   plan_path: Path | None, devices: Sequence[str]) -> Placement:
    """Build `model` (not yet built) with every layer's variables on its stage's device."""
    plan = plan_for(sizes, stages, plan_path)
    placement = make_placement(sizes, plan, devices)
    with placement_scope(placement):
        build(model)
    for line in placement.describe(sizes):
        LOG.info("  %s", line)
    return placement


def parameter_bytes(model) -> dict[str, int]:
    """Bytes of the model's variables on each device, as they were placed."""
    import tensorflow as tf

    found: dict[str, int] = {}
    for var in model.weights:
        device = tf.DeviceSpec.from_string(var.device)
        name = f"/{device.device_type}:{device.device_index}"
        found[name] = found.get(name, 0) + int(var.shape.num_elements()) * var.dtype.size
    return found


def micro_batch_bounds(rows, micro_batches: int):
    """Row bounds of `micro_batches` micro-batches whose sizes differ by at most one row: a
    (micro_batches + 1,) int32 tensor for a tensor `rows`, a list for an int."""
    if isinstance(rows, int):
        return [m * rows // micro_batches for m in range(micro_batches + 1)]
    import tensorflow as tf

    return (tf.range(micro_batches + 1) * rows) // micro_batches
