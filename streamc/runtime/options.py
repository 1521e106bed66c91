"""How the runtime builds its ONNX Runtime sessions: the policy, and the knobs of one process."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from streamc.policy import DEFAULT_POLICY, RuntimePolicy

#: glibc's mmap threshold with ``allocator="system"``: tensors of at least this many bytes are
#: mapped and unmapped, so freed ones go back to the system (docs/memory.md).
SYSTEM_MMAP_THRESHOLD = 64 * 2**10


@dataclass(frozen=True)
class RuntimeOptions:
    """Session settings: the :class:`~streamc.policy.RuntimePolicy` (which the memory plan
    follows too) and what only the running process needs to know.

    ``threads``: ORT intra-op threads, default ``torch.get_num_threads()`` (or ORT's default
    without torch). ``providers``: explicit ORT providers (names or ``(name, options)`` pairs),
    overriding the device's defaults. ``gpu_mem_limit``: bytes ORT's CUDA arena may hold
    (default: half the GPU's memory, the rest is torch's); the arena is one process-wide ORT
    allocator shared by all sessions. ``cpu_arena``: ``"shared"`` gives every session one
    process-wide ORT arena, ``True`` each session its own, ``False`` none (malloc on every
    run); by default ``"shared"`` unless the policy's allocator is ``"system"``.
    ``cudnn_conv_algo_search``: by default ``"HEURISTIC"`` for baked sessions (an exhaustive
    search would be repeated at every rebuild), ``"EXHAUSTIVE"`` for the others.
    """

    policy: RuntimePolicy = DEFAULT_POLICY
    threads: int | None = None
    providers: Sequence[str | tuple[str, dict[str, Any]]] | None = None
    gpu_mem_limit: int | None = None
    cpu_arena: bool | Literal["shared"] | None = None
    cudnn_conv_algo_search: str | None = None
    #: ORT memory patterns: from its second run a session allocates one planned block per run
    #: instead of one buffer per tensor. Off by default: in the shared arena that block lands
    #: beside the per-tensor buffers of the first run and of the other shape classes, which
    #: the arena keeps, so every graph's peak is held about twice; off costs no measurable
    #: time (``benchmarks/tile_memory.py``, docs/memory-runtime.md).
    mem_pattern: bool = False
    #: growth of the shared CPU arena: ``"pow2"`` (kNextPowerOfTwo, each new region twice the
    #: last) or ``"same"`` (kSameAsRequested). Only the first registration in a process counts.
    arena_extend: Literal["same", "pow2"] = "pow2"
    #: bytes of the shared CPU arena's first region, or ``"auto"``: sized from the program's
    #: memory plan (:func:`~streamc.runtime.allocators.arena_reserve_for`); 0: ORT's default.
    #: ORT honours it only with ``arena_extend="pow2"``. Pages of the region no tensor used are
    #: never touched and cost no memory; one region that holds every run keeps the arena from
    #: spreading over several (ResNet-18 at 4096², one step: 1.23-1.24x the plan against
    #: 1.39x with kSameAsRequested regions, the same time; docs/memory.md). Only the first
    #: registration in a process counts.
    arena_reserve: int | Literal["auto"] = "auto"
    #: glibc's mmap threshold in bytes (see :func:`~streamc.runtime.allocators.tune_malloc`);
    #: by default :data:`SYSTEM_MMAP_THRESHOLD` with the policy's ``"system"`` allocator, else
    #: malloc is left alone.
    mmap_threshold: int | None = None
    #: call glibc's ``malloc_trim(0)`` after every graph run on CPU: returns the heap freed by
    #: released sessions, session builds and tile buffers to the OS (−0.15 GiB step peak at
    #: 2048²/tile 1024, −1.1 GiB at 1024²/tile 512 with 49 classes; no CPU cost measured).
    trim: bool = True
    #: shrink the CPU arena at the end of every graph run (ORT's
    #: ``memory.enable_memory_arena_shrinkage``): the chunks a run freed go back to the system.
    #: Measured at 4096²/tile 512: the step's peak is unchanged, what the process holds after
    #: the step halves, the step takes 1.2x as long (``benchmarks/results/arena_shrink.json``).
    shrink_arena: bool = False
    #: when ORT's intra-op threads spin-wait for work instead of sleeping: ``"run"`` while a run
    #: of their session goes on, stopping when it returns (ORT's ``session.force_spinning_stop``);
    #: ``"always"`` (ORT's default) also after it; ``"never"``. Every session has its own pool
    #: (a program has one session per shape class and pass), so with ``"always"`` the pools of
    #: the sessions that just ran take the cores from the one running now
    #: (``benchmarks/results/thread_spinning.json``).
    spin_threads: Literal["run", "always", "never"] = "run"

    @property
    def arena(self) -> bool | Literal["shared"]:
        """The CPU arena setting in effect (see ``cpu_arena``)."""
        if self.cpu_arena is not None:
            return self.cpu_arena
        return "shared" if self.policy.allocator == "arena" else False

    @property
    def malloc_threshold(self) -> int | None:
        """glibc's mmap threshold in effect (see ``mmap_threshold``)."""
        if self.mmap_threshold is not None:
            return self.mmap_threshold
        return SYSTEM_MMAP_THRESHOLD if self.policy.allocator == "system" else None
