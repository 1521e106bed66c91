"""The steps of a compiled program: what the runtime runs, and the memory planner walks, in the
one order both follow.

A training step is four phases (:data:`PHASES`), the boundaries autograd sees:

- ``prefix_forward``: stage 0's tiles (each writes its kept regions into whole buffers and its
  partials into one row of each partials buffer), then the global graph that combines them, then
  stage 1's tiles, ... up to the last stage, and the global graph that combines the last stage's
  partials when the head reduces a grid tensor (a classifier's global pool);
- ``head_forward``: the head on whole buffers;
- ``head_backward``: the head's backward graph (gradients of the buffers it reads);
- ``prefix_backward``: the same units in reverse: the final global graph's backward, the last
  stage's tile backward graphs, the global graph before it backward, ... stage 0's.

The weight work hoisted out of the tile backward graphs (``meta.weight_work``) runs once per
backward pass: :data:`StepKind.PREPARE_WEIGHTS` first (the prepared tensors live until the end
of the pass), :data:`StepKind.GRADIENT_LAYOUT` after the last tile (before the weight
gradients are combined between workers).

A unit that keeps its activations (``meta.kept``: the last tile of the last stage, or every
stage's tile of a one-tile grid) runs its class's ``kept_forward`` graph forward, which also
gives the residuals, and its ``kept_backward`` graph backward, which reads them instead of
recomputing (the step's ``keeps``).

A :data:`StepKind.RELEASE` step frees a baked session once its pass is over. Tiles of a stage run
in the stage's ``run_order`` (with halo reuse: grid order forward, its reverse backward, since a
tile's strips come from the tiles before it); whether a step's session has its weights baked in
follows the :class:`~streamc.policy.RuntimePolicy`.

A *worker* of a tile-parallel run (``tiles``: the tiles it runs, per stage) has the tile steps
of its own tiles only, and *combine* steps where its results meet the other workers'
(docs/architecture.md, "Distributed"): after each stage's tiles, every output buffer and
partials buffer of the stage (:data:`StepKind.COMBINE`: the workers wrote disjoint parts);
in backward, before a stage's tiles, the gradient of every stage output that later stages'
tiles read, and before a global graph, the gradient of every global buffer tiles read
(:data:`StepKind.COMBINE_GRADIENT`: partial sums); last, the weight gradients
(:data:`StepKind.COMBINE_WEIGHT_GRADIENTS`). The step's ``name`` is the buffer's.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, replace
from enum import Enum

from streamc.meta import GraphSpec, ProgramMeta
from streamc.policy import RuntimePolicy


class StepKind(str, Enum):
    TILE_FORWARD = "tile forward"
    GLOBAL_FORWARD = "global forward"
    HEAD_FORWARD = "head forward"
    HEAD_BACKWARD = "head backward"
    GLOBAL_BACKWARD = "global backward"
    TILE_BACKWARD = "tile backward"
    PREPARE_WEIGHTS = "prepare weights"
    GRADIENT_LAYOUT = "weight gradient layout"
    RELEASE = "release"
    COMBINE = "combine"
    COMBINE_GRADIENT = "combine gradient"
    COMBINE_WEIGHT_GRADIENTS = "combine weight gradients"


PHASES = ("prefix_forward", "head_forward", "head_backward", "prefix_backward")
#: The steps of the weight work hoisted out of the tiles (no buffer read or written).
WEIGHT_WORK_KINDS = (StepKind.PREPARE_WEIGHTS, StepKind.GRADIENT_LAYOUT)
_BACKWARD = (StepKind.TILE_BACKWARD, StepKind.GLOBAL_BACKWARD, StepKind.HEAD_BACKWARD,
             StepKind.COMBINE_GRADIENT, StepKind.COMBINE_WEIGHT_GRADIENTS, *WEIGHT_WORK_KINDS)
#: The steps that exchange data between workers (none in a single-process run).
COMBINE_KINDS = (StepKind.COMBINE, StepKind.COMBINE_GRADIENT, StepKind.COMBINE_WEIGHT_GRADIENTS)
#: Tiles per stage a worker runs (None: every tile, a single-process run).
TileSubset = Sequence[Collection[int]] | None


@dataclass(frozen=True)
class Step:
    """One step: its kind, the graph it runs (or releases), the tile and stage (tile steps),
    the global graph's name (global steps), whether the graph's session has the weights baked
    in, and whether the tile keeps its activations from forward to backward."""

    kind: StepKind
    graph: str
    tile: int | None = None
    baked: bool = False
    stage: int | None = None
    name: str | None = None
    keeps: bool = False

    @property
    def role(self) -> str:
        return "backward" if self.kind in _BACKWARD else "forward"


def phase_label(meta: ProgramMeta, step: Step) -> str:
    """How memory plans name the phase a step belongs to: ``"tile class 3 forward"``,
    ``"global1 backward"``, ``"head backward"``..."""
    if step.tile is not None:
        return f"tile class {meta.tiles[step.tile].parts[step.stage].class_id} {step.role}"
    if step.kind in COMBINE_KINDS or step.kind in WEIGHT_WORK_KINDS:
        return step.kind.value
    if step.name is not None:
        return f"{step.name} {step.role}"
    return step.kind.value


def program_steps(meta: ProgramMeta, policy: RuntimePolicy, chunks: int = 1,
                  tiles: TileSubset = None) -> dict[str, list[Step]]:
    """The steps of each phase of one training step over ``chunks`` batch chunks (a batch of
    ``chunks`` times the compiled batch runs each step once per chunk); with ``tiles`` (per
    stage, the tiles one worker runs), that worker's steps, combine steps included."""
    workers = tiles is not None
    if tiles is not None:
        meta = _worker_view(meta, tiles)
    per_class = meta.tiles_per_class()
    classes = meta.classes
    kept = set(meta.kept) if policy.keep_activations else set()
    bake_forward = policy.bakes("forward")
    forward: list[Step] = []
    backward: list[Step] = []
    forward_graphs: list[str] = []
    before = {g.ready: g for g in meta.globals}  # stage index (or len(stages)) -> graph
    final = before.get(len(meta.stages))

    def global_forward(spec: GraphSpec) -> None:
        forward.append(Step(StepKind.GLOBAL_FORWARD, spec.forward, None, bake_forward, None,
                            spec.name))
        forward_graphs.append(spec.forward)

    for stage in meta.stages:
        if stage.index in before:
            global_forward(before[stage.index])
        for i in stage.run_order:
            cls = classes[meta.tiles[i].parts[stage.index].class_id]
            keeps = (stage.index, i) in kept
            graph = cls.kept_forward if keeps else cls.forward
            forward.append(Step(StepKind.TILE_FORWARD, graph, i, bake_forward, stage.index,
                                keeps=keeps))
            forward_graphs.append(graph)
        if workers:
            forward += [Step(StepKind.COMBINE, "", None, False, stage.index, name)
                        for name in (*stage.outputs, *stage.partials)]
    if final is not None:
        global_forward(final)
    if policy.release_sessions and bake_forward:
        # The baked forward sessions hold this step's weights, which the optimizer step after
        # the backward pass replaces: free them (and their weight copies) now.
        backward += [Step(StepKind.RELEASE, g, None, True) for g in dict.fromkeys(forward_graphs)]
    work = meta.weight_work
    if work.prepare:
        backward.append(Step(StepKind.PREPARE_WEIGHTS, work.prepare))
    if final is not None and final.gradients:
        backward += _global_backward(final, policy, chunks)
    for stage in reversed(meta.stages):
        if workers:
            read_later = {n for s in meta.stages[stage.index + 1:] for n in s.inputs}
            backward += [Step(StepKind.COMBINE_GRADIENT, "", None, False, stage.index, name)
                         for name in stage.outputs if name in read_later]
        backward += _stage_backward(meta, stage.index, per_class, policy, chunks, kept)
        spec = before.get(stage.index)
        if spec is not None and spec.gradients:
            if workers:
                side = {n for s in meta.stages for n in s.side_inputs}
                backward += [Step(StepKind.COMBINE_GRADIENT, "", None, False, None, name)
                             for name in spec.outputs if name in side]
            backward += _global_backward(spec, policy, chunks)
    if work.layout:
        backward.append(Step(StepKind.GRADIENT_LAYOUT, work.layout))
    if workers:
        backward.append(Step(StepKind.COMBINE_WEIGHT_GRADIENTS, ""))
    head = meta.head
    head_backward = []
    if head.gradients:
        head_backward.append(Step(StepKind.HEAD_BACKWARD, head.backward, None,
                                  policy.bakes("backward", runs=chunks)))
    return {
        "prefix_forward": forward,
        "head_forward": [Step(StepKind.HEAD_FORWARD, head.forward, None, bake_forward)],
        "head_backward": head_backward,
        "prefix_backward": backward,
    }


