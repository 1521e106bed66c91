"""The weights a set of sessions runs with: a snapshot, reused while the weights are unchanged."""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

_GENERATIONS = itertools.count(1)


def as_numpy(value: Any) -> np.ndarray:
    """A CPU numpy view of a numpy array or torch tensor (a copy only from another device or
    when it is not contiguous)."""
    if isinstance(value, np.ndarray):
        return np.ascontiguousarray(value)
    value = value.detach()
    if value.device.type != "cpu":
        value = value.cpu()
    return np.ascontiguousarray(value.numpy())


@dataclass
class WeightSet:
    """The weights one set of sessions is built for.

    ``tensors`` maps parameter names to detached tensors on the runtime's device, or numpy
    arrays (the reference backend); a snapshot (:func:`snapshot_weights`) holds a private copy
    taken when the set was made, so that later in-place updates cannot reach sessions built
    from it. ``generation`` identifies the set (0: not a snapshot, never baked into a session).
    """

    tensors: dict[str, Any]
    generation: int = field(default_factory=lambda: next(_GENERATIONS))
    #: (version counter, storage address) of each source tensor when the copy was taken.
    sources: dict[str, tuple[int, int]] = field(default_factory=dict, repr=False)
    _arrays: dict[str, np.ndarray] | None = field(default=None, repr=False)

    def arrays(self) -> dict[str, np.ndarray]:
        """CPU numpy copies (cached): what ORT's external initializers point at."""
        if self._arrays is None:
            self._arrays = {name: as_numpy(t) for name, t in self.tensors.items()}
        return self._arrays


def snapshot_weights(tensors: Mapping[str, Any], previous: WeightSet | None) -> WeightSet:
    """``previous`` if every tensor still holds the same values, else a fresh copy.

    A changed version counter or storage means a change (optimizers' in-place updates bump
    ``tensor._version``). Unchanged counters are not trusted: fused optimizers
    (``torch.optim.Adam(fused=True)``) and writes through ``.data`` change values without
    bumping them, so the values are then compared with the copy (one pass over the weights).
    """
    import torch

    sources = {name: (t._version, t.data_ptr()) for name, t in tensors.items()}
    if (previous is not None and previous.tensors.keys() == tensors.keys()
            and previous.sources == sources):
        same = True
        for name, t in tensors.items():
            old = previous.tensors[name]
            if (old.shape != t.shape or old.dtype != t.dtype or old.device != t.device
                    or not torch.equal(old, t.detach())):
                same = False
                break
        if same:
            return previous
    copies = {name: t.detach().clone(memory_format=torch.contiguous_format)
              for name, t in tensors.items()}
    return WeightSet(copies, sources=sources)


