"""Schedule pass: the tile grid, each tile's kept regions, and the crops it reads.

Contract: :func:`make_schedule` takes an :class:`~streamc.analysis.Analysis` with a static image
size and a requested tile size (input pixels per axis, an upper bound on every crop) and returns
a :class:`Schedule`. Tile boundaries in the image lie on the alignment lattice of every grid
tensor (docs/architecture.md). The *targets* of each stage (the grid tensors it writes whole,
and those whose reductions it computes) are cut along the same image boundaries: the kept
regions of the tiles partition every target. A tile's crop of a stage input is what its kept
regions need of it. Each axis is cut into as few tiles as fit the requested size (image pixels;
a crop of a later stage's input counts its width times its stride), of equal kept size except
the last.

With halo reuse (``halo="reuse"``, the default) the schedule also holds every grid tensor's
owned regions (:class:`~streamc.analysis.ownership.Ownership`): the kept regions are the
targets' owned regions, a crop is what the tile's owned regions read of a stage input, and a
tile's crop need not cover the receptive field (it is its region plus the halo of the ops that
read the stage input directly). Tile boundaries still lie on the alignment lattice, so most
tiles have equal owned sizes and share a shape class.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from fractions import Fraction

from streamc.analysis import Analysis
from streamc.analysis.ownership import AxisOwnership, Ownership, axis_ownership
from streamc.analysis.regions import Box, is_empty, union
from streamc.errors import CompileError, StreamcError
from streamc.units import parse_extent


@dataclass(frozen=True)
class Tile:
    """One tile: its grid index, its kept region of every stage target it has a part of, and
    per stage the region of each stage input it reads (``crops[k]``; empty when the tile has
    nothing to compute in stage ``k``)."""

    index: tuple[int, ...]
    kept: dict[str, Box]
    crops: tuple[dict[str, Box], ...]

    @property
    def crop(self) -> Box:
        """The image region the tile reads in the first stage."""
        return next(iter(self.crops[0].values()))


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
    #: halo reuse: every grid tensor's owned regions (None: every tile recomputes its halo)
    ownership: Ownership | None = None

    @property
    def grid(self) -> tuple[int, ...]:
        return tuple(len(b) - 1 for b in self.boundaries)


def parse_tile(tile: int | str | Sequence[int], n_spatial: int) -> tuple[int, ...]:
    """``2048``, ``"2048"``, ``"2048x1536"`` or ``(2048, 1536)`` -> one size per spatial axis."""
    try:
        return parse_extent(tile, "tile size", n_spatial)
    except StreamcError as exc:
        raise CompileError(str(exc)) from None


def _cut_boundary(analysis: Analysis, cut: str, axis: int, pixel: int, last: bool) -> int:
    extent = analysis.extent(cut)[axis]
    if last:
        return extent
    # Position j of the cut reads image pixels [j·S − P, j·S − P + r) (stride S, offset P,
    # field r): it belongs to the tile whose image interval holds the centre of that field.
    # Ignoring P and r (j ↔ pixel j·S) puts the positions that read mostly padding all into the
    # first or last tile, whose crop can then be wider than any other (or cover the image).
    info = analysis.tensors[cut]
    centre = Fraction(info.offset[axis]) - Fraction(info.receptive_field[axis] - 1, 2)
    value = math.ceil((Fraction(pixel) + centre) / info.stride[axis])
    return min(max(value, 0), extent)


def _axis_kept(analysis: Analysis, axis: int, start: int, stop: int, image_end: int
               ) -> dict[str, tuple[int, int]]:
    return {
        cut: (
            0 if start == 0 else _cut_boundary(analysis, cut, axis, start, False),
            _cut_boundary(analysis, cut, axis, stop, stop >= image_end),
        )
        for cut in analysis.targets
    }


@dataclass(frozen=True)
class _Span:
    """What one tile reads along an axis: the image interval of the first stage, and the
    widest crop of any stage in image pixels (a later stage's crop times its input's stride)."""

    lo: int
    hi: int
    width: int

    @property
    def empty(self) -> bool:
        return self.hi <= self.lo


def _crop_along(analysis: Analysis, axis: int, kept: dict[str, tuple[int, int]]) -> _Span:
    """What the kept intervals along ``axis`` need of the stage inputs (other axes full)."""
    lo = hi = width = 0
    for k, stage in enumerate(analysis.split.stage_io):
        boxes: dict[str, Box] = {}
        for cut in stage.targets:
            interval = kept[cut]
            if interval[1] <= interval[0]:
                continue
            box = [(0, n) for n in analysis.extent(cut)]
            box[axis] = interval
            boxes[cut] = tuple(box)
        if not boxes:
            continue
        regions = analysis.regions_for(boxes, runnable=True, stage=k)
        for tensor in stage.inputs:
            box = regions.get(tensor)
            if box is None or is_empty(box):
                continue
            a, b = box[axis]
            width = max(width, math.ceil((b - a) * analysis.tensors[tensor].stride[axis]))
            if k == 0 and tensor == analysis.input_name:
                lo, hi = a, b
    return _Span(lo, hi, width)


def _crops(analysis: Analysis, axis: int, bounds: Sequence[int], size: int) -> list[_Span]:
    return [_crop_along(analysis, axis, _axis_kept(analysis, axis, a, b, size))
            for a, b in zip(bounds, bounds[1:])]


def _without_empty(analysis: Analysis, axis: int, bounds: list[int], size: int) -> list[int]:
    """Merge away tiles whose kept regions read no image pixel (they hold only values computed
    from padding, at the border): a tile needs a non-empty crop. Merging one into its neighbour
    does not widen the neighbour's crop."""
    crops = _crops(analysis, axis, bounds, size)
    keep = [0]
    for i in range(1, len(bounds) - 1):
        # Boundary i separates tile i-1 from tile i; drop it if either side is empty, unless
        # that would merge two tiles that both read pixels.
        if not crops[i].empty and not crops[i - 1].empty:
            keep.append(bounds[i])
    return keep + [size]


