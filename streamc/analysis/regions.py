"""Region transfer over the prefix DAG, receptive fields, strides and alignment.

A *box* is one half-open interval per spatial axis, in a tensor's own full-image coordinates.
:func:`needed_regions` walks the prefix in reverse topological order and gives every tensor the
bounding box of the regions its consumers read (docs/architecture.md). Receptive fields, offsets and
strides are derived from the same rules, so the numbers that ``streamc inspect`` reports are the
ones the compiler uses.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction

from streamc.analysis.split import Split
from streamc.graph import Graph
from streamc.ops.geometry import Interval

Box = tuple[Interval, ...]


def is_empty(box: Box | None) -> bool:
    return box is None or any(b <= a for a, b in box)


def union(a: Box | None, b: Box | None) -> Box | None:
    """Bounding box of two boxes (an empty one is ignored)."""
    if is_empty(a):
        return None if is_empty(b) else b
    if is_empty(b):
        return a
    return tuple((min(x[0], y[0]), max(x[1], y[1])) for x, y in zip(a, b))


def clip(box: Box, extent: Sequence[int]) -> Box:
    return tuple((max(a, 0), min(b, n)) for (a, b), n in zip(box, extent))


def contains(outer: Box, inner: Box) -> bool:
    return is_empty(inner) or all(
        o[0] <= i[0] and i[1] <= o[1] for o, i in zip(outer, inner)
    )


def box_size(box: Box) -> tuple[int, ...]:
    return tuple(max(0, b - a) for a, b in box)


def spatial_extent(graph: Graph, tensor: str, layout: Sequence[int] | None = None
                   ) -> tuple[int, ...] | None:
    """Sizes of the spatial axes (at ``layout``, channels-first by default) of a tensor."""
    shape = graph.shape(tensor)
    if shape is None:
        return None
    layout = layout or range(2, len(shape))
    if any(p >= len(shape) or shape[p] is None for p in layout):
        return None
    return tuple(shape[p] for p in layout)


def needed_regions(
    graph: Graph,
    split: Split,
    cut_boxes: Mapping[str, Box],
    clip_to_extent: bool = True,
    runnable: bool = False,
    stage: int | None = None,
) -> dict[str, Box]:
    """Regions every prefix tensor must hold so that the cut tensors hold ``cut_boxes``.

    Each tensor gets the union of what its consumers read; regions are clipped to the tensor's
    extent (what lies outside is padding that the op supplies itself) unless
    ``clip_to_extent`` is False (then the graph's sizes are not needed). Tensors that no cut
    region depends on are absent from the result.

    With ``runnable``, an op whose needed output region reads only its own padding (a Conv
    with padding wider than its kernel, near the border) gets its output region widened
    towards the interior until it reads at least one input position: an op cannot run on an
    empty input, and the extra positions are sliced away. The tiling passes use this; the
    exact dependency regions (``runnable=False``) are what receptive fields report.

    With ``stage``, only the nodes of that stage are walked: the regions of the grid tensors it
    reads from earlier stages are what a tile of the stage needs of them (its crops).
    """
    needed: dict[str, Box] = {t: b for t, b in cut_boxes.items() if not is_empty(b)}
    for step in _steps(graph, split):
        if stage is not None and step.stage != stage:
            continue
        out_box = None
        for out in step.outputs:
            box = needed.get(out)
            if box is not None:
                out_box = box if out_box is None else union(out_box, box)
        if out_box is None:
            continue
        if runnable and clip_to_extent:
            out_box = _reading_something(step, out_box)
            for out in step.outputs:
                needed[out] = out_box
        reads = tuple(axis.reads(iv) for axis, iv in zip(step.op.axes, out_box))
        for tensor, extent in step.inputs:
            box = reads
            if clip_to_extent:
                if extent is None:
                    raise ValueError(f"tensor {tensor!r} has no static spatial size")
                box = clip(box, extent)
            if not is_empty(box):
                needed[tensor] = union(needed.get(tensor), box)
    return needed


@dataclass(frozen=True)
class _Step:
    """One prefix node as region transfer sees it (precomputed once per split)."""

    node: object
    op: object
    outputs: tuple[str, ...]
    inputs: tuple[tuple[str, tuple[int, ...] | None], ...]  # grid input, its spatial extent
    out_extent: tuple[int, ...] | None  # spatial extent of the first output
    stage: int = 0


def _steps(graph: Graph, split: Split) -> list[_Step]:
    """The prefix in reverse topological order, cached on ``split`` (region transfer is called
    hundreds of times per compilation)."""
    cached = split.__dict__.get("_region_steps")
    if cached is not None and cached[0] is graph:
        return cached[1]
    steps = []
    for name in reversed(split.prefix):
        node = graph.nodes[name]
        op = split.local_ops[name]
        inputs = tuple((node.input[slot], spatial_extent(graph, node.input[slot],
                                                          split.layout(node.input[slot])))
                       for slot in op.grid_inputs)
        out = node.output[0]
        steps.append(_Step(node, op, tuple(o for o in node.output if o), inputs,
                           spatial_extent(graph, out, split.layout(out)), split.phase[out]))
    split.__dict__["_region_steps"] = (graph, steps)
    return steps


def _reading_something(step: _Step, out_box: Box) -> Box:
    """``out_box`` widened, per axis, until it reads at least one position of every grid input."""
    out_extent = step.out_extent
    if out_extent is None:
        return out_box
    result = list(out_box)
    for _tensor, extent in step.inputs:
        if extent is None:
            continue
        for axis, (ax, n, m) in enumerate(zip(step.op.axes, extent, out_extent)):
            a, b = result[axis]
            lo, hi = ax.reads((a, b))
            if hi <= 0:  # everything read lies in the begin padding: grow towards the end
                while b < m and ax.reads((b, b + 1))[1] <= 0:
                    b += 1
                b = min(b + 1, m)
            elif lo >= n:  # everything read lies in the end padding: grow towards the start
                while a > 0 and ax.reads((a - 1, a))[0] >= n:
                    a -= 1
                a = max(a - 1, 0)
            result[axis] = (a, b)
    return tuple(result)


@dataclass
class Field:
    """Closed-form numbers for one prefix tensor, per spatial axis.

    Position ``j`` of the tensor reads input pixels inside ``[j·stride − offset, j·stride −
    offset + receptive_field)`` (before clipping to the image). When the tensor's field varies
    with the position's phase (a stride-2 layer followed by a ×2 upsampling: even and odd
    positions read windows shifted by one pixel; or a fractional stride), ``offset`` and
    ``receptive_field`` describe the smallest interval of that form that covers every phase,
    so the formula never understates what a position reads.
    """

    stride: tuple[Fraction, ...]
    receptive_field: tuple[int, ...]
    offset: tuple[int, ...]


def strides(graph: Graph, split: Split) -> dict[str, tuple[Fraction, ...]]:
    """Cumulative stride of every prefix tensor: input pixels per step of the tensor."""
    result: dict[str, tuple[Fraction, ...]] = {
        split.input_name: (Fraction(1),) * split.n_spatial
    }
    for name in split.prefix:
        node = graph.nodes[name]
        op = split.local_ops[name]
        source = result[node.input[op.grid_inputs[0]]] if op.grid_inputs else None
        if source is None:
            continue
        stride = tuple(s * axis.scale for s, axis in zip(source, op.axes))
        for out in node.output:
            if out:
                result[out] = stride
    return result


#: Most phases measured per tensor (the period is the lcm of stride ratios; it is 1 unless a
#: tensor is upsampled from a coarser grid).
MAX_PHASES = 64


def receptive_fields(graph: Graph, split: Split) -> dict[str, Field]:
    """Stride, receptive field and offset of every prefix tensor (unclipped region transfer)."""
    tensor_strides = strides(graph, split)
    fields: dict[str, Field] = {}
    n = split.n_spatial
    distinct = set(tensor_strides.values())
    periods: dict[tuple[Fraction, ...], int] = {}
    for tensor, stride in tensor_strides.items():
        # Positions j and j + period read the same window shifted by period·stride when
        # period·stride is a whole number of steps of every tensor upstream.
        period = periods.get(stride)
        if period is None:
            period = 1
            for other in distinct:
                for s, o in zip(stride, other):
                    period = math.lcm(period, (s / o).denominator)
            periods[stride] = period
        before: list[Fraction | None] = [None] * n  # max over phases of j·S − start
        after: list[Fraction | None] = [None] * n  # max over phases of stop − j·S
        for phase in range(min(period, MAX_PHASES)):
            box = ((phase, phase + 1),) * n
            regions = needed_regions(graph, split, {tensor: box}, clip_to_extent=False)
            image_box = regions.get(split.input_name, box)
            for axis, (a, b) in enumerate(image_box):
                centre = phase * stride[axis]
                lo, hi = centre - a, b - centre
                before[axis] = lo if before[axis] is None else max(before[axis], lo)
                after[axis] = hi if after[axis] is None else max(after[axis], hi)
        offset = tuple(math.ceil(v) for v in before)
        size = tuple(math.ceil(p + v) for p, v in zip(offset, after))
        fields[tensor] = Field(stride, size, offset)
    return fields


def alignment(
    tensor_strides: Mapping[str, tuple[Fraction, ...]], n_spatial: int
) -> tuple[int, ...]:
    """Per axis, the multiple every tile origin must be: lcm of stride numerators
    (docs/architecture.md)."""
    result = [1] * n_spatial
    for stride in tensor_strides.values():
        for axis, s in enumerate(stride):
            result[axis] = math.lcm(result[axis], s.numerator)
    return tuple(result)
