"""ONNX Runtime sessions for a program, and torch tensors in and out of them.

:class:`SessionPool` builds one ONNX Runtime session per program graph and runs it on torch
tensors: on CPU through zero-copy numpy views, on CUDA through IOBinding on the tensors'
``data_ptr()`` so that tiles, weights and gradients never leave the GPU (DESIGN section 7).

Weights reach a graph's session in one of two ways:

*baked* (weights as initializers)
    The parameter inputs of the graph are rewritten into *external initializers* and the
    session is built with ``SessionOptions.add_external_initializers`` holding a
    :class:`WeightSet`, a snapshot of the weights. ORT can then fold BatchNorm into the convs,
    fuse activations and pre-pack weights. The session belongs to one snapshot and is rebuilt
    when the weights change, i.e. once per optimizer step.
    (``SessionOptions.add_initializer`` is no use here: ORT refuses it for names that are graph
    inputs, and for a name that is an initializer of the graph it is ignored by constant folding
    and pre-packing under full optimization: the graph's own value is used. Checked on ORT 1.32.)
*fed* (weights as inputs)
    The weights are fed as graph inputs on every run: the session is built once and never
    rebuilt, but ORT cannot fold or pre-pack them.

:attr:`RuntimeOptions.weights` chooses: ``"initializers"`` bakes every graph, ``"inputs"``
none, and ``"auto"`` (default) bakes the forward graphs, and backward graphs that run at least
``auto_min_runs`` times per step when they are optimised (``backward_optimization`` other than
its default ``"none"``). Measured on ResNet-18, one thread, 512² and 1024² tiles
(``benchmarks/runtime_sessions.py``, CPU seconds): baking makes the forward graph 1.2x faster for
a 0.05 s rebuild, but a fully optimised backward graph only 1.07-1.09x faster for a 0.2-0.6 s
rebuild; an unoptimised one not at all.

Memory (CPU; measured in ``benchmarks/tile_memory.py``, docs/memory-runtime.md): all sessions
share one ORT arena, with ORT's memory patterns off (a patterned block beside the first run's
per-tensor buffers held every graph's peak twice), constant folding off in backward graphs (it
froze tile-sized zero tensors into every backward session), and baked sessions freed once the
pass that uses them is over (:meth:`SessionPool.release`, called by the engine).
"""

from __future__ import annotations

import itertools
import threading
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import onnx
import torch

from streamc.errors import StreamcError
from streamc.program import Program

WeightMode = Literal["auto", "initializers", "inputs"]

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


class DeviceError(StreamcError):
    """The requested device cannot be used: no GPU, or no CUDA build of ONNX Runtime."""


def torch_dtype_of_onnx(elem_type: int) -> torch.dtype:
    """The torch dtype of an ONNX ``TensorProto`` element type."""
    if elem_type not in _TORCH_OF_ONNX:
        raise StreamcError(
            f"ONNX element type {onnx.TensorProto.DataType.Name(elem_type)} is not supported by "
            "the streamc runtime."
        )
    return _TORCH_OF_ONNX[elem_type]


