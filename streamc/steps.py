"""The steps of a compiled program: what the runtime runs, and the memory planner walks, in the
one order both follow.

A training step is four phases (:data:`PHASES`), the boundaries autograd sees:

- ``prefix_forward``: stage 0's tiles (each writes its kept regions into whole buffers and its
  partials into one row of each partials buffer), then the global graph that combines them, then
  stage 1's tiles, ... up to the last stage;
- ``head_forward``: the head on whole buffers;
- ``head_backward``: the head's backward graph (gradients of the buffers it reads);
- ``prefix_backward``: the same units in reverse: the last stage's tile backward graphs, the
  global graph before it backward, ... stage 0's.

A :data:`StepKind.RELEASE` step frees a baked session once its pass is over. Tiles of a stage run
in the stage's ``run_order``; whether a step's session has its weights baked in follows the
:class:`~streamc.policy.RuntimePolicy`.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from streamc.meta import ProgramMeta
from streamc.policy import RuntimePolicy


class StepKind(str, Enum):
    TILE_FORWARD = "tile forward"
    GLOBAL_FORWARD = "global forward"
    HEAD_FORWARD = "head forward"
    HEAD_BACKWARD = "head backward"
    GLOBAL_BACKWARD = "global backward"
    TILE_BACKWARD = "tile backward"
    RELEASE = "release"


PHASES = ("prefix_forward", "head_forward", "head_backward", "prefix_backward")
_BACKWARD = (StepKind.TILE_BACKWARD, StepKind.GLOBAL_BACKWARD, StepKind.HEAD_BACKWARD)


@dataclass(frozen=True)
class Step:
    """One step: its kind, the graph it runs (or releases), the tile and stage (tile steps),
    the global graph's name (global steps), and whether the graph's session has the weights
    baked in."""

    kind: StepKind
    graph: str
    tile: int | None = None
    baked: bool = False
    stage: int | None = None
    name: str | None = None

    @property
    def role(self) -> str:
        return "backward" if self.kind in _BACKWARD else "forward"


def phase_label(meta: ProgramMeta, step: Step) -> str:
    """How memory plans name the phase a step belongs to: ``"tile class 3 forward"``,
    ``"global1 backward"``, ``"head backward"``..."""
    if step.tile is not None:
        return f"tile class {meta.tiles[step.tile].parts[step.stage].class_id} {step.role}"
    if step.name is not None:
        return f"{step.name} {step.role}"
    return step.kind.value


def program_steps(meta: ProgramMeta, policy: RuntimePolicy, chunks: int = 1
                  ) -> dict[str, list[Step]]:
    """The steps of each phase of one training step over ``chunks`` batch chunks (a batch of
    ``chunks`` times the compiled batch runs each step once per chunk)."""
    per_class = meta.tiles_per_class()
    classes = meta.classes
    bake_forward = policy.bakes("forward")
    forward: list[Step] = []
    backward: list[Step] = []
    forward_graphs: list[str] = []
    for stage in meta.stages:
        if stage.index > 0:
            spec = meta.globals[stage.index - 1]
            forward.append(Step(StepKind.GLOBAL_FORWARD, spec.forward, None, bake_forward,
                                None, spec.name))
            forward_graphs.append(spec.forward)
        for i in stage.run_order:
            cls = classes[meta.tiles[i].parts[stage.index].class_id]
            forward.append(Step(StepKind.TILE_FORWARD, cls.forward, i, bake_forward,
                                stage.index))
            forward_graphs.append(cls.forward)
    if policy.release_sessions and bake_forward:
        # The baked forward sessions hold this step's weights, which the optimizer step after
        # the backward pass replaces: free them (and their weight copies) now.
        backward += [Step(StepKind.RELEASE, g, None, True) for g in dict.fromkeys(forward_graphs)]
    for stage in reversed(meta.stages):
        backward += _stage_backward(meta, stage.index, per_class, policy, chunks)
        if stage.index > 0 and meta.globals[stage.index - 1].gradients:
            spec = meta.globals[stage.index - 1]
            baked = policy.bakes("backward", runs=chunks)
            backward.append(Step(StepKind.GLOBAL_BACKWARD, spec.backward, None, baked, None,
                                 spec.name))
            if baked and policy.release_sessions:
                backward.append(Step(StepKind.RELEASE, spec.backward, None, True))
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


def _stage_backward(meta: ProgramMeta, stage: int, per_class: dict[int, int],
                    policy: RuntimePolicy, chunks: int) -> list[Step]:
    order = meta.stages[stage].run_order
    classes = meta.classes
    steps: list[Step] = []
    last = {meta.tiles[i].parts[stage].class_id: k for k, i in enumerate(order)}
    for k, i in enumerate(order):
        cls = classes[meta.tiles[i].parts[stage].class_id]
        if not cls.gradients:
            continue
        baked = policy.bakes("backward", runs=per_class[cls.id] * chunks)
        steps.append(Step(StepKind.TILE_BACKWARD, cls.backward, i, baked, stage))
        if baked and policy.release_sessions and last[cls.id] == k:
            steps.append(Step(StepKind.RELEASE, cls.backward, None, True))
    return steps