def _global_backward(spec: GraphSpec, policy: RuntimePolicy, chunks: int) -> list[Step]:
    baked = policy.bakes("backward", runs=chunks)
    steps = [Step(StepKind.GLOBAL_BACKWARD, spec.backward, None, baked, None, spec.name)]
    if baked and policy.release_sessions:
        steps.append(Step(StepKind.RELEASE, spec.backward, None, True))
    return steps


def _stage_backward(meta: ProgramMeta, stage: int, per_class: dict[int, int],
                    policy: RuntimePolicy, chunks: int, kept: Collection[tuple[int, int]]
                    ) -> list[Step]:
    order = meta.stages[stage].run_order
    if meta.halo == "reuse":  # a tile's strips get their gradients from the tiles after it
        order = tuple(reversed(order))
    classes = meta.classes
    steps: list[Step] = []
    last = {meta.tiles[i].parts[stage].class_id: k for k, i in enumerate(order)
            if (stage, i) not in kept}
    for k, i in enumerate(order):
        cls = classes[meta.tiles[i].parts[stage].class_id]
        if not cls.gradients:
            continue
        if (stage, i) in kept:
            baked = policy.bakes("backward", runs=chunks)
            steps.append(Step(StepKind.TILE_BACKWARD, cls.kept_backward, i, baked, stage,
                              keeps=True))
            if baked and policy.release_sessions:
                steps.append(Step(StepKind.RELEASE, cls.kept_backward, None, True))
            continue
        baked = policy.bakes("backward", runs=per_class[cls.id] * chunks)
        steps.append(Step(StepKind.TILE_BACKWARD, cls.backward, i, baked, stage))
        if baked and policy.release_sessions and last[cls.id] == k:
            steps.append(Step(StepKind.RELEASE, cls.backward, None, True))
    return steps


