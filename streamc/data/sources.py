"""Image sources: images read lazily, one tile's crop at a time.

An :class:`ImageSource` is an image as the model sees it, ``(N, C, *size)`` float32, that is
never held whole: :meth:`ImageSource.read` returns the crop a tile needs, read from its storage
and put through the per-tile :class:`Transform` (stored integers to floats, mean/std
normalisation, channels first). The runtime takes a source wherever it takes an image tensor
(:class:`~streamc.runtime.module.StreamingModel`,
:class:`~streamc.runtime.interpreter.Interpreter`).

- :class:`ArraySource`: any array-like with ``shape``, ``dtype`` and slicing (a numpy array or
  memmap, a zarr array, an h5py dataset, :class:`OpenSlideLevel`), in ``"HWC"``, ``"CHW"``,
  ``"HW"`` or ``"NCHW"`` layout.
- :class:`SlideSource`: one level of a slide file, opened lazily (a source pickles as its path,
  level and transform, so DataLoader workers and the main process open files themselves).
  TIFF/SVS levels are read with tifffile + zarr (``pip install 'streamc[slides]'``); MRXS, NDPI
  and the other vendor formats with OpenSlide (``pip install openslide-bin openslide-python``),
  the second backend behind the same array interface; ``.zarr`` and ``.npy`` directly.

The transform is elementwise and applied crop by crop, so every crop equals the same region of
the whole transformed image, bit for bit: streaming from a source is exactly streaming the
tensor ``source.read(full)`` would give.
"""

from __future__ import annotations

import math
import os
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np

from streamc.errors import InputError

Index = tuple
Layout = Literal["HWC", "CHW", "HW", "NCHW"]
Backend = Literal["auto", "tifffile", "openslide", "zarr", "numpy"]

#: File name endings read by each backend when ``backend="auto"``.
TIFF_SUFFIXES = (".tif", ".tiff", ".svs", ".btf", ".tf8", ".tf2", ".qptiff", ".ome.tif")
OPENSLIDE_SUFFIXES = (".mrxs", ".ndpi", ".vms", ".vmu", ".scn", ".bif", ".svslide")
#: A level is taken for a requested µm/px when it is within this relative distance of it.
MPP_TOLERANCE = 0.05


class SlideError(InputError):
    """A slide cannot be opened or read: missing, not an image, no such level, a missing
    optional dependency."""


@runtime_checkable
class ImageSource(Protocol):
    """An image read lazily: ``shape`` is ``(N, C, *size)`` as the model sees it, and
    ``read(index)`` returns ``image[index]`` (slices over every axis) as C-contiguous
    float32."""

    @property
    def shape(self) -> tuple[int, ...]: ...

    def read(self, index: Index) -> np.ndarray: ...


def is_image_source(image: Any) -> bool:
    """Whether ``image`` is a lazy source (not an in-memory array or tensor)."""
    return (not isinstance(image, np.ndarray) and hasattr(image, "read")
            and hasattr(image, "shape") and not hasattr(image, "__array__")
            and not _is_tensor(image))


def _is_tensor(value: Any) -> bool:
    return type(value).__module__.startswith("torch")


