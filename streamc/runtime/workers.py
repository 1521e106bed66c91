"""What the interpreter needs of a tile-parallel run: :class:`Workers`.

One image's tiles are split among several workers (processes); each runs its own tiles'
steps and meets the others at the program's combine steps (:mod:`streamc.steps`). This module
holds the interface only, free of any communication library;
:class:`streamc.runtime.distributed.TileGroup` implements it on ``torch.distributed``.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from typing import Any, Literal, Protocol

Reduce = Literal["sum", "max", "min"]


class Workers(Protocol):
    """One worker's view of a tile-parallel run.

    ``tiles``: per stage, the indices of the tiles this worker runs. ``root``: whether this
    worker adds what every worker computes alike (the global graphs' and the head's shares of
    gradients that are combined later); exactly one worker of a run is the root.
    """

    tiles: Sequence[Collection[int]]
    root: bool

    def combine(self, tensor: Any, op: Reduce, what: str) -> Any:
        """``tensor`` reduced elementwise with ``op`` over the workers (every worker gets the
        result, possibly in a new tensor, which it returns); ``what`` names it in errors."""

    def combine_all(self, tensors: Sequence[Any], what: str) -> list[Any]:
        """Each of ``tensors`` summed over the workers (the same names in the same order on
        every worker)."""

    def check_input(self, image: Any) -> None:
        """Raise unless every worker was given the same image (compared by a sample of it)."""


def reduce_op(identity: float) -> Reduce:
    """How the workers' copies of a buffer combine, from the value its unwritten parts hold:
    zeros add up (disjoint kept regions, sums' partials), -inf and +inf are the identities
    of max and min (the partials of ReduceMax and ReduceMin)."""
    if identity == 0.0:
        return "sum"
    if math.isinf(identity):
        return "max" if identity < 0 else "min"
    raise ValueError(f"no reduction has identity {identity}")


__all__ = ["Reduce", "Workers", "reduce_op"]