@dataclass(frozen=True)
class RuntimeOptions:
    """How sessions are built.

    ``weights``: ``"auto"``, ``"initializers"`` or ``"inputs"`` (see the module docstring);
    ``auto_min_runs``: runs per step from which ``"auto"`` bakes a backward graph.
    ``threads``: ORT intra-op threads, default ``torch.get_num_threads()``. ``providers``:
    explicit ORT providers (names or ``(name, options)`` pairs), overriding the device's
    defaults. ``gpu_mem_limit``: bytes
    ORT's CUDA arena may hold (default: half the GPU's memory, the rest is torch's); the arena is
    one process-wide ORT allocator shared by all sessions, so the bound holds for all of them.
    ``cpu_arena``: ``"shared"`` (default) gives every session one process-wide ORT arena, so
    memory is the peak of the largest graph, reused across tiles, classes and rebuilt sessions;
    ``True`` gives each session its own arena (each keeps its own peak: the runtime holds one
    session per tile class and direction); ``False`` allocates with malloc on every run.
    ``cudnn_conv_algo_search``: by default ``"HEURISTIC"`` for baked sessions (an exhaustive
    search would be repeated at every rebuild), ``"EXHAUSTIVE"`` for the others.
    """

    weights: WeightMode = "auto"
    auto_min_runs: int = 4
    threads: int | None = None
    providers: Sequence[str | tuple[str, dict[str, Any]]] | None = None
    gpu_mem_limit: int | None = None
    cpu_arena: bool | Literal["shared"] = "shared"
    cudnn_conv_algo_search: str | None = None
    optimization: Literal["all", "extended", "basic", "none"] = "all"
    #: ORT memory patterns: from its second run a session allocates one planned block per run
    #: instead of one buffer per tensor. Off by default: in the shared arena that block lands
    #: beside the per-tensor buffers of the first run and of the other shape classes, which
    #: the arena keeps, so every graph's peak is held about twice; off costs no measurable
    #: time (``benchmarks/tile_memory.py``, docs/memory-runtime.md).
    mem_pattern: bool = False
    #: growth of the shared CPU arena: ``"same"`` (kSameAsRequested) or ``"pow2"``
    #: (kNextPowerOfTwo). Only the first registration in a process counts.
    arena_extend: Literal["same", "pow2"] = "same"
    #: glibc malloc tuning (see :func:`tune_malloc`): ``None`` leaves malloc alone, else the
    #: mmap threshold in bytes (blocks at least this large are mmapped and go back to the OS
    #: when freed).
    mmap_threshold: int | None = None
    #: call glibc's ``malloc_trim(0)`` after every graph run on CPU: returns the heap freed by
    #: released sessions, session builds and tile buffers to the OS (−0.15 GiB step peak at
    #: 2048²/tile 1024, −1.1 GiB at 1024²/tile 512 with 49 classes; no CPU cost measured).
    trim: bool = True
    #: free baked sessions once the pass that uses them is over (forward sessions when the
    #: backward pass starts, a class's backward session after its last tile): they are
    #: rebuilt for the next optimizer step's weights anyway.
    release_sessions: bool = True
    #: graphs whose sessions run ORT's constant folding: ``"forward"`` (default), ``"all"`` or
    #: ``"none"``. In a backward graph it folds tile-sized constants (the zeros a MaxPool's
    #: ScatterElements writes into, padding blocks) into initializers that the session then
    #: holds for its lifetime, one set per shape class: 94 MiB per backward session at tile
    #: 1024, ~4x that at 2048 (docs/memory-runtime.md); computed at run time they cost
    #: nothing measurable.
    fold_constants: Literal["forward", "all", "none"] = "forward"
    #: ORT graph optimisation level of backward graphs (``optimization`` is the forward
    #: graphs'). ``"none"`` by default: on a ResNet-18 tile backward graph (4096²/tile 2048,
    #: class 0) ORT's basic-level rewrites (chiefly EliminateIdentity, which reorders the
    #: gradient branches) raised the run's peak from 1.6 to 2.4 GiB for the same CPU time;
    #: the recomputed activations are read by gradient ops, so little fuses anyway
    #: (docs/memory-runtime.md). At ``"none"`` baking gains nothing, so ``weights="auto"``
    #: feeds the weights of backward graphs (no rebuild per optimizer step).
    backward_optimization: Literal["all", "extended", "basic", "none"] = "none"


def check_cuda(device: torch.device) -> None:
    """Raise :class:`DeviceError` unless torch sees a GPU and ORT has the CUDA provider."""
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


def _device_index(device: torch.device) -> int:
    if device.type != "cuda":
        return 0
    return device.index if device.index is not None else torch.cuda.current_device()


def resolve_providers(device: torch.device, options: RuntimeOptions, baked: bool = True
                      ) -> list[str | tuple[str, dict[str, Any]]]:
    """ORT providers for ``device``: the CPU provider, or CUDA (bounded arena) then CPU."""
    if options.providers is not None:
        return list(options.providers)
    if device.type == "cpu":
        return ["CPUExecutionProvider"]
    if device.type != "cuda":
        raise DeviceError(f"device {device} is not supported: use 'cpu' or 'cuda'.")
    check_cuda(device)
    index = _device_index(device)
    limit = options.gpu_mem_limit
    if limit is None:  # half for ORT, the rest for torch
        limit = torch.cuda.get_device_properties(index).total_memory // 2
    search = options.cudnn_conv_algo_search or (
        "HEURISTIC" if baked else "EXHAUSTIVE")
    cuda_options = {
        "device_id": index,
        "gpu_mem_limit": int(limit),
        "arena_extend_strategy": "kSameAsRequested",
        "cudnn_conv_algo_search": search,
        "do_copy_in_default_stream": True,
    }
    return [("CUDAExecutionProvider", cuda_options), "CPUExecutionProvider"]


_GENERATIONS = itertools.count(1)


