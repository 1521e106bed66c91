"""Schedule pass: the tile grid, each tile's kept regions of the cut tensors, and its input crop.

Contract: :func:`make_schedule` takes an :class:`~streamc.analysis.Analysis` with a static image
size and a requested tile size (input pixels per axis, an upper bound on every crop) and returns
a :class:`Schedule`. Tile boundaries in the image lie on the prefix's alignment lattice
(DESIGN section 3); the kept regions of every cut tensor partition that tensor; each axis is cut
into as few tiles as fit the requested size, of equal kept size except the last.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from fractions import Fraction

from streamc.analysis import Analysis
from streamc.analysis.regions import Box, is_empty
from streamc.errors import CompileError


@dataclass(frozen=True)
class Tile:
    """One tile: its grid index, kept region of each cut tensor, and the image crop it reads."""

    index: tuple[int, ...]
    kept: dict[str, Box]
    crop: Box


@dataclass
class Schedule:
    """The tile grid: per axis the image boundaries, and every tile in row-major order."""

    image_size: tuple[int, ...]
    requested_tile: tuple[int, ...]
    tile: tuple[int, ...]
    alignment: tuple[int, ...]
    boundaries: tuple[tuple[int, ...], ...]
    tiles: list[Tile] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def grid(self) -> tuple[int, ...]:
        return tuple(len(b) - 1 for b in self.boundaries)


def parse_tile(tile: int | str | Sequence[int], n_spatial: int) -> tuple[int, ...]:
    """``2048``, ``"2048"``, ``"2048x1536"`` or ``(2048, 1536)`` -> one size per spatial axis."""
    if isinstance(tile, str):
        try:
            parts = [int(p) for p in tile.lower().replace("×", "x").split("x")]
        except ValueError:
            raise CompileError(
                f"tile size {tile!r} is not a number or NxM (e.g. 2048 or 2048x1536)."
            ) from None
    elif isinstance(tile, int):
        parts = [tile]
    else:
        parts = [int(p) for p in tile]
    if len(parts) == 1:
        parts = parts * n_spatial
    if len(parts) != n_spatial:
        raise CompileError(
            f"tile size {tile!r} has {len(parts)} axes but the image has {n_spatial} spatial axes."
        )
    if any(p <= 0 for p in parts):
        raise CompileError(f"tile size {tile!r} must be positive.")
    return tuple(parts)


def _cut_boundary(analysis: Analysis, cut: str, axis: int, pixel: int, last: bool) -> int:
    extent = analysis.extent(cut)[axis]
    if last:
        return extent
    stride: Fraction = analysis.tensors[cut].stride[axis]
    value = Fraction(pixel) / stride
    if value.denominator != 1:  # cannot happen on the alignment lattice; guard anyway
        raise CompileError(f"tile boundary {pixel} is not aligned with cut tensor {cut!r}.")
    return min(int(value), extent)


def _axis_kept(analysis: Analysis, axis: int, start: int, stop: int, image_end: int
               ) -> dict[str, tuple[int, int]]:
    return {
        cut: (
            0 if start == 0 else _cut_boundary(analysis, cut, axis, start, False),
            _cut_boundary(analysis, cut, axis, stop, stop >= image_end),
        )
        for cut in analysis.cut_tensors
    }


def _crop_along(analysis: Analysis, axis: int, kept: dict[str, tuple[int, int]]) -> tuple[int, int]:
    """Image interval along ``axis`` needed for these kept intervals (other axes full)."""
    boxes: dict[str, Box] = {}
    for cut, interval in kept.items():
        extent = analysis.extent(cut)
        box = [(0, n) for n in extent]
        box[axis] = interval
        boxes[cut] = tuple(box)
    regions = analysis.regions_for(boxes)
    image_box = regions.get(analysis.input_name)
    if image_box is None or is_empty(image_box):
        return (0, 0)
    return image_box[axis]


def _axis_boundaries(analysis: Analysis, axis: int, size: int, tile: int, align: int
                     ) -> list[int]:
    """As few aligned boundaries as keep every crop along ``axis`` within ``tile`` pixels."""

    def max_crop(bounds: list[int]) -> int:
        widest = 0
        for start, stop in zip(bounds, bounds[1:]):
            a, b = _crop_along(analysis, axis, _axis_kept(analysis, axis, start, stop, size))
            widest = max(widest, b - a)
        return widest

    whole = [0, size]
    if max_crop(whole) <= tile:
        return whole
    halo = 0
    if size > 2 * align:
        # Smallest useful tile: one alignment step kept, in the middle of the image.
        mid = (size // 2 // align) * align
        a, b = _crop_along(analysis, axis, _axis_kept(analysis, axis, mid, mid + align, size))
        if b - a > tile:
            raise CompileError(
                f"tile {tile} along axis {axis} is too small to make progress: keeping one "
                f"aligned step of {align} px needs a crop of {b - a} px (the receptive field's "
                f"halo). Use a tile of at least {b - a}."
            )
        halo = (b - a) - align
    n = max(2, math.ceil(size / max(align, tile - halo)))
    while True:
        kept = math.ceil(size / n / align) * align
        bounds = [min(i * kept, size) for i in range(n)] + [size]
        bounds = sorted(set(bounds))
        if max_crop(bounds) <= tile:
            return bounds
        if kept <= align:
            raise CompileError(
                f"tile {tile} along axis {axis} is too small to make progress with alignment "
                f"{align}; use a larger tile."
            )
        n += 1


def make_schedule(analysis: Analysis, tile: int | str | Sequence[int]) -> Schedule:
    """Lay the tile grid for ``analysis``'s image size (see module docstring)."""
    size = analysis.image_size
    if any(s is None for s in size):
        raise CompileError(
            "the model's spatial size is dynamic: pass the image size (--image HxW) to compile."
        )
    requested = parse_tile(tile, analysis.n_spatial)
    notes = []
    aligned = []
    for axis, (t, a) in enumerate(zip(requested, analysis.alignment)):
        if t % a:
            rounded = max(a, (t // a) * a)
            notes.append(
                f"tile {t} along axis {axis} is not a multiple of the network's alignment {a}; "
                f"rounded to {rounded}."
            )
            t = rounded
        aligned.append(t)
    for cut in analysis.cut_tensors:
        extent = analysis.extent(cut)
        if extent is None or any(n <= 0 for n in extent):
            raise CompileError(
                f"cut tensor {cut!r} is empty at image size {size}: the image is too small for "
                "this network."
            )
    boundaries = tuple(
        tuple(_axis_boundaries(analysis, axis, size[axis], aligned[axis],
                               analysis.alignment[axis]))
        for axis in range(analysis.n_spatial)
    )
    schedule = Schedule(tuple(size), requested, tuple(aligned), analysis.alignment, boundaries,
                        notes=notes)
    for index in _grid_indices(schedule.grid):
        kept: dict[str, list[tuple[int, int]]] = {c: [] for c in analysis.cut_tensors}
        for axis, i in enumerate(index):
            start, stop = boundaries[axis][i], boundaries[axis][i + 1]
            for cut, interval in _axis_kept(analysis, axis, start, stop, size[axis]).items():
                kept[cut].append(interval)
        kept_boxes = {c: tuple(b) for c, b in kept.items() if not is_empty(tuple(b))}
        if not kept_boxes:
            continue
        regions = analysis.regions_for(kept_boxes)
        crop = regions[analysis.input_name]
        schedule.tiles.append(Tile(index, kept_boxes, crop))
    return schedule


def _grid_indices(grid: Sequence[int]) -> list[tuple[int, ...]]:
    indices: list[tuple[int, ...]] = [()]
    for n in grid:
        indices = [i + (k,) for i in indices for k in range(n)]
    return indices