def min_tile(analysis: Analysis, axis: int) -> int:
    """The smallest crop that makes progress: the widest crop of the finest tiling (one aligned
    step per tile). Any coarser tiling has a crop at least as wide, as a merged tile reads
    everything its parts read. Steps away from the borders repeat one pattern (their starts
    are aligned), so only the border steps and one interior step are measured."""
    size, align = analysis.image_size[axis], analysis.alignment[axis]
    steps = list(range(0, size, align))
    reach = max(
        abs(info.offset[axis]) + info.receptive_field[axis]
        for info in (analysis.tensors[c] for c in analysis.targets)
    ) + align
    interior = (size // 2 // align) * align
    chosen = sorted({a for a in steps if a < reach or a + align > size - reach} | {interior})
    widest = 0
    for a in chosen:
        span = _crop_along(analysis, axis,
                           _axis_kept(analysis, axis, a, min(a + align, size), size))
        widest = max(widest, span.width)
    return widest


def _even_bounds(analysis: Analysis, axis: int, size: int, n: int, align: int) -> list[int]:
    """Boundaries of ``n`` tiles (or fewer) of equal aligned kept size along ``axis``."""
    kept = math.ceil(size / n / align) * align
    bounds = sorted({min(i * kept, size) for i in range(n)} | {size})
    return _without_empty(analysis, axis, bounds, size)


def _first_guess(size: int, tile: int, align: int, smallest: int) -> int:
    """Tiles along an axis when every tile pays the full halo (an interior tile's; border
    tiles pay less, so fewer may fit)."""
    halo = max(0, smallest - align)
    return max(2, math.ceil(size / max(align, tile - halo)))


def _axis_boundaries(analysis: Analysis, axis: int, tile: int, smallest: int) -> list[int]:
    """The fewest aligned tiles of equal kept size whose every crop along ``axis`` fits in
    ``tile`` pixels (``smallest``: :func:`min_tile` of the axis)."""
    size, align = analysis.image_size[axis], analysis.alignment[axis]

    def fits(bounds: list[int]) -> bool:
        return max(span.width for span in _crops(analysis, axis, bounds, size)) <= tile

    if fits([0, size]):
        return [0, size]
    n = _first_guess(size, tile, align, smallest)
    while True:
        found = _even_bounds(analysis, axis, size, n, align)
        if fits(found):
            break
        if math.ceil(size / n / align) * align <= align:  # cannot happen: see min_tile
            raise CompileError(
                f"internal error: no tiling along axis {axis} fits tile {tile} although the "
                f"smallest useful tile is {smallest}; please report this."
            )
        n += 1
    # Border tiles need less halo than the guess assumed: fewer tiles may fit. A tile never
    # keeps more than its crop, so at least size/tile are needed.
    fewest = max(2, math.ceil(size / tile))
    if n - fewest <= 32:
        for m in range(fewest, n):
            bounds = _even_bounds(analysis, axis, size, m, align)
            if fits(bounds):
                return bounds
        return found
    m = n - 1
    while m >= fewest:
        bounds = _even_bounds(analysis, axis, size, m, align)
        if not fits(bounds):
            break
        found, m = bounds, m - 1
    return found


def _too_small(tile: int, axis: int, align: int, smallest: int) -> CompileError:
    aligned = -(-smallest // align) * align
    return CompileError(
        f"tile {tile} along axis {axis} is too small to make progress: keeping one aligned "
        f"step of {align} px needs a crop of up to {smallest} px (the receptive field's "
        f"halo). Use a tile of at least {aligned}."
    )


#: The most tiles a schedule may have unless the caller allows more (``max_tiles``): beyond it
#: compiling takes minutes and every step pays per-tile overhead; usually the tile is too small.
MAX_TILES = 20_000


def _refuse_many_tiles(analysis: Analysis, tiles: Sequence[int], smallest: Sequence[int],
                       max_tiles: int) -> None:
    guess = [1 if tiles[a] >= size else _first_guess(size, tiles[a], analysis.alignment[a],
                                                      smallest[a])
             for a, size in enumerate(analysis.image_size)]
    total = math.prod(guess)
    if total <= max_tiles:
        return
    per_axis = [math.ceil(size / (max_tiles ** (1 / len(guess)))) for size in analysis.image_size]
    better = max(max(p + s - a for p, s, a in zip(per_axis, smallest, analysis.alignment)),
                 max(tiles))
    raise CompileError(
        f"tile {'x'.join(map(str, tiles))} would need about {total:,} tiles "
        f"({' x '.join(map(str, guess))}) for a {'x'.join(map(str, analysis.image_size))} "
        f"image, more than the limit of {max_tiles:,}: use a larger tile (about {better} keeps "
        f"it under the limit), or raise the limit (--max-tiles, max_tiles=) to go on anyway."
    )


#: How tiles get the values around them: ``"reuse"`` (each activation computed once; strips
#: handed on between tiles) or ``"recompute"`` (each tile recomputes its whole halo).
HALO_MODES = ("reuse", "recompute")
DEFAULT_HALO = "reuse"


def _stage_targets(analysis: Analysis) -> list[list[str]]:
    return [list(io.targets) for io in analysis.split.stage_io]


def _owned_axis(analysis: Analysis, axis: int, bounds: Sequence[int]) -> AxisOwnership:
    return axis_ownership(analysis.graph, analysis.split, axis, bounds, _stage_targets(analysis))


def _owned_boundaries(analysis: Analysis, axis: int, tile: int) -> tuple[list[int],
                                                                          AxisOwnership]:
    """The fewest aligned tiles of equal size along ``axis`` owning at most ``tile`` pixels of
    the image each, when tiles hand their halos on.

    The crops add halos that the tile size does not count: the image's, a few pixels, and a
    later stage's, whose input is a whole buffer computed before (its halo, and the skew of the
    owned boundaries at depth, are read there, not computed again; the memory plan counts
    them)."""
    size, align = analysis.image_size[axis], analysis.alignment[axis]
    if align > tile and align < size:
        raise CompileError(f"tile {tile} along axis {axis} is too small to make progress: one "
                           f"aligned step of this network is {align} px. Use a tile of at "
                           f"least {align}.")
    n = max(1, math.ceil(size / tile))
    while True:
        step = math.ceil(size / n / align) * align
        if step <= tile or step >= size:
            bounds = sorted({min(i * step, size) for i in range(n)} | {size})
            return bounds, _owned_axis(analysis, axis, bounds)
        n += 1


def _owned_schedule(analysis: Analysis, schedule: Schedule, max_tiles: int) -> Schedule:
    axes = []
    bounds = []
    for axis in range(analysis.n_spatial):
        b, own = _owned_boundaries(analysis, axis, schedule.tile[axis])
        bounds.append(tuple(b))
        axes.append(own)
    total = math.prod(len(b) - 1 for b in bounds)
    if total > max_tiles:
        raise CompileError(
            f"tile {'x'.join(map(str, schedule.tile))} needs {total:,} tiles "
            f"({' x '.join(str(len(b) - 1) for b in bounds)}), more than the limit of "
            f"{max_tiles:,}: use a larger tile, or raise the limit (--max-tiles, max_tiles=).")
    ownership = Ownership(tuple(axes), dict(analysis.split.phase))
    schedule.boundaries = tuple(bounds)
    schedule.ownership = ownership
    computed = [[analysis.graph.nodes[n].output[0] for n in io.nodes]
                for io in analysis.split.stage_io]
    for index in _grid_indices(schedule.grid):
        kept = {t: ownership.owned(t, index) for t in analysis.targets}
        kept = {t: b for t, b in kept.items() if not is_empty(b)}
        crops = []
        for k, io in enumerate(analysis.split.stage_io):
            if all(is_empty(ownership.owned(t, index)) for t in computed[k]):
                crops.append({})  # nothing to do in this stage
                continue
            reads = {t: ownership.read(t, k, index) for t in io.inputs}
            crop = {t: b for t, b in reads.items() if b is not None and not is_empty(b)}
            # A tile may compute from strips alone; it still reads (and ignores) the region
            # it owns of the stage's first input, so every part has a crop to size it by.
            first = io.inputs[0]
            crop[first] = union(crop.get(first), ownership.owned(first, index))
            crops.append({t: crop[t] for t in io.inputs if t in crop})
        if not crops[0]:
            continue
        schedule.tiles.append(Tile(index, kept, tuple(crops)))
    # The tile size counts what a tile owns of the image; its crop adds the halo of the ops
    # that read the image, a few pixels: the program's tile is the widest crop.
    schedule.tile = tuple(max([schedule.tile[a]] + [t.crop[a][1] - t.crop[a][0]
                                                    for t in schedule.tiles])
                          for a in range(analysis.n_spatial))
    return schedule


def make_schedule(analysis: Analysis, tile: int | str | Sequence[int],
                  max_tiles: int = MAX_TILES, halo: str = DEFAULT_HALO) -> Schedule:
    """Lay the tile grid for ``analysis``'s image size (see module docstring); refuse at once
    a tile so small that the grid would have more than ``max_tiles`` tiles. ``halo``: one of
    :data:`HALO_MODES`."""
    if halo not in HALO_MODES:
        raise CompileError(f"halo={halo!r}: choose one of {', '.join(map(repr, HALO_MODES))}.")
    size = analysis.image_size
    if any(s is None for s in size):
        raise CompileError(
            "the model's spatial size is dynamic: pass the image size (--image HxW) to compile."
        )
    requested = parse_tile(tile, analysis.n_spatial)
    notes = []
    aligned = []
    for axis, (t, a) in enumerate(zip(requested, analysis.alignment)):
        if t % a and halo == "recompute":  # halo reuse reads a halo on any tile anyway
            rounded = max(a, (t // a) * a)
            notes.append(
                f"tile {t} along axis {axis} is not a multiple of the network's alignment {a}; "
                f"rounded to {rounded}."
            )
            t = rounded
        aligned.append(t)
    for cut in analysis.targets:
        extent = analysis.extent(cut)
        if extent is None or any(n <= 0 for n in extent):
            raise CompileError(
                f"cut tensor {cut!r} is empty at image size {size}: the image is too small for "
                "this network."
            )
    if halo == "reuse":
        schedule = Schedule(tuple(size), requested, tuple(aligned), analysis.alignment, (),
                            notes=notes)
        guess = math.prod(math.ceil(s / t) for s, t in zip(size, aligned))
        if guess > max_tiles:
            raise CompileError(
                f"tile {'x'.join(map(str, aligned))} would need about {guess:,} tiles for a "
                f"{'x'.join(map(str, size))} image, more than the limit of {max_tiles:,}: use "
                "a larger tile, or raise the limit (--max-tiles, max_tiles=).")
        return _owned_schedule(analysis, schedule, max_tiles)
    smallest = []
    for axis in range(analysis.n_spatial):
        needed = 0 if aligned[axis] >= size[axis] else min_tile(analysis, axis)
        if needed > aligned[axis]:
            raise _too_small(aligned[axis], axis, analysis.alignment[axis], needed)
        smallest.append(needed)
    _refuse_many_tiles(analysis, aligned, smallest, max_tiles)
    boundaries = tuple(
        tuple(_axis_boundaries(analysis, axis, aligned[axis], smallest[axis]))
        for axis in range(analysis.n_spatial)
    )
    schedule = Schedule(tuple(size), requested, tuple(aligned), analysis.alignment, boundaries,
                        notes=notes)
    for index in _grid_indices(schedule.grid):
        kept: dict[str, list[tuple[int, int]]] = {c: [] for c in analysis.targets}
        for axis, i in enumerate(index):
            start, stop = boundaries[axis][i], boundaries[axis][i + 1]
            for cut, interval in _axis_kept(analysis, axis, start, stop, size[axis]).items():
                kept[cut].append(interval)
        kept_boxes = {c: tuple(b) for c, b in kept.items() if not is_empty(tuple(b))}
        if not kept_boxes:
            continue
        schedule.tiles.append(Tile(index, kept_boxes, _stage_crops(analysis, index, kept_boxes)))
    return schedule


def _stage_crops(analysis: Analysis, index: tuple[int, ...], kept: dict[str, Box]
                 ) -> tuple[dict[str, Box], ...]:
    """Per stage, the region of each stage input the tile's kept regions need."""
    crops = []
    for k, stage in enumerate(analysis.split.stage_io):
        boxes = {t: kept[t] for t in stage.targets if t in kept}
        if not boxes:
            crops.append({})
            continue
        regions = analysis.regions_for(boxes, runnable=True, stage=k)
        reads = {t: regions[t] for t in stage.inputs if t in regions}
        if k == 0 and analysis.input_name not in reads:
            raise CompileError(
                f"internal error: tile {index} keeps {boxes}, which read no image pixel; "
                "please report this.")
        crops.append(reads)
    return tuple(crops)


def _grid_indices(grid: Sequence[int]) -> list[tuple[int, ...]]:
    indices: list[tuple[int, ...]] = [()]
    for n in grid:
        indices = [i + (k,) for i in indices for k in range(n)]
    return indices


def smallest_tile(analysis: Analysis) -> int:
    """The smallest tile size (one number for every axis) the schedule accepts for this model:
    :func:`min_tile` of every axis, rounded up to its alignment."""
    return max(-(-min_tile(analysis, axis) // align) * align
               for axis, align in enumerate(analysis.alignment))


def check_schedule(analysis: Analysis, schedule: Schedule) -> None:
    """The schedule's invariants: along every axis the kept intervals of every cut tensor
    follow each other without gap or overlap from 0 to the tensor's extent (so the kept
    regions of all tiles partition it), and every crop lies in the image within the tile."""
    for cut in analysis.targets:
        extent = analysis.extent(cut)
        for axis in range(analysis.n_spatial):
            intervals: dict[int, tuple[int, int]] = {}
            for tile in schedule.tiles:
                if cut in tile.kept:
                    intervals.setdefault(tile.index[axis], tile.kept[cut][axis])
            position = 0
            for _, (a, b) in sorted(intervals.items()):
                if a != position or b < a:
                    raise CompileError(
                        f"internal error: the kept regions of {cut!r} along axis {axis} do not "
                        f"follow each other ({a} after {position}); please report this.")
                position = b
            if position != extent[axis]:
                raise CompileError(
                    f"internal error: the kept regions of {cut!r} along axis {axis} end at "
                    f"{position}, not at its extent {extent[axis]}; please report this.")
    for tile in schedule.tiles:
        for axis, (a, b) in enumerate(tile.crop):
            if a < 0 or b > schedule.image_size[axis] or b - a > schedule.tile[axis]:
                raise CompileError(
                    f"internal error: tile {tile.index} reads {a}..{b} along axis {axis}, "
                    f"outside the image or wider than the tile {schedule.tile[axis]}; please "
                    "report this.")