@dataclass(frozen=True)
class Transform:
    """The per-tile transform from stored pixels to the model's input, applied to each crop.

    ``scale``: multiply first (default: ``1/255`` for uint8, ``1/65535`` for uint16, 1 for
    floats); then subtract ``mean`` and divide by ``std`` (one value, or one per channel).
    ``channels``: keep only these stored channels, in this order (e.g. ``(0, 1, 2)`` drops an
    alpha channel; ``(2, 1, 0)`` reverses BGR). All arithmetic is float32.
    """

    scale: float | None = None
    mean: float | Sequence[float] | None = None
    std: float | Sequence[float] | None = None
    channels: Sequence[int] | None = None

    def scale_for(self, dtype: np.dtype) -> float:
        if self.scale is not None:
            return float(self.scale)
        if np.dtype(dtype) == np.uint8:
            return 1.0 / 255.0
        if np.dtype(dtype) == np.uint16:
            return 1.0 / 65535.0
        return 1.0

    def apply(self, raw: np.ndarray, channel_axis: int) -> np.ndarray:
        """``raw`` (stored dtype, all stored channels on ``channel_axis``) as float32."""
        if self.channels is not None:
            raw = np.take(raw, list(self.channels), axis=channel_axis)
        x = raw.astype(np.float32)
        scale = np.float32(self.scale_for(raw.dtype))
        if scale != 1:
            x *= scale
        for values, op in ((self.mean, np.subtract), (self.std, np.divide)):
            if values is not None:
                v = np.asarray(values, dtype=np.float32)
                if v.ndim == 1 and v.size > 1:
                    shape = [1] * x.ndim
                    shape[channel_axis] = v.size
                    v = v.reshape(shape)
                op(x, v, out=x)
        return x

    def channels_out(self, stored: int) -> int:
        return stored if self.channels is None else len(self.channels)

    def check(self, stored: int, where: str) -> None:
        """Raise when the transform does not fit an image with ``stored`` channels."""
        if self.channels is not None:
            bad = [c for c in self.channels if not 0 <= int(c) < stored]
            if bad:
                raise SlideError(f"{where} has {stored} channels; the transform asks for "
                                 f"channel {bad[0]}: choose channels among 0..{stored - 1}.")
        out = self.channels_out(stored)
        for name, values in (("mean", self.mean), ("std", self.std)):
            n = np.asarray(values).size if values is not None else 1
            if n not in (1, out):
                raise SlideError(f"{where}: the transform's {name} has {n} values for {out} "
                                 "channels; give one value or one per channel.")


IDENTITY = Transform(scale=1.0)


class ArraySource:
    """An array-like image (shape, dtype, slicing) read crop by crop through a transform.

    ``layout``: how the stored axes are ordered (``"HWC"`` for slides and most image files,
    ``"CHW"``, ``"HW"`` for one channel, ``"NCHW"`` for a batch). ``transform``: applied to each
    crop (default :class:`Transform`: integers scaled to [0, 1], no normalisation).
    """

    def __init__(self, array: Any, layout: Layout = "HWC", transform: Transform | None = None,
                 name: str | None = None) -> None:
        if layout not in ("HWC", "CHW", "HW", "NCHW"):
            raise InputError(f"layout={layout!r}: choose 'HWC', 'CHW', 'HW' or 'NCHW'.")
        shape = tuple(int(d) for d in array.shape)
        if len(shape) != len(layout):
            raise InputError(f"{name or 'the array'} has shape {list(shape)}, which is not "
                             f"{layout} ({len(layout)} axes): pass the layout it has.")
        self.array = array
        self.layout = layout
        self.transform = transform if transform is not None else Transform()
        self.name = name or type(array).__name__
        stored = 1 if layout == "HW" else shape[layout.index("C")]
        self.transform.check(stored, self.name)
        channels = self.transform.channels_out(stored)
        size = (shape[layout.index("H")], shape[layout.index("W")])
        batch = shape[0] if layout == "NCHW" else 1
        self._shape = (batch, channels, *size)

    @property
    def shape(self) -> tuple[int, ...]:
        """``(N, C, H, W)`` as the model sees it."""
        return self._shape

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.float32)

    def _stored(self) -> Any:
        """The stored array-like."""
        return self.array

    def read(self, index: Index) -> np.ndarray:
        """The crop ``image[index]`` (``index``: slices over N, C, H, W) as float32 NCHW."""
        n, c, ys, xs = _normalise(index, self._shape)
        layout, array = self.layout, self._stored()
        if layout == "NCHW":
            x = self.transform.apply(np.asarray(array[n, :, ys, xs]), 1)
            return np.ascontiguousarray(x[:, c])
        if n != slice(0, 1):
            raise InputError(f"{self.name} is one image; batch index {n} is out of range.")
        if layout == "HWC":
            x = self.transform.apply(np.asarray(array[ys, xs, :]), 2).transpose(2, 0, 1)
        elif layout == "CHW":
            x = self.transform.apply(np.asarray(array[:, ys, xs]), 0)
        else:  # HW
            x = self.transform.apply(np.asarray(array[ys, xs])[None], 0)
        return np.ascontiguousarray(x[c][None])

    def __repr__(self) -> str:
        size = "x".join(map(str, self._shape[2:]))
        return f"{type(self).__name__}({self.name}, {size}, {self.layout})"


