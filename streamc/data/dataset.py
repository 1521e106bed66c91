"""A torch ``Dataset`` of slides: rows of (path, level or µm/px, label) yielding lazy sources.

:class:`SlideDataset` holds rows (:class:`SlideRow`), from a list or a CSV file
(:meth:`SlideDataset.from_csv`), and its items are ``(source, label)`` pairs, where the source
is a :class:`~streamc.data.sources.SlideSource`: only the file's header is read, never its
pixels. It works with a plain ``torch.utils.data.DataLoader``: pass
``collate_fn=collate_slides`` (torch's default collate does not know sources), and any number of
workers: a source pickles as its path, level and transform, and each process opens the file
itself when it first reads a crop. A batch keeps its sources lazy: one
:class:`~streamc.data.sources.SourceBatch` when the images share a size, else a list, which
:class:`~streamc.runtime.any_size.AnySizeModel` runs image by image.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from streamc.data.sources import Backend, SlideError, SlideSource, SourceBatch, Transform


@dataclass(frozen=True)
class SlideRow:
    """One slide: its path, the level (or µm/px) to read, and its label."""

    path: str
    label: Any = None
    level: int | None = None
    mpp: float | None = None


class SlideDataset(Dataset):
    """A map-style torch dataset of slides (see the module docstring).

    ``rows``: :class:`SlideRow` s (or ``(path, label)`` pairs). ``level`` / ``mpp``: the default
    for rows that give neither. ``transform``: the per-tile transform of every source.
    ``root``: relative paths are taken from here.
    """

    def __init__(self, rows: Sequence[SlideRow | tuple], *, level: int | None = None,
                 mpp: float | None = None, transform: Transform | None = None,
                 backend: Backend = "auto", root: str | Path | None = None) -> None:
        self.rows = [r if isinstance(r, SlideRow) else SlideRow(str(r[0]), *r[1:]) for r in rows]
        self.level = level
        self.mpp = mpp
        self.transform = transform
        self.backend = backend
        self.root = Path(root) if root is not None else None

    @classmethod
    def from_csv(cls, path: str | Path, **options: Any) -> SlideDataset:
        """Rows from a CSV file with a header: ``path`` and ``label`` columns, and optionally
        ``level`` or ``mpp`` per row. Relative paths are taken from the CSV's folder (unless
        ``root`` is given); labels that are integers become ints."""
        path = Path(path)
        try:
            with open(path, newline="") as f:
                reader = csv.DictReader(f)
                fields = reader.fieldnames or []
                if "path" not in fields:
                    raise SlideError(f"{path} has no 'path' column (its header is "
                                     f"{', '.join(fields) or 'empty'}): a slide list needs "
                                     "path and label columns.")
                rows = [SlideRow(r["path"], _label(r.get("label")),
                                 _number(r, "level", path, k, int),
                                 _number(r, "mpp", path, k, float))
                        for k, r in enumerate(reader, 2)]
        except OSError as exc:
            raise SlideError(f"cannot read the slide list {path}: "
                             f"{exc.strerror or type(exc).__name__}.") from None
        options.setdefault("root", path.parent)
        return cls(rows, **options)

    def __len__(self) -> int:
        return len(self.rows)

    def source(self, index: int) -> SlideSource:
        """The lazy source of row ``index`` (reads the file's header only)."""
        row = self.rows[index]
        path = Path(row.path)
        if self.root is not None and not path.is_absolute():
            path = self.root / path
        level, mpp = row.level, row.mpp
        if level is None and mpp is None:
            level, mpp = self.level, self.mpp
        return SlideSource(path, level, mpp, self.transform, self.backend)

    def sizes(self) -> dict[tuple[int, ...], int]:
        """How many slides have each image size (reads every file's header): a model compiles
        one program per size."""
        counts: dict[tuple[int, ...], int] = {}
        for k in range(len(self)):
            size = tuple(self.source(k).shape[2:])
            counts[size] = counts.get(size, 0) + 1
        return counts

    def __getitem__(self, index: int) -> tuple[SlideSource, Any]:
        return self.source(index), self.rows[index].label


def collate_slides(batch: Sequence[tuple[Any, Any]]) -> tuple[Any, Any]:
    """``DataLoader`` collate for ``(source, label)`` items: the sources stay lazy (one
    :class:`SourceBatch` if they share a size, else a list); labels become a tensor when they
    are numbers."""
    sources = [s for s, _ in batch]
    labels = [y for _, y in batch]
    shapes = {tuple(s.shape[1:]) for s in sources}
    images: Any = SourceBatch(sources) if len(shapes) == 1 else sources
    if all(isinstance(y, (int, float)) and not isinstance(y, bool) for y in labels):
        return images, torch.tensor(labels)
    return images, labels


def _label(text: str | None) -> Any:
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            return text


def _number(row: dict, key: str, path: Path, line: int, kind: type) -> int | float | None:
    """Column ``key`` of a CSV row as ``kind`` (int or float); None when empty."""
    text = (row.get(key) or "").strip()
    if not text:
        return None
    try:
        return kind(text)
    except ValueError:
        what = "a whole number" if kind is int else "a number"
        raise SlideError(f"{path} line {line}: {key} {text!r} is not {what}.") from None


__all__ = ["SlideDataset", "SlideRow", "collate_slides"]
