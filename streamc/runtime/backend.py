"""Backends: the tensor work of the interpreter, on one kind of array and device.

The :class:`~streamc.runtime.interpreter.Interpreter` walks a program's steps and asks its
backend for everything that touches data: crop an image, allocate and write regions of the cut
tensors, run a graph, add gradients up, release a session. A backend owns a
:class:`~streamc.runtime.sessions.SessionPool`, which builds sessions by the runtime policy.

Backends: :class:`NumpyBackend` (numpy arrays on ONNX Runtime's CPU provider: the reference
that ``streamc check`` runs) here; :class:`~streamc.runtime.torch_backend.TorchCpuBackend` and
:class:`~streamc.runtime.torch_backend.TorchCudaBackend` (torch tensors; what
:class:`~streamc.runtime.module.StreamingModel` runs) beside it. A new backend implements
:class:`Backend` (docs/architecture.md says how).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from streamc.program import Program
from streamc.runtime.options import RuntimeOptions
from streamc.runtime.sessions import SessionPool, gather_inputs
from streamc.runtime.weights import WeightSet, as_numpy
from streamc.steps import Step

Box = Sequence[Sequence[int]]
#: An index into a tensor (slices and ints), built by the interpreter from a box and the
#: positions of the tensor's spatial axes.
Index = tuple


def region(box: Box) -> tuple[slice, ...]:
    """Index of a spatial box over a channels-first tensor (N, C, *spatial)."""
    return (slice(None), slice(None)) + tuple(slice(a, b) for a, b in box)


class Backend(Protocol):
    """What the interpreter needs of a backend (arrays are the backend's own type)."""

    pool: SessionPool

    def crop(self, tensor: Any, index: Index) -> Any:
        """``tensor[index]`` as a graph input (contiguous)."""

    def read(self, tensor: Any, index: Index) -> Any:
        """``tensor[index]`` (a region of a gradient buffer) as a graph input."""

    def from_numpy(self, array: np.ndarray) -> Any:
        """A numpy array (a crop read from a lazy image) as this backend's array."""

    def full(self, shape: Sequence[int], value: float, dtype: np.dtype) -> Any:
        """A new tensor of ``shape`` filled with ``value``."""

    def write(self, target: Any, index: Index, value: Any) -> None:
        """``target[index] = value``."""

    def add(self, target: Any, index: Index, value: Any) -> None:
        """``target[index] += value``."""

    def accumulate(self, totals: dict[str, Any], name: str, value: Any) -> None:
        """``totals[name] += value`` (or set it)."""

    def batch(self, tensor: Any, chunk: slice) -> Any:
        """The batch rows ``chunk`` of a tensor."""

    def concat(self, parts: list[Any]) -> Any:
        """Tensors joined along the batch axis."""

    def run(self, step: Step, weights: WeightSet, feeds: Mapping[str, Any],
            outputs: Sequence[str]) -> list[Any]:
        """Run the step's graph (baked or fed as the step says) and return ``outputs``."""

    def release(self, step: Step) -> None:
        """Free the baked session of the step's graph."""


class NumpyBackend:
    """The reference backend: numpy arrays, ONNX Runtime's CPU provider, the runtime policy's
    sessions (the same sessions training builds). Backends on other CPU arrays subclass it and
    convert at :meth:`to_numpy` and :meth:`from_numpy`."""

    def __init__(self, program: Program, options: RuntimeOptions | None = None,
                 device: Any = "cpu") -> None:
        self.pool = SessionPool(program, device, options)

    def to_numpy(self, value: Any) -> np.ndarray:
        """A graph input as the contiguous numpy array ONNX Runtime reads."""
        return as_numpy(value)

    def from_numpy(self, array: np.ndarray) -> Any:
        """A graph output as this backend's array."""
        return array

    def crop(self, tensor: np.ndarray, index: Index) -> np.ndarray:
        return np.ascontiguousarray(tensor[index])

    read = crop

    def full(self, shape: Sequence[int], value: float, dtype: np.dtype) -> np.ndarray:
        return np.full(tuple(shape), value, dtype=dtype)

    def write(self, target: np.ndarray, index: Index, value: np.ndarray) -> None:
        target[index] = value

    def add(self, target: np.ndarray, index: Index, value: np.ndarray) -> None:
        target[index] += value

    def accumulate(self, totals: dict[str, np.ndarray], name: str, value: np.ndarray) -> None:
        if name in totals:
            np.add(totals[name], value, out=totals[name])
        else:
            totals[name] = value  # a fresh array from ONNX Runtime

    def batch(self, tensor: np.ndarray, chunk: slice) -> np.ndarray:
        return tensor[chunk]

    def concat(self, parts: list[np.ndarray]) -> np.ndarray:
        return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)

    def run(self, step: Step, weights: WeightSet, feeds: Mapping[str, Any],
            outputs: Sequence[str]) -> list[np.ndarray]:
        session = self.pool.session(step.graph, weights, step.baked)
        inputs = gather_inputs(session, feeds, weights, step.graph)
        results = self.pool.run_cpu(session, {k: self.to_numpy(v) for k, v in inputs.items()},
                                    outputs)
        return [self.from_numpy(r) for r in results]

    def release(self, step: Step) -> None:
        self.pool.release(step.graph, baked=True)