def _normalise(index: Index, shape: Sequence[int]) -> tuple[slice, ...]:
    """Plain ``start:stop`` slices (step 1) for each of the 4 axes of ``shape``."""
    index = tuple(index) + (slice(None),) * (len(shape) - len(index))
    out = []
    for axis, (s, n) in enumerate(zip(index, shape)):
        if not isinstance(s, slice):
            raise InputError(f"a source is read with slices only, not {s!r} (axis {axis}).")
        start, stop, step = s.indices(n)
        if step != 1:
            raise InputError("a source is read with contiguous slices only.")
        out.append(slice(start, max(start, stop)))
    return tuple(out)


class SourceBatch:
    """Sources of one size read as one batch ``(sum of N, C, *size)``."""

    def __init__(self, sources: Sequence[ImageSource]) -> None:
        if not sources:
            raise InputError("a batch needs at least one image source.")
        shapes = {tuple(s.shape[1:]) for s in sources}
        if len(shapes) > 1:
            raise InputError(f"a batch of sources needs one size and channel count, not "
                             f"{sorted(shapes)}: use batches of one image (batch_size=1) or "
                             "run the sources one by one.")
        self.sources = list(sources)
        self._offsets = np.cumsum([0] + [s.shape[0] for s in sources])
        self._shape = (int(self._offsets[-1]), *sources[0].shape[1:])

    @property
    def shape(self) -> tuple[int, ...]:
        return self._shape

    def read(self, index: Index) -> np.ndarray:
        n, *rest = _normalise(index, self._shape)
        parts = []
        for k, source in enumerate(self.sources):
            a, b = max(n.start, self._offsets[k]), min(n.stop, self._offsets[k + 1])
            if a < b:
                local = slice(int(a - self._offsets[k]), int(b - self._offsets[k]))
                parts.append(source.read((local, *rest)))
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def __len__(self) -> int:
        return len(self.sources)


class RegionSource:
    """A rectangle ``ys`` x ``xs`` of another source, read lazily (a region of interest)."""

    def __init__(self, source: ImageSource, ys: slice, xs: slice) -> None:
        height, width = source.shape[2:]
        (y0, y1), (x0, x1) = ys.indices(height)[:2], xs.indices(width)[:2]
        if not (y0 < y1 and x0 < x1):
            raise InputError(f"the region {y0}:{y1} x {x0}:{x1} of an image of {height}x{width} "
                             "is empty.")
        self.source = source
        self.origin = (y0, x0)
        self._shape = (*source.shape[:2], y1 - y0, x1 - x0)
        self.name = f"{getattr(source, 'name', type(source).__name__)} [{y0}:{y1}, {x0}:{x1}]"

    @property
    def shape(self) -> tuple[int, ...]:
        return self._shape

    def read(self, index: Index) -> np.ndarray:
        n, c, ys, xs = _normalise(index, self._shape)
        y0, x0 = self.origin
        return self.source.read((n, c, slice(ys.start + y0, ys.stop + y0),
                                 slice(xs.start + x0, xs.stop + x0)))


def region(source: ImageSource, ys: slice, xs: slice) -> RegionSource:
    """The rectangle ``ys`` x ``xs`` of ``source`` as a lazy source of its own."""
    return RegionSource(source, ys, xs)


