"""ONNX Runtime sessions for a program's graphs, built the way the runtime policy says.

Weights reach a graph's session in one of two ways (:meth:`RuntimePolicy.bakes
<streamc.policy.RuntimePolicy.bakes>` chooses):

*baked* (weights as initializers)
    The parameter inputs of the graph are rewritten into *external initializers* and the
    session is built with ``SessionOptions.add_external_initializers`` holding a
    :class:`~streamc.runtime.weights.WeightSet`, a snapshot of the weights. ORT can then fold
    BatchNorm into the convs, fuse activations and pre-pack weights. The session belongs to
    one snapshot and is rebuilt when the weights change, i.e. once per optimizer step.
    (``SessionOptions.add_initializer`` is no use here: ORT refuses it for names that are graph
    inputs, and for a name that is an initializer of the graph it is ignored by constant folding
    and pre-packing under full optimization: the graph's own value is used. Checked on ORT 1.32.)
*fed* (weights as inputs)
    The weights are fed as graph inputs on every run: the session is built once and never
    rebuilt, but ORT cannot fold or pre-pack them.

Memory (CPU; docs/memory-runtime.md): all sessions share one ORT arena (unless the policy's
allocator is ``"system"``), with ORT's memory patterns off, constant folding only where the
policy allows it, and baked sessions freed once the pass that uses them is over (release steps,
:mod:`streamc.steps`). This module imports neither torch nor a backend: backends run sessions.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from streamc.errors import StreamcError
from streamc.program import Program
from streamc.runtime.allocators import (
    arena_reserve_for,
    malloc_trim,
    register_shared_cpu_arena,
    shared_arena_registered,
    tune_malloc,
)
from streamc.runtime.options import RuntimeOptions
from streamc.runtime.providers import (
    device_index,
    device_type,
    gpu_mem_limit,
    register_shared_cuda_arena,
    resolve_providers,
)
from streamc.runtime.weights import WeightSet

#: ONNX Runtime's GraphOptimizationLevel member for each policy level name.
ORT_LEVELS = {"all": "ORT_ENABLE_ALL", "extended": "ORT_ENABLE_EXTENDED",
           "basic": "ORT_ENABLE_BASIC", "none": "ORT_DISABLE_ALL"}


@dataclass
class Session:
    """A built session: the ORT session, the weight generation it is baked with (0: fed), its
    input names and its outputs' (shape, ORT type)."""

    session: Any
    generation: int
    inputs: list[str]
    outputs: dict[str, tuple[tuple[int | str | None, ...], str]]
    keep_alive: list[Any] = field(default_factory=list)


def graph_roles(program: Program) -> dict[str, str]:
    """``"forward"`` or ``"backward"`` of every graph a program runs."""
    meta = program.meta
    roles = {c.forward: "forward" for c in meta.classes}
    roles.update({c.backward: "backward" for c in meta.classes})
    roles.update({c.kept_forward: "forward" for c in meta.classes if c.kept_forward})
    roles.update({c.kept_backward: "backward" for c in meta.classes if c.kept_backward})
    roles[meta.head.forward] = "forward"
    roles[meta.head.backward] = "backward"
    for g in meta.globals:
        roles[g.forward] = "forward"
        roles[g.backward] = "backward"
    for graph in (meta.weight_work.prepare, meta.weight_work.layout):
        if graph:
            roles[graph] = "backward"
    return roles


