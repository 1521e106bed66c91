"""The torch backends: torch tensors on the CPU or a CUDA GPU, run on ONNX Runtime.

:class:`TorchCpuBackend` hands ORT zero-copy numpy views of CPU tensors; :class:`TorchCudaBackend`
binds tensors' device memory through IOBinding (``data_ptr()``), so tiles, weights and gradients
never leave the GPU. Both are what :class:`~streamc.runtime.module.StreamingModel` runs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import onnx
import torch

from streamc.errors import StreamcError
from streamc.program import Program
from streamc.runtime.backend import Index, NumpyBackend
from streamc.runtime.options import RuntimeOptions
from streamc.runtime.providers import device_index
from streamc.runtime.sessions import Session, gather_inputs
from streamc.runtime.weights import WeightSet
from streamc.steps import Step

_NUMPY_OF_TORCH = {
    torch.float32: np.float32,
    torch.float64: np.float64,
    torch.float16: np.float16,
    torch.int64: np.int64,
    torch.int32: np.int32,
    torch.bool: np.bool_,
    torch.uint8: np.uint8,
    torch.int8: np.int8,
}
_TORCH_OF_ONNX = {
    onnx.TensorProto.FLOAT: torch.float32,
    onnx.TensorProto.DOUBLE: torch.float64,
    onnx.TensorProto.FLOAT16: torch.float16,
    onnx.TensorProto.INT64: torch.int64,
    onnx.TensorProto.INT32: torch.int32,
    onnx.TensorProto.BOOL: torch.bool,
    onnx.TensorProto.UINT8: torch.uint8,
    onnx.TensorProto.INT8: torch.int8,
}
_TORCH_OF_ORT_TYPE = {
    "tensor(float)": torch.float32,
    "tensor(double)": torch.float64,
    "tensor(float16)": torch.float16,
    "tensor(int64)": torch.int64,
    "tensor(int32)": torch.int32,
    "tensor(bool)": torch.bool,
    "tensor(uint8)": torch.uint8,
    "tensor(int8)": torch.int8,
}


_TORCH_OF_NUMPY = {np.dtype(v): k for k, v in _NUMPY_OF_TORCH.items()}


def torch_dtype_of_onnx(elem_type: int) -> torch.dtype:
    """The torch dtype of an ONNX ``TensorProto`` element type."""
    if elem_type not in _TORCH_OF_ONNX:
        raise StreamcError(
            f"ONNX element type {onnx.TensorProto.DataType.Name(elem_type)} is not supported by "
            "the streamc runtime."
        )
    return _TORCH_OF_ONNX[elem_type]


def _numpy_view(t: torch.Tensor) -> np.ndarray:
    """A numpy view of a CPU tensor (a copy only when it is not contiguous).

    The copy is numpy's, single-threaded: torch's multi-threaded copy of a small crop costs
    more in thread wake-ups (ORT's pool has just been spinning) than it saves.
    """
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    return np.ascontiguousarray(t.numpy())


class TorchCpuBackend(NumpyBackend):
    """torch CPU tensors; ORT reads and writes them through numpy views."""

    def __init__(self, program: Program, options: RuntimeOptions | None = None,
                 device: torch.device | str = "cpu") -> None:
        options = options or RuntimeOptions()
        if options.threads is None:
            options = replace(options, threads=torch.get_num_threads())
        self.device = torch.device(device)
        super().__init__(program, options, self.device)

    to_numpy = staticmethod(_numpy_view)

    def from_numpy(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array))

    def crop(self, tensor: torch.Tensor, index: Index) -> torch.Tensor:
        return tensor[index]

    read = crop

    def full(self, shape: Sequence[int], value: float, dtype: np.dtype) -> torch.Tensor:
        return torch.full(tuple(shape), value, dtype=_TORCH_OF_NUMPY[np.dtype(dtype)],
                          device=self.device)

    def write(self, target: torch.Tensor, index: Index, value: torch.Tensor) -> None:
        # Through numpy: one thread, no thread wake-ups.
        target.numpy()[index] = value.numpy()

    def add(self, target: torch.Tensor, index: Index, value: torch.Tensor) -> None:
        view = target.numpy()[index]
        np.add(view, value.numpy(), out=view)

    def accumulate(self, totals: dict[str, torch.Tensor], name: str, value: torch.Tensor
                   ) -> None:
        if name not in totals:
            totals[name] = value
        else:
            total = totals[name].numpy()
            np.add(total, value.numpy(), out=total)

    def concat(self, parts: list[torch.Tensor]) -> torch.Tensor:
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)


class TorchCudaBackend(TorchCpuBackend):
    """torch CUDA tensors, bound to ORT's CUDA provider through IOBinding."""

    def write(self, target: torch.Tensor, index: Index, value: torch.Tensor) -> None:
        target[index] = value

    def add(self, target: torch.Tensor, index: Index, value: torch.Tensor) -> None:
        target[index] += value

    def accumulate(self, totals: dict[str, torch.Tensor], name: str, value: torch.Tensor
                   ) -> None:
        if name not in totals:
            totals[name] = value
        else:
            totals[name] += value

    def run(self, step: Step, weights: WeightSet, feeds: Mapping[str, Any],
            outputs: Sequence[str]) -> list[torch.Tensor]:
        session = self.pool.session(step.graph, weights, step.baked)
        return self._run_bound(session, gather_inputs(session, feeds, weights, step.graph),
                               outputs)

    def _run_bound(self, entry: Session, inputs: Mapping[str, torch.Tensor],
                   outputs: Sequence[str]) -> list[torch.Tensor]:
        """IOBinding on torch's device memory: no host round trip for inputs or outputs."""
        index = device_index(self.device)
        binding = entry.session.io_binding()
        alive = []
        for name, t in inputs.items():
            t = t.detach()
            if t.device != self.device:
                t = t.to(self.device)
            t = t.contiguous()
            alive.append(t)
            binding.bind_input(name, "cuda", index, _NUMPY_OF_TORCH[t.dtype], list(t.shape),
                               t.data_ptr())
        results: list[torch.Tensor | None] = []
        for name in outputs:
            shape, ort_type = entry.outputs[name]
            dtype = _TORCH_OF_ORT_TYPE.get(ort_type, torch.float32)
            if all(isinstance(d, int) for d in shape):
                out = torch.empty(shape, dtype=dtype, device=self.device)
                binding.bind_output(name, "cuda", index, _NUMPY_OF_TORCH[dtype], list(shape),
                                    out.data_ptr())
                results.append(out)
            else:  # dynamic shape: let ORT allocate, then take it over through DLPack
                binding.bind_output(name, "cuda", index)
                results.append(None)
        # ORT runs on its own CUDA stream: torch's pending work on these tensors must be done.
        torch.cuda.current_stream(self.device).synchronize()
        entry.session.run_with_iobinding(binding)
        binding.synchronize_outputs()
        if any(r is None for r in results):
            values = binding.get_outputs()
            for k, r in enumerate(results):
                if r is None:
                    results[k] = _torch_from_ortvalue(values[k], self.device)
        del alive
        return results  # type: ignore[return-value]


def _torch_from_ortvalue(value: Any, device: torch.device) -> torch.Tensor:
    try:
        return torch.from_dlpack(value._get_c_value().to_dlpack())
    except Exception:  # older ORT builds without DLPack export
        return torch.from_numpy(value.numpy()).to(device)
