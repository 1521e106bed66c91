"""Maps larger than memory, written tile by tile: a tiled TIFF, a zarr array or a ``.npy``.

The interpreter writes each tile's kept region of a grid buffer (``streamc predict``), or adds
each tile's image gradient (``streamc saliency``), into an array-like it is given instead of a
buffer in memory: a :class:`MapWriter`. Tiles arrive in the program's run order, not in raster
order, and image gradients overlap between tiles, so the writer keeps the map in a store with
random access, read and written with ``pread``/``pwrite`` (never memory-mapped, so the process's
resident memory stays bounded):

- ``.npy``: the store is the output itself (an ``(H, W, C)`` array);
- ``.zarr``: a zarr array, chunked 256×256, written in place;
- ``.tif`` / ``.tiff``: a ``.npy`` store beside the output, converted at the end into a tiled
  TIFF (256×256 tiles, ``(H, W, C)`` float32, read back by tifffile or any TIFF reader) band by
  band, then deleted.

Every output is written under a temporary name and renamed into place when complete; an
existing file is replaced only when asked (``force``). :meth:`MapWriter.finish` also writes a
small PNG preview (longest side at most 1024 px).
"""

from __future__ import annotations

import math
import os
import shutil
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from streamc.data.sources import Index, SlideError

FORMATS = (".tif", ".tiff", ".zarr", ".npy")
TIFF_TILE = 256
PREVIEW_SIDE = 1024
Preview = Literal["first", "last", "absmax"]


class NpyStore:
    """An ``(H, W, C)`` array in a ``.npy`` file, read and written with ``pread``/``pwrite``
    (created sparse: unwritten regions read as zeros)."""

    def __init__(self, path: Path, shape: tuple[int, int, int], dtype: Any = np.float32) -> None:
        self.path = Path(path)
        self.shape = tuple(int(d) for d in shape)
        self.dtype = np.dtype(dtype)
        header = _npy_header(self.shape, self.dtype)
        self._offset = len(header)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        os.pwrite(self._fd, header, 0)
        os.ftruncate(self._fd, self._offset + math.prod(self.shape) * self.dtype.itemsize)
        self._row = self.shape[1] * self.shape[2] * self.dtype.itemsize

    def _span(self, y: int, x0: int) -> int:
        return self._offset + y * self._row + x0 * self.shape[2] * self.dtype.itemsize

    def __getitem__(self, index: tuple[slice, slice]) -> np.ndarray:
        ys, xs = (s.indices(n)[:2] for s, n in zip(index, self.shape[:2]))
        h, w, c = ys[1] - ys[0], xs[1] - xs[0], self.shape[2]
        out = np.empty((h, w, c), self.dtype)
        if xs == (0, self.shape[1]):  # whole rows: one read
            _pread_into(self._fd, out, self._span(ys[0], 0))
            return out
        for k in range(h):
            _pread_into(self._fd, out[k], self._span(ys[0] + k, xs[0]))
        return out

    def __setitem__(self, index: tuple[slice, slice], value: np.ndarray) -> None:
        ys, xs = (s.indices(n)[:2] for s, n in zip(index, self.shape[:2]))
        value = np.ascontiguousarray(value, dtype=self.dtype)
        if xs == (0, self.shape[1]):
            os.pwrite(self._fd, memoryview(value).cast("B"), self._span(ys[0], 0))
            return
        for k in range(ys[1] - ys[0]):
            os.pwrite(self._fd, memoryview(value[k]).cast("B"), self._span(ys[0] + k, xs[0]))

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _pread_into(fd: int, out: np.ndarray, offset: int) -> None:
    view = memoryview(out).cast("B")
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            raise OSError(f"short read at offset {offset + done}")
        done += n


def _npy_header(shape: tuple[int, ...], dtype: np.dtype) -> bytes:
    import io

    buffer = io.BytesIO()
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
              "shape": shape}
    np.lib.format.write_array_header_2_0(buffer, header)
    return buffer.getvalue()


@dataclass
class Written:
    """What a writer left: the output, its shape ``(H, W, C)`` and dtype, and the preview."""

    path: Path
    shape: tuple[int, int, int]
    dtype: str
    preview: Path | None