@dataclass
class WeightSet:
    """The weights one set of sessions is built for.

    ``tensors`` maps parameter names to detached tensors on the runtime's device (in
    ``"initializers"`` mode a private copy taken when the set was made, so that later in-place
    updates cannot reach sessions built from it). ``generation`` identifies the set.
    """

    tensors: dict[str, torch.Tensor]
    generation: int = field(default_factory=lambda: next(_GENERATIONS))
    #: (version counter, storage address) of each source tensor when the copy was taken.
    sources: dict[str, tuple[int, int]] = field(default_factory=dict, repr=False)
    _arrays: dict[str, np.ndarray] | None = field(default=None, repr=False)

    def arrays(self) -> dict[str, np.ndarray]:
        """CPU float32 numpy copies (cached): what ORT's external initializers point at."""
        if self._arrays is None:
            self._arrays = {
                name: np.ascontiguousarray(t.detach().cpu().numpy())
                for name, t in self.tensors.items()
            }
        return self._arrays


def snapshot_weights(tensors: Mapping[str, torch.Tensor], previous: WeightSet | None
                     ) -> WeightSet:
    """``previous`` if every tensor still holds the same values, else a fresh copy.

    A changed version counter or storage means a change (optimizers' in-place updates bump
    ``tensor._version``). Unchanged counters are not trusted: fused optimizers
    (``torch.optim.Adam(fused=True)``) and writes through ``.data`` change values without
    bumping them, so the values are then compared with the copy (one pass over the weights).
    """
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


@dataclass
class _Session:
    session: Any
    generation: int
    inputs: list[str]
    outputs: dict[str, tuple[tuple[int | str | None, ...], torch.dtype]]
    keep_alive: list[Any] = field(default_factory=list)


