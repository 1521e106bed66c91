"""Sizes as people write them: memory (``8GiB``) and extents (``2048x1536``, ``64x64x64``).

One grammar each, used by the command line and the Python API alike.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Sequence

from streamc.errors import StreamcError

_UNITS = {
    "": 1, "b": 1,
    "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
    "t": 10**12, "tb": 10**12, "p": 10**15, "pb": 10**15,
    "ki": 2**10, "kib": 2**10, "mi": 2**20, "mib": 2**20, "gi": 2**30, "gib": 2**30,
    "ti": 2**40, "tib": 2**40, "pi": 2**50, "pib": 2**50,
}
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([a-zA-Z]*)\s*$")
#: Largest extent accepted along one axis: beyond it every size computation overflows int64
#: somewhere (ONNX shapes are int64), long before any machine could hold the image.
MAX_EXTENT = 2**31 - 1


def parse_bytes(text: str | int) -> int:
    """``'4GiB'``, ``'512MiB'``, ``'8GB'``, ``'1.5G'`` or plain bytes (``'1000000'``) -> bytes.

    Binary units (KiB, MiB, GiB, TiB, PiB) are powers of 1024, decimal ones (kB, MB, GB, TB,
    PB and the bare letters k, M, G, T, P) powers of 1000. Case does not matter.
    """
    if isinstance(text, bool):
        raise StreamcError(f"memory size {text!r} is not a size.")
    if isinstance(text, int):
        if text <= 0:
            raise StreamcError(f"memory size {text} must be positive.")
        return text
    match = _SIZE.match(str(text))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise StreamcError(
            f"memory size {text!r} is not a size: write a number with an optional unit, e.g. "
            "4GiB, 512MiB, 8GB or 1000000 (bytes)."
        )
    value = float(match.group(1)) * _UNITS[unit]
    if value < 1:
        raise StreamcError(f"memory size {text!r} must be at least one byte.")
    return int(value)


def format_bytes(n: float) -> str:
    """Bytes as a short human string in binary units (``'1.50 GiB'``)."""
    for unit, scale in (("PiB", 2**50), ("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20),
                        ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def parse_extent(value: int | str | Sequence[int], what: str = "size",
                 n_spatial: int | None = None) -> tuple[int, ...]:
    """``2048``, ``"2048"``, ``"2048x1536"``, ``"64x64x64"`` or ``(2048, 1536)`` -> one positive
    whole number per axis.

    A single number stands for every axis: it is repeated ``n_spatial`` times when that is
    given, and returned alone otherwise (:func:`per_axis` expands it once the rank is known).
    ``what`` names the value in errors (``"image size"``, ``"tile size"``).
    """
    if isinstance(value, str):
        text = value.strip().lower().replace("×", "x")
        try:
            parts = [int(p) for p in text.split("x")]
        except ValueError:
            raise StreamcError(
                f"{what} {value!r} is not a number or NxM (e.g. 2048, 2048x1536 or "
                "64x64x64)."
            ) from None
    else:
        # Whole numbers only: a float (2048.5) or a bool is a mistake, not a size.
        values = [value] if not isinstance(value, Sequence) else list(value)
        try:
            if not values or any(isinstance(p, bool) for p in values):
                raise TypeError
            parts = [operator.index(p) for p in values]
        except TypeError:
            raise StreamcError(
                f"{what} {value!r} must be a whole number of pixels per axis, e.g. 2048, "
                "'2048x1536' or (2048, 1536)."
            ) from None
    if any(p <= 0 for p in parts):
        raise StreamcError(f"{what} {value!r} must be positive.")
    if any(p > MAX_EXTENT for p in parts):
        raise StreamcError(
            f"{what} {value!r} is too large: at most {MAX_EXTENT} pixels per axis.")
    return per_axis(tuple(parts), n_spatial, what, value) if n_spatial is not None \
        else tuple(parts)


def per_axis(parts: tuple[int, ...], n_spatial: int, what: str = "size",
             original: object = None) -> tuple[int, ...]:
    """``parts`` for ``n_spatial`` axes: one number is repeated, otherwise the counts must match."""
    if len(parts) == 1:
        return parts * n_spatial
    if len(parts) != n_spatial:
        shown = original if original is not None else "x".join(map(str, parts))
        raise StreamcError(
            f"{what} {shown!r} has {len(parts)} axes but the image has {n_spatial} spatial axes."
        )
    return parts
