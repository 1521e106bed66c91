"""The runtime policy: how the runtime treats each graph of a program, in one place.

Which sessions get the weights baked in as initializers, which let ONNX Runtime fold constants,
at which optimisation level each graph runs, whether sessions are released after their pass,
and how CPU memory is allocated. :class:`~streamc.runtime.sessions.SessionPool` builds sessions
by it and the memory planner (:mod:`streamc.passes.memory.step`) plans by it, so the two cannot
drift; a stored plan names the policy it assumed.

Measured on ResNet-18 (docs/memory.md, docs/performance.md):

- a baked forward session is rebuilt after every optimizer step (0.2-0.3 s per shape class),
  and with halo reuse that costs more than baking saves: a whole step with fed forward
  sessions took 0.80x the baked one's time at 1024² tile 512, 0.90x at 2048² tile 256 and
  0.96x at 4096² tile 1024 (``benchmarks/results/weights_policy.json``); a fully optimised
  backward graph runs only 1.07-1.09x faster baked, for a 0.2-0.6 s rebuild, an unoptimised one
  not at all: ``weights="auto"`` feeds the weights of forward graphs, and bakes backward graphs
  only when they are optimised and run at least ``auto_min_runs`` times per step;
- ORT's basic-level rewrites of a backward graph (EliminateIdentity reorders the gradient
  branches) raised a tile backward run's peak from 1.6 to 2.4 GiB for the same time:
  ``backward_optimization="none"``;
- constant folding in a backward graph freezes tile-sized zero tensors into every session
  (94 MiB per backward session at tile 1024): ``fold_constants="forward"``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

from streamc.errors import StreamcError

WeightMode = Literal["auto", "initializers", "inputs"]
Level = Literal["all", "extended", "basic", "none"]
Role = Literal["forward", "backward"]

_WEIGHTS = ("auto", "initializers", "inputs")
_LEVELS = ("all", "extended", "basic", "none")
_FOLDS = ("forward", "all", "none")
_ALLOCATORS = ("arena", "system")


@dataclass(frozen=True)
class RuntimePolicy:
    """How the runtime runs a program's graphs (see the module docstring).

    ``weights``: ``"initializers"`` bakes every graph's weights into its session (rebuilt once
    per optimizer step), ``"inputs"`` feeds them on every run (sessions built once), ``"auto"``
    decides per graph. ``optimization`` / ``backward_optimization``: ORT graph optimisation
    level of forward and backward graphs. ``fold_constants``: which graphs ORT may fold
    constants in. ``release_sessions``: free baked sessions once their pass is over.
    ``allocator``: ``"arena"`` (ORT's shared CPU arena, fast, keeps what it took) or
    ``"system"`` (freed memory returns to the system: a step keeps to the memory plan).
    ``keep_activations``: the units the program marks (``ProgramMeta.kept``) keep their
    activations from forward to backward instead of recomputing them.
    """

    weights: WeightMode = "auto"
    auto_min_runs: int = 4
    optimization: Level = "all"
    backward_optimization: Level = "none"
    fold_constants: Literal["forward", "all", "none"] = "forward"
    release_sessions: bool = True
    allocator: Literal["arena", "system"] = "arena"
    keep_activations: bool = True

    def __post_init__(self) -> None:
        for name, value, allowed in (("weights", self.weights, _WEIGHTS),
                                     ("optimization", self.optimization, _LEVELS),
                                     ("backward_optimization", self.backward_optimization,
                                      _LEVELS),
                                     ("fold_constants", self.fold_constants, _FOLDS),
                                     ("allocator", self.allocator, _ALLOCATORS)):
            if value not in allowed:
                raise StreamcError(
                    f"{name}={value!r}: choose one of {', '.join(map(repr, allowed))}.")
        if isinstance(self.auto_min_runs, bool) or not isinstance(self.auto_min_runs, int) \
                or self.auto_min_runs < 1:
            raise StreamcError(f"auto_min_runs={self.auto_min_runs!r} must be a positive integer.")

    def bakes(self, role: Role, runs: int = 1) -> bool:
        """Whether a graph of ``role``, run ``runs`` times per step, gets baked weights."""
        if self.weights == "auto":
            return (role == "backward" and runs >= self.auto_min_runs
                    and self.backward_optimization != "none")
        return self.weights == "initializers"

    def folds_constants(self, role: Role) -> bool:
        """Whether ORT may fold constants in a graph of ``role``."""
        return self.fold_constants == "all" or (self.fold_constants == "forward"
                                                and role == "forward")

    def level(self, role: Role) -> Level:
        """ORT's graph optimisation level for a graph of ``role``."""
        return self.backward_optimization if role == "backward" else self.optimization

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RuntimePolicy:
        return cls(**data)


DEFAULT_POLICY = RuntimePolicy()