# -- slides ------------------------------------------------------------------------------------


class OpenSlideLevel:
    """One level of an OpenSlide slide as a read-only ``(H, W, 3)`` uint8 array."""

    def __init__(self, slide: Any, level: int) -> None:
        self.slide = slide
        self.level = level
        width, height = slide.level_dimensions[level]
        self.shape = (int(height), int(width), 3)
        self.dtype = np.dtype(np.uint8)
        self._downsample = float(slide.level_downsamples[level])

    def __getitem__(self, index: Index) -> np.ndarray:
        ys, xs, cs = _normalise(tuple(index), self.shape)[:3]
        h, w = ys.stop - ys.start, xs.stop - xs.start
        if h == 0 or w == 0:
            return np.zeros((h, w, 3), np.uint8)[:, :, cs]
        ds = self._downsample
        region = self.slide.read_region((int(round(xs.start * ds)), int(round(ys.start * ds))),
                                        self.level, (w, h))
        return np.asarray(region)[:, :, :3][:, :, cs]


@dataclass(frozen=True)
class LevelInfo:
    """One pyramid level: its size (H, W) and, when the file says it, its µm per pixel."""

    size: tuple[int, int]
    mpp: float | None


class SlideSource(ArraySource):
    """One level of a slide file (or a ``.zarr`` / ``.npy`` image), opened lazily.

    ``level``: the pyramid level (0 is the full resolution), or ``mpp``: the level whose µm per
    pixel is within 5% of it. ``backend``: ``"auto"`` (by the file's ending), ``"tifffile"``,
    ``"openslide"``, ``"zarr"`` or ``"numpy"``. The file is opened on first use in each
    process; a pickled source carries only its path, level and transform.
    """

    def __init__(self, path: str | Path, level: int | None = None, mpp: float | None = None,
                 transform: Transform | None = None, backend: Backend = "auto") -> None:
        self.path = Path(path)
        self.backend = _choose_backend(self.path, backend)
        self._lock = threading.Lock()
        self._opened: tuple[int, Any] | None = None
        self._levels = _levels(self.path, self.backend)
        self.level = _choose_level(self.path, self._levels, level, mpp)
        array = self._stored()
        layout: Layout = "HWC" if len(array.shape) == 3 else "HW"
        if self.backend in ("zarr", "numpy") and _channels_first(array.shape):
            layout = "CHW"
        super().__init__(array, layout, transform, name=f"{self.path} level {self.level}")
        self.array = None

    def levels(self) -> list[LevelInfo]:
        """The file's pyramid levels, full resolution first."""
        return list(self._levels)

    @property
    def mpp(self) -> float | None:
        """µm per pixel of the level read, when the file says it."""
        return self._levels[self.level].mpp

    def _stored(self) -> Any:
        # Opened once per process: a forked DataLoader worker must not share the parent's file
        # offset, so a new process opens the file again.
        pid = os.getpid()
        if self._opened is None or self._opened[0] != pid:
            self._opened = (pid, _open_level(self.path, self.backend, self.level))
        return self._opened[1]

    def read(self, index: Index) -> np.ndarray:
        with self._lock:  # one reader at a time on the file's handle
            try:
                return super().read(index)
            except InputError:
                raise
            except (OSError, ValueError, RuntimeError, KeyError) as exc:
                raise SlideError(f"cannot read {self.path} level {self.level}: "
                                 f"{_first_line(exc)}.") from None

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_lock"] = None
        state["_opened"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()


def open_slide(path: str | Path, level: int | None = None, mpp: float | None = None,
               transform: Transform | None = None, backend: Backend = "auto") -> SlideSource:
    """A lazy source of one level of the slide at ``path`` (see :class:`SlideSource`)."""
    return SlideSource(path, level, mpp, transform, backend)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _choose_backend(path: Path, backend: Backend) -> str:
    if not path.exists():
        raise SlideError(f"{path} does not exist: check the slide's path.")
    name = path.name.lower()
    if backend != "auto":
        if backend not in ("tifffile", "openslide", "zarr", "numpy"):
            raise SlideError(f"backend={backend!r}: choose 'auto', 'tifffile', 'openslide', "
                             "'zarr' or 'numpy'.")
        return backend
    if path.is_dir() or name.endswith(".zarr"):
        return "zarr"
    if name.endswith(".npy"):
        return "numpy"
    if name.endswith(TIFF_SUFFIXES):
        return "tifffile"
    if name.endswith(OPENSLIDE_SUFFIXES):
        return "openslide"
    return "tifffile"  # tifffile says clearly when a file is not a TIFF


def _require(module: str, path: Path) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        extra = ("pip install openslide-bin openslide-python" if module == "openslide"
                 else "pip install 'streamc[slides]'")
        raise SlideError(f"reading {path} needs the {module} package: {extra}.") from None


def _tiff_levels(path: Path) -> list[LevelInfo]:
    tifffile = _require("tifffile", path)
    try:
        with tifffile.TiffFile(path) as tf:
            if not tf.series:
                raise SlideError(f"{path} holds no image.")
            series = tf.series[0]
            levels = list(series.levels)
            base_mpp = _tiff_mpp(tf)
            sizes = [_hw(level.shape, level.axes) for level in levels]
    except SlideError:
        raise
    except Exception as exc:  # noqa: BLE001 - tifffile raises many kinds for a bad file
        raise SlideError(f"{path} is not an image streamc can read ({_first_line(exc)}); "
                         "give a TIFF/SVS slide, a .zarr or .npy array, or an OpenSlide "
                         "format.") from None
    return _with_mpp(sizes, base_mpp)


def _hw(shape: Sequence[int], axes: str) -> tuple[int, int]:
    axes = axes.upper()
    if "Y" in axes and "X" in axes:
        return int(shape[axes.index("Y")]), int(shape[axes.index("X")])
    return int(shape[0]), int(shape[1])


def _with_mpp(sizes: list[tuple[int, int]], base_mpp: float | None) -> list[LevelInfo]:
    base_w = sizes[0][1]
    return [LevelInfo(size, None if base_mpp is None else base_mpp * base_w / size[1])
            for size in sizes]


def _tiff_mpp(tf: Any) -> float | None:
    """µm per pixel of the full-resolution level: an SVS description's ``MPP = ...``, else the
    resolution tags (centimetres or inches)."""
    page = tf.pages[0]
    description = getattr(page, "description", "") or ""
    found = re.search(r"MPP\s*=\s*([0-9.]+)", description)
    if found:
        return float(found.group(1))
    tags = page.tags
    if "XResolution" in tags and "ResolutionUnit" in tags:
        num, den = tags["XResolution"].value
        unit = int(tags["ResolutionUnit"].value)
        if num and den:
            per_unit = num / den
            microns = {3: 1e4, 2: 25400.0}.get(unit)
            if microns is not None and per_unit > 0:
                return microns / per_unit
    return None


def _openslide_levels(path: Path) -> list[LevelInfo]:
    openslide = _require("openslide", path)
    try:
        slide = openslide.OpenSlide(str(path))
    except Exception as exc:  # noqa: BLE001
        raise SlideError(f"{path} is not a slide OpenSlide can read ({_first_line(exc)}).") \
            from None
    try:
        mpp = slide.properties.get("openslide.mpp-x")
        sizes = [(int(h), int(w)) for w, h in slide.level_dimensions]
        return _with_mpp(sizes, float(mpp) if mpp else None)
    finally:
        slide.close()


def _channels_first(shape: Sequence[int]) -> bool:
    return len(shape) == 3 and shape[0] <= 4 < shape[2]


def _array_levels(path: Path, backend: str) -> list[LevelInfo]:
    shapes = [_open_level(path, backend, 0).shape]
    if backend == "zarr":  # a multiscale group holds its levels as arrays "0", "1", ...
        while True:
            try:
                shapes.append(_open_level(path, backend, len(shapes), quiet=True).shape)
            except (SlideError, KeyError):
                break
    return [LevelInfo((int(s[1]), int(s[2])) if _channels_first(s) else (int(s[0]), int(s[1])),
                      None) for s in shapes]


def _levels(path: Path, backend: str) -> list[LevelInfo]:
    if backend == "tifffile":
        return _tiff_levels(path)
    if backend == "openslide":
        return _openslide_levels(path)
    return _array_levels(path, backend)


def _choose_level(path: Path, levels: list[LevelInfo], level: int | None, mpp: float | None
                  ) -> int:
    described = ", ".join(f"{k}: {h}x{w}" + (f" at {m:.3g} µm/px" if m else "")
                          for k, ((h, w), m) in enumerate((lv.size, lv.mpp) for lv in levels))
    if level is not None and mpp is not None:
        raise SlideError(f"{path}: give a level or a resolution (µm/px), not both.")
    if mpp is not None:
        if not mpp > 0:
            raise SlideError(f"{path}: the resolution must be a positive number of µm per "
                             f"pixel, not {mpp}.")
        known = [(k, lv.mpp) for k, lv in enumerate(levels) if lv.mpp]
        if not known:
            raise SlideError(f"{path} does not say its resolution (µm/px): choose a level "
                             f"instead ({described}).")
        k, found = min(known, key=lambda km: abs(math.log(km[1] / mpp)))
        if abs(found - mpp) > MPP_TOLERANCE * mpp:
            raise SlideError(f"{path} has no level at {mpp:g} µm/px (levels {described}): "
                             "choose one of these resolutions or a level.")
        return k
    level = 0 if level is None else level
    if isinstance(level, bool) or not isinstance(level, (int, np.integer)) \
            or not 0 <= level < len(levels):
        raise SlideError(f"{path} has no level {level}; its levels are {described}.")
    return int(level)


def _open_level(path: Path, backend: str, level: int, quiet: bool = False) -> Any:
    """The level as an array-like (HWC, CHW or HW)."""
    try:
        if backend == "tifffile":
            tifffile = _require("tifffile", path)
            zarr = _require("zarr", path)
            store = tifffile.imread(path, aszarr=True, level=level)
            return zarr.open(store, mode="r")
        if backend == "openslide":
            openslide = _require("openslide", path)
            return OpenSlideLevel(openslide.OpenSlide(str(path)), level)
        if backend == "zarr":
            zarr = _require("zarr", path)
            opened = zarr.open(str(path), mode="r")
            if hasattr(opened, "shape"):
                if level:
                    raise KeyError(level)
                return opened
            return opened[str(level)]  # a multiscale group: levels "0", "1", ...
        array = np.load(path, mmap_mode="r", allow_pickle=False)
        if array.ndim not in (2, 3):
            raise SlideError(f"{path} holds an array of shape {list(array.shape)}; an image is "
                             "HxW, HxWxC or CxHxW.")
        return array
    except SlideError:
        raise
    except Exception as exc:  # noqa: BLE001 - each library raises its own kinds
        if quiet:
            raise KeyError(level) from None
        raise SlideError(f"{path} is not an image streamc can read ({_first_line(exc)}).") \
            from None


def describe(source: ImageSource) -> str:
    """``"path level 1 (3x16384x16384)"``: a source in words, for messages."""
    size = "x".join(map(str, source.shape[1:]))
    return f"{getattr(source, 'name', type(source).__name__)} ({size})"


__all__ = [
    "ArraySource",
    "IDENTITY",
    "ImageSource",
    "LevelInfo",
    "OpenSlideLevel",
    "RegionSource",
    "SlideError",
    "SlideSource",
    "SourceBatch",
    "Transform",
    "describe",
    "is_image_source",
    "open_slide",
    "region",
]
