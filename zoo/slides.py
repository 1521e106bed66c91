"""Synthetic whole-slide images, generated region by region and written as pyramidal TIFFs.

:class:`SyntheticSlide` is the slide version of ``examples/train_synthetic.py``'s task: tinted
noise with a few small square patches, checkered (one-pixel checkerboard) in class 1 and flat
with the same mean in class 0. The label lives in full-resolution detail: a level downsampled
2x averages the checkerboard away, so the classes look alike there. Every pixel is a function
of the seed and its position (noise is drawn per 256x256 block from the block's own seed), so
any region of any level is generated on demand and a 32768² slide is written band by band,
never held. :func:`write_pyramid` writes one with tifffile (levels as successive reduced pages,
resolution tags in µm/px, as generic TIFF readers and OpenSlide expect). Used by the tests,
``examples/train_slides.py`` and ``benchmarks/slides.py``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

BLOCK = 256
BACKGROUND = (205.0, 150.0, 190.0)  # a pinkish tint, as of eosin
PATCH = (120.0, 70.0, 150.0)  # a darker, bluer tint, as of nuclei


@dataclass(frozen=True)
class SyntheticSlide:
    """A ``height`` x ``width`` RGB slide of class ``label`` (see the module docstring).

    ``patches`` squares of ``patch`` pixels; ``noise``: the standard deviation of the noise
    and ``amplitude`` the checkerboard's, in 8-bit units.
    """

    height: int
    width: int
    label: int
    seed: int = 0
    patches: int = 6
    patch: int = 8
    noise: float = 24.0
    amplitude: float = 60.0

    def level_size(self, level: int) -> tuple[int, int]:
        """(H, W) of pyramid level ``level`` (each level halves the previous one)."""
        return self.height >> level, self.width >> level

    def patch_corners(self) -> np.ndarray:
        """(patches, 2) top-left corners of the patches at level 0."""
        rng = np.random.default_rng([self.seed, 1])
        return np.stack([rng.integers(0, self.height - self.patch, self.patches),
                         rng.integers(0, self.width - self.patch, self.patches)], axis=1)

    def region(self, ys: slice, xs: slice, level: int = 0) -> np.ndarray:
        """Rows ``ys`` and columns ``xs`` of level ``level`` as (h, w, 3) uint8."""
        height, width = self.level_size(level)
        y0, y1 = ys.indices(height)[:2]
        x0, x1 = xs.indices(width)[:2]
        if level == 0:
            return np.clip(np.round(self._region0(y0, y1, x0, x1)), 0, 255).astype(np.uint8)
        f = 1 << level  # a level's pixel is the mean of f x f level-0 pixels
        full = np.clip(np.round(self._region0(y0 * f, y1 * f, x0 * f, x1 * f)), 0, 255)
        blocks = full.reshape(y1 - y0, f, x1 - x0, f, 3).mean(axis=(1, 3))
        return np.clip(np.round(blocks), 0, 255).astype(np.uint8)

    def _region0(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        out = np.empty((y1 - y0, x1 - x0, 3), np.float32)
        for by in range(y0 // BLOCK, (y1 - 1) // BLOCK + 1):
            for bx in range(x0 // BLOCK, (x1 - 1) // BLOCK + 1):
                rng = np.random.default_rng([self.seed, 0, by, bx])
                block = rng.standard_normal((BLOCK, BLOCK, 3), dtype=np.float32)
                block *= self.noise
                block += np.asarray(BACKGROUND, np.float32)
                ty0, tx0 = by * BLOCK, bx * BLOCK
                a, b = max(y0, ty0), min(y1, ty0 + BLOCK)
                c, d = max(x0, tx0), min(x1, tx0 + BLOCK)
                out[a - y0:b - y0, c - x0:d - x0] = block[a - ty0:b - ty0, c - tx0:d - tx0]
        yy, xx = np.mgrid[:self.patch, :self.patch]
        checker = np.where((yy + xx) % 2 == 0, 1.0, -1.0).astype(np.float32)[:, :, None]
        texture = self.amplitude * checker if self.label else np.zeros_like(checker)
        square = np.asarray(PATCH, np.float32) + texture
        for top, left in self.patch_corners():
            a, b = max(y0, top), min(y1, top + self.patch)
            c, d = max(x0, left), min(x1, left + self.patch)
            if a < b and c < d:
                out[a - y0:b - y0, c - x0:d - x0] = square[a - top:b - top, c - left:d - left]
        return out


def write_pyramid(path: str | Path, slide: SyntheticSlide, levels: int = 3, tile: int = 256,
                  mpp: float = 0.5, compression: str | None = None,
                  quality: int | None = None) -> Path:
    """Write ``slide`` as a tiled pyramidal TIFF (level 0 at ``mpp`` µm/px, each next level
    half the size), band by band; returns the path. ``compression``: None, ``"zlib"``
    (lossless) or ``"jpeg"`` (as in SVS files; needs imagecodecs; ``quality``)."""
    import tifffile

    options = {"compressionargs": {"level": quality}} if quality is not None else {}

    path = Path(path)
    with tifffile.TiffWriter(path, bigtiff=True) as writer:
        for level in range(levels):
            height, width = slide.level_size(level)
            if min(height, width) < 1:
                break
            resolution = 1e4 / (mpp * (1 << level))  # pixels per centimetre
            writer.write(_tiles(slide, level, tile), shape=(height, width, 3), dtype=np.uint8,
                         tile=(tile, tile), photometric="rgb", compression=compression,
                         subfiletype=1 if level else 0, resolution=(resolution, resolution),
                         resolutionunit="CENTIMETER", metadata=None, **options)
    return path


def _tiles(slide: SyntheticSlide, level: int, tile: int) -> Iterator[np.ndarray]:
    height, width = slide.level_size(level)
    for y0 in range(0, height, tile):
        band = slide.region(slice(y0, min(y0 + tile, height)), slice(0, width), level)
        for x0 in range(0, width, tile):
            yield np.ascontiguousarray(band[:, x0:x0 + tile])


__all__ = ["SyntheticSlide", "write_pyramid"]
