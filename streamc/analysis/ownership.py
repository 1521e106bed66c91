"""Owned regions: how the tiles partition every grid tensor so that each position is computed
once (halo reuse, docs/architecture.md).

Along each spatial axis the image is cut at boundaries ``b_0 = 0 < b_1 < … < b_n = size``. Every
grid tensor ``u`` gets boundaries of its own, by the **skew rule**: tile ``j`` owns the positions
of a node's output whose windows read only input positions owned by tile ``j`` or by tiles
before it along the axis, so an interior boundary of the output is the largest ``o`` such that
the window of output ``o − 1`` ends at or before the input's boundary (over every grid input:
the smallest). The last tile owns the rest. Owned intervals partition each tensor, and a tile
never reads a position a later tile owns: what it reads before its own start (its *halo*) was
computed by earlier tiles, which hand it over in *strips*.

Axes are independent: a tile's owned box is the product of its owned interval along each axis,
and so is what it reads. :class:`AxisOwnership` is one axis; :class:`Ownership` all of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from streamc.analysis.regions import Box, _steps
from streamc.analysis.split import Split
from streamc.graph import Graph
from streamc.ops.geometry import Interval


@dataclass(frozen=True)
class AxisOwnership:
    """One spatial axis: per grid tensor its boundaries (one more than the tiles along the
    axis), and per (tensor, stage) the interval the stage's nodes read of it on each tile
    index (``None``: nothing)."""

    boundaries: dict[str, tuple[int, ...]]
    reads: dict[tuple[str, int], tuple[Interval | None, ...]]

    def owned(self, tensor: str, j: int) -> Interval:
        b = self.boundaries[tensor]
        return (b[j], b[j + 1])


def _reading_range(axis_map, extent_in: int, extent_out: int) -> tuple[int, int]:
    """The first and the last output that read an input position (those before and after
    them read only padding)."""
    lo, hi = 0, extent_out - 1
    while lo < hi:  # the first whose window ends inside the input
        mid = (lo + hi) // 2
        if axis_map.reads((mid, mid + 1))[1] > 0:
            hi = mid
        else:
            lo = mid + 1
    first = lo
    lo, hi = first, extent_out - 1
    while lo < hi:  # the last whose window starts inside the input
        mid = (lo + hi + 1) // 2
        if axis_map.reads((mid, mid + 1))[0] < extent_in:
            lo = mid
        else:
            hi = mid - 1
    return first, lo


def _owned_end(axis_map, boundary: int, extent_in: int, extent_out: int,
               reading: tuple[int, int]) -> int:
    """The largest ``o`` such that outputs ``[0, o)`` read no input position at or after
    ``boundary`` (the input's extent clips what padding reads).

    An op cannot run on an empty input, so outputs that read only padding go with the
    nearest output that reads the input (``reading``: the first and the last that do, from
    :func:`_reading_range`): no boundary falls inside the outputs before the first (they go
    with it) or after the last (they go with it)."""
    first, last = reading
    lo, hi = 0, extent_out
    while lo < hi:
        mid = (lo + hi + 1) // 2
        end = min(axis_map.reads((mid - 1, mid))[1], extent_in)
        if end <= boundary:
            lo = mid
        else:
            hi = mid - 1
    if lo <= first:
        return 0
    if lo > last:
        return extent_out
    return lo


def axis_ownership(graph: Graph, split: Split, axis: int, bounds: Sequence[int],
                   targets: Sequence[Sequence[str]]) -> AxisOwnership:
    """The owned boundaries of every grid tensor along ``axis`` for image boundaries
    ``bounds``, and what each stage reads on each tile index. ``targets[k]``: the tensors stage
    ``k`` keeps or reduces (only what they depend on is read)."""
    n = len(bounds) - 1
    steps = list(reversed(_steps(graph, split)))  # topological order
    boundaries: dict[str, tuple[int, ...]] = {split.input_name: tuple(bounds)}
    image_extent = bounds[-1]

    def start(tensor: str, extent: int, stage: int) -> tuple[int, ...]:
        # A tensor of an earlier stage is a whole buffer: a later stage may read any of it, so
        # its nodes start from boundaries at the image's, scaled, not from the skew the
        # earlier stage's layers accumulated (which would grow the last tile stage by stage).
        if split.phase.get(tensor, stage) < stage and tensor != split.input_name:
            return tuple(min(extent, round(b * extent / image_extent)) for b in bounds)
        return boundaries[tensor]

    for step in steps:
        if step.out_extent is None or not step.inputs:
            continue
        extent_out = step.out_extent[axis]
        ax = step.op.axes[axis]
        reading = [_reading_range(ax, extent[axis], extent_out) for _, extent in step.inputs]
        starts = [start(tensor, extent[axis], step.stage) for tensor, extent in step.inputs]
        inner = []
        for i in range(1, n):
            inner.append(min(_owned_end(ax, b[i], extent[axis], extent_out, r)
                             for (_, extent), b, r in zip(step.inputs, starts, reading)))
        result = (0, *inner, extent_out)
        for out in step.outputs:
            boundaries[out] = result
    needed: set[str] = {t for stage in targets for t in stage}
    reads: dict[tuple[str, int], list[Interval | None]] = {}
    for step in reversed(steps):
        if not any(o in needed for o in step.outputs):
            continue
        b = boundaries[step.outputs[0]]
        ax = step.op.axes[axis]
        for tensor, extent in step.inputs:
            needed.add(tensor)
            row = reads.setdefault((tensor, step.stage), [None] * n)
            for j in range(n):
                if b[j + 1] <= b[j]:
                    continue
                a, c = ax.reads((b[j], b[j + 1]))
                a, c = max(a, 0), min(c, extent[axis])
                if c <= a:
                    continue
                old = row[j]
                row[j] = (a, c) if old is None else (min(old[0], a), max(old[1], c))
    return AxisOwnership(boundaries, {k: tuple(v) for k, v in reads.items()})


@dataclass(frozen=True)
class Ownership:
    """Every axis's :class:`AxisOwnership`, and the strips between tiles that follow from it.

    A tensor computed in stage ``k`` and read by that stage's nodes before a tile's own start
    needs a *band* per axis and interior boundary ``i``: the positions ``[lo, b_i)`` along the
    axis (``lo``: the least position tiles at index ``i`` read), every position along the
    other axes. Tiles before index ``i`` write what they own of it; tiles at index ``i`` read
    their strips from it."""

    axes: tuple[AxisOwnership, ...]
    phase: dict[str, int]

    def owned(self, tensor: str, index: Sequence[int]) -> Box:
        return tuple(ax.owned(tensor, j) for ax, j in zip(self.axes, index))

    def read(self, tensor: str, stage: int, index: Sequence[int]) -> Box | None:
        """What stage ``stage``'s nodes read of ``tensor`` on tile ``index`` (None: nothing)."""
        box = []
        for ax, j in zip(self.axes, index):
            row = ax.reads.get((tensor, stage))
            if row is None or row[j] is None:
                return None
            box.append(row[j])
        return tuple(box)

    def available(self, tensor: str, index: Sequence[int]) -> Box:
        """What a tile holds of a tensor its stage computes: its owned box, extended back to
        the first position the stage reads (the strips before it)."""
        stage = self.phase[tensor]
        box = []
        for ax, j in zip(self.axes, index):
            a, b = ax.owned(tensor, j)
            row = ax.reads.get((tensor, stage))
            if row is not None and row[j] is not None:
                a = min(a, row[j][0])
            box.append((a, b))
        return tuple(box)

    def band(self, tensor: str, axis: int, i: int) -> Interval | None:
        """Along ``axis``, the positions of band ``i`` (strips read at tile index ``i``)."""
        ax = self.axes[axis]
        b = ax.boundaries[tensor][i]
        row = ax.reads.get((tensor, self.phase[tensor]))
        if i == 0 or row is None or row[i] is None or row[i][0] >= b:
            return None
        return (row[i][0], b)
