"""Devices and ONNX Runtime execution providers: the CPU provider, or CUDA with a bounded arena.

Everything CUDA-specific about sessions lives here: checking that a GPU and a CUDA build of ONNX
Runtime are there, the provider options, and the one process-wide CUDA arena shared by every
session (so ``gpu_mem_limit`` bounds all of them together). torch is imported only for CUDA.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

from streamc.errors import StreamcError
from streamc.runtime.allocators import SHARED_ARENAS

if TYPE_CHECKING:
    import torch

    from streamc.runtime.options import RuntimeOptions

Providers = list[str | tuple[str, dict[str, Any]]]


class DeviceError(StreamcError):
    """The requested device cannot be used: no GPU, or no CUDA build of ONNX Runtime."""


def device_type(device: str | torch.device) -> str:
    """``"cpu"`` or ``"cuda"`` (or whatever else was asked for) of a device or device string."""
    return getattr(device, "type", None) or str(device).split(":")[0]


def check_cuda(device: torch.device) -> None:
    """Raise :class:`DeviceError` unless torch sees a GPU and ORT has the CUDA provider."""
    import torch

    if not torch.cuda.is_available():
        raise DeviceError(
            "device='cuda' needs a CUDA GPU visible to torch, and torch.cuda.is_available() is "
            "False: install a CUDA build of torch on a machine with an NVIDIA GPU, or use "
            "device='cpu'."
        )
    import onnxruntime as ort

    available = ort.get_available_providers()
    if "CUDAExecutionProvider" not in available:
        raise DeviceError(
            "device='cuda' needs ONNX Runtime's CUDAExecutionProvider, which this onnxruntime "
            f"build lacks (it has {', '.join(available)}): uninstall onnxruntime and install "
            "onnxruntime-gpu instead (pip uninstall onnxruntime && pip install onnxruntime-gpu; "
            "never both: they provide the same module)."
        )
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index >= torch.cuda.device_count():
        raise DeviceError(f"device {device} does not exist: torch sees "
                          f"{torch.cuda.device_count()} GPU(s).")


def device_index(device: torch.device) -> int:
    """The GPU index of a CUDA device (the current one when unnumbered); 0 on CPU."""
    if device_type(device) != "cuda":
        return 0
    import torch

    return device.index if device.index is not None else torch.cuda.current_device()


def gpu_mem_limit(device: torch.device, options: RuntimeOptions) -> int:
    """Bytes ORT's CUDA arena may hold: the option, or half the GPU (the rest is torch's)."""
    if options.gpu_mem_limit is not None:
        return int(options.gpu_mem_limit)
    import torch

    return torch.cuda.get_device_properties(device_index(device)).total_memory // 2


def resolve_providers(device: str | torch.device, options: RuntimeOptions, baked: bool = True
                      ) -> Providers:
    """ORT providers for ``device``: the CPU provider, or CUDA (bounded arena) then CPU."""
    if options.providers is not None:
        return list(options.providers)
    kind = device_type(device)
    if kind == "cpu":
        return ["CPUExecutionProvider"]
    if kind != "cuda":
        raise DeviceError(f"device {device} is not supported: use 'cpu' or 'cuda'.")
    check_cuda(device)
    search = options.cudnn_conv_algo_search or ("HEURISTIC" if baked else "EXHAUSTIVE")
    cuda_options = {
        "device_id": device_index(device),
        "gpu_mem_limit": gpu_mem_limit(device, options),
        "arena_extend_strategy": "kSameAsRequested",
        "cudnn_conv_algo_search": search,
        "do_copy_in_default_stream": True,
    }
    return [("CUDAExecutionProvider", cuda_options), "CPUExecutionProvider"]


def register_shared_cuda_arena(index: int, limit: int) -> bool:
    """Register one process-wide CUDA arena for GPU ``index``, bounded to ``limit`` bytes.

    Every session then allocates from it (``session.use_env_allocators``), so the bound holds
    for all of them together; a per-session ``gpu_mem_limit`` would bound each session alone.
    The first registration's limit stays for the process. Returns False (sessions keep their
    own bounded arenas) if this ORT build refuses it.
    """
    key = f"cuda:{index}"
    if key not in SHARED_ARENAS:
        import onnxruntime as ort

        try:
            info = ort.OrtMemoryInfo("Cuda", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, index,
                                     ort.OrtMemType.DEFAULT)
            cfg = ort.OrtArenaCfg({"max_mem": int(limit), "arena_extend_strategy": 1})
            ort.create_and_register_allocator_v2("CUDAExecutionProvider", info,
                                                 {"device_id": str(index)}, cfg)
            SHARED_ARENAS[key] = True
        except Exception as exc:  # noqa: BLE001 - ORT raises its own exception types
            warnings.warn(f"streamc: could not register a shared ONNX Runtime CUDA arena "
                          f"({exc}); each session keeps its own arena bounded to "
                          f"gpu_mem_limit.", stacklevel=3)
            SHARED_ARENAS[key] = False
    return SHARED_ARENAS[key]
