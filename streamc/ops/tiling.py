"""How each kind of local op runs on a tile: its layout, the positions it computes, its rewrite.

Every locality rule (:mod:`streamc.ops.locality`) names one :class:`TileRule` for its node. The
tile-graph pass asks that rule three things, without knowing which op it is:

- :meth:`TileRule.layout`: given the full-image output region a tile needs and the input region
  it reads, the padding (and output padding or output slice) that make the op, run on that
  input, produce exactly that output;
- :meth:`TileRule.computes`: from the tile-local numbers alone, which full-image positions the
  op computes along one axis and which of them are exact (the layout check, see
  docs/architecture.md);
- :meth:`TileRule.rewrite`: the node's copy in the tile graph, with that padding written in.

Rules are stateless singletons: :data:`POINTWISE`, :data:`WINDOW`, :data:`PAD`, :data:`RESIZE`,
:data:`TRANSPOSED`, :data:`RESHAPE`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import onnx

from streamc.errors import CompileError
from streamc.ops.attrs import set_attribute
from streamc.ops.geometry import AxisMap, Interval, Transposed, Upsample, Window

Local = tuple[tuple[int, int], ...]  # half-open tile-local intervals, one per spatial axis


@dataclass(frozen=True)
class AxisState:
    """One axis of a tensor on a tile: full-image position of local index 0, local size, and
    the full-image positions whose values are exact."""

    origin: int
    size: int
    valid: Interval


@dataclass(frozen=True)
class Placement:
    """What :meth:`TileRule.layout` decides for one node on one tile (tile-local numbers)."""

    pads: tuple[tuple[int, int], ...] | None = None
    output_padding: tuple[int, ...] | None = None
    output_slice: Local | None = None
    #: the tile-local size of the output region, per spatial axis
    sizes: tuple[int, ...] | None = None


class Emitter(Protocol):
    """What a rewrite may add to the tile graph: int64 constants and fresh initializers."""

    def ints(self, values: Sequence[int]) -> str: ...

    def initializer(self, base: str, array: np.ndarray) -> str: ...


def _intersect(a: Interval, b: Interval) -> Interval:
    return (max(a[0], b[0]), min(a[1], b[1]))


class TileRule:
    """The pointwise behaviour; subclasses override what differs (see the module docstring)."""

    name = "pointwise"

    def layout(self, axes: Sequence[AxisMap], out_box: Sequence[Interval],
               need: Sequence[Interval]) -> Placement:
        return Placement()

    def computes(self, axis: AxisMap, state: AxisState, extent: int, placement: Placement,
                 index: int) -> AxisState:
        """Positions of the output along axis ``index`` computed from ``state`` of the first
        grid input (``extent``: that input's full-image size), before any output slice."""
        pads = placement.pads[index] if placement.pads is not None else (0, 0)
        return _window_computes(axis, state, pads, extent)

    def rewrite(self, node: onnx.NodeProto, axes: Sequence[AxisMap], placement: Placement,
                attrs: dict, opset: int, emit: Emitter) -> None:
        """Write ``placement`` into ``node`` (the node's copy in the tile graph)."""

    def __repr__(self) -> str:
        return f"<tile rule {self.name}>"


def _window_computes(ax: Window, state: AxisState, pads: tuple[int, int], extent: int
                     ) -> AxisState:
    p_b, p_e = pads
    count = (state.size + p_b + p_e - ax.span) // ax.stride + 1
    first = state.origin - p_b + ax.pad_begin
    if first % ax.stride:
        raise CompileError(
            f"tile origin {state.origin} is not aligned with a stride-{ax.stride} window; the "
            "tile grid must lie on the network's alignment lattice."
        )
    j0 = first // ax.stride
    lo, hi = j0, j0 + count
    v = state.valid
    if v[0] > 0:
        lo = max(lo, -((-(v[0] + ax.pad_begin)) // ax.stride))
    if v[1] < extent:
        hi = min(hi, (v[1] - ax.span + ax.pad_begin) // ax.stride + 1)
    return AxisState(j0, count, _intersect((lo, max(lo, hi)), (j0, j0 + count)))


class WindowRule(TileRule):
    """Conv and pooling: new ``pads``; genuine padding only at the true image border."""

    name = "window"

    def layout(self, axes, out_box, need):
        return Placement(pads=tuple(ax.tile_pads(iv, nv)
                                    for ax, iv, nv in zip(axes, out_box, need)))

    def rewrite(self, node, axes, placement, attrs, opset, emit):
        set_attribute(node, "auto_pad", None)
        ends = [p for _, p in placement.pads]
        if any(getattr(ax, "ceil_mode", False) for ax in axes):
            # A ceil_mode overhang (the last window reaching past the end padding, by less
            # than a stride) stays ceil_mode's: written as padding it can reach the kernel
            # size, which ONNX Runtime refuses. The tile's exact pads keep their output
            # count under ceil_mode, since their padded length is a whole number of strides.
            ends = [min(p, ax.pad_end) for p, ax in zip(ends, axes)]
        set_attribute(node, "pads", [p for p, _ in placement.pads] + ends)


class PadRule(WindowRule):
    """Constant Pad: new pads (an input from opset 11, an attribute before)."""

    name = "pad"

    def rewrite(self, node, axes, placement, attrs, opset, emit):
        pads = list(attrs["pads"])
        rank = len(pads) // 2
        for axis, (p_b, p_e) in enumerate(placement.pads):
            pads[2 + axis], pads[2 + axis + rank] = p_b, p_e
        if opset < 11:
            set_attribute(node, "pads", pads)
        else:
            del node.input[3:]
            node.input[1] = emit.ints(pads)


class ResizeRule(TileRule):
    """Nearest upsampling: computed on the input region, then sliced to the output region."""

    name = "resize"

    def layout(self, axes, out_box, need):
        produced = tuple(ax.produces(nv) if isinstance(ax, Upsample) else nv
                         for ax, nv in zip(axes, need))
        return Placement(output_slice=local_box(out_box, produced))

    def computes(self, axis, state, extent, placement, index):
        f = axis.factor if isinstance(axis, Upsample) else 1
        v = state.valid
        return AxisState(state.origin * f, state.size * f, (v[0] * f, v[1] * f))

    def rewrite(self, node, axes, placement, attrs, opset, emit):
        if opset >= 11 and len(node.input) > 3 and node.input[3]:
            # Sizes are full-image sizes: switch to the (integer) scales instead.
            scales = [1.0, 1.0] + [float(getattr(ax, "factor", 1)) for ax in axes]
            node.input[2] = emit.initializer("scales", np.array(scales, dtype=np.float32))
            del node.input[3:]


class TransposedRule(TileRule):
    """ConvTranspose: new ``pads`` and ``output_padding`` that yield exactly the output region."""

    name = "transposed"

    def layout(self, axes, out_box, need):
        pads, extra = [], []
        for ax, iv, nv in zip(axes, out_box, need):
            p_begin, p_end, more = _transposed_pads(ax, iv, nv)
            pads.append((p_begin, p_end))
            extra.append(more)
        return Placement(pads=tuple(pads), output_padding=tuple(extra))

    def computes(self, axis, state, extent, placement, index):
        o, n, v = state.origin, state.size, state.valid
        p_b, p_e = placement.pads[index]
        j0 = o * axis.stride - axis.pad_begin + p_b
        count = axis.stride * (n - 1) + placement.output_padding[index] + axis.span - p_b - p_e
        lo = j0 if v[0] == 0 else max(j0, (v[0] - 1) * axis.stride - axis.pad_begin + axis.span)
        hi = j0 + count if v[1] == extent else min(j0 + count,
                                                   v[1] * axis.stride - axis.pad_begin)
        return AxisState(j0, count, _intersect((lo, max(lo, hi)), (j0, j0 + count)))

    def rewrite(self, node, axes, placement, attrs, opset, emit):
        set_attribute(node, "auto_pad", None)
        set_attribute(node, "pads",
                      [p for p, _ in placement.pads] + [p for _, p in placement.pads])
        set_attribute(node, "output_padding", list(placement.output_padding))


class ReshapeRule(TileRule):
    """Reshape of channel axes only: its shape constant gets the tile's spatial sizes."""

    name = "reshape"

    def layout(self, axes, out_box, need):
        return Placement(sizes=tuple(b - a for a, b in out_box))

    def rewrite(self, node, axes, placement, attrs, opset, emit):
        shape = list(attrs["shape"])
        for position, size in zip(attrs["layout"], placement.sizes):
            shape[position] = size
        node.input[1] = emit.ints(shape)


def _transposed_pads(ax: Transposed, out: Interval, available: Interval) -> tuple[int, int, int]:
    """Pads and output_padding for a ConvTranspose on ``available`` to yield exactly ``out``."""
    start, stop = ax.produces(available)
    p_begin = out[0] - start
    p_end = stop - out[1]
    extra = 0
    if p_end < 0:
        extra, p_end = -p_end, 0
    if p_begin < 0:
        raise CompileError("internal error: a transposed convolution tile starts too late.")
    return p_begin, p_end, extra


def local_box(box: Sequence[Interval], within: Sequence[Interval]) -> Local | None:
    """``box`` in coordinates local to ``within``; None when they are equal."""
    if tuple(box) == tuple(within):
        return None
    return tuple((a - w0, b - w0) for (a, b), (w0, _w1) in zip(box, within))


POINTWISE = TileRule()
WINDOW = WindowRule()
PAD = PadRule()
RESIZE = ResizeRule()
TRANSPOSED = TransposedRule()
RESHAPE = ReshapeRule()

__all__ = ["PAD", "POINTWISE", "RESHAPE", "RESIZE", "TRANSPOSED", "WINDOW", "AxisState",
           "Emitter",
           "Local", "Placement", "TileRule", "local_box"]
