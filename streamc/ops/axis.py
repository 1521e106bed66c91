"""One spatial axis of a local op: which input interval an output interval reads.

Every spatially local op acts on each spatial axis independently, as one of three maps:

- :class:`Window` (Conv, pooling, pointwise ops, constant Pad): output ``j`` reads input
  ``[j·s − p_begin, j·s − p_begin + d·(k−1) + 1)``;
- :class:`Upsample` (nearest Resize by an integer factor ``f``): output ``j`` reads input ``⌊j/f⌋``;
- :class:`Transposed` (ConvTranspose): output ``j`` reads every input ``i`` with
  ``i·s − p_begin + t·d = j`` for some tap ``t``.

Intervals are half-open ``(start, stop)`` in the tensor's own full-image coordinates. ``reads``
does not clip: what falls outside the input's extent is the op's own padding.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

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