class MapWriter:
    """An ``(N=1, C, H, W)`` map the interpreter writes into (``writer[index] = value`` and
    ``+=``), kept on disk as ``(H, W, C)`` (module docstring).

    ``out``: ``.tif``/``.tiff``, ``.zarr`` or ``.npy``. ``force``: replace an existing output.
    ``preview``: which channel the PNG preview shows: ``"last"`` (e.g. the positive class of a
    probability map), ``"first"``, or ``"absmax"`` (the largest magnitude over the channels,
    for gradients); None: no preview.
    """

    def __init__(self, out: str | Path, shape: tuple[int, ...], *, force: bool = False,
                 preview: Preview | None = "last", compression: str | None = None) -> None:
        self.out = Path(out)
        suffix = _suffix(self.out)
        check_map_output(self.out, force, preview is not None)
        self.preview_path = None if preview is None else preview_path(self.out)
        if len(shape) != 4 or shape[0] != 1:
            raise SlideError(f"a map of shape {list(shape)} cannot be written: one image "
                             "(1, C, H, W) at a time.")
        self.suffix = suffix
        self.force = force
        self.preview_mode = preview
        self.compression = compression
        _, channels, height, width = (int(d) for d in shape)
        self.shape = (1, channels, height, width)
        self.map_shape = (height, width, channels)
        self.dtype = np.dtype(np.float32)
        self._temp = _temp_path(self.out)
        if suffix == ".zarr":
            zarr = _zarr(self.out)
            self._store: Any = zarr.open_array(
                str(self._temp), mode="w", shape=self.map_shape, dtype=self.dtype,
                chunks=(TIFF_TILE, TIFF_TILE, channels), fill_value=0.0)
        else:
            self._store = NpyStore(self._temp, self.map_shape, self.dtype)

    # -- what the interpreter calls ----------------------------------------------------------------
    def __getitem__(self, index: Index) -> np.ndarray:
        cs, ys, xs = _spatial(index)
        block = self._store[ys, xs]
        return np.ascontiguousarray(block.transpose(2, 0, 1)[cs][None])

    def __setitem__(self, index: Index, value: Any) -> None:
        cs, ys, xs = _spatial(index)
        value = np.asarray(value, dtype=self.dtype)
        if value.ndim == 4:
            value = value[0]
        block = value.transpose(1, 2, 0)
        if cs != slice(None) and cs != slice(0, self.map_shape[2]):
            whole = self._store[ys, xs]
            whole[:, :, cs] = block
            block = whole
        self._store[ys, xs] = block

    # -- the end ----------------------------------------------------------------------------------
    def finish(self, progress: bool | None = None) -> Written:
        """Install the output (converting the store to a tiled TIFF, with a progress bar where
        ``progress`` says: None, on a terminal) and write the preview."""
        from streamc.progress import progress_bar

        preview_path = None
        try:
            preview = self._preview_array()
            if self.suffix in (".tif", ".tiff"):
                bands = math.ceil(self.map_shape[0] / TIFF_TILE)
                with progress_bar(bands, "TIFF", progress, unit="band") as tick:
                    self._write_tiff(tick)
            else:
                if isinstance(self._store, NpyStore):
                    self._store.close()
                _install(self._temp, self.out, self.force)
            if preview is not None:
                preview_path = self.preview_path
                write_png(preview_path, preview)
        finally:
            self.discard()
        return Written(self.out, self.map_shape, str(self.dtype), preview_path)

    def discard(self) -> None:
        """Remove the temporary store (after :meth:`finish`, or when giving up)."""
        if isinstance(self._store, NpyStore):
            self._store.close()
        if self._temp.is_dir():
            shutil.rmtree(self._temp, ignore_errors=True)
        elif self._temp.exists():
            self._temp.unlink()

    def bands(self, rows: int = TIFF_TILE) -> Iterator[tuple[int, np.ndarray]]:
        """The map in bands of whole rows ``(y0, (rows, W, C))``, top to bottom."""
        height = self.map_shape[0]
        for y0 in range(0, height, rows):
            yield y0, self._store[slice(y0, min(y0 + rows, height)), slice(None)]

    def _write_tiff(self, tick: Any) -> None:
        import tifffile

        height, width, channels = self.map_shape
        temp = _temp_path(self.out, ".tif")

        def tiles() -> Iterator[np.ndarray]:
            for _, band in self.bands():
                for x0 in range(0, width, TIFF_TILE):
                    yield np.ascontiguousarray(band[:, x0:x0 + TIFF_TILE])
                tick()

        try:
            tifffile.imwrite(temp, tiles(), shape=self.map_shape, dtype=self.dtype,
                             tile=(TIFF_TILE, TIFF_TILE), photometric="minisblack",
                             planarconfig="contig", bigtiff=True,
                             compression=self.compression, metadata=None)
            _install(temp, self.out, self.force)
        finally:
            if temp.exists():
                temp.unlink()

    def _preview_array(self) -> np.ndarray | None:
        """A small uint8 image of the map (nearest-neighbour, every ``step``-th pixel)."""
        if self.preview_mode is None:
            return None
        height, width, channels = self.map_shape
        step = max(1, math.ceil(max(height, width) / PREVIEW_SIDE))
        rows = []
        band_rows = step * max(1, TIFF_TILE // step)
        for y0, band in self.bands(band_rows):
            first = (-y0) % step
            pixels = band[first::step, ::step]
            # each row is a new array: a view would keep its whole band alive
            rows.append(np.abs(pixels).max(axis=2) if self.preview_mode == "absmax" else
                        pixels[:, :, -1 if self.preview_mode == "last" else 0].copy())
        small = np.concatenate(rows).astype(np.float64)
        lo, hi = float(np.min(small)), float(np.max(small))
        if self.preview_mode != "absmax" and lo >= 0 and hi <= 1:
            lo, hi = 0.0, 1.0  # probabilities: keep their scale
        if self.preview_mode == "absmax":
            lo = 0.0
        scaled = (small - lo) / (hi - lo) if hi > lo else np.zeros_like(small)
        return np.clip(np.round(scaled * 255), 0, 255).astype(np.uint8)


def _spatial(index: Index) -> tuple[slice, slice, slice]:
    index = tuple(index)
    if len(index) != 4:
        raise SlideError(f"a map is indexed (batch, channels, rows, columns), not {index}.")
    return index[1], index[2], index[3]


def _suffix(path: Path) -> str:
    return path.suffix.lower()


def _temp_path(out: Path, ending: str | None = None) -> Path:
    """A hidden name beside ``out`` for what is being written (``ending``: default ``.npy``,
    nothing for a zarr directory)."""
    if ending is None:
        ending = "" if _suffix(out) == ".zarr" else ".npy"
    return out.with_name(f".{out.name}.partial-{os.getpid()}{ending}")


def preview_path(out: Path) -> Path:
    """Where the PNG preview of ``out`` goes: ``heatmap.tif`` -> ``heatmap.preview.png``."""
    return out.with_suffix(".preview.png")


def _zarr(path: Path) -> Any:
    try:
        import zarr
    except ImportError:
        raise SlideError(f"writing {path} needs the zarr package: pip install "
                         "'streamc[slides]'.") from None
    return zarr


def check_map_output(out: Path, force: bool, preview: bool = True) -> None:
    """Refuse, before any work, a map output of an unknown format, or one (or its preview)
    that would replace a file unless ``force``."""
    if _suffix(out) not in FORMATS:
        raise SlideError(f"{out}: write a .tif, .tiff, .zarr or .npy file (the format follows "
                         "the name).")
    check_output(out, force)
    if preview:
        check_output(preview_path(out), force)


def check_output(out: Path, force: bool) -> None:
    """Refuse an output that would replace something unless ``force``; and a place that cannot
    be written, before any work."""
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise SlideError(f"cannot write {out}: {parent} is not a directory.")
    if not os.access(parent, os.W_OK):
        raise SlideError(f"cannot write {out}: {parent} is not writable.")
    if out.exists() or out.is_symlink():
        if not force:
            raise SlideError(f"{out} exists: choose another output, or pass --force "
                             "(force=True) to replace it.")
        if out.is_dir() and _suffix(out) != ".zarr":
            raise SlideError(f"{out} is a directory: give a file name for the map.")


def _install(temp: Path, out: Path, force: bool) -> None:
    if out.is_dir() and not out.is_symlink():
        if not force:
            raise SlideError(f"{out} exists: pass --force to replace it.")
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(temp, out)
        shutil.rmtree(old, ignore_errors=True)
        return
    os.replace(temp, out)


def write_png(path: Path, image: np.ndarray) -> None:
    """An 8-bit greyscale (H, W) or RGB (H, W, 3) PNG (no dependency beyond zlib)."""
    image = np.ascontiguousarray(image, dtype=np.uint8)
    height, width = image.shape[:2]
    colour = 2 if image.ndim == 3 else 0
    raw = b"".join(b"\x00" + image[y].tobytes() for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    png = (b"\x89PNG\r\n\x1a\n"
           + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, colour, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))
    temp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    temp.write_bytes(png)
    os.replace(temp, path)


def read_map(path: str | Path) -> np.ndarray:
    """A map written by :class:`MapWriter`, whole, as ``(H, W, C)`` (for tests and small
    maps)."""
    path = Path(path)
    suffix = _suffix(path)
    if suffix == ".npy":
        return np.load(path)
    if suffix == ".zarr":
        return np.asarray(_zarr(path).open_array(str(path), mode="r")[:])
    import tifffile

    return tifffile.imread(path)


__all__ = ["FORMATS", "MapWriter", "NpyStore", "Written", "check_map_output", "check_output",
           "preview_path", "read_map", "write_png"]