def _worker_view(meta: ProgramMeta, tiles: Sequence[Collection[int]]) -> ProgramMeta:
    """``meta`` with each stage's run order (and each tile's parts) cut down to ``tiles``."""
    if len(tiles) != len(meta.stages):
        raise ValueError(f"a tile subset per stage is needed: {len(meta.stages)} stages, "
                         f"{len(tiles)} subsets given")
    mine = [set(t) for t in tiles]
    stages = [replace(s, run_order=tuple(i for i in s.run_order if i in mine[s.index]))
              for s in meta.stages]
    parts = [replace(t, parts=tuple(p if i in mine[k] else None for k, p in enumerate(t.parts)))
             for i, t in enumerate(meta.tiles)]
    return replace(meta, stages=stages, tiles=parts)


def buffer_access(meta: ProgramMeta, step: Step) -> tuple[list[str], list[str], bool]:
    """(buffers read, buffers written, whether the writes are whole graph outputs) of a step;
    gradient buffers are named ``<buffer>:grad`` (the image's crops count as reads of the
    image's name, which is not a buffer)."""
    kind = step.kind
    if kind in (StepKind.RELEASE, StepKind.COMBINE_WEIGHT_GRADIENTS, *WEIGHT_WORK_KINDS):
        return [], [], False
    if kind is StepKind.COMBINE:  # a worker that wrote no part of it creates it here
        return [], [step.name], False
    if kind is StepKind.COMBINE_GRADIENT:
        return [], [f"{step.name}:grad"], False
    if step.tile is not None:
        part = meta.tiles[step.tile].parts[step.stage]
        cls = meta.classes[part.class_id]
        inputs = list(cls.inputs) + list(cls.side_inputs) + [part.bands[n][0] for n in cls.strips]
        handed_on = [part.bands[n][0] for n in cls.emits]
        if kind is StepKind.TILE_FORWARD:
            return inputs, list(cls.outputs) + list(cls.partials) + handed_on, False
        grads_in = [f"{n}:grad" for n in list(cls.outputs) + list(cls.partials) + handed_on]
        grads_out = [f"{n}:grad" for n in inputs]
        return inputs + grads_in, grads_out, False
    spec = meta.head if step.name is None else next(g for g in meta.globals
                                                    if g.name == step.name)
    if kind in (StepKind.HEAD_FORWARD, StepKind.GLOBAL_FORWARD):
        return list(spec.inputs), list(spec.outputs), True
    grads_in = [f"{n}:grad" for n in spec.outputs]
    return list(spec.inputs) + grads_in, [f"{n}:grad" for n in spec.inputs], True


def last_uses(meta: ProgramMeta, steps: Sequence[Step]) -> dict[str, int]:
    """The position in ``steps`` of the last step that reads or writes each buffer (gradient
    buffers: ``<buffer>:grad``): after it, the buffer can be freed."""
    last: dict[str, int] = {}
    for position, step in enumerate(steps):
        reads, writes, _whole = buffer_access(meta, step)
        for name in (*reads, *writes):
            last[name] = position
    return last