class SessionPool:
    """Lazily built ORT sessions of a program's graphs, run on torch tensors.

    A graph has at most one baked session (for one :class:`WeightSet`, rebuilt for another) and
    one fed session (built once); :meth:`bakes` says which one a run uses.
    """

    def __init__(self, program: Program, device: torch.device | str = "cpu",
                 options: RuntimeOptions | None = None) -> None:
        self.program = program
        self.options = options or RuntimeOptions()
        if self.options.weights not in ("auto", "initializers", "inputs"):
            raise StreamcError(f"weights={self.options.weights!r}: choose 'auto', "
                               "'initializers' or 'inputs'.")
        self.device = torch.device(device)
        self.providers = {baked: resolve_providers(self.device, self.options, baked)
                          for baked in (True, False)}
        self._parameters = {p["name"]: p for p in program.meta["parameters"]}
        self._backward_graphs = {c["backward"] for c in program.classes if c.get("backward")}
        head = program.meta.get("head") or {}
        if head.get("backward"):
            self._backward_graphs.add(head["backward"])
        self._sessions: dict[tuple[str, bool], _Session] = {}
        self._stripped: dict[str, bytes] = {}
        self._lock = threading.Lock()
        self.builds = 0  # sessions built so far (for tests and benchmarks)
        if self.options.mmap_threshold is not None and self.device.type == "cpu":
            tune_malloc(self.options.mmap_threshold)

    def bakes(self, backward: bool, runs: int = 1) -> bool:
        """Whether a graph (a backward one, run ``runs`` times per step) gets baked weights."""
        mode = self.options.weights
        if mode == "auto":
            return not backward or (runs >= self.options.auto_min_runs
                                    and self.options.backward_optimization != "none")
        return mode == "initializers"

    # -- building ------------------------------------------------------------------------------
    def _session_options(self, backward: bool = False):
        import onnxruntime as ort

        so = ort.SessionOptions()
        level = self.options.backward_optimization if backward else self.options.optimization
        so.graph_optimization_level = {
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        }[level]
        so.log_severity_level = 3
        so.enable_mem_pattern = bool(self.options.mem_pattern)
        so.intra_op_num_threads = int(self.options.threads or torch.get_num_threads())
        # Weights are allocated outside the arena: sessions are rebuilt once per step, and
        # their initializers would otherwise fragment the arena that the activations reuse.
        so.add_session_config_entry("session.use_device_allocator_for_initializers", "1")
        shared = False
        if self.options.cpu_arena == "shared":
            _register_shared_cpu_arena(self.options.arena_extend)
            so.enable_cpu_mem_arena = True
            shared = True
        else:
            so.enable_cpu_mem_arena = bool(self.options.cpu_arena)
        if self.device.type == "cuda" and self.options.providers is None:
            shared = _register_shared_cuda_arena(_device_index(self.device),
                                                 self._gpu_mem_limit()) or shared
        if shared:
            so.add_session_config_entry("session.use_env_allocators", "1")
        return so

    def _gpu_mem_limit(self) -> int:
        if self.options.gpu_mem_limit is not None:
            return int(self.options.gpu_mem_limit)
        return torch.cuda.get_device_properties(_device_index(self.device)).total_memory // 2

    def _weight_inputs(self, relative: str) -> list[str]:
        """Parameter inputs of the graph that some node reads (ORT drops unread initializers
        while loading and then fails to find them for ``add_external_initializers``)."""
        graph = self.program.graphs[relative].graph
        used = {name for node in graph.node for name in node.input}
        used.update(o.name for o in graph.output)
        return [i.name for i in graph.input if i.name in self._parameters and i.name in used]

    def _parameter_inputs(self, relative: str) -> set[str]:
        return {i.name for i in self.program.graphs[relative].graph.input
                if i.name in self._parameters}

    def _stripped_bytes(self, relative: str) -> bytes:
        """The graph with its parameter inputs turned into external-data initializers."""
        if relative not in self._stripped:
            model = onnx.ModelProto()
            model.CopyFrom(self.program.graphs[relative])
            graph = model.graph
            names = set(self._weight_inputs(relative))
            params = self._parameter_inputs(relative)  # unread ones are dropped
            kept = [i for i in graph.input if i.name not in params]
            del graph.input[:]
            graph.input.extend(kept)
            for k, name in enumerate(sorted(names)):
                spec = self._parameters[name]
                tensor = graph.initializer.add()
                tensor.name = name
                tensor.data_type = spec["elem_type"]
                tensor.dims.extend(spec["shape"])
                tensor.data_location = onnx.TensorProto.EXTERNAL
                entry = tensor.external_data.add()
                entry.key, entry.value = "location", f"streamc-weight-{k}"
            self._stripped[relative] = model.SerializeToString()
        return self._stripped[relative]

    def _build(self, relative: str, weights: WeightSet | None, baked: bool) -> _Session:
        import onnxruntime as ort

        so = self._session_options(backward=relative in self._backward_graphs)
        keep: list[Any] = []
        generation = 0
        if baked:
            if weights is None:
                raise StreamcError("internal: a weight set is needed to build this session")
            names = sorted(self._weight_inputs(relative))
            arrays = weights.arrays()
            values = [ort.OrtValue.ortvalue_from_numpy(arrays[n]) for n in names]
            if names:
                so.add_external_initializers(names, values)
            keep = [arrays, values]  # ORT may read these buffers for the session's lifetime
            data = self._stripped_bytes(relative)
            generation = weights.generation
        else:
            data = self.program.serialized(relative)
        fold = self.options.fold_constants
        disabled = [] if fold == "all" or (
            fold == "forward" and relative not in self._backward_graphs) else ["ConstantFolding"]
        try:
            session = ort.InferenceSession(data, so, providers=self.providers[baked],
                                           disabled_optimizers=disabled or None)
        except Exception as exc:  # ORT raises its own exception types
            raise StreamcError(
                f"ONNX Runtime could not load {relative} of the program: {exc}"
            ) from None
        self.builds += 1
        outputs = {o.name: (tuple(o.shape), _TORCH_OF_ORT_TYPE.get(o.type, torch.float32))
                   for o in session.get_outputs()}
        return _Session(session, generation, [i.name for i in session.get_inputs()], outputs,
                        keep)

    def session(self, relative: str, weights: WeightSet | None, baked: bool) -> _Session:
        """The session of graph ``relative``: baked with ``weights``, or fed (built once)."""
        with self._lock:
            key = (relative, baked)
            wanted = weights.generation if (baked and weights is not None) else 0
            current = self._sessions.get(key)
            if current is not None and current.generation == wanted:
                return current
            if current is not None:
                del self._sessions[key]  # free it before building its successor
                del current
            if wanted:
                # Sessions of older weight sets will not be asked for again (unless a backward
                # pass of an older forward comes, which rebuilds): free their memory now.
                for k in [k for k, s in self._sessions.items() if 0 < s.generation < wanted]:
                    del self._sessions[k]
            built = self._build(relative, weights, baked)
            self._sessions[key] = built
            return built

    def clear(self) -> None:
        """Drop every session (they are rebuilt on demand)."""
        with self._lock:
            self._sessions.clear()

    def release(self, relative: str, baked: bool | None = True) -> None:
        """Drop the session(s) of graph ``relative`` (``baked``: only the baked one, ``False``:
        only the fed one, ``None``: both). A baked session is rebuilt at every optimizer step
        anyway, so once the pass that uses it is over it only holds memory (its copy of the
        weights, their pre-packed forms, ORT's per-session buffers)."""
        with self._lock:
            for key in [(relative, True), (relative, False)]:
                if baked is None or key[1] == baked:
                    self._sessions.pop(key, None)

    # -- running -------------------------------------------------------------------------------
    def run(self, relative: str, weights: WeightSet | None, feeds: Mapping[str, torch.Tensor],
            outputs: Sequence[str], baked: bool = True) -> list[torch.Tensor]:
        """Run graph ``relative`` (``baked`` or fed weights, from ``weights``); ``feeds`` may
        hold more than it reads. Returns torch tensors on the pool's device."""
        entry = self.session(relative, weights, baked)
        inputs: dict[str, torch.Tensor] = {}
        for name in entry.inputs:
            if name in feeds:
                inputs[name] = feeds[name]
            elif weights is not None and name in weights.tensors:
                inputs[name] = weights.tensors[name]
            else:
                raise StreamcError(f"internal: no value for input {name!r} of {relative}")
        if self.device.type == "cuda":
            return self._run_cuda(entry, inputs, outputs)
        results = self._run_cpu(entry, inputs, outputs)
        if self.options.trim:
            malloc_trim()
        return results

    @staticmethod
    def _run_cpu(entry: _Session, inputs: Mapping[str, torch.Tensor], outputs: Sequence[str]
                 ) -> list[torch.Tensor]:
        feeds = {name: _numpy_view(t) for name, t in inputs.items()}
        results = entry.session.run(list(outputs), feeds)
        return [torch.from_numpy(np.ascontiguousarray(r)) for r in results]

    def _run_cuda(self, entry: _Session, inputs: Mapping[str, torch.Tensor],
                  outputs: Sequence[str]) -> list[torch.Tensor]:
        """IOBinding on torch's device memory: no host round trip for inputs or outputs."""
        index = _device_index(self.device)
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
            shape, dtype = entry.outputs[name]
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


