"""Process-wide allocator state on the CPU: ONNX Runtime's shared arena and glibc's malloc.

The shared arena is registered once per process and every session that opts in allocates from
it; glibc's mmap threshold and ``malloc_trim`` decide whether freed memory goes back to the
system (docs/memory.md).
"""

from __future__ import annotations

from typing import Any

SHARED_ARENAS: dict[str, bool] = {}


def register_shared_cpu_arena(extend: str = "same", reserve: int = 0) -> None:
    """Register one process-wide CPU arena that every session opting in shares.

    ``reserve``: bytes of the arena's first region (0: ORT's default; ORT honours it with
    ``extend="pow2"`` only). Pages of it that no tensor ever used are never touched, so they
    cost no resident memory.
    """
    if shared_arena_registered("cpu"):
        return
    import onnxruntime as ort

    info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0,
                             ort.OrtMemType.DEFAULT)
    try:
        # max_mem 0 = unlimited, extend strategy 1 = kSameAsRequested (0 = kNextPowerOfTwo),
        # default chunk settings.
        strategy = 0 if extend == "pow2" else 1
        initial = int(reserve) if reserve > 0 else -1
        ort.create_and_register_allocator(info, ort.OrtArenaCfg(0, strategy, initial, -1))
    except Exception:  # noqa: BLE001 - e.g. the application registered one already: use it
        pass
    SHARED_ARENAS["cpu"] = True


#: ORT reads an arena's first region size as a 32-bit int.
MAX_ARENA_REGION = 2**31 - 1


def arena_reserve_for(largest_graph: int) -> int:
    """The first region of the shared CPU arena for a program whose largest tile graph run is
    planned at ``largest_graph`` bytes: the smallest power of two above it (so the largest run
    fits in one region, with room for the smaller graphs' tensors that come and go beside it),
    at most :data:`MAX_ARENA_REGION`; 0 (ORT's default) when unknown. Measured on ResNet-18 at
    4096² (``benchmarks/results/arena_reserve.json``): tile 512 (largest graph 273 MiB) was
    best of 512 MiB / 1 / 2 GiB at 512 MiB, tile 1024 (1038 MiB) at 2 GiB."""
    if largest_graph <= 0:
        return 0
    return min(1 << int(largest_graph).bit_length(), MAX_ARENA_REGION)


def shared_arena_registered(device: str = "cpu") -> bool:
    """Whether this process registered its shared arena for ``device`` already."""
    return device in SHARED_ARENAS


_MALLOC_TUNED: dict[str, Any] = {}


def _libc():
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def tune_malloc(mmap_threshold: int) -> bool:
    """Fix glibc's mmap threshold at ``mmap_threshold`` bytes (process-wide, once).

    glibc raises its mmap threshold dynamically (up to 32 MiB) each time a mmapped block is
    freed, after which blocks of that size come from the heap and stay resident when freed;
    a fixed threshold keeps every tile-sized buffer mmapped. Setting ``MALLOC_*`` environment
    variables after the interpreter started has no effect, hence ``mallopt``. Returns False
    where there is no glibc.
    """
    if _MALLOC_TUNED.get("mmap") == mmap_threshold:
        return True
    libc = _libc()
    if libc is None or not hasattr(libc, "mallopt"):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    ok = bool(libc.mallopt(m_mmap_threshold, int(mmap_threshold)))
    ok = bool(libc.mallopt(m_trim_threshold, int(max(mmap_threshold, 1 << 20)) * 2)) and ok
    _MALLOC_TUNED["mmap"] = mmap_threshold
    return ok


def malloc_trim() -> None:
    """Give freed heap memory back to the OS (glibc ``malloc_trim(0)``; no-op elsewhere)."""
    libc = _MALLOC_TUNED.get("libc")
    if libc is None:
        libc = _libc()
        _MALLOC_TUNED["libc"] = libc if libc is not None and hasattr(libc, "malloc_trim") else 0
        libc = _MALLOC_TUNED["libc"]
    if libc:
        libc.malloc_trim(0)
