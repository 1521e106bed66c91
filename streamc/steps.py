"""The steps of a compiled program: what the runtime runs, and the memory planner walks, in the
one order both follow.

A training step is four phases (:data:`PHASES`): the prefix forward (one step per tile, writing
its kept regions into the full cut tensors), the head forward, the head backward (which yields
the gradients of the cut tensors), the prefix backward (one step per tile, adding its weight
gradients up). A :data:`StepKind.RELEASE` step frees a baked session once its pass is over.
Tiles run in the program's ``run_order``; whether a step's session has its weights baked in
follows the :class:`~streamc.policy.RuntimePolicy`.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from streamc.meta import ProgramMeta
from streamc.policy import RuntimePolicy


class StepKind(str, Enum):
    TILE_FORWARD = "tile forward"
    HEAD_FORWARD = "head forward"
    HEAD_BACKWARD = "head backward"
    TILE_BACKWARD = "tile backward"
    RELEASE = "release"


PHASES = ("prefix_forward", "head_forward", "head_backward", "prefix_backward")


@dataclass(frozen=True)
class Step:
    """One step: its kind, the graph it runs (or releases), the tile (for tile steps) and
    whether the graph's session has the weights baked in."""

    kind: StepKind
    graph: str
    tile: int | None = None
    baked: bool = False

    @property
    def role(self) -> str:
        return "backward" if self.kind in (StepKind.TILE_BACKWARD,
                                           StepKind.HEAD_BACKWARD) else "forward"


def phase_label(meta: ProgramMeta, step: Step) -> str:
    """How memory plans name the phase a step belongs to: ``"tile class 3 forward"``,
    ``"head backward"``..."""
    if step.tile is None:
        return step.kind.value
    return f"tile class {meta.tiles[step.tile].class_id} {step.role}"


def program_steps(meta: ProgramMeta, policy: RuntimePolicy, chunks: int = 1
                  ) -> dict[str, list[Step]]:
    """The steps of each phase of one training step over ``chunks`` batch chunks (a batch of
    ``chunks`` times the compiled batch runs each tile step once per chunk)."""
    per_class = meta.tiles_per_class()
    classes = meta.classes
    bake_forward = policy.bakes("forward")
    forward = [Step(StepKind.TILE_FORWARD, classes[meta.tiles[i].class_id].forward, i,
                    bake_forward) for i in meta.run_order]
    head = meta.head
    head_backward = []
    if head.gradients:
        head_backward.append(Step(StepKind.HEAD_BACKWARD, head.backward, None,
                                  policy.bakes("backward", runs=chunks)))
    backward: list[Step] = []
    if policy.release_sessions and bake_forward:
        # The baked forward sessions hold this step's weights, which the optimizer step after
        # the backward pass replaces: free them (and their weight copies) now.
        backward += [Step(StepKind.RELEASE, cls.forward, None, True) for cls in classes]
    last = {meta.tiles[i].class_id: k for k, i in enumerate(meta.run_order)}
    for k, i in enumerate(meta.run_order):
        cls = classes[meta.tiles[i].class_id]
        if not cls.gradients:
            continue
        baked = policy.bakes("backward", runs=per_class[cls.id] * chunks)
        backward.append(Step(StepKind.TILE_BACKWARD, cls.backward, i, baked))
        if baked and policy.release_sessions and last[cls.id] == k:
            backward.append(Step(StepKind.RELEASE, cls.backward, None, True))
    return {
        "prefix_forward": forward,
        "head_forward": [Step(StepKind.HEAD_FORWARD, head.forward, None, bake_forward)],
        "head_backward": head_backward,
        "prefix_backward": backward,
    }
