"""Spatial geometry of ops: the one definition of windows, padding and nearest resizing.

Every spatially local op acts on each spatial axis independently, as one of three maps:

- :class:`Window` (Conv, pooling, pointwise ops, constant Pad): output ``j`` reads input
  ``[j·s − p_begin, j·s − p_begin + d·(k−1) + 1)``;
- :class:`Upsample` (nearest Resize by an integer factor ``f``): output ``j`` reads input ``⌊j/f⌋``;
- :class:`Transposed` (ConvTranspose): output ``j`` reads every input ``i`` with
  ``i·s − p_begin + t·d = j`` for some tap ``t``.

Intervals are half-open ``(start, stop)`` in the tensor's own full-image coordinates. ``reads``
does not clip: what falls outside the input's extent is the op's own padding.

:func:`node_windows` reads a Conv or pooling node's attributes into one :class:`Window` per axis
(``auto_pad`` resolved by :func:`same_pads`); :class:`NodeWindow` adds the input and output sizes
that the VJP rules need; :func:`resize_matrix` is the 1-D map of a nearest or linear Resize,
from which the locality rule decides whether a Resize is an integer upsampling.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import onnx

from streamc.ops.attrs import attributes

Interval = tuple[int, int]


def _ceil_div(a: int, b: int) -> int:
    return -((-a) // b)


@dataclass(frozen=True)
class Window:
    """A sliding window: kernel ``k``, stride ``s``, dilation ``d``, padding at both ends."""

    kernel: int = 1
    stride: int = 1
    dilation: int = 1
    pad_begin: int = 0
    pad_end: int = 0
    ceil_mode: bool = False

    @property
    def span(self) -> int:
        """Input positions one output reads: the dilated kernel size."""
        return self.dilation * (self.kernel - 1) + 1

    @property
    def scale(self) -> Fraction:
        """Input steps per output step."""
        return Fraction(self.stride)

    def reads(self, out: Interval) -> Interval:
        a, b = out
        if b <= a:
            return (0, 0)
        start = a * self.stride - self.pad_begin
        return (start, (b - 1) * self.stride - self.pad_begin + self.span)

    def out_size(self, n: int) -> int:
        total = n + self.pad_begin + self.pad_end - self.span
        if self.ceil_mode:
            size = _ceil_div(total, self.stride) + 1
            # ONNX/torch: the last window must start inside the input or the begin padding.
            if (size - 1) * self.stride >= n + self.pad_begin:
                size -= 1
            return size
        return total // self.stride + 1

    def tile_pads(self, out: Interval, available: Interval) -> tuple[int, int]:
        """Pads that make the op, run on input ``available``, produce exactly ``out``.

        ``available`` must be ``reads(out)`` clipped to the input's extent; the difference is
        genuine padding at the true image border.
        """
        u, v = self.reads(out)
        return available[0] - u, v - available[1]


@dataclass(frozen=True)
class Upsample:
    """Nearest-neighbour upsampling by an integer factor: output ``j`` reads ``⌊j/f⌋``."""

    factor: int

    @property
    def scale(self) -> Fraction:
        return Fraction(1, self.factor)

    def reads(self, out: Interval) -> Interval:
        a, b = out
        if b <= a:
            return (0, 0)
        return (a // self.factor, (b - 1) // self.factor + 1)

    def out_size(self, n: int) -> int:
        return n * self.factor

    def produces(self, available: Interval) -> Interval:
        """The output interval computed from input ``available``."""
        return (available[0] * self.factor, available[1] * self.factor)


@dataclass(frozen=True)
class Transposed:
    """A transposed convolution: input ``i`` scatters to outputs ``i·s − p_begin + t·d``."""

    kernel: int
    stride: int = 1
    dilation: int = 1
    pad_begin: int = 0
    pad_end: int = 0
    output_padding: int = 0

    @property
    def span(self) -> int:
        return self.dilation * (self.kernel - 1) + 1

    @property
    def scale(self) -> Fraction:
        return Fraction(1, self.stride)

    def reads(self, out: Interval) -> Interval:
        a, b = out
        if b <= a:
            return (0, 0)
        first = _ceil_div(a + self.pad_begin - (self.span - 1), self.stride)
        last = (b - 1 + self.pad_begin) // self.stride
        return (first, last + 1)

    def out_size(self, n: int) -> int:
        return (
            self.stride * (n - 1) + self.output_padding + self.span - self.pad_begin - self.pad_end
        )

    def produces(self, available: Interval) -> Interval:
        """Full-image output positions that a transposed conv over ``available`` (no pads) spans."""
        u, v = available
        start = u * self.stride - self.pad_begin
        return (start, (v - 1) * self.stride - self.pad_begin + self.span)


AxisMap = Window | Upsample | Transposed
IDENTITY = Window()


# -- windows of whole nodes ------------------------------------------------------------------------


def same_pads(size: int | None, kernel: int, stride: int, dilation: int, upper: bool
              ) -> tuple[int, int]:
    """``auto_pad=SAME_UPPER`` / ``SAME_LOWER`` padding of one axis of input ``size``.

    The output has ``ceil(size / stride)`` positions; the extra padding goes at the end
    (UPPER) or the start (LOWER). Without a size (a dynamic axis) only stride 1 is defined.
    """
    span = dilation * (kernel - 1) + 1
    if size is None:
        if stride != 1:
            raise ValueError("auto_pad SAME with stride > 1 needs the input size")
        total = span - 1
    else:
        out = -(-size // stride)
        total = max((out - 1) * stride + span - size, 0)
    small, big = total // 2, total - total // 2
    return (small, big) if upper else (big, small)


def _per_axis(values: Sequence[int] | None, n: int, default: int, what: str) -> list[int]:
    if values is None or len(values) == 0:
        return [default] * n
    values = [int(v) for v in values]
    if len(values) != n:
        raise ValueError(f"its {what} has {len(values)} entries for {n} spatial axes")
    return values


def node_windows(node: onnx.NodeProto, kernel: Sequence[int],
                 in_size: Sequence[int | None] | None = None) -> tuple[Window, ...]:
    """One :class:`Window` per spatial axis of a Conv or pooling ``node`` with ``kernel``.

    Reads ``strides``, ``dilations``, ``pads`` / ``auto_pad`` and ``ceil_mode``; ``in_size``
    (the input's spatial size, entries may be None) is needed for ``auto_pad`` SAME with
    stride > 1. Raises ValueError with a phrase naming what is malformed.
    """
    attrs = attributes(node)
    n = len(kernel)
    strides = _per_axis(attrs.get("strides"), n, 1, "strides")
    dilations = _per_axis(attrs.get("dilations"), n, 1, "dilations")
    auto_pad = attrs.get("auto_pad", "NOTSET")
    if auto_pad in ("NOTSET", ""):
        pads = list(attrs.get("pads") or [0] * (2 * n))
        if len(pads) != 2 * n:
            raise ValueError(f"its pads have {len(pads)} entries for {n} spatial axes")
        pairs = [(pads[i], pads[i + n]) for i in range(n)]
    elif auto_pad == "VALID":
        pairs = [(0, 0)] * n
    elif auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        sizes = list(in_size) if in_size is not None else [None] * n
        pairs = [same_pads(sizes[i], kernel[i], strides[i], dilations[i],
                           auto_pad == "SAME_UPPER") for i in range(n)]
    else:
        raise ValueError(f"auto_pad={auto_pad!r} is not an ONNX value")
    ceil_mode = bool(attrs.get("ceil_mode", 0))
    return tuple(Window(int(kernel[i]), strides[i], dilations[i], int(pairs[i][0]),
                        int(pairs[i][1]), ceil_mode) for i in range(n))


@dataclass(frozen=True)
class NodeWindow:
    """A node's windows over all its spatial axes, with the input and output sizes."""

    axes: tuple[Window, ...]
    in_size: tuple[int, ...]
    out_size: tuple[int, ...]

    @property
    def rank(self) -> int:
        return len(self.axes)

    @property
    def kernel(self) -> tuple[int, ...]:
        return tuple(a.kernel for a in self.axes)

    @property
    def strides(self) -> tuple[int, ...]:
        return tuple(a.stride for a in self.axes)

    @property
    def dilations(self) -> tuple[int, ...]:
        return tuple(a.dilation for a in self.axes)

    @property
    def pads_begin(self) -> tuple[int, ...]:
        return tuple(a.pad_begin for a in self.axes)

    @property
    def pads_end(self) -> tuple[int, ...]:
        return tuple(a.pad_end for a in self.axes)

    def span(self, axis: int) -> int:
        return self.axes[axis].span

    def trailing(self, axis: int) -> int:
        """Padded-input positions after the last window (negative: ceil_mode overhang)."""
        a = self.axes[axis]
        read = (self.out_size[axis] - 1) * a.stride + a.span
        return self.in_size[axis] + a.pad_begin + a.pad_end - read


# -- Resize ---------------------------------------------------------------------------------------


def _source_coordinate(mode: str, j: np.ndarray, scale: float, n_in: int, n_out: int
                       ) -> np.ndarray:
    if mode == "half_pixel":
        return (j + 0.5) / scale - 0.5
    if mode == "pytorch_half_pixel":
        return (j + 0.5) / scale - 0.5 if n_out > 1 else np.zeros_like(j, dtype=np.float64)
    if mode == "align_corners":
        return j * (n_in - 1) / (n_out - 1) if n_out > 1 else np.zeros_like(j, dtype=np.float64)
    if mode == "asymmetric":
        return j / scale
    if mode == "tf_half_pixel_for_nn":
        return (j + 0.5) / scale
    if mode == "half_pixel_symmetric":
        adjustment = n_out / (scale * n_in)
        offset = n_in / 2 * (1 - adjustment)
        return offset + (j + 0.5) / scale - 0.5
    raise ValueError(f"coordinate_transformation_mode {mode!r} is not supported")


def _nearest(x: np.ndarray, rounding: str) -> np.ndarray:
    if rounding == "round_prefer_floor":
        return np.ceil(x - 0.5)
    if rounding == "round_prefer_ceil":
        return np.floor(x + 0.5)
    if rounding == "floor":
        return np.floor(x)
    if rounding == "ceil":
        return np.ceil(x)
    raise ValueError(f"nearest_mode {rounding!r} is not an ONNX value")


def resize_matrix(mode: str, transform: str, rounding: str, n_in: int, n_out: int,
                  scale: float) -> np.ndarray:
    """The (n_out, n_in) matrix of a 1-D nearest or linear Resize along one axis."""
    j = np.arange(n_out, dtype=np.float64)
    source = _source_coordinate(transform, j, scale, n_in, n_out)
    matrix = np.zeros((n_out, n_in))
    if mode == "nearest":
        index = np.clip(_nearest(source, rounding), 0, n_in - 1).astype(np.int64)
        matrix[np.arange(n_out), index] = 1.0
        return matrix
    source = np.clip(source, 0, n_in - 1)
    low = np.floor(source).astype(np.int64)
    high = np.minimum(low + 1, n_in - 1)
    frac = source - low
    np.add.at(matrix, (np.arange(n_out), low), 1 - frac)
    np.add.at(matrix, (np.arange(n_out), high), frac)
    return matrix


def is_block_upsampling(matrix: np.ndarray, factor: int) -> bool:
    """Whether a resize ``matrix`` maps output ``j`` to input ``floor(j / factor)``."""
    n_in = matrix.shape[1]
    return matrix.shape[0] == n_in * factor and np.array_equal(
        matrix, np.repeat(np.eye(n_in), factor, axis=0))