class SessionPool:
    """Lazily built ORT sessions of a program's graphs.

    A graph has at most one baked session (for one :class:`WeightSet`, rebuilt for another) and
    one fed session (built once).
    """

    def __init__(self, program: Program, device: Any = "cpu",
                 options: RuntimeOptions | None = None) -> None:
        self.program = program
        self.options = options or RuntimeOptions()
        self.policy = self.options.policy
        self.device = device
        self.providers = {baked: resolve_providers(device, self.options, baked)
                          for baked in (True, False)}
        self._parameters = {p.name: p for p in program.meta.parameters}
        self._roles = graph_roles(program)
        self._sessions: dict[tuple[str, bool], Session] = {}
        self._stripped: dict[str, bytes] = {}
        self._lock = threading.Lock()
        self.builds = 0  # sessions built so far (for tests and benchmarks)
        self._run_options = None
        if self.options.shrink_arena and self.options.arena and device_type(device) == "cpu":
            import onnxruntime as ort

            self._run_options = ort.RunOptions()
            self._run_options.add_run_config_entry("memory.enable_memory_arena_shrinkage",
                                                   "cpu:0")
        threshold = self.options.malloc_threshold
        if threshold is not None and device_type(device) == "cpu":
            tune_malloc(threshold)

    @property
    def live(self) -> list[tuple[str, bool]]:
        """(graph, baked) of every session alive now."""
        return list(self._sessions)

    # -- building ------------------------------------------------------------------------------
    def _session_options(self, role: str):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.graph_optimization_level = getattr(ort.GraphOptimizationLevel,
                                              ORT_LEVELS[self.policy.level(role)])
        so.log_severity_level = 3
        so.enable_mem_pattern = bool(self.options.mem_pattern)
        if self.options.threads is not None:
            so.intra_op_num_threads = int(self.options.threads)
        spin = self.options.spin_threads
        so.add_session_config_entry("session.intra_op.allow_spinning",
                                    "0" if spin == "never" else "1")
        so.add_session_config_entry("session.force_spinning_stop", "1" if spin == "run" else "0")
        # Weights are allocated outside the arena: sessions are rebuilt once per step, and
        # their initializers would otherwise fragment the arena that the activations reuse.
        so.add_session_config_entry("session.use_device_allocator_for_initializers", "1")
        shared = False
        arena = self.options.arena
        if arena == "shared":
            if not shared_arena_registered("cpu"):
                reserve = self.options.arena_reserve
                if reserve == "auto":
                    reserve = arena_reserve_for(self._largest_graph_peak())
                register_shared_cpu_arena(self.options.arena_extend, reserve)
            so.enable_cpu_mem_arena = True
            shared = True
        else:
            so.enable_cpu_mem_arena = bool(arena)
        if device_type(self.device) == "cuda" and self.options.providers is None:
            shared = register_shared_cuda_arena(device_index(self.device),
                                                gpu_mem_limit(self.device, self.options)) \
                or shared
        if shared:
            so.add_session_config_entry("session.use_env_allocators", "1")
        return so

    def _largest_graph_peak(self) -> int:
        """The largest tile graph's planned peak: from the program's memory plan, else planned
        now (a program compiled without one; an inference program has none to plan: 0)."""
        plan = self.program.meta.memory_plan
        if not plan and self.program.meta.mode != "inference":
            from streamc.passes.memory import plan_program

            plan = plan_program(self.program, policy=self.policy).to_dict()
        if not plan:
            return 0
        return max(int(plan.get("backward_peak") or 0), int(plan.get("forward_peak") or 0))

    def _weight_inputs(self, relative: str) -> list[str]:
        """Parameter inputs of the graph that some node reads (ORT drops unread initializers
        while loading and then fails to find them for ``add_external_initializers``)."""
        graph = self.program.graphs[relative].graph
        used = {name for node in graph.node for name in node.input}
        used.update(o.name for o in graph.output)
        return [i.name for i in graph.input if i.name in self._parameters and i.name in used]

    def _stripped_bytes(self, relative: str) -> bytes:
        """The graph with its parameter inputs turned into external-data initializers."""
        if relative not in self._stripped:
            model = onnx.ModelProto()
            model.CopyFrom(self.program.graphs[relative])
            graph = model.graph
            names = set(self._weight_inputs(relative))
            kept = [i for i in graph.input if i.name not in self._parameters]
            del graph.input[:]
            graph.input.extend(kept)
            for k, name in enumerate(sorted(names)):
                spec = self._parameters[name]
                tensor = graph.initializer.add()
                tensor.name = name
                tensor.data_type = spec.elem_type
                tensor.dims.extend(spec.shape)
                tensor.data_location = onnx.TensorProto.EXTERNAL
                entry = tensor.external_data.add()
                entry.key, entry.value = "location", f"streamc-weight-{k}"
            self._stripped[relative] = model.SerializeToString()
        return self._stripped[relative]

    def _build(self, relative: str, weights: WeightSet | None, baked: bool) -> Session:
        import onnxruntime as ort

        role = self._roles.get(relative, "forward")
        so = self._session_options(role)
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
        disabled = None if self.policy.folds_constants(role) else ["ConstantFolding"]
        try:
            session = ort.InferenceSession(data, so, providers=self.providers[baked],
                                           disabled_optimizers=disabled)
        except Exception as exc:  # noqa: BLE001 - ORT raises its own exception types
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise StreamcError(
                f"ONNX Runtime could not load {relative} of the program: {first}"
            ) from None
        self.builds += 1
        outputs = {o.name: (tuple(o.shape), o.type) for o in session.get_outputs()}
        return Session(session, generation, [i.name for i in session.get_inputs()], outputs,
                       keep)

    def session(self, relative: str, weights: WeightSet | None, baked: bool) -> Session:
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
        only the fed one, ``None``: both)."""
        with self._lock:
            for key in [(relative, True), (relative, False)]:
                if baked is None or key[1] == baked:
                    self._sessions.pop(key, None)

    # -- running on the CPU ----------------------------------------------------------------------
    def run_cpu(self, session: Session, feeds: Mapping[str, np.ndarray],
                outputs: Sequence[str]) -> list[np.ndarray]:
        """Run a session on numpy arrays; give freed heap memory back when the options say so."""
        results = session.session.run(list(outputs), dict(feeds), self._run_options)
        if self.options.trim:
            malloc_trim()
        return results


def gather_inputs(session: Session, feeds: Mapping[str, Any], weights: WeightSet | None,
                  relative: str) -> dict[str, Any]:
    """The values of a session's inputs: from ``feeds``, else from the weights (fed sessions);
    ``feeds`` may hold more than the session reads."""
    inputs: dict[str, Any] = {}
    for name in session.inputs:
        if name in feeds:
            inputs[name] = feeds[name]
        elif weights is not None and name in weights.tensors:
            inputs[name] = weights.tensors[name]
        else:
            raise StreamcError(f"internal: no value for input {name!r} of {relative}")
    return inputs