_SHARED_ARENAS: dict[str, bool] = {}


def _register_shared_cpu_arena(extend: str = "same") -> None:
    """Register one process-wide CPU arena that every session opting in shares."""
    if "cpu" in _SHARED_ARENAS:
        return
    import onnxruntime as ort

    info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0,
                             ort.OrtMemType.DEFAULT)
    try:
        # max_mem 0 = unlimited, extend strategy 1 = kSameAsRequested (0 = kNextPowerOfTwo),
        # default chunk settings.
        strategy = 0 if extend == "pow2" else 1
        ort.create_and_register_allocator(info, ort.OrtArenaCfg(0, strategy, -1, -1))
    except Exception:  # noqa: BLE001 - e.g. the application registered one already: use it
        pass
    _SHARED_ARENAS["cpu"] = True


def _register_shared_cuda_arena(index: int, limit: int) -> bool:
    """Register one process-wide CUDA arena for GPU ``index``, bounded to ``limit`` bytes.

    Every session then allocates from it (``session.use_env_allocators``), so the bound holds
    for all of them together; a per-session ``gpu_mem_limit`` would bound each session alone.
    The first registration's limit stays for the process. Returns False (sessions keep their
    own bounded arenas) if this ORT build refuses it.
    """
    key = f"cuda:{index}"
    if key not in _SHARED_ARENAS:
        import onnxruntime as ort

        try:
            info = ort.OrtMemoryInfo("Cuda", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, index,
                                     ort.OrtMemType.DEFAULT)
            cfg = ort.OrtArenaCfg({"max_mem": int(limit), "arena_extend_strategy": 1})
            ort.create_and_register_allocator_v2("CUDAExecutionProvider", info,
                                                 {"device_id": str(index)}, cfg)
            _SHARED_ARENAS[key] = True
        except Exception as exc:  # ORT raises its own exception types
            warnings.warn(f"streamc: could not register a shared ONNX Runtime CUDA arena "
                          f"({exc}); each session keeps its own arena bounded to "
                          f"gpu_mem_limit.", stacklevel=3)
            _SHARED_ARENAS[key] = False
    return _SHARED_ARENAS[key]


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


def _numpy_view(t: torch.Tensor) -> np.ndarray:
    """A numpy view of a CPU tensor (a copy only when it is not contiguous).

    The copy is numpy's, single-threaded: torch's multi-threaded copy of a small crop costs
    more in thread wake-ups (ORT's pool has just been spinning) than it saves.
    """
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    return np.ascontiguousarray(t.numpy())


def _torch_from_ortvalue(value: Any, device: torch.device) -> torch.Tensor:
    try:
        return torch.from_dlpack(value._get_c_value().to_dlpack())
    except Exception:  # older ORT builds without DLPack export
        return torch.from_numpy(value.numpy()).to(device)
